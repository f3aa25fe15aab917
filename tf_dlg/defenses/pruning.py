"""Magnitude pruning: zero the `rate` fraction of entries with the smallest magnitude.

`per_tensor` (default) prunes floor(rate * size) entries of every tensor separately, as
DLG's paper pruned per layer; it keeps every layer's largest entries, so no layer is
silenced because another layer's values are larger. `global` ranks all entries of the
update together. Sparsity is exact: ties are broken by position, never by keeping more.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tf_dlg.defenses import base

SCOPES = ("per_tensor", "global")


def _prune_flat(flat: tf.Tensor, rate) -> tf.Tensor:
  n = flat.shape.num_elements()
  if isinstance(rate, tf.Tensor):  # a runtime setting: the same count, computed in float64
    k = tf.cast(tf.floor(tf.round(tf.cast(rate, tf.float64) * n * 1e6) / 1e6), tf.int32)
    smallest = tf.argsort(tf.abs(flat), stable=True)[:k]
    return tf.tensor_scatter_nd_update(flat, smallest[:, None], tf.zeros([k], flat.dtype))
  # floor(rate * n), static (shapes are known in every caller). Rounded first so that
  # float error does not lose an entry: 0.29 * 100 is 28.999999999999996 in binary.
  k = int(math.floor(round(rate * n, 6)))
  if k == 0:
    return flat
  smallest = tf.argsort(tf.abs(flat), stable=True)[:k]
  return tf.tensor_scatter_nd_update(flat, smallest[:, None], tf.zeros([k], flat.dtype))


def prune_by_magnitude(tensors, rate: float, scope: str = "per_tensor"):
  """Zeroes the `rate` fraction of smallest-magnitude entries (pure TF)."""
  if scope == "per_tensor":
    return [tf.reshape(_prune_flat(tf.reshape(t, [-1]), rate), tf.shape(t)) for t in tensors]
  if scope == "global":
    return base.split_like(_prune_flat(base.concat_flat(tensors), rate), tensors)
  raise ValueError(f"scope={scope!r} must be one of {', '.join(SCOPES)}.")


class Pruning(base.Defense):
  """Magnitude pruning of a `rate` in [0, 1) of the entries; `scope` per_tensor|global."""

  name = "pruning"
  param_name = "rate"
  option_names = ("scope",)

  def __init__(self, rate: float, exclude=None, scope: str = "per_tensor"):
    super().__init__(rate, exclude)
    if scope not in SCOPES:
      raise ValueError(f"scope={scope!r} must be one of {', '.join(SCOPES)}.")
    self.scope = scope

  @staticmethod
  def check(rate):
    return base.check_number("pruning rate", rate, 0.0, 1.0, high_open=True)

  def _apply(self, tensors, param, seed):
    return prune_by_magnitude(tensors, param, self.scope)
