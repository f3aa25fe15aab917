"""Clipping: bound the update's global L2 norm (as in DP), or each entry's value.

* `Clipping(norm)`: scales the whole update by min(1, norm / ||update||_2) over all
  (non-excluded) tensors together -- `tf.clip_by_global_norm`, the clipping of DP-SGD
  and DP-FedAvg. An update already within the bound is returned unchanged.
* `ValueClipping(c)`: clips every entry to [-c, c] independently; this changes the
  update's direction, unlike norm clipping.
"""

from __future__ import annotations

import tensorflow as tf

from tf_dlg.defenses import base


def clip_by_global_norm(tensors, norm: float):
  """The tensors scaled so that their joint L2 norm is at most `norm`."""
  clipped, _ = tf.clip_by_global_norm(list(tensors), norm)
  return clipped


def clip_by_value(tensors, bound: float):
  return [tf.clip_by_value(t, -bound, bound) for t in tensors]


class Clipping(base.Defense):
  """Global L2-norm clipping to `norm` > 0."""

  name = "clipping"
  param_name = "norm"

  def __init__(self, norm: float, exclude=None):
    super().__init__(base.check_number("clipping norm", norm, 0.0, float("inf"),
                                       low_open=True, high_open=True), exclude)

  def _apply(self, tensors, seed):
    return clip_by_global_norm(tensors, self.param)


class ValueClipping(base.Defense):
  """Element-wise clipping to [-bound, bound], bound > 0."""

  name = "value_clipping"
  param_name = "bound"

  def __init__(self, bound: float, exclude=None):
    super().__init__(base.check_number("value clipping bound", bound, 0.0, float("inf"),
                                       low_open=True, high_open=True), exclude)

  def _apply(self, tensors, seed):
    return clip_by_value(tensors, self.param)
