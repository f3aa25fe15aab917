"""Clipping: bound the update's global L2 norm (as in DP), or each entry's value.

* `Clipping(norm)`: scales the whole update by min(1, norm / ||update||_2) over all
  (non-excluded) tensors together -- `tf.clip_by_global_norm`, the clipping of DP-SGD
  and DP-FedAvg. An update already within the bound is returned unchanged.
* `RelativeClipping(clip_ratio)`: the same with the bound set relative to the update's
  own global norm, clip_ratio x ||update||_2, so that one setting means the same on
  any model's updates (an absolute norm found on one model's gradients is a no-op on
  another model's smaller updates). For one update this is a rescaling by clip_ratio;
  see the class for what that does and does not protect. It is the same transform in
  the attack experiments, in TFF training and in Keras.
* `MedianClipping(clip_ratio)` (`clipping_median`): clip every client of a round to
  clip_ratio x the round's median client update norm, which does bound outlying
  clients. It exists only across a round's clients (TFF training, through
  `tf_dlg.federated.defense_aggregator.median_clipping_factory`): a single update, which is what
  the attack experiments defend, cannot express it, so it is not searched.
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


def _setting(param, dtype):
  """A parameter in the tensors' dtype when it is a runtime (float64 tensor) setting."""
  return tf.cast(param, dtype) if isinstance(param, tf.Tensor) else param


class Clipping(base.Defense):
  """Global L2-norm clipping to `norm` > 0."""

  name = "clipping"
  param_name = "norm"
  clips = True

  @staticmethod
  def check(norm):
    return base.check_number(
      "clipping norm", norm, 0.0, float("inf"), low_open=True, high_open=True
    )

  def _apply(self, tensors, param, seed):
    return clip_by_global_norm(tensors, _setting(param, tensors[0].dtype))

  def _clip_scale(self, tensors, param):
    return clip_scale(tensors, param)


class RelativeClipping(base.Defense):
  """Global L2-norm clipping to clip_ratio x the update's own norm, ratio in (0, 1].

  On one update this multiplies it by `clip_ratio`: the direction, and so everything
  a cosine-distance attack (Inverting Gradients) matches, is untouched, and an attacker
  who knows the ratio undoes it exactly. What it changes is the update's scale, which
  a Euclidean gradient-matching attack (DLG / iDLG) must reproduce, and the server's
  step size. Its use is a clipping setting that transfers between models: the same
  ratio means the same relative change on any update. To bound clients against each
  other, clip relative to the round's median client norm (`MedianClipping`).
  """

  name = "clipping_ratio"
  param_name = "clip_ratio"
  clips = True

  @staticmethod
  def check(clip_ratio):
    return base.check_number("clip_ratio", clip_ratio, 0.0, 1.0, low_open=True)

  def _apply(self, tensors, param, seed):
    # Clipping to ratio x ||update|| is exactly a multiplication by the ratio.
    return [t * tf.cast(param, t.dtype) for t in tensors]

  def _clip_scale(self, tensors, param):
    # Exactly the ratio, except for an all-zero update, which no factor changes.
    nonzero = base.global_norm(tensors) > 0
    return tf.where(nonzero, tf.cast(param, tf.float32), 1.0)


class MedianClipping(base.Defense):
  """Clipping to clip_ratio x the round's median client norm, ratio in (0, 1].

  The bound depends on the other clients of the round, so this object only carries the
  setting; TFF training applies it (`tf_dlg.federated.defense_aggregator`). Called on one
  update it raises.
  """

  name = "clipping_median"
  param_name = "clip_ratio"
  clips = True
  single_update = False

  @staticmethod
  def check(clip_ratio):
    return base.check_number("clip_ratio", clip_ratio, 0.0, 1.0, low_open=True)

  def _apply(self, tensors, param, seed):
    raise ValueError(
      "clipping_median clips against the median client norm of a round, which a single "
      "update does not have: it runs only in federated training (use clipping_ratio to "
      "rescale one update)."
    )


class ValueClipping(base.Defense):
  """Element-wise clipping to [-bound, bound], bound > 0."""

  name = "value_clipping"
  param_name = "bound"

  @staticmethod
  def check(bound):
    return base.check_number(
      "value clipping bound", bound, 0.0, float("inf"), low_open=True, high_open=True
    )

  def _apply(self, tensors, param, seed):
    return clip_by_value(tensors, _setting(param, tensors[0].dtype))
