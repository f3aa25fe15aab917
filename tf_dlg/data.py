"""Datasets and federated client partitions for tf-dlg.

One registry, one call: `load_dataset(name)` returns an `ImageDataset` with images as
float32 in [0, 1], NHWC, integer labels, the class count, and a test split.

Two kinds of data are registered:

* **tfds** (`mnist`, `cifar10`, `lfw`): the paper's datasets, loaded with
  `tensorflow_datasets`. They need a network or a prepared `data_dir`.
* **offline** (`digits`, `lfw_subset`, `photos`): real images that installed packages
  ship, so that tests, demos and CI run with no network. Every `ImageDataset` carries a
  `source` string naming where its pixels come from; experiments print it in every
  output so that a stand-in is never mistaken for the paper's data.

Client partitions (`partition`) are deterministic per seed: IID, Dirichlet(alpha) over
labels, and k-classes-per-client shards. `client_datasets` turns them into the
per-client `tf.data.Dataset`s that TFF simulations consume.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

OFFLINE_DATASETS = ("digits", "lfw_subset", "photos")
TFDS_DATASETS = ("mnist", "cifar10", "lfw")
PARTITION_SCHEMES = ("iid", "dirichlet", "shards")

# The paper's datasets and the offline images that stand in for them here.
OFFLINE_STAND_IN = {"mnist": "digits", "cifar10": "photos", "lfw": "lfw_subset"}


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
    return self.name in OFFLINE_DATASETS

  def __repr__(self):
    test = 0 if self.x_test is None else len(self.x_test)
    return (f"ImageDataset(name={self.name!r}, train={len(self.x_train)}, test={test}, "
            f"shape={self.input_shape}, classes={self.num_classes}, source={self.source!r})")


class DatasetUnavailableError(RuntimeError):
  """A tfds dataset is neither prepared in `data_dir` nor downloadable."""


# --------------------------------------------------------------------------- helpers


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of [N, H, W, C] float images to [N, size, size, C], kept in [0, 1]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if images.shape[1:3] == (size, size):
    return images.astype(np.float32)
  out = tf.image.resize(images.astype(np.float32), (size, size), method="bilinear",
                        antialias=True)
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


def _load_digits(seed: int) -> ImageDataset:
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]
  x = _resize(x, 28)
  y = digits.target.astype(np.int64)
  x_tr, y_tr, x_te, y_te = _split(x, y, 0.2, seed)
  return ImageDataset(
      name="digits",
      source=("sklearn.datasets.load_digits: 1,797 real 8x8 handwritten digits, "
              "upsampled to 28x28 (offline stand-in for MNIST)"),
      x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_classes=10,
      class_names=[str(i) for i in range(10)])


def _load_lfw_subset(seed: int) -> ImageDataset:
  from skimage import data as sk_data  # pylint: disable=g-import-not-at-top
  faces = sk_data.lfw_subset().astype(np.float32)  # [200, 25, 25]: 100 faces, 100 non-faces
  x = _resize(faces[..., None], 32)
  y = np.array([1] * 100 + [0] * 100, dtype=np.int64)
  x_tr, y_tr, x_te, y_te = _split(x, y, 0.2, seed)
  return ImageDataset(
      name="lfw_subset",
      source=("skimage.data.lfw_subset: 200 real 25x25 grey LFW crops (100 faces, 100 "
              "non-faces), resized to 32x32 (offline stand-in for LFW)"),
      x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_classes=2,
      class_names=["non-face", "face"])


# Colour photos bundled inside scikit-image (no download needed).
PHOTO_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                 "hubble_deep_field", "retina", "colorwheel")
PHOTO_CROPS_PER_SOURCE = 40
_PHOTO_SHORT_SIDE = 128  # photos are downscaled first, so a 32x32 crop shows an object part


def _load_photos(seed: int) -> ImageDataset:
  """A fixed, seeded set of 32x32 crops of skimage's colour photos, labelled by photo."""
  from skimage import data as sk_data  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # The crop set itself is fixed (seed 1234) so that "photo #i" means the same image in
  # every run; `seed` only changes the train/test split.
  rng = np.random.default_rng(1234)
  crops, labels = [], []
  for label, name in enumerate(PHOTO_SOURCES):
    img = getattr(sk_data, name)()
    img = np.asarray(img)[..., :3].astype(np.float32) / 255.0
    h, w = img.shape[:2]
    scale = _PHOTO_SHORT_SIDE / min(h, w)
    img = tf.image.resize(img, (int(round(h * scale)), int(round(w * scale))),
                          antialias=True).numpy()
    h, w = img.shape[:2]
    for _ in range(PHOTO_CROPS_PER_SOURCE):
      top, left = rng.integers(0, h - 32 + 1), rng.integers(0, w - 32 + 1)
      crops.append(img[top:top + 32, left:left + 32])
      labels.append(label)
  x = np.clip(np.stack(crops), 0.0, 1.0).astype(np.float32)
  y = np.asarray(labels, dtype=np.int64)
  x_tr, y_tr, x_te, y_te = _split(x, y, 0.2, seed)
  return ImageDataset(
      name="photos",
      source=(f"skimage.data colour photos ({', '.join(PHOTO_SOURCES)}): "
              f"{len(x)} seeded 32x32 crops labelled by source photo "
              "(offline stand-in for CIFAR-10)"),
      x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
      num_classes=len(PHOTO_SOURCES), class_names=list(PHOTO_SOURCES))


# --------------------------------------------------------------------------- tfds

_TFDS_SPECS = {
    # name: (tfds name, train split, test split, image size or None to keep)
    "mnist": ("mnist", "train", "test", None),
    "cifar10": ("cifar10", "train", "test", None),
    # LFW has one split and 250x250 colour images; the paper attacks 32x32 crops.
    "lfw": ("lfw", "train", None, 32),
}


def _load_tfds(name: str, data_dir: Optional[str], download: bool, seed: int,
               max_examples: Optional[int]) -> ImageDataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_name, train_split, test_split, size = _TFDS_SPECS[name]
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if download:
      builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetUnavailableError(_unavailable_message(name, data_dir, e)) from e
  def read(split):
    if split is None:
      return None, None
    if max_examples:
      split = f"{split}[:{int(max_examples)}]"
    try:
      ds = builder.as_dataset(split=split, as_supervised=False)
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetUnavailableError(_unavailable_message(name, data_dir, e)) from e
    images, labels = [], []
    for ex in tfds.as_numpy(ds):
      images.append(ex["image"])
      labels.append(ex["label"])
    return np.stack(images), labels

  x_tr, y_tr = read(train_split)
  x_te, y_te = read(test_split)
  info = builder.info
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
    num_classes = info.features["label"].num_classes
    class_names = list(info.features["label"].names)
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
      name=name, source=f"tensorflow_datasets '{tfds_name}' (data_dir={data_dir or 'default'})",
      x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_classes=num_classes,
      class_names=class_names)


def _unavailable_message(name: str, data_dir: Optional[str], error: Exception) -> str:
  return (f"tfds dataset {name!r} is not available in data_dir={data_dir or '~/tensorflow_datasets'} "
          f"and could not be downloaded ({type(error).__name__}: {str(error)[:200]}). "
          f"Without a network use an offline dataset: {', '.join(OFFLINE_DATASETS)} "
          f"({OFFLINE_STAND_IN[name]!r} stands in for {name!r}). To prepare tfds data, run "
          f"`python -c \"import tensorflow_datasets as tfds; tfds.load('{_TFDS_SPECS[name][0]}', "
          f"data_dir='DIR')\"` on a machine with a network and pass --data_dir=DIR.")


# --------------------------------------------------------------------------- registry

_OFFLINE_LOADERS: Dict[str, Callable[[int], ImageDataset]] = {
    "digits": _load_digits,
    "lfw_subset": _load_lfw_subset,
    "photos": _load_photos,
}

DATASETS = OFFLINE_DATASETS + TFDS_DATASETS


@functools.lru_cache(maxsize=16)
def _load_offline_cached(name: str, seed: int) -> ImageDataset:
  return _OFFLINE_LOADERS[name](seed)


def load_dataset(name: str, data_dir: Optional[str] = None, download: bool = True,
                 seed: int = 0, max_examples: Optional[int] = None) -> ImageDataset:
  """Loads a dataset by registry name.

  Args:
    name: One of `DATASETS`: offline `digits`, `lfw_subset`, `photos`, or tfds `mnist`,
      `cifar10`, `lfw`.
    data_dir: tfds data directory (tfds datasets only).
    download: Whether tfds may download and prepare missing data.
    seed: Seed of the train/test split of datasets that ship without one.
    max_examples: Read at most this many examples per split (tfds datasets only).

  Returns:
    An `ImageDataset`.

  Raises:
    ValueError: `name` is not registered.
    DatasetUnavailableError: a tfds dataset is missing and cannot be downloaded.
  """
  if not isinstance(name, str) or name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; expected one of {', '.join(DATASETS)} "
                     f"(offline: {', '.join(OFFLINE_DATASETS)}).")
  if name in _OFFLINE_LOADERS:
    return _load_offline_cached(name, int(seed))
  return _load_tfds(name, data_dir, download, int(seed), max_examples)


# --------------------------------------------------------------------------- partitions


def _check_num_clients(num_clients, n):
  if not isinstance(num_clients, (int, np.integer)) or isinstance(num_clients, bool) \
      or not 1 <= num_clients <= n:
    raise ValueError(f"num_clients={num_clients!r} must be an integer in [1, {n}] "
                     f"(the number of examples).")


def partition(labels: np.ndarray, num_clients: int, scheme: str = "iid", *,
              alpha: float = 0.5, classes_per_client: int = 2, seed: int = 0,
              min_size: int = 1) -> List[np.ndarray]:
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
  _check_num_clients(num_clients, n)
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)

  if scheme == "iid":
    parts = np.array_split(rng.permutation(n), num_clients)

  elif scheme == "dirichlet":
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
      raise ValueError(f"alpha={alpha!r} must be a finite number > 0 (Dirichlet concentration).")
    if min_size * num_clients > n:
      raise ValueError(f"min_size={min_size} x num_clients={num_clients} exceeds {n} examples.")
    for _ in range(1000):
      buckets = [[] for _ in range(num_clients)]
      for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
          buckets[client].extend(chunk.tolist())
      if min(len(b) for b in buckets) >= min_size:
        break
    else:
      raise ValueError(f"Could not draw a Dirichlet(alpha={alpha}) split giving each of "
                       f"{num_clients} clients >= {min_size} examples; raise alpha or lower "
                       f"num_clients.")
    parts = [np.asarray(b, dtype=np.int64) for b in buckets]

  elif scheme == "shards":
    k = classes_per_client
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= len(classes):
      raise ValueError(f"classes_per_client={k!r} must be an integer in [1, {len(classes)}] "
                       f"(the number of classes present).")
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
        raise ValueError(f"Class {c} has {len(idx)} examples, fewer than the {len(owners)} "
                         f"clients that must hold it; lower num_clients or classes_per_client.")
      for client, chunk in zip(owners, np.array_split(idx, len(owners))):
        buckets[client].extend(chunk.tolist())
    parts = [np.asarray(b, dtype=np.int64) for b in buckets]

  else:
    raise ValueError(f"Unknown partition scheme {scheme!r}; expected one of "
                     f"{', '.join(PARTITION_SCHEMES)}.")
  return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def client_datasets(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray], *,
                    batch_size: int = 20, epochs: int = 1, shuffle: bool = True,
                    seed: int = 0):
  """Per-client `tf.data.Dataset`s of `OrderedDict(x=images, y=labels)` batches.

  The element structure matches `tf_dlg.models.input_spec`, the spec that
  `tff.learning.models.from_keras_model` expects.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")
  if not isinstance(epochs, (int, np.integer)) or epochs < 1:
    raise ValueError(f"epochs={epochs!r} must be an integer >= 1.")
  out = []
  for i, idx in enumerate(parts):
    ds = tf.data.Dataset.from_tensor_slices(
        collections.OrderedDict(x=x[idx].astype(np.float32), y=y[idx].astype(np.int64)))
    if shuffle:
      ds = ds.shuffle(max(len(idx), 1), seed=seed + i, reshuffle_each_iteration=True)
    out.append(ds.repeat(epochs).batch(batch_size))
  return out
