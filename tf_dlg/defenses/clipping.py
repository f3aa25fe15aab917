"""Clipping: bound the update's global L2 norm (as in DP), or each entry's value.

* `Clipping(norm)`: scales the whole update by min(1, norm / ||update||_2) over all
  (non-excluded) tensors together -- `tf.clip_by_global_norm`, the clipping of DP-SGD
  and DP-FedAvg. An update already within the bound is returned unchanged.
* `RelativeClipping(clip_ratio)`: the same with the bound set relative to the update's
  own global norm, clip_ratio x ||update||_2, so that one setting means the same on
  any model's updates (an absolute norm found on one model's gradients is a no-op on
  another model's smaller updates). For one update this is a rescaling by clip_ratio;
  see the class for what that does and does not protect. In TFF,
  `tf_dlg.defenses.aggregator.median_clipping_factory` sets the bound relative to the
  median client update norm of the round instead, which does bound outlying clients.
* `ValueClipping(c)`: clips every entry to [-c, c] independently; this changes the
  update's direction, unlike norm clipping.

`clip_scale(tensors, norm)` (and every defence's `clip_scale(update)`) is the factor a
norm clipping applies: 1.0 when the update was not clipped.
"""

from __future__ import annotations

import tensorflow as tf

from tf_dlg.defenses import base


def clip_by_global_norm(tensors, norm: float):
  """The tensors scaled so that their joint L2 norm is at most `norm`."""
  clipped, _ = tf.clip_by_global_norm(list(tensors), norm)
  return clipped


def clip_scale(tensors, norm) -> tf.Tensor:
  """min(1, norm / ||tensors||_2) as float32: the factor `clip_by_global_norm` applies."""
  current = base.global_norm(list(tensors))
  norm = tf.cast(norm, tf.float32)
  return tf.where(current > norm, norm / tf.maximum(current, 1e-30), 1.0)


def clip_by_value(tensors, bound: float):
  return [tf.clip_by_value(t, -bound, bound) for t in tensors]


class Clipping(base.Defense):
  """Global L2-norm clipping to `norm` > 0."""

  name = "clipping"
  param_name = "norm"

  def __init__(self, norm: float, exclude=None):
    super().__init__(
      base.check_number("clipping norm", norm, 0.0, float("inf"), low_open=True, high_open=True),
      exclude,
    )

  def _apply(self, tensors, seed):
    return clip_by_global_norm(tensors, self.param)

  def clip_scale(self, update):
    return clip_scale(self.kept_tensors(update), self.param)


class RelativeClipping(base.Defense):
  """Global L2-norm clipping to clip_ratio x the update's own norm, ratio in (0, 1].

  On one update this multiplies it by `clip_ratio`: the direction, and so everything
  a cosine-distance attack (Inverting Gradients) matches, is untouched, and an attacker
  who knows the ratio undoes it exactly. What it changes is the update's scale, which
  a Euclidean gradient-matching attack (DLG / iDLG) must reproduce, and the server's
  step size. Its use is a clipping setting that transfers between models: the same
  ratio means the same relative change on any update. To bound clients against each
  other, clip relative to the round's median client norm
  (`tf_dlg.defenses.aggregator.median_clipping_factory`).
  """

  name = "clipping_ratio"
  param_name = "clip_ratio"

  def __init__(self, clip_ratio: float, exclude=None):
    super().__init__(base.check_number("clip_ratio", clip_ratio, 0.0, 1.0, low_open=True), exclude)

  def _apply(self, tensors, seed):
    # Clipping to ratio x ||update|| is exactly a multiplication by the ratio.
    return [t * tf.cast(self.param, t.dtype) for t in tensors]

  def clip_scale(self, update):
    # Exactly the ratio, except for an all-zero update, which no factor changes.
    nonzero = base.global_norm(self.kept_tensors(update)) > 0
    return tf.where(nonzero, tf.constant(self.param, tf.float32), 1.0)


class ValueClipping(base.Defense):
  """Element-wise clipping to [-bound, bound], bound > 0."""

  name = "value_clipping"
  param_name = "bound"

  def __init__(self, bound: float, exclude=None):
    super().__init__(
      base.check_number(
        "value clipping bound", bound, 0.0, float("inf"), low_open=True, high_open=True
      ),
      exclude,
    )

  def _apply(self, tensors, seed):
    return clip_by_value(tensors, self.param)
