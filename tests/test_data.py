"""Tests of the dataset registry, offline real images, tfds path and client partitions."""

import collections

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tf_dlg import data

EXPECTED = {
    # name: (shape, classes, min train+test)
    "digits": ((28, 28, 1), 10, 1797),
    "lfw_subset": ((32, 32, 1), 2, 200),
    "photos": ((32, 32, 3), 8, 200),
}


def _neighbour_correlation(images):
  """Mean correlation of horizontally adjacent pixels, per image."""
  a = images[:, :, :-1, :].reshape(len(images), -1)
  b = images[:, :, 1:, :].reshape(len(images), -1)
  a = a - a.mean(axis=1, keepdims=True)
  b = b - b.mean(axis=1, keepdims=True)
  denom = np.sqrt((a * a).sum(1) * (b * b).sum(1)) + 1e-12
  return (a * b).sum(1) / denom


@pytest.mark.parametrize("name", data.OFFLINE_DATASETS)
def test_offline_dataset_shapes_range_classes(name):
  shape, classes, total = EXPECTED[name]
  ds = data.load_dataset(name)
  assert ds.name == name and ds.offline
  assert ds.input_shape == shape
  assert ds.num_classes == classes
  assert len(ds.x_train) + len(ds.x_test) >= total
  assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
  for x in (ds.x_train, ds.x_test):
    assert x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
  for y in (ds.y_train, ds.y_test):
    assert y.dtype == np.int64
    assert set(np.unique(y)) == set(range(classes))
  assert ds.source and "offline stand-in" in ds.source


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
  with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'.*digits"):
    data.load_dataset("imagenet")


def test_tfds_path_with_mock_data():
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_dataset("mnist", download=False)
  assert ds.input_shape == (28, 28, 1)
  assert ds.num_classes == 10
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
  with pytest.raises(data.DatasetUnavailableError, match=r"digits.*data_dir"):
    data.load_dataset("mnist", data_dir=str(tmp_path), download=False)


# --------------------------------------------------------------------------- partitions

LABELS = data.load_dataset("digits").y_train


def _check_cover(parts, n):
  joined = np.concatenate(parts)
  assert len(joined) == n and len(np.unique(joined)) == n


def test_iid_partition_is_balanced_and_covers():
  parts = data.partition(LABELS, 10, "iid", seed=0)
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 1
  _check_cover(parts, len(LABELS))
  # IID: each client sees (almost) every class.
  assert all(len(np.unique(LABELS[p])) >= 9 for p in parts)


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not():
  def skew(alpha):
    parts = data.partition(LABELS, 10, "dirichlet", alpha=alpha, seed=0)
    _check_cover(parts, len(LABELS))
    # Mean share of each client's most common label.
    return np.mean([np.bincount(LABELS[p]).max() / len(p) for p in parts])
  assert skew(0.1) > 0.5
  assert skew(100.0) < 0.2


def test_shards_give_exactly_k_classes_per_client():
  for k in (1, 2, 3):
    parts = data.partition(LABELS, 10, "shards", classes_per_client=k, seed=1)
    assert [len(np.unique(LABELS[p])) for p in parts] == [k] * 10
    _check_cover(parts, len(LABELS))


@pytest.mark.parametrize("scheme", data.PARTITION_SCHEMES)
def test_same_seed_same_split_other_seed_other_split(scheme):
  a = data.partition(LABELS, 7, scheme, seed=5)
  b = data.partition(LABELS, 7, scheme, seed=5)
  c = data.partition(LABELS, 7, scheme, seed=6)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_clients=0, scheme="iid"), r"num_clients=0 must be an integer in \[1, "),
    (dict(num_clients=10**6, scheme="iid"), r"num_clients=1000000"),
    (dict(num_clients=5, scheme="dirichlet", alpha=0.0), r"alpha=0.0 must be"),
    (dict(num_clients=5, scheme="dirichlet", alpha=float("nan")), r"alpha=nan"),
    (dict(num_clients=5, scheme="shards", classes_per_client=11), r"classes_per_client=11 .*\[1, 10\]"),
    (dict(num_clients=5, scheme="shards", classes_per_client=0), r"classes_per_client=0"),
    (dict(num_clients=5, scheme="pathological"), r"Unknown partition scheme 'pathological'"),
])
def test_partition_errors_name_the_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.partition(LABELS, **kwargs)


def test_client_datasets_yield_model_input_structure():
  ds = data.load_dataset("digits")
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
