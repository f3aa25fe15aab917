"""Noising: add i.i.d. zero-mean noise of standard deviation `stddev` to every entry.

Gaussian by default; Laplacian as DLG's paper also tested, parametrised by the same
standard deviation (scale b = stddev / sqrt(2)) so both are comparable at one setting.
Noise is stateless in the seed. This is plain noising, not differential privacy: no
clipping bounds the sensitivity (see `tf_dlg.defenses.dp` for that).
"""

from __future__ import annotations

import math

import tensorflow as tf

from tf_dlg.defenses import base

DISTRIBUTIONS = ("gaussian", "laplacian")


def add_noise(tensors, stddev: float, seed, distribution: str = "gaussian"):
  seed = base.as_seed(seed)
  out = []
  for i, t in enumerate(tensors):
    s = base.tensor_seed(seed, i)
    if distribution == "gaussian":
      noise = tf.random.stateless_normal(tf.shape(t), s, stddev=stddev, dtype=t.dtype)
    elif distribution == "laplacian":
      # Difference of two exponentials: Laplace(0, b) from two uniforms.
      u = tf.random.stateless_uniform(tf.concat([[2], tf.shape(t)], 0), s,
                                      minval=1e-12, maxval=1.0, dtype=t.dtype)
      noise = (stddev / math.sqrt(2.0)) * (tf.math.log(u[0]) - tf.math.log(u[1]))
    else:
      raise ValueError(f"distribution={distribution!r} must be one of {', '.join(DISTRIBUTIONS)}.")
    out.append(t + noise)
  return out


class Noising(base.Defense):
  """Additive noise with `stddev` >= 0 (`distribution` gaussian | laplacian)."""

  name = "noising"
  param_name = "stddev"

  def __init__(self, stddev: float, exclude=None, distribution: str = "gaussian"):
    super().__init__(base.check_number("noise stddev", stddev, 0.0, float("inf"),
                                       high_open=True), exclude)
    if distribution not in DISTRIBUTIONS:
      raise ValueError(f"distribution={distribution!r} must be one of {', '.join(DISTRIBUTIONS)}.")
    self.distribution = distribution

  def _apply(self, tensors, seed):
    return add_noise(tensors, self.param, seed, self.distribution)

  def get_config(self):
    return dict(super().get_config(), distribution=self.distribution)
