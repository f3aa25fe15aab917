"""Which update entries belong to BatchNorm, so that defences can leave them alone.

Masking a BatchNorm *statistic* is not a harmless zero: where clients send their moving
variance (as `tf_dlg.federated` does, to keep the server's statistics current), a masked
entry becomes 0 and the layer divides by sqrt(0 + epsilon), blowing activations up by
~1/sqrt(epsilon). Gamma/beta are ordinary parameters, but masking gamma zeroes whole
channels. So by default every BatchNorm variable is excluded; `mask_gamma_beta=True`
masks gamma/beta and still never the moving statistics.

Variables are found by layer type (`tf.keras.layers.BatchNormalization`), not by name.
"""

from __future__ import annotations

from typing import List, Sequence

import tensorflow as tf

from tf_dlg import models


def batchnorm_exclusion(
  model: tf.keras.Model, variables: Sequence[tf.Variable], mask_gamma_beta: bool = False
) -> List[bool]:
  """For each of `variables` (of `model`), True if a defence must pass it through."""
  bn = {}
  for _layer, v in models.batchnorm_variables(model):
    bn[models.variable_key(v)] = v.trainable
  out = []
  for v in variables:
    if models.variable_key(v) not in bn:
      out.append(False)
    elif bn[models.variable_key(v)]:  # gamma / beta
      out.append(not mask_gamma_beta)
    else:  # moving mean / variance
      out.append(True)
  return out
