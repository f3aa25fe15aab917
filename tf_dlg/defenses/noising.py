"""Noising: add i.i.d. zero-mean noise to every entry of the update.

* `Noising(stddev)`: noise of a fixed standard deviation.
* `RelativeNoising(noise_ratio)`: standard deviation noise_ratio x the RMS of the
  update's (non-excluded) entries, i.e. a noise-to-signal ratio: the same setting means
  the same relative corruption on any model's update, where an absolute stddev found on
  one model's gradients is much stronger or weaker on another's.

Gaussian by default; Laplacian as DLG's paper also tested, parametrised by the same
standard deviation (scale b = stddev / sqrt(2)) so both are comparable at one setting.
Noise is stateless in the seed. This is plain noising, not differential privacy: no
clipping bounds the sensitivity (see `tf_dlg.defenses.dp` for that).
"""

from __future__ import annotations

import math

import tensorflow as tf

from tf_dlg import validation
from tf_dlg.defenses import base

DISTRIBUTIONS = ("gaussian", "laplacian")


def add_noise(tensors, stddev, seed, distribution: str = "gaussian"):
  """Adds noise of standard deviation `stddev` (a float or scalar tensor) to each tensor."""
  validation.check_choice("distribution", distribution, DISTRIBUTIONS)
  seed = base.as_seed(seed)
  out = []
  for i, t in enumerate(tensors):
    s = base.tensor_seed(seed, i)
    std = tf.cast(stddev, t.dtype)
    if distribution == "gaussian":
      noise = std * tf.random.stateless_normal(tf.shape(t), s, dtype=t.dtype)
    else:
      # Difference of two exponentials: Laplace(0, b) from two uniforms.
      u = tf.random.stateless_uniform(
        tf.concat([[2], tf.shape(t)], 0), s, minval=1e-12, maxval=1.0, dtype=t.dtype
      )
      noise = (std / math.sqrt(2.0)) * (tf.math.log(u[0]) - tf.math.log(u[1]))
    out.append(t + noise)
  return out


class Noising(base.Defense):
  """Additive noise with `stddev` >= 0 (`distribution` gaussian | laplacian)."""

  name = "noising"
  param_name = "stddev"
  draws = True
  option_names = ("distribution",)

  def __init__(self, stddev: float, exclude=None, distribution: str = "gaussian"):
    super().__init__(stddev, exclude)
    self.distribution = validation.check_choice("distribution", distribution, DISTRIBUTIONS)

  @staticmethod
  def check(stddev):
    return base.check_number("noise stddev", stddev, 0.0, float("inf"), high_open=True)

  def _stddev(self, tensors, param):
    del tensors
    return param

  def _apply(self, tensors, param, seed):
    return add_noise(tensors, self._stddev(tensors, param), seed, self.distribution)


class RelativeNoising(Noising):
  """Noise with stddev = noise_ratio x RMS of the update, noise_ratio >= 0."""

  name = "noising_ratio"
  param_name = "noise_ratio"

  def __init__(self, noise_ratio: float, exclude=None, distribution: str = "gaussian"):
    super().__init__(noise_ratio, exclude, distribution)

  @staticmethod
  def check(noise_ratio):
    return base.check_number("noise_ratio", noise_ratio, 0.0, float("inf"), high_open=True)

  def _stddev(self, tensors, param):
    rms = base.root_mean_square(tensors)
    return (tf.cast(param, rms.dtype) if isinstance(param, tf.Tensor) else param) * rms
