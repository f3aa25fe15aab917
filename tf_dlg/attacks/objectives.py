"""Attack objectives: how far a dummy update is from the observed one.

Small interchangeable classes (breaching style). Each maps a batch of candidate updates
and observed updates (lists of [A, ...] tensors, one per trainable variable, leading
attack axis) to a per-attack *matching distance* [A], plus an optional image prior.
The optimiser minimises `distance + regularizer`; an attack stops when the distance
alone falls below the objective's `tolerance`.

* `EuclideanMatching` (DLG/iDLG): squared L2 distance summed over all variables; stops
  at a distance relative to the observed update's squared norm.
* `CosineMatching` (Inverting Gradients, Geiping et al. 2020): 1 - cosine similarity
  of the concatenated updates, plus `tv_weight` x total variation of the image.
  Scale-invariant, so it sees through norm clipping and uniform rescaling.
* `MaskedCosineMatching`: cosine over the coordinates that are not exactly zero in the
  observed update; zeroed coordinates (masking, pruning) carry no information, and
  matching them to zero would pull the reconstruction away from the true image.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Type

import numpy as np
import tensorflow as tf


def _flat(tensors: List[tf.Tensor]) -> tf.Tensor:
  a = tf.shape(tensors[0])[0]
  return tf.concat([tf.reshape(t, [a, -1]) for t in tensors], axis=1)


def total_variation(images: tf.Tensor) -> tf.Tensor:
  """Mean absolute difference of neighbouring pixels per attack; images [A, N, H, W, C]."""
  dh = tf.abs(images[:, :, 1:, :, :] - images[:, :, :-1, :, :])
  dw = tf.abs(images[:, :, :, 1:, :] - images[:, :, :, :-1, :])
  return tf.reduce_mean(dh, axis=[1, 2, 3, 4]) + tf.reduce_mean(dw, axis=[1, 2, 3, 4])


class Objective:
  """Base class: `distance(update, observed) -> [A]`, `regularizer(images) -> [A]`."""

  name = "objective"
  tolerance = 1e-6

  def distance(self, update, observed) -> tf.Tensor:
    raise NotImplementedError

  def regularizer(self, images) -> tf.Tensor:
    return tf.zeros(tf.shape(images)[:1], images.dtype)

  def stop_threshold(self, observed: List[np.ndarray]) -> float:
    """The distance below which an attack on `observed` (one update) has converged."""
    return self.tolerance

  def get_config(self) -> Dict:
    return {"name": self.name, "tolerance": self.tolerance}


class EuclideanMatching(Objective):
  """DLG's squared L2 distance between updates.

  Stop rule (`relative=True`, default): distance < `tolerance` x ||observed||^2 (default
  1e-8), in the observed update's own units, so it means the same for a colour image, a
  clipped update or a confident model. The previous rule also capped it at an absolute
  1e-6 (`cap`; `STOP_RULES["capped"]`), which bound above squared norms of 100, i.e. on
  every undefended LeNet gradient here (~1.5e2-7e2): 1.4e-9-7e-9 relative. Measured on
  undefended iDLG (attack LeNet), colour crops reach SSIM 0.9 at 2e-8-1.3e-7 relative and
  0.99 at 3e-9-2e-8, and L-BFGS descends slowly there (x10 in distance per ~1,000
  iterations): under the cap they ran 2,700-4,000 iterations and one ran to the 4,000 cap
  at SSIM 0.992. At 1e-8 they stop at SSIM ~0.96-0.99; grey images cross the whole range
  within a few dozen iterations. Never tighter than the capped rule.
  `relative=False`: distance < `tolerance` (absolute).
  """

  name = "euclidean"

  def __init__(self, tolerance: float = 1e-8, relative: bool = True, cap: Optional[float] = None):
    self.tolerance = float(tolerance)
    self.relative = bool(relative)
    self.cap = None if cap is None else float(cap)

  def stop_threshold(self, observed):
    if not self.relative:
      return self.tolerance
    norm = float(sum(np.sum(np.square(np.asarray(o, np.float64))) for o in observed))
    threshold = self.tolerance * norm
    return threshold if self.cap is None else min(threshold, self.cap)

  def get_config(self):
    return dict(super().get_config(), relative=self.relative, cap=self.cap)

  def distance(self, update, observed):
    return tf.add_n(
      [
        tf.reduce_sum(tf.reshape(tf.square(u - o), [tf.shape(u)[0], -1]), 1)
        for u, o in zip(update, observed)
      ]
    )


class CosineMatching(Objective):
  """Inverting Gradients: 1 - cos(update, observed) + tv_weight * TV(image)."""

  name = "cosine"

  def __init__(self, tv_weight: float = 1e-4, tolerance: float = 1e-9):
    self.tv_weight = float(tv_weight)
    self.tolerance = float(tolerance)

  def _mask(self, observed_flat):
    return None

  def distance(self, update, observed):
    u, o = _flat(update), _flat(observed)
    mask = self._mask(o)
    if mask is not None:
      u = u * mask
    # 1 - cos(u, o) = |u/|u| - o/|o||^2 / 2, which float32 resolves far below the ~6e-8
    # granularity of 1 - <u, o> / (|u| |o|).
    u = u * tf.math.rsqrt(tf.maximum(tf.reduce_sum(u * u, 1, keepdims=True), 1e-30))
    o = o * tf.math.rsqrt(tf.maximum(tf.reduce_sum(o * o, 1, keepdims=True), 1e-30))
    return 0.5 * tf.reduce_sum(tf.square(u - o), 1)

  def regularizer(self, images):
    if self.tv_weight == 0:
      return super().regularizer(images)
    return self.tv_weight * total_variation(images)

  def get_config(self):
    return dict(super().get_config(), tv_weight=self.tv_weight)


class MaskedCosineMatching(CosineMatching):
  """Cosine + TV over the coordinates that are non-zero in the observed update."""

  name = "masked_cosine"

  def _mask(self, observed_flat):
    return tf.cast(tf.not_equal(observed_flat, 0.0), observed_flat.dtype)


OBJECTIVES: Dict[str, Type[Objective]] = {
  "euclidean": EuclideanMatching,
  "cosine": CosineMatching,
  "masked_cosine": MaskedCosineMatching,
}

# Stop rules of the Euclidean objective (`AttackConfig.stop_rule`): constructor options.
# "capped" is the rule before issue 35, kept to compare the two on the same inputs.
STOP_RULES: Dict[str, Dict] = {
  "relative": {},
  "capped": {"tolerance": 1e-8, "cap": 1e-6},
}
