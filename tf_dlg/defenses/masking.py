"""Random gradient masking (Kim & Park, 2024): zero a random fraction of the update.

Each entry is dropped independently with probability `rate` (Bernoulli, stateless in
the seed), so on average a `rate` fraction is zeroed and the attacker does not know
which coordinates were kept. With `rescale=True` kept entries are multiplied by
1 / (1 - rate), which keeps the update unbiased (E[masked] = update), as in dropout;
the paper's masking does not rescale, so the default is False -- the masked update
then also shrinks by (1 - rate) in expectation, which a server learning rate absorbs.

BatchNorm: pass `exclude` (e.g. `batchnorm_exclusion(model, variables)`) so that BN
parameters and statistics are not masked (see `tf_dlg.defenses.batchnorm`).
"""

from __future__ import annotations

import tensorflow as tf

from tf_dlg.defenses import base


def mask_update(tensors, rate: float, seed, rescale: bool = False):
  """Zeroes each entry of each tensor with probability `rate` (pure TF, stateless)."""
  seed = base.as_seed(seed)
  out = []
  for i, t in enumerate(tensors):
    u = tf.random.stateless_uniform(tf.shape(t), base.tensor_seed(seed, i), dtype=tf.float32)
    # `rate` may be a tensor (a trained process's runtime setting); x / 1 is exact.
    keep = tf.cast(u >= tf.cast(rate, tf.float32), t.dtype)
    masked = t * keep
    if rescale:
      # In float32 at least: 1 - rate near 1 rounds to 0 in float16 (x / 0 = inf).
      wide = tf.float32 if t.dtype in (tf.float16, tf.bfloat16) else t.dtype
      masked = tf.cast(tf.cast(masked, wide) / tf.cast(1.0 - rate, wide), t.dtype)
    out.append(masked)
  return out


class Masking(base.Defense):
  """Random masking with `rate` in [0, 1); optional `rescale` by 1 / (1 - rate)."""

  name = "masking"
  param_name = "rate"
  draws = True
  option_names = ("rescale",)

  def __init__(self, rate: float, exclude=None, rescale: bool = False):
    super().__init__(rate, exclude)
    self.rescale = bool(rescale)

  @staticmethod
  def check(rate):
    return base.check_number("masking rate", rate, 0.0, 1.0, high_open=True)

  def _apply(self, tensors, param, seed):
    return mask_update(tensors, param, seed, self.rescale)
