"""Keras model builders: the DLG/iDLG reference LeNet and a BatchNorm CNN for FedAvg.

Both return un-compiled `tf.keras.Model`s that output **logits** (no softmax); pair them
with `SparseCategoricalCrossentropy(from_logits=True)`.
"""

from __future__ import annotations

import collections
from typing import Sequence, Tuple

import numpy as np
import tensorflow as tf

from tf_dlg.registry import Registry

_REGISTRY = Registry("model", taken="already registered; unregister it first")
# {name: builder(input_shape, num_classes, seed=...)}, read-only; `register` adds to it.
MODELS = _REGISTRY.view


def _check_shape(input_shape: Sequence[int], num_classes: int) -> Tuple[int, int, int]:
  shape = tuple(int(d) for d in input_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"input_shape={tuple(input_shape)!r} must be (height, width, channels).")
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2.")
  return shape


def lenet(input_shape: Sequence[int], num_classes: int, seed: int = 0) -> tf.keras.Model:
  """The LeNet of the reference DLG/iDLG code, in Keras.

  Three 5x5 convolutions with 12 channels, strides 2, 2, 1, 'same' padding and sigmoid
  activations (smooth, so its gradient is twice differentiable everywhere, which the
  attack's second-order optimisation needs), then one dense layer. As in the reference
  code every weight and bias is drawn from uniform(-0.5, 0.5); `seed` fixes them.
  """
  shape = _check_shape(input_shape, num_classes)
  rng = np.random.default_rng(seed)

  def init():
    # A distinct seed per variable, derived from `seed`, so layers do not share values.
    return tf.keras.initializers.RandomUniform(-0.5, 0.5, seed=int(rng.integers(2**31 - 1)))

  inputs = tf.keras.Input(shape=shape, name="image")
  h = inputs
  for i, stride in enumerate((2, 2, 1)):
    h = tf.keras.layers.Conv2D(
      12,
      5,
      strides=stride,
      padding="same",
      activation="sigmoid",
      kernel_initializer=init(),
      bias_initializer=init(),
      name=f"conv{i + 1}",
    )(h)
  h = tf.keras.layers.Flatten(name="flatten")(h)
  logits = tf.keras.layers.Dense(
    num_classes, kernel_initializer=init(), bias_initializer=init(), name="logits"
  )(h)
  return tf.keras.Model(inputs, logits, name="dlg_lenet")


# Smallest head of the attacked LeNet. With a 2-class head (lfw_subset: face / non-face)
# the untrained model is ~certain of one class for half the images, their gradients
# vanish (~1e-3 squared norm) and Euclidean gradient matching stalls. The reference
# LeNet's LFW / CIFAR-100 heads had many classes; labels are unchanged by a wider head.
ATTACK_MIN_CLASSES = 10


def attack_lenet(input_shape: Sequence[int], num_classes: int, seed: int = 0) -> tf.keras.Model:
  """The LeNet the attack experiments observe: `lenet` with >= ATTACK_MIN_CLASSES outputs."""
  return lenet(input_shape, max(int(num_classes), ATTACK_MIN_CLASSES), seed=seed)


def bn_cnn(
  input_shape: Sequence[int],
  num_classes: int,
  seed: int = 0,
  width: int = 16,
  head: str = "flatten",
) -> tf.keras.Model:
  """A small CNN with BatchNormalization, for federated training.

  conv(w)-BN-ReLU-maxpool, conv(2w)-BN-ReLU-maxpool, flatten, dense(4w)-ReLU,
  dense(classes). Small enough for many TFF rounds on 2 CPU cores; its BatchNorm layers
  exercise the masking defence's BatchNorm handling. `head="gap"` puts a global average
  pool where the flatten is: far fewer weights, but it keeps no position, and on MNIST it
  learns several times slower (`benchmarks.plain_fedavg --grid`).
  """
  if head not in ("flatten", "gap"):
    raise ValueError(f"head={head!r}; expected 'flatten' or 'gap'.")
  shape = _check_shape(input_shape, num_classes)
  # Seeded initialisers, not tf.keras.utils.set_random_seed: building a model must not
  # reseed Python's, NumPy's and TensorFlow's global generators.
  rng = np.random.default_rng(seed)

  def glorot():
    return tf.keras.initializers.GlorotUniform(seed=int(rng.integers(2**31 - 1)))

  inputs = tf.keras.Input(shape=shape, name="image")
  h = inputs
  for i, channels in enumerate((width, 2 * width)):
    h = tf.keras.layers.Conv2D(
      channels, 3, padding="same", use_bias=False, kernel_initializer=glorot(), name=f"conv{i + 1}"
    )(h)
    h = tf.keras.layers.BatchNormalization(name=f"bn{i + 1}")(h)
    h = tf.keras.layers.ReLU(name=f"relu{i + 1}")(h)
    h = tf.keras.layers.MaxPool2D(name=f"pool{i + 1}")(h)
  if head == "gap":
    h = tf.keras.layers.GlobalAveragePooling2D(name="gap")(h)
  else:
    h = tf.keras.layers.Flatten(name="flatten")(h)
  h = tf.keras.layers.Dense(4 * width, activation="relu", kernel_initializer=glorot(), name="fc")(h)
  logits = tf.keras.layers.Dense(num_classes, kernel_initializer=glorot(), name="logits")(h)
  return tf.keras.Model(inputs, logits, name="bn_cnn")


def build_model(
  name: str, input_shape: Sequence[int], num_classes: int, seed: int = 0
) -> tf.keras.Model:
  """Builds a registered model (`lenet`, `bn_cnn` or one added by `register`) by name."""
  return _REGISTRY[name](input_shape, num_classes, seed=seed)


def register(name: str, builder) -> None:
  """Adds `builder(input_shape, num_classes, seed=...) -> tf.keras.Model` under `name`, so a
  `FederatedConfig(model=name)` trains it (e.g. the audit's user model)."""
  if not callable(builder):
    raise TypeError(f"register takes a model builder function, got {builder!r}.")
  _REGISTRY.register(name, builder)


def unregister(name: str) -> None:
  _REGISTRY.unregister(name)


def input_spec(input_shape: Sequence[int]) -> collections.OrderedDict:
  """The batch spec of `tf_dlg.data.client_datasets`, for `tff.learning` Keras wrappers."""
  return collections.OrderedDict(
    x=tf.TensorSpec([None, *input_shape], tf.float32), y=tf.TensorSpec([None], tf.int64)
  )


def variable_key(variable) -> int:
  """A hashable identity of a model variable, for Keras 2 (`tf.Variable`) and Keras 3.

  Keras 3 variables have no `ref()`; a model hands out the same variable objects on
  every access, so their identity is the key.
  """
  return id(variable)


def batchnorm_variables(model: tf.keras.Model):
  """The variables of every BatchNormalization layer in `model` (found by layer type).

  Returns a list of (layer, variable) pairs: gamma/beta (trainable) and the moving
  mean/variance (non-trainable). Nested models are searched too.
  """
  found = []

  def visit(layer):
    if isinstance(layer, tf.keras.layers.BatchNormalization):
      found.extend((layer, v) for v in layer.weights)
    for sub in getattr(layer, "layers", []):
      visit(sub)

  visit(model)
  return found


register("lenet", lenet)
register("bn_cnn", bn_cnn)
