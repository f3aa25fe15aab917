"""The BatchNorm statistics an update carries: read off Keras' own training, and the prior."""

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import models
from tf_dlg.attacks import batchnorm_prior, functional


def _train(model, batches, lr=0.1):
  """Keras training steps in training mode; the update in TFF's sign (initial - final)."""
  before = [v.numpy() for v in model.non_trainable_variables]
  opt = tf.keras.optimizers.SGD(lr)
  for x, y in batches:
    with tf.GradientTape() as tape:
      logits = model(x, training=True)
      loss = tf.reduce_mean(
        tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
      )
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
  return [a - v.numpy() for a, v in zip(before, model.non_trainable_variables)]


def _batch_statistics(model, weights, x):
  """Each BatchNorm layer's (mean, biased variance) of batch x, by NumPy from the
  layer's input (a Keras sub-model, independent of the attack's functional model)."""
  model.set_weights(weights)
  out = []
  for layer in batchnorm_prior.batchnorm_layers(model):
    feed = tf.keras.Model(model.inputs, layer.input)(x, training=True).numpy()
    rows = feed.reshape(-1, feed.shape[-1]).astype(np.float64)
    out.append((rows.mean(0), rows.var(0)))
  return out


@pytest.fixture
def case():
  rng = np.random.default_rng(3)
  model = models.bn_cnn((12, 12, 1), 4, seed=1, width=4)
  x = rng.uniform(size=(5, 12, 12, 1)).astype(np.float32)
  y = rng.integers(0, 4, size=5)
  return model, [np.asarray(w) for w in model.get_weights()], x, y


def test_one_step_gives_the_batch_statistics_exactly(case):
  model, w0, x, y = case
  delta = _train(model, [(x, y)])
  model.set_weights(w0)
  got = batchnorm_prior.observed_statistics(model, w0, delta, steps=1, batch_size=len(x))
  want = _batch_statistics(model, w0, x)
  assert len(got) == len(want) == 2
  for g, (mean, var) in zip(got, want):
    np.testing.assert_allclose(g.mean, mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g.variance, var, rtol=1e-4, atol=1e-6)


def test_several_steps_give_the_momentum_weighted_mean_of_the_batches(case):
  model, w0, x, y = case
  batches = [(x[:3], y[:3]), (x[2:], y[2:]), (x[1:4], y[1:4])]
  # Each step's statistics at the weights it trained from.
  weights, per_step = w0, []
  for b in batches:
    per_step.append(_batch_statistics(model, weights, b[0]))
    model.set_weights(weights)
    _train(model, [b])
    weights = [np.asarray(w) for w in model.get_weights()]
  model.set_weights(w0)
  delta = _train(model, batches)
  model.set_weights(w0)
  got = batchnorm_prior.observed_statistics(model, w0, delta, steps=3, batch_size=3)
  mu = batchnorm_prior.batchnorm_layers(model)[0].momentum
  coef = np.array([mu**2, mu, 1.0]) * (1 - mu) / (1 - mu**3)
  for layer, g in enumerate(got):
    mean = sum(c * s[layer][0] for c, s in zip(coef, per_step))
    var = sum(c * s[layer][1] for c, s in zip(coef, per_step))
    np.testing.assert_allclose(g.mean, mean, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(g.variance, var, rtol=1e-3, atol=1e-6)


def test_the_prior_is_zero_at_the_clients_batch_and_has_a_finite_gradient_there(case):
  model, w0, x, y = case
  delta = _train(model, [(x, y)])
  model.set_weights(w0)
  stats = batchnorm_prior.observed_statistics(model, w0, delta, steps=1, batch_size=len(x))
  observed = [
    (tf.constant(s.mean[None], tf.float32), tf.constant(s.variance[None], tf.float32))
    for s in stats
  ]
  fmodel = functional.BatchedModel(model)
  weights = [tf.constant(w[None]) for w in fmodel.trainable_weights_from(w0)]

  def value(images):
    images = tf.constant(images[None])
    with tf.GradientTape() as tape:
      tape.watch(images)
      dummy = []
      fmodel(weights, images, statistics=dummy)
      p = batchnorm_prior.prior(dummy, observed)
    return float(p[0]), tape.gradient(p, images).numpy()

  at_batch, grad = value(x)
  other, _ = value(np.random.default_rng(9).uniform(size=x.shape).astype(np.float32))
  assert at_batch < 1e-3 and np.isfinite(grad).all()
  assert other > 100 * at_batch


def test_mismatched_inputs_are_one_clear_error(case):
  model, w0, _, _ = case
  with pytest.raises(ValueError, match="non-trainable variables"):
    batchnorm_prior.observed_statistics(model, w0, [np.zeros(4)], steps=1, batch_size=2)
  with pytest.raises(ValueError, match="steps=0"):
    batchnorm_prior.observed_statistics(model, w0, [], steps=0, batch_size=2)


def test_the_attackers_model_copy_keeps_the_trainings_batchnorm_momentum():
  """The prior divides by 1 - momentum^T: the attacker's copy (`attack_model`) must keep
  the momentum the training set (`FederatedConfig.bn_momentum`, 0.9), not Keras' 0.99."""
  from tf_dlg.federated import local_training

  model = models.bn_cnn((12, 12, 1), 4, seed=1, width=4)
  for layer in batchnorm_prior.batchnorm_layers(model):
    layer.momentum = 0.9
  copy = local_training.attack_model(model)
  assert [layer.momentum for layer in batchnorm_prior.batchnorm_layers(copy)] == [0.9, 0.9]
