"""The dataset type of tf-dlg and the array helpers every loader shares.

`ImageDataset` holds images as float32 in [0, 1], NHWC, integer labels, the class count,
a test split and a `source` naming where the pixels come from. `resize` and
`stratified_split` are the two operations loaders apply to them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

# The start of every tfds dataset's `source`; any other source is offline.
TFDS_SOURCE = "tensorflow_datasets"


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
    return not self.source.startswith(TFDS_SOURCE)

  def __repr__(self):
    test = 0 if self.x_test is None else len(self.x_test)
    return (
      f"ImageDataset(name={self.name!r}, train={len(self.x_train)}, test={test}, "
      f"shape={self.input_shape}, classes={self.num_classes}, source={self.source!r})"
    )


class DatasetUnavailableError(RuntimeError):
  """A dataset is neither installed, prepared in `data_dir` nor downloadable."""


def resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of [N, H, W, C] float images to [N, size, size, C], kept in [0, 1]."""
  import tensorflow as tf

  if images.shape[1:3] == (size, size):
    return images.astype(np.float32)
  out = tf.image.resize(images.astype(np.float32), (size, size), method="bilinear", antialias=True)
  return np.clip(out.numpy(), 0.0, 1.0).astype(np.float32)


def stratified_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
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


def split_dataset(name: str, source: str, x, y, seed: int, class_names) -> ImageDataset:
  """An `ImageDataset` of labelled images, split seeded and stratified 80/20."""
  x_tr, y_tr, x_te, y_te = stratified_split(x, y, 0.2, seed)
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
