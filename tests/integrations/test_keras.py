"""Keras training on defended gradients (`tf_dlg.integrations.keras.DefendedModel`).

With plain SGD at learning rate 1 the weight change of one step *is* the applied
(defended) gradient, so the tests read the defence off the weights: masking zeroes the
requested fraction, clipping bounds the norm, BatchNorm gamma/beta pass through, and the
step is exactly the pure defence of the gradient with `batch_seed(step, x)`.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import defenses, models
from tf_dlg.integrations import keras as defenses_keras

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def digit_arrays(digits):
  return digits.x_train[:1000], digits.y_train[:1000], digits.x_test, digits.y_test


def _bn_model(num_classes=10):
  return models.bn_cnn((28, 28, 1), num_classes, seed=0, width=8)


def _defended(defense, seed=0, lr=1.0, **kwargs):
  model = defenses_keras.DefendedModel(_bn_model(), defense, seed=seed, **kwargs)
  model.compile(optimizer=tf.keras.optimizers.SGD(lr), loss=LOSS, metrics=["accuracy"])
  return model


def _weights(model):
  return [v.numpy() for v in model.trainable_variables]


def _raw_gradient(model, x, y):
  with tf.GradientTape() as tape:
    loss = LOSS(y, model(x, training=True))
  return tape.gradient(loss, model.trainable_variables)


def test_one_step_applies_exactly_the_defended_gradient(digit_arrays):
  x, y = digit_arrays[0][:32], digit_arrays[1][:32]
  rate = 0.6
  model = _defended(defenses.get_defense("masking", rate), seed=5)
  model.build((None, 28, 28, 1))
  exclude = model.gradient_exclusion()
  bn = {models.variable_key(v) for _, v in models.batchnorm_variables(model.model)}
  assert (
    exclude == [models.variable_key(v) in bn for v in model.trainable_variables]
    and sum(exclude) == 4
  )
  raw = [g.numpy() for g in _raw_gradient(model, x, y)]
  before = _weights(model)
  seed = model.batch_seed(0, x)  # of the weights before the step
  model.train_on_batch(x, y)
  applied = [b - a for b, a in zip(before, _weights(model))]  # SGD, lr 1: = gradient

  expected = defenses.get_defense("masking", rate, exclude=exclude)(
    [tf.constant(g) for g in raw], seed
  )
  for j, (a, e) in enumerate(zip(applied, expected)):
    np.testing.assert_allclose(a, np.asarray(e), rtol=1e-4, atol=1e-6, err_msg=f"var {j}")
  # The masked fraction, counted on the entries whose raw gradient was nonzero.
  moved = np.concatenate([g.ravel() != 0 for g, e in zip(raw, exclude) if not e])
  zero = np.concatenate([a.ravel() == 0 for a, e in zip(applied, exclude) if not e])
  n = int(moved.sum())
  assert abs(zero[moved].mean() - rate) <= 4 * math.sqrt(rate * (1 - rate) / n)
  for a, g, e in zip(applied, raw, exclude):  # BN gamma/beta: the raw gradient
    if e:
      np.testing.assert_allclose(a, g, rtol=1e-4, atol=1e-7)
      assert np.all(a != 0)
  # Next step: a different seed, hence a different mask.
  assert not np.array_equal(model.step_seed(1).numpy(), model.step_seed(0).numpy())
  raw2 = [g.numpy() for g in _raw_gradient(model, x, y)]
  before2 = _weights(model)
  model.train_on_batch(x, y)
  applied2 = [b - a for b, a in zip(before2, _weights(model))]
  big = int(np.argmax([a.size for a in applied]))
  mask1, mask2 = applied[big] == 0, applied2[big] == 0
  both = (raw[big] != 0) & (raw2[big] != 0)
  assert 0.3 < np.mean(mask1[both] != mask2[both]) < 0.6  # ~2 rate (1 - rate) = 0.48


def _mlp():
  tf.keras.utils.set_random_seed(0)
  return tf.keras.Sequential(
    [
      tf.keras.layers.Flatten(input_shape=(28, 28, 1)),
      tf.keras.layers.Dense(64),
      tf.keras.layers.BatchNormalization(),
      tf.keras.layers.ReLU(),
      tf.keras.layers.Dense(10),
    ]
  )


def test_fit_with_masking_still_reduces_the_loss(digit_arrays):
  """The README example: one epoch of `fit` on 1,000 digits with half the gradient masked."""
  x, y, xt, yt = digit_arrays
  model = defenses_keras.DefendedModel(_mlp(), defenses.get_defense("masking", 0.5), seed=0)
  model.compile(optimizer=tf.keras.optimizers.Adam(0.005), loss=LOSS, metrics=["accuracy"])
  initial_loss, _ = model.evaluate(xt, yt, verbose=0)
  history = model.fit(x, y, batch_size=20, epochs=1, verbose=0)
  assert int(model.optimizer.iterations) == 50
  assert np.isfinite(history.history["loss"]).all()
  test_loss, test_accuracy = model.evaluate(xt, yt, verbose=0)
  assert test_loss < 0.5 * initial_loss and test_accuracy > 0.6, (
    initial_loss,
    test_loss,
    test_accuracy,
  )
  # The wrapped model itself was trained (same variables), BN statistics included.
  bn = model.model.layers[2]
  assert np.all(bn.moving_variance.numpy() != 1.0)
  np.testing.assert_allclose(
    model.model.predict(xt[:50], verbose=0), model.predict(xt[:50], verbose=0), rtol=1e-6
  )


@pytest.mark.parametrize("norm", [0.05, 1.0])
def test_fit_with_clipping_bounds_every_step(digit_arrays, norm):
  x, y = digit_arrays[0][:64], digit_arrays[1][:64]
  model = _defended(defenses.get_defense("clipping", norm), lr=1.0)
  model.build((None, 28, 28, 1))
  exclude = model.gradient_exclusion()
  for i in range(2):
    before = _weights(model)
    model.train_on_batch(x[32 * i : 32 * (i + 1)], y[32 * i : 32 * (i + 1)])
    step = [b - a for b, a in zip(before, _weights(model))]
    norm_step = math.sqrt(
      sum(float(np.sum(s.astype(np.float64) ** 2)) for s, e in zip(step, exclude) if not e)
    )
    assert norm_step <= norm * (1 + 1e-4)
    if norm == 0.05:
      assert norm_step == pytest.approx(norm, rel=1e-3)


def test_fit_with_relative_clipping_scales_each_step_by_the_ratio(digit_arrays):
  x, y = digit_arrays[0][:32], digit_arrays[1][:32]
  model = _defended(defenses.get_defense("clipping_ratio", 0.25), lr=1.0)
  model.build((None, 28, 28, 1))
  exclude = model.gradient_exclusion()
  raw = [g.numpy() for g in _raw_gradient(model, x, y)]
  before = _weights(model)
  model.train_on_batch(x, y)
  for j, (b, a, g, e) in enumerate(zip(before, _weights(model), raw, exclude)):
    np.testing.assert_allclose(
      b - a, g if e else 0.25 * g, rtol=1e-3, atol=1e-7, err_msg=f"var {j}"
    )


def test_exclude_options(digit_arrays):
  x, y = digit_arrays[0][:16], digit_arrays[1][:16]
  masking = defenses.get_defense("masking", 0.5)
  naive = _defended(masking, exclude=None)
  naive.build((None, 28, 28, 1))
  assert naive.gradient_exclusion() is None
  before = _weights(naive)
  naive.train_on_batch(x, y)
  gamma = [i for i, v in enumerate(naive.trainable_variables) if "gamma" in v.name]
  assert any(np.any(before[i] == _weights(naive)[i]) for i in gamma)  # gamma masked
  own = defenses.get_defense("masking", 0.5, exclude=[True] * 10)
  m = _defended(own)
  m.build((None, 28, 28, 1))
  assert m.gradient_exclusion() == [True] * 10
  raw = [g.numpy() for g in _raw_gradient(m, x, y)]
  before = _weights(m)
  m.train_on_batch(x, y)
  for b, a, g in zip(before, _weights(m), raw):  # nothing masked
    assert np.all((b - a)[g != 0] != 0)
  with pytest.raises(ValueError, match="exclude='bn'"):
    _defended(masking, exclude="bn")
  with pytest.raises(TypeError, match="Defense"):
    defenses_keras.DefendedModel(_bn_model(), "masking")
  with pytest.raises(TypeError, match="tf.keras.Model"):
    defenses_keras.DefendedModel(lambda t: t, masking)


def test_defended_gradients_keeps_none_and_densifies():
  d = defenses.get_defense("clipping", 1.0)
  grads = [
    tf.fill([3], 10.0),
    None,
    tf.IndexedSlices(tf.fill([1, 2], 10.0), tf.constant([1]), tf.constant([3, 2])),
  ]
  out = defenses_keras.defended_gradients(d, grads, 0)
  assert out[1] is None and out[2].shape == (3, 2)
  assert float(tf.linalg.global_norm([out[0], out[2]])) == pytest.approx(1.0, rel=1e-5)
  out = defenses_keras.defended_gradients(d, grads, 0, exclude=[True, False, False])
  np.testing.assert_array_equal(out[0].numpy(), [10.0] * 3)
  with pytest.raises(ValueError, match="exclude has 2 entries"):
    defenses_keras.defended_gradients(d, grads, 0, exclude=[True, False])


def test_config_round_trip_and_save_load(digit_arrays, tmp_path):
  x, y = digit_arrays[0][:16], digit_arrays[1][:16]
  model = _defended(defenses.get_defense("noising", 1e-3, distribution="laplacian"), seed=9)
  model.train_on_batch(x, y)
  cfg = model.get_config()
  assert cfg["defense"] == {"name": "noising", "stddev": 1e-3, "distribution": "laplacian"}
  assert cfg["seed"] == 9 and cfg["exclude"] == "auto"
  again = defenses_keras.DefendedModel.from_config(cfg)
  assert again.defense.get_config() == model.defense.get_config()
  assert again.defense_seed == 9
  path = str(tmp_path / "defended.keras")
  model.save(path)
  loaded = tf.keras.models.load_model(path)
  assert isinstance(loaded, defenses_keras.DefendedModel)
  assert loaded.get_config()["defense"] == cfg["defense"]
  np.testing.assert_allclose(
    loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
  )


def test_mixin_on_a_subclassed_model_and_loss_scale_optimizer(digit_arrays):
  x, y = digit_arrays[0][:32], digit_arrays[1][:32]

  class Small(defenses_keras.DefenseTrainStepMixin, tf.keras.Model):
    def __init__(self):
      super().__init__()
      self.flatten = tf.keras.layers.Flatten()
      self.bn = tf.keras.layers.BatchNormalization()
      self.out = tf.keras.layers.Dense(10)
      self.set_defense(defenses.get_defense("masking", 0.5), seed=1)

    def call(self, inputs, training=None):
      return self.out(self.bn(self.flatten(inputs), training=training))

  tf.keras.utils.set_random_seed(0)
  model = Small()
  model.compile(
    optimizer=tf.keras.mixed_precision.LossScaleOptimizer(tf.keras.optimizers.SGD(1.0)), loss=LOSS
  )
  model(tf.zeros([1, 28, 28, 1]))  # Keras 3 builds a subclassed model only by calling it
  assert model.gradient_exclusion() == [True, True, False, False]  # gamma, beta, W, b
  raw = [g.numpy() for g in _raw_gradient(model, x, y)]
  before = _weights(model)
  seed = model.batch_seed(0, x)
  model.train_on_batch(x, y)
  step = [b - a for b, a in zip(before, _weights(model))]
  expected = defenses.get_defense("masking", 0.5, exclude=[True, True, False, False])(
    [tf.constant(g) for g in raw], seed
  )
  for a, e in zip(step, expected):
    np.testing.assert_allclose(a, np.asarray(e), rtol=1e-3, atol=1e-6)
  moved = raw[2] != 0
  assert abs(np.mean(step[2][moved] == 0) - 0.5) < 4 * math.sqrt(0.25 / moved.sum())


def _tanh_mlp():
  # tanh, not ReLU: every raw gradient entry is nonzero, so zeros in an update are the defence's.
  tf.keras.utils.set_random_seed(1)
  inputs = tf.keras.Input((28, 28, 1))
  h = tf.keras.layers.Flatten()(inputs)
  h = tf.keras.layers.Dense(32, activation="tanh")(h)
  h = tf.keras.layers.BatchNormalization()(h)
  return tf.keras.Model(inputs, tf.keras.layers.Dense(10)(h))


def _delta(before, after, exclude):
  return [a - b for a, b, e in zip(after, before, exclude) if not e]


def _live(delta, x):
  """The delta's entries that training can move: input pixels blank in every image of x
  (the digits' 28x28 frame) give their first-layer kernel rows no gradient."""
  live_rows = np.any(x.reshape(len(x), -1) != 0, axis=0)
  return np.concatenate([delta[0][live_rows].ravel(), *[d.ravel() for d in delta[1:]]])


def test_fit_one_step_update_carries_the_masking_rate(digit_arrays):
  """`fit` of a wrapped model: one SGD step's weight change is masked at the set rate."""
  x, y = digit_arrays[0][:64], digit_arrays[1][:64]
  rate = 0.3
  model = defenses_keras.DefendedModel(_tanh_mlp(), defenses.get_defense("masking", rate), seed=3)
  model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=LOSS)
  model(x[:1])
  exclude = model.gradient_exclusion()
  assert sum(exclude) == 2  # BN gamma, beta
  before = _weights(model)
  model.fit(x, y, batch_size=64, epochs=1, verbose=0)
  flat = _live(_delta(before, _weights(model), exclude), x)
  n = flat.size
  assert abs(np.mean(flat == 0) - rate) <= 4 * math.sqrt(rate * (1 - rate) / n), np.mean(flat == 0)
  bn_moved = [a - b for a, b, e in zip(_weights(model), before, exclude) if e]
  assert all(np.all(d != 0) for d in bn_moved)


@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_defend_update_callback_masks_the_fit_delta(digit_arrays, rate):
  x, y = digit_arrays[0][:200], digit_arrays[1][:200]
  model = _tanh_mlp()
  model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss=LOSS)
  before = model.get_weights()
  callback = defenses_keras.DefendUpdate(defenses.get_defense("masking", rate), seed=7)
  model.fit(x, y, batch_size=50, epochs=2, verbose=0, callbacks=[callback])
  after = model.get_weights()
  exclude = defenses.batchnorm_exclusion(model, model.weights)
  assert sum(exclude) == 4  # gamma, beta, moving mean, moving variance
  delta = _delta(before, after, exclude)
  flat = _live(delta, x)
  sigma = math.sqrt(rate * (1 - rate) / flat.size)
  assert abs(np.mean(flat == 0) - rate) <= 4 * sigma
  kept = [t for t, e in zip(_delta(before, after, [False] * len(after)), exclude) if not e]
  all_kept = np.concatenate([d.ravel() for d in delta])
  assert callback.statistics["zero_fraction"] == pytest.approx(np.mean(all_kept == 0), abs=1e-6)
  assert callback.statistics["clip_scale"] == 1.0
  assert callback.statistics["defended_norm"] == pytest.approx(
    math.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in kept)), rel=1e-4
  )
  # BatchNorm statistics moved with training and were sent as trained.
  moving_var = after[[i for i, e in enumerate(exclude) if e][3]]
  assert np.all(moving_var != 1.0)


def test_defend_weights_delta_clips_and_checks_shapes():
  rng = np.random.default_rng(0)
  before = [rng.normal(size=(5, 4)).astype(np.float32), np.zeros(4, np.float32)]
  after = [b + rng.normal(size=b.shape).astype(np.float32) for b in before]
  norm = math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(after, before)))
  weights, stats = defenses_keras.defend_weights_delta(
    before, after, defenses.get_defense("clipping", 0.5), seed=0
  )
  sent = math.sqrt(sum(float(np.sum((w - b) ** 2)) for w, b in zip(weights, before)))
  assert sent == pytest.approx(0.5, rel=1e-5)
  assert stats["clip_scale"] == pytest.approx(0.5 / norm, rel=1e-5)
  assert stats["norm"] == pytest.approx(norm, rel=1e-5) and stats["zero_fraction"] == 0.0
  weights, _ = defenses_keras.defend_weights_delta(
    before, after, defenses.get_defense("clipping", 0.5), exclude=[False, True]
  )
  np.testing.assert_array_equal(weights[1], after[1])
  with pytest.raises(ValueError, match=r"weight 1: shape \(4,\) before but \(3,\) after"):
    defenses_keras.defend_weights_delta(
      before, [after[0], after[1][:3]], defenses.get_defense("masking", 0.5)
    )
