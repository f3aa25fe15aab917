"""Shared pytest set-up: quiet TensorFlow, shared fixtures, no TFF orphans.

Fixtures for every test module:
- `digits`: the offline `digits` `ImageDataset` (real 8x8 digits at 28x28), loaded once.
- `sim_config`: a 10-client, 3-round IID `SimulationConfig` on `digits` (mean FedAvg).
- `mean_fedavg`: the `FedAvg` of `sim_config`, built once for every federated test.
- `tiny_bn_model`: a function `(input_shape, num_classes, seed=0) -> tf.keras.Model`, a
  one-conv BatchNorm model small enough for TFF rounds in a second or two.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stop_tff_workers_at_end():
  yield
  from tf_dlg.execution import runtime

  runtime.stop_tff_workers()


@pytest.fixture(scope="session")
def digits():
  from tf_dlg import data

  return data.load_dataset("digits")


@pytest.fixture(scope="session")
def sim_config():
  from tf_dlg.federated import simulation

  return simulation.SimulationConfig(
    dataset="digits", num_clients=10, rounds=3, aggregator="mean", seed=0
  )


@pytest.fixture(scope="session")
def mean_fedavg(sim_config, digits):
  from tf_dlg.federated import simulation

  return simulation.build_for_config(sim_config, digits)


def _tiny_bn_model(input_shape, num_classes, seed=0):
  import tensorflow as tf

  init = tf.keras.initializers.GlorotUniform(seed=seed)
  inputs = tf.keras.Input(input_shape)
  h = tf.keras.layers.Conv2D(4, 3, strides=2, use_bias=False, kernel_initializer=init)(inputs)
  h = tf.keras.layers.BatchNormalization()(h)
  h = tf.keras.layers.ReLU()(h)
  h = tf.keras.layers.GlobalAveragePooling2D()(h)
  dense_init = tf.keras.initializers.GlorotUniform(seed=seed + 1)
  return tf.keras.Model(
    inputs, tf.keras.layers.Dense(num_classes, kernel_initializer=dense_init)(h)
  )


@pytest.fixture(scope="session")
def tiny_bn_model():
  return _tiny_bn_model
