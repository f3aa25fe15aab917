"""The batch statistics a client's BatchNorm update carries, used as a reconstruction prior.

A client that trains a BatchNorm model in training mode moves every layer's moving mean
and variance toward its batches' statistics, m <- mu m + (1 - mu) b (Keras' `momentum`
mu), and its FedAvg update carries the change (`tf_dlg.federated.fedavg` sends the
non-trainable deltas after the trainable ones; TFF's sign, initial - final). An
attacker who holds the global model therefore reads the batch statistics off the
update: after T local steps, b = m0 - delta / (1 - mu^T), exact for one step and the
(1 - mu) mu^(T - t)-weighted mean of the T batches' statistics otherwise.
Keras 2's fused kernel (4-D inputs) moves the variance toward the unbiased batch
variance, Keras 3's toward the biased one; `observed_statistics` returns the biased
one, what a dummy batch's forward pass computes.

`prior` is the BatchNorm regulariser of Yin et al. ("See through gradients", CVPR 2021),
sum over layers of ||mean(x) - mean||_2 + ||var(x) - var||_2, with these observed
statistics in place of the model's running averages that paper uses: they are this
client's own batches.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence

import numpy as np
import tensorflow as tf

from tf_dlg import models


@dataclasses.dataclass(frozen=True)
class LayerStatistics:
  """One BatchNorm layer's batch mean and (biased) variance, [channels] each."""

  mean: np.ndarray
  variance: np.ndarray


def batchnorm_layers(model: tf.keras.Model) -> list:
  return [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]


def observed_statistics(
  model: tf.keras.Model,
  weights: Sequence[np.ndarray],
  non_trainable_delta: Sequence[np.ndarray],
  steps: int,
  batch_size: int,
) -> List[LayerStatistics]:
  """Each BatchNorm layer's batch statistics, read off a client update.

  Args:
    model: The global model's architecture (Keras).
    weights: Its weights before the client trained (`model.get_weights()` order).
    non_trainable_delta: The update's non-trainable part, `model.non_trainable_variables`
      order, TFF's sign (initial - final).
    steps: The client's local steps.
    batch_size: Its batch size (the variance's Bessel correction of Keras 2's fused kernel).
  """
  if steps < 1:
    raise ValueError(f"steps={steps}; expected at least 1.")
  key = models.variable_key
  where = {key(v): i for i, v in enumerate(model.non_trainable_variables)}
  index = {key(v): i for i, v in enumerate(model.weights)}
  if len(non_trainable_delta) != len(where):
    raise ValueError(
      f"non_trainable_delta has {len(non_trainable_delta)} arrays; the model has "
      f"{len(where)} non-trainable variables."
    )

  def read(variable, carried):
    before = np.asarray(weights[index[key(variable)]], np.float64)
    return before - np.asarray(non_trainable_delta[where[key(variable)]], np.float64) / carried

  out = []
  for layer in batchnorm_layers(model):
    carried = 1.0 - float(layer.momentum) ** steps
    variance = read(layer.moving_variance, carried)
    if getattr(layer, "fused", False):  # Keras 2's fused kernel: unbiased variance
      rows = batch_size * int(np.prod(layer.input.shape[1:-1]))
      variance = variance * (rows - 1) / rows
    out.append(LayerStatistics(read(layer.moving_mean, carried), variance))
  return out


def prior(dummy: Sequence, observed: Sequence) -> tf.Tensor:
  """[A] sum over layers of ||mean - observed mean||_2 + ||var - observed var||_2.

  `dummy`: per layer (mean [A, C], variance [A, C]) of each attack's dummy batch (from
  `functional.BatchedModel(..., statistics=[])`); `observed`: per layer (mean, variance)
  tensors [A, C] (each attack's own client).
  """
  if len(dummy) != len(observed):
    raise ValueError(f"{len(dummy)} BatchNorm layers in the model, {len(observed)} observed.")

  def norm(d):  # smoothed at 0, where the plain norm's gradient is NaN
    return tf.sqrt(tf.reduce_sum(tf.square(d), -1) + 1e-12)

  return tf.add_n([norm(m - om) + norm(v - ov) for (m, v), (om, ov) in zip(dummy, observed)])
