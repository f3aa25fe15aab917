"""Probe defects of the Keras glue: one seed shared by clients, and Keras 3's loss tracker.

With the default seed, `DefendedModel` and `DefendUpdate` once gave every client and
every round the same mask and noise, so two clients' defended updates differed exactly as
their clean ones did (the noise cancelled). The seed is now folded with a fingerprint of
the update, as the TFF aggregator does. And Keras 3's `fit` reported loss 0.0 with a
custom `train_step` that never fed its loss tracker.
"""

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import defenses
from tf_dlg.integrations import keras as defenses_keras

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _tanh(seed=0):
  # tanh: every raw gradient entry is nonzero, so a zero in a step is the mask's.
  tf.keras.utils.set_random_seed(seed)
  return tf.keras.Sequential(
    [tf.keras.Input((16,)), tf.keras.layers.Dense(24, activation="tanh"), tf.keras.layers.Dense(3)]
  )


def _client_data(client):
  rng = np.random.default_rng(100 + client)
  return rng.normal(size=(32, 16)).astype(np.float32), rng.integers(0, 3, 32).astype(np.int64)


def _one_step(defense, client, weights=None):
  """(applied step, raw gradient) of one SGD(1) step of a client with the default seed."""
  model = defenses_keras.DefendedModel(_tanh(), defense)  # seed=0: the default every client shares
  model.compile(optimizer=tf.keras.optimizers.SGD(1.0), loss=LOSS)
  model(tf.zeros([1, 16]))
  if weights is not None:
    model.model.set_weights(weights)
  x, y = _client_data(client)
  with tf.GradientTape() as tape:
    raw = tape.gradient(LOSS(y, model(x, training=True)), model.trainable_variables)
  before = [v.numpy() for v in model.trainable_variables]
  model.train_on_batch(x, y)
  step = [b - v.numpy() for b, v in zip(before, model.trainable_variables)]
  return step, [g.numpy() for g in raw], model


def test_clients_sharing_the_default_seed_draw_different_masks():
  rate = 0.5
  (a, _, _), (b, _, _) = (_one_step(defenses.get_defense("masking", rate), c) for c in (0, 1))
  mask_a, mask_b = a[0] == 0, b[0] == 0
  assert abs(mask_a.mean() - rate) < 0.1 and abs(mask_b.mean() - rate) < 0.1
  # Independent masks disagree on 2 r (1 - r) = 0.5 of the entries; one shared mask, on 0.
  assert 0.4 < np.mean(mask_a != mask_b) < 0.6


def test_noise_does_not_cancel_between_clients_or_rounds():
  """Noised steps: their difference is not the clean gradients' difference."""
  sigma = 0.05
  noising = defenses.get_defense("noising", sigma)
  (a, ga, _), (b, gb, _) = (_one_step(noising, c) for c in (0, 1))
  noise_diff = (a[0] - b[0]) - (ga[0] - gb[0])
  # Two independent N(0, sigma^2) draws: their difference has std sigma * sqrt(2).
  assert np.std(noise_diff) == pytest.approx(sigma * np.sqrt(2), rel=0.15)
  # The same client in a later round (new weights, a new optimizer at step 0): new noise.
  later = [w + 0.01 for w in _tanh().get_weights()]
  c, gc, _ = _one_step(noising, 0, weights=later)
  round_diff = (a[0] - c[0]) - (ga[0] - gc[0])
  assert np.std(round_diff) == pytest.approx(sigma * np.sqrt(2), rel=0.15)
  # Reproducible: the same client, weights and data draw the same noise.
  again, _, _ = _one_step(noising, 0)
  np.testing.assert_array_equal(again[0], a[0])


def test_defend_update_noise_differs_between_clients_with_the_default_seed():
  sigma = 0.1
  rng = np.random.default_rng(0)
  before = [rng.normal(size=(40, 30)).astype(np.float32)]
  clean = [[b + rng.normal(size=b.shape).astype(np.float32) for b in before] for _ in range(2)]
  sent = [
    defenses_keras.defend_weights_delta(before, after, defenses.get_defense("noising", sigma))[0]
    for after in clean
  ]
  noise = [s[0] - c[0] for s, c in zip(sent, clean)]
  assert np.std(noise[0] - noise[1]) == pytest.approx(sigma * np.sqrt(2), rel=0.1)
  # The callback, two clients, default seed: different masks.
  masks = []
  for client in (0, 1):
    model = _tanh()
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=LOSS)
    start = model.get_weights()
    cb = defenses_keras.DefendUpdate(defenses.get_defense("masking", 0.5))
    model.fit(*_client_data(client), epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    masks.append(model.get_weights()[0] == start[0])
  assert 0.4 < np.mean(masks[0] != masks[1]) < 0.6


def test_fit_reports_the_real_loss_and_early_stopping_waits():
  """`fit`'s reported loss equals the batch loss computed here; EarlyStopping sees it."""
  x, y = _client_data(0)
  model = defenses_keras.DefendedModel(_tanh(), defenses.get_defense("masking", 0.1))
  model.compile(optimizer=tf.keras.optimizers.SGD(0.0), loss=LOSS)  # lr 0: weights stay
  expected = float(LOSS(y, model.model(x, training=False)))
  assert expected > 0.5  # three classes at random: about ln 3
  history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
  np.testing.assert_allclose(history.history["loss"], [expected] * 2, rtol=1e-5)
  # Training that lowers the loss: EarlyStopping(monitor="loss") runs every epoch.
  model.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss=LOSS)
  stop = tf.keras.callbacks.EarlyStopping(monitor="loss", patience=1)
  history = model.fit(x, y, batch_size=8, epochs=6, verbose=0, callbacks=[stop])
  losses = history.history["loss"]
  assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])), losses
