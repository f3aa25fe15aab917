"""A Keras model as a pure, batched function of per-attack weights.

Many independent attacks run together by giving every attack its own copy of the
weights: each trainable tensor gets a leading attack axis [A, ...] and each attack's
dummy batch is [A, N, H, W, C]. Because attack `a`'s loss depends only on weight copy
`a`, the gradient of the *summed* loss with respect to the stacked weights is exactly
the stack of per-attack client gradients -- no `vectorized_map`, no per-example loop,
and the double backward pass (gradient of a gradient distance w.r.t. the images) stays a
plain graph of convolutions and batched matmuls that XLA compiles.

Convolutions run as im2col + batched matmul: patches come from strided slices of the
padded input (differentiable to any order), then `einsum('apk,ako->apo')` applies each
attack's kernel.

Supported layers: InputLayer, Conv2D (groups=1, no dilation), Dense, Flatten,
Activation, ReLU, MaxPool2D, AveragePooling2D, GlobalAveragePooling2D,
BatchNormalization (training mode: statistics of each attack's own batch, as a client
computing its update sees them), Dropout (identity). The model must be a chain; other
layers raise `ValueError`.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_dlg import models


def _patches(h, kernel_shape, strides, padding):
  """im2col: [B, H, W, C] -> [B, Ho, Wo, kh*kw*C] in (row, col, channel) kernel order.

  Built from k*k strided slices of the padded input: pure data movement whose gradient
  (and gradient of gradient) is again slicing, unlike a one-hot convolution that would
  spend k*k*C multiply-adds per copied value.
  """
  k_h, k_w = kernel_shape
  s_h, s_w = strides
  height, width = h.shape[1], h.shape[2]
  if padding == "SAME":
    out_h, out_w = -(-height // s_h), -(-width // s_w)
    pad_h = max((out_h - 1) * s_h + k_h - height, 0)
    pad_w = max((out_w - 1) * s_w + k_w - width, 0)
    h = tf.pad(
      h, [[0, 0], [pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2], [0, 0]]
    )
  else:
    out_h, out_w = (height - k_h) // s_h + 1, (width - k_w) // s_w + 1
  cols = [
    h[:, i : i + (out_h - 1) * s_h + 1 : s_h, j : j + (out_w - 1) * s_w + 1 : s_w, :]
    for i in range(k_h)
    for j in range(k_w)
  ]
  return tf.concat(cols, axis=-1)


def _extracted_patches(h, kernel_shape, strides, padding):
  """`_patches` as one `tf.image.extract_patches` op (same values and order).

  Without XLA it is one op and one gradient op instead of k*k of each: measured on a
  12-channel 28x28 LeNet layer, a double-backward pass traced 4x and ran 2.3x faster.
  XLA lowers it to a one-hot convolution, so compiled code keeps `_patches`.
  """
  return tf.image.extract_patches(h, [1, *kernel_shape, 1], [1, *strides, 1], [1, 1, 1, 1], padding)


def _weightless_op(layer):
  """The op of a layer without weights (flatten, activation, pooling), else None."""
  kl = tf.keras.layers
  if isinstance(layer, kl.Flatten):
    return ("flatten",)
  if isinstance(layer, kl.Activation):
    return ("act", layer.activation)
  if isinstance(layer, kl.ReLU):
    return ("act", lambda h, layer=layer: layer(h))
  if isinstance(layer, (kl.MaxPool2D, kl.AveragePooling2D)):
    pool = tf.nn.max_pool2d if isinstance(layer, kl.MaxPool2D) else tf.nn.avg_pool2d
    return ("pool", pool, list(layer.pool_size), list(layer.strides), layer.padding.upper())
  if isinstance(layer, kl.GlobalAveragePooling2D):
    return ("gap",)
  return None


def _inbound_layers(node) -> list:
  """The layers feeding a functional model's node (Keras 2: inbound_layers; 3: parents)."""
  if hasattr(node, "inbound_layers"):
    inbound = node.inbound_layers
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]
  return [parent.operation for parent in node.parent_nodes]


class BatchedModel:
  """Batched functional forward pass of a chain-structured Keras model.

  Args:
    model: A built Keras model (e.g. `tf_dlg.models.lenet`).

  `weights` arguments are lists shaped like `model.trainable_variables` with a leading
  attack axis. `trainable_weights_from(all_weights)` maps a `get_weights()` list to the
  trainable list.
  """

  def __init__(self, model: tf.keras.Model):
    self.model = model
    self.input_shape = tuple(int(d) for d in model.input_shape[1:])
    self.num_classes = int(model.output_shape[-1])
    key = models.variable_key
    trainable = {key(v): i for i, v in enumerate(model.trainable_variables)}
    self._all_index = {key(v): i for i, v in enumerate(model.weights)}
    self.trainable_index_in_all = [self._all_index[key(v)] for v in model.trainable_variables]
    self.trainable_shapes = [tuple(v.shape) for v in model.trainable_variables]
    self.im2col = _patches
    self._ops = []
    prev = None
    for layer in model.layers:
      if prev is not None and layer._inbound_nodes:
        inbound = _inbound_layers(layer._inbound_nodes[0])
        if len(inbound) != 1 or inbound[0] is not prev:
          raise ValueError(
            f"Layer {layer.name!r} does not follow {prev.name!r}: only chain "
            "(sequential) models are supported by the batched attack."
          )
      prev = layer
      self._ops.append(self._compile_layer(layer, trainable))

  def _compile_layer(self, layer, trainable):
    kl = tf.keras.layers

    def idx(v):
      if v is None:
        return None
      if models.variable_key(v) not in trainable:
        raise ValueError(
          f"Variable {v.name} of layer {layer.name!r} is frozen; the batched "
          "attack needs every weight of a supported layer to be trainable."
        )
      return trainable[models.variable_key(v)]

    if isinstance(layer, kl.InputLayer) or isinstance(layer, kl.Dropout):
      return None
    if isinstance(layer, kl.Conv2D) and type(layer) is kl.Conv2D:
      if layer.groups != 1 or tuple(layer.dilation_rate) != (1, 1):
        raise ValueError(f"Conv2D {layer.name!r}: groups/dilation are not supported.")
      if layer.data_format != "channels_last":
        raise ValueError(f"Conv2D {layer.name!r}: only channels_last is supported.")
      patch = tuple(layer.kernel.shape[:2])
      return (
        "conv",
        idx(layer.kernel),
        idx(layer.bias) if layer.use_bias else None,
        patch,
        list(layer.strides),
        layer.padding.upper(),
        layer.activation,
      )
    if isinstance(layer, kl.Dense):
      return (
        "dense",
        idx(layer.kernel),
        idx(layer.bias) if layer.use_bias else None,
        layer.activation,
      )
    op = _weightless_op(layer)
    if op is not None:
      return op
    if isinstance(layer, kl.BatchNormalization):
      return (
        "bn",
        idx(layer.gamma) if layer.scale else None,
        idx(layer.beta) if layer.center else None,
        float(layer.epsilon),
      )
    raise ValueError(
      f"Layer {layer.name!r} ({type(layer).__name__}) is not supported by the "
      "batched attack model; supported: Conv2D, Dense, Flatten, Activation, "
      "ReLU, MaxPool2D, AveragePooling2D, GlobalAveragePooling2D, "
      "BatchNormalization, Dropout."
    )

  def without_xla(self) -> "BatchedModel":
    """The same model for code run without XLA (im2col by `_extracted_patches`)."""
    variant = copy.copy(self)
    variant.im2col = _extracted_patches
    return variant

  def trainable_weights_from(self, all_weights: Sequence[np.ndarray]) -> List[np.ndarray]:
    """`model.get_weights()`-ordered list -> trainable-variable-ordered list."""
    return [np.asarray(all_weights[i]) for i in self.trainable_index_in_all]

  def __call__(
    self, weights: Sequence[tf.Tensor], x: tf.Tensor, statistics: Optional[list] = None
  ) -> tf.Tensor:
    """Logits [A, N, classes] of images x [A, N, H, W, C] under weights [A, ...].

    `statistics`, a list, receives each BatchNorm layer's batch (mean, biased variance),
    [A, C] each, in layer order (`batchnorm_prior`).
    """
    a = tf.shape(x)[0]
    n = tf.shape(x)[1]
    h = tf.reshape(x, tf.concat([[a * n], tf.shape(x)[2:]], 0))
    for op in self._ops:
      if op is None:
        continue
      kind = op[0]
      if kind == "conv":
        _, ki, bi, patch, strides, padding, act = op
        kernel = weights[ki]
        p = self.im2col(h, patch, strides, padding)
        shp = tf.shape(p)
        p = tf.reshape(p, [a, -1, p.shape[-1]])
        out = tf.einsum("apk,ako->apo", p, tf.reshape(kernel, [a, p.shape[-1], -1]))
        if bi is not None:
          out = out + weights[bi][:, None, :]
        h = act(tf.reshape(out, tf.concat([shp[:3], [kernel.shape[-1]]], 0)))
      elif kind == "dense":
        _, ki, bi, act = op
        hh = tf.reshape(h, [a, n, h.shape[-1]])
        out = tf.einsum("and,ado->ano", hh, weights[ki])
        if bi is not None:
          out = out + weights[bi][:, None, :]
        h = act(tf.reshape(out, [a * n, out.shape[-1]]))
      elif kind == "flatten":
        h = tf.reshape(h, [a * n, int(np.prod(h.shape[1:]))])
      elif kind == "act":
        h = op[1](h)
      elif kind == "pool":
        _, fn, size, strides, padding = op
        h = fn(h, ksize=size, strides=strides, padding=padding)
      elif kind == "gap":
        h = tf.reduce_mean(h, axis=[1, 2])
      elif kind == "bn":
        _, gi, bi, eps = op
        c = h.shape[-1]
        hh = tf.reshape(h, [a, -1, c])
        mean, var = tf.nn.moments(hh, axes=[1], keepdims=True)
        if statistics is not None:
          statistics.append((mean[:, 0, :], var[:, 0, :]))
        hh = (hh - mean) * tf.math.rsqrt(var + eps)
        if gi is not None:
          hh = hh * weights[gi][:, None, :]
        if bi is not None:
          hh = hh + weights[bi][:, None, :]
        h = tf.reshape(hh, tf.shape(h))
    return tf.reshape(h, [a, n, self.num_classes])


def soft_cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """Mean over the batch axis of cross-entropy; labels [A, N, K] (probabilities) -> [A]."""
  return tf.reduce_mean(-tf.reduce_sum(labels * tf.nn.log_softmax(logits, axis=-1), -1), -1)


def client_gradients(fmodel: BatchedModel, weights, x, labels):
  """Per-attack gradient of the mean cross-entropy: list of [A, ...] tensors."""
  with tf.GradientTape() as tape:
    tape.watch(weights)
    loss = tf.reduce_sum(soft_cross_entropy(labels, fmodel(weights, x)))
  return tape.gradient(loss, weights)


def batch_indices(step: int, num_examples: int, batch_size: int) -> np.ndarray:
  """Examples of local step `step`: consecutive batches cycling through the data in order.

  This is the local-training schedule the `fedavg_delta` threat model assumes (and
  `threat_model.observe_fedavg_delta` produces): unshuffled epochs of `batch_size`.
  """
  start = (step * batch_size) % num_examples
  return (start + np.arange(min(batch_size, num_examples))) % num_examples


def fedavg_delta(
  fmodel: BatchedModel, weights, x, labels, local_steps: int, learning_rate: float, batch_size: int
):
  """Per-attack `initial - final` weights after `local_steps` SGD steps (differentiable)."""
  n = int(x.shape[1])
  current = list(weights)
  for step in range(local_steps):
    idx = batch_indices(step, n, batch_size)
    if len(idx) == n and np.all(idx == np.arange(n)):
      xb, yb = x, labels
    else:
      xb, yb = tf.gather(x, idx, axis=1), tf.gather(labels, idx, axis=1)
    grads = client_gradients(fmodel, current, xb, yb)
    current = [w - learning_rate * g for w, g in zip(current, grads)]
  return [w0 - w for w0, w in zip(weights, current)]
