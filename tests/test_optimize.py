"""The batched optimisers on problems with known minima, and slot refill."""

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg.attacks import optimize


def _quadratic(a_diag, target):
  """0.5 (x - t)^T diag(a) (x - t) per row: minimum 0 at x = t."""
  a = tf.constant(a_diag, tf.float32)
  t = tf.constant(target, tf.float32)

  def value_fn(x, c):
    with tf.GradientTape() as tape:
      tape.watch(x)
      d = 0.5 * tf.reduce_sum(c["scale"][:, None] * a * tf.square(x - t), 1)
    return d, d, tape.gradient(d, x)

  return value_fn


def test_lbfgs_finds_known_minimum_like_tfp():
  import tensorflow_probability as tfp

  rng = np.random.default_rng(0)
  a_diag = rng.uniform(0.5, 20.0, size=12).astype(np.float32)  # condition number 40
  target = rng.normal(size=12).astype(np.float32)
  value_fn = _quadratic(a_diag, target)
  x0 = rng.normal(size=(3, 12)).astype(np.float32)
  consts = {"scale": np.ones(3, np.float32)}
  ours = optimize.minimize(
    "lbfgs", value_fn, x0, consts, iterations=200, tolerance=1e-10, jit_compile=False
  )
  assert set(ours.status) == {"converged"}
  np.testing.assert_allclose(ours.position, np.broadcast_to(target, (3, 12)), atol=1e-4)
  assert np.all(ours.iterations < 60)  # fixed-step L-BFGS: superlinear on a quadratic

  def vg(x):
    d, _, g = value_fn(x, {"scale": tf.ones([3])})
    return d, g

  ref = tfp.optimizer.lbfgs_minimize(vg, initial_position=tf.constant(x0), tolerance=1e-8)
  np.testing.assert_allclose(ours.position, ref.position.numpy(), atol=1e-4)


def test_failed_row_stops_alone_and_others_converge():
  target = tf.constant([[0.5, -0.25]])

  def value_fn(x, c):
    with tf.GradientTape() as tape:
      tape.watch(x)
      d = tf.reduce_sum(tf.square(x - target), 1) + c["poison"]
    return d, d, tape.gradient(d, x)

  consts = {"poison": np.array([0.0, np.nan], np.float32)}
  res = optimize.minimize(
    "lbfgs",
    value_fn,
    np.zeros([2, 2], np.float32),
    consts,
    iterations=100,
    tolerance=1e-8,
    jit_compile=False,
  )
  assert list(res.status) == ["converged", "failed"]


@pytest.mark.parametrize("name,slots", [("lbfgs", 2), ("lbfgs", 3), ("lbfgs", 4), ("adam", 2)])
def test_refilled_slots_match_solo_runs(name, slots):
  """Six problems of different difficulty on 2, 3 or 4 slots (3, 4: the batch shrinks to
  2 for the last ones, never to 1): each equals its solo run exactly."""
  rng = np.random.default_rng(1)
  value_fn = _quadratic(
    rng.uniform(0.5, 5.0, size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
  )
  x0 = rng.normal(size=(6, 8)).astype(np.float32)
  scale = np.array([1.0, 30.0, 0.2, 3.0, 100.0, 0.5], np.float32)
  opts = {"learning_rate": 0.1} if name == "adam" else {}
  tol = 1e-2 if name == "adam" else 1e-7
  compiled = optimize.build(name, value_fn, 300, jit_compile=True, **opts)
  queue = optimize.ArrayQueue(x0, {"scale": scale}, tol)
  optimize.run_queue(compiled, queue, slots, 300, check_every=7)
  together = queue.result()
  assert len(set(together.iterations)) > 2  # they did finish at different iterations
  for i in range(6):
    solo = optimize.ArrayQueue(x0[i : i + 1], {"scale": scale[i : i + 1]}, tol)
    optimize.run_queue(compiled, solo, 2, 300, check_every=7)
    alone = solo.result()
    assert alone.iterations[0] == together.iterations[i]
    np.testing.assert_array_equal(alone.position[0], together.position[i])


def test_build_rejects_unknown_optimizer_and_option():
  with pytest.raises(ValueError, match="optimizer='sgd'"):
    optimize.build("sgd", None, 10)
  with pytest.raises(ValueError, match="history"):
    optimize.build("adam", None, 10, history=5)
