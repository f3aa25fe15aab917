"""Tests of the Keras model builders."""

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import models


@pytest.mark.parametrize(
  "shape, classes, flat",
  [
    ((28, 28, 1), 10, 7 * 7 * 12),
    ((32, 32, 1), 2, 8 * 8 * 12),
    ((32, 32, 3), 8, 8 * 8 * 12),
  ],
)
def test_lenet_layer_shapes(shape, classes, flat):
  m = models.lenet(shape, classes, seed=0)
  convs = [x for x in m.layers if isinstance(x, tf.keras.layers.Conv2D)]
  assert [c.strides for c in convs] == [(2, 2), (2, 2), (1, 1)]
  assert all(c.kernel_size == (5, 5) and c.filters == 12 and c.padding == "same" for c in convs)
  assert all(c.activation is tf.keras.activations.sigmoid for c in convs)
  assert convs[0].kernel.shape == (5, 5, shape[2], 12)
  dense = m.get_layer("logits")
  assert dense.kernel.shape == (flat, classes)
  assert m(np.zeros((2, *shape), np.float32)).shape == (2, classes)


def test_lenet_init_is_uniform_half_and_seeded():
  a = models.lenet((32, 32, 3), 10, seed=1)
  b = models.lenet((32, 32, 3), 10, seed=1)
  c = models.lenet((32, 32, 3), 10, seed=2)
  for wa, wb in zip(a.get_weights(), b.get_weights()):
    np.testing.assert_array_equal(wa, wb)
    assert wa.min() >= -0.5 and wa.max() <= 0.5
  big = a.get_layer("logits").kernel.numpy().ravel()
  # Uniform(-0.5, 0.5): mean ~0, std ~ 1/sqrt(12).
  assert abs(big.mean()) < 0.02 and abs(big.std() - 12**-0.5) < 0.02
  assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])
  # Biases are random too (reference code initialises them uniformly as well).
  assert np.std(a.get_layer("conv1").bias.numpy()) > 0.1


def test_bn_cnn_has_batchnorm_and_learns_shapes():
  m = models.bn_cnn((28, 28, 1), 10, seed=0)
  bn = models.batchnorm_variables(m)
  assert len(bn) == 8  # 2 layers x (gamma, beta, moving mean, moving variance)
  assert {v.trainable for _, v in bn} == {True, False}
  assert m(np.zeros((3, 28, 28, 1), np.float32)).shape == (3, 10)
  assert models.batchnorm_variables(models.lenet((28, 28, 1), 10)) == []


def test_model_errors():
  with pytest.raises(ValueError, match="Unknown model 'resnet'"):
    models.build_model("resnet", (28, 28, 1), 10)
  with pytest.raises(ValueError, match=r"input_shape=\(28, 28\)"):
    models.lenet((28, 28), 10)
  with pytest.raises(ValueError, match="num_classes=1"):
    models.bn_cnn((28, 28, 1), 1)


@pytest.mark.parametrize("name", ["lenet", "bn_cnn"])
def test_building_a_model_leaves_global_random_state_alone(name):
  import random

  np.random.seed(123)
  random.seed(123)
  expected_np, expected_py = np.random.rand(3), random.random()
  np.random.seed(123)
  random.seed(123)
  a = models.build_model(name, (28, 28, 1), 10, seed=4)
  assert np.array_equal(np.random.rand(3), expected_np)
  assert random.random() == expected_py
  b = models.build_model(name, (28, 28, 1), 10, seed=4)
  c = models.build_model(name, (28, 28, 1), 10, seed=5)
  for wa, wb in zip(a.get_weights(), b.get_weights()):
    np.testing.assert_array_equal(wa, wb)
  assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])


def test_a_registered_model_is_built_and_configured_by_name():
  from tf_dlg.federated.config import FederatedConfig

  def tiny(input_shape, num_classes, seed=0):
    return tf.keras.Sequential(
      [tf.keras.Input(input_shape), tf.keras.layers.Flatten(), tf.keras.layers.Dense(num_classes)]
    )

  with pytest.raises(ValueError, match="model='tiny' is not one of lenet, bn_cnn"):
    FederatedConfig(model="tiny")
  models.register("tiny", tiny)
  try:
    assert models.build_model("tiny", (28, 28, 1), 10).output_shape == (None, 10)
    assert FederatedConfig(model="tiny").model == "tiny"
    models.register("tiny", tiny)  # the same builder again: no-op
    with pytest.raises(ValueError, match="A model named 'tiny' is already registered"):
      models.register("tiny", lambda *a, **k: None)
    with pytest.raises(TypeError, match="model builder function"):
      models.register("other", 3)
  finally:
    models.unregister("tiny")
  with pytest.raises(ValueError, match="Unknown model 'tiny'; expected one of lenet, bn_cnn"):
    models.build_model("tiny", (28, 28, 1), 10)
