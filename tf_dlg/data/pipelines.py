"""The per-client `tf.data` pipelines that TFF simulations and the Flower engine consume."""

from __future__ import annotations

import collections
import contextlib
from typing import Sequence

import numpy as np

from tf_dlg import validation


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
  with _op_seeds_only():
    for i, idx in enumerate(parts):
      ds = tf.data.Dataset.from_tensor_slices(
        collections.OrderedDict(x=x[idx].astype(np.float32), y=y[idx].astype(np.int64))
      )
      if shuffle:
        ds = ds.shuffle(max(len(idx), 1), seed=seed + i, reshuffle_each_iteration=True)
      out.append(ds.repeat(epochs).batch(batch_size))
  return out


@contextlib.contextmanager
def _op_seeds_only():
  """Builds datasets as if no global seed were set, then restores the caller's.

  tf.data mixes the global seed (`tf.random.set_seed`, `tf.keras.utils.set_random_seed`)
  into an op's seed: a process that had set one shuffled its clients' data in another
  order and trained to other numbers than a fresh process (seen in the test suite).
  TensorFlow has no public switch for this; the eager context's `_seed` (TF 2.14 and
  2.21) is what `random_seed.get_seed` reads. The op seeds alone give the order a fresh
  process always had, so no earlier result moves.
  """
  from tensorflow.python.eager import context

  ctx = context.context()
  saved = ctx._seed
  ctx._seed = None
  try:
    yield
  finally:
    ctx._seed = saved
