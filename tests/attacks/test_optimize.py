"""The batched optimisers on problems with known minima, and slot refill."""

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg.attacks import lbfgs, optimize


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


def _plateau_or_bowl(x, c):
  """Row with c["stuck"] > 0: a plateau (loss 5, zero gradient); else sum(x^2)."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    d = tf.where(c["stuck"] > 0, tf.reduce_sum(0.0 * x, 1) + 5.0, tf.reduce_sum(tf.square(x), 1))
  return d, d, tape.gradient(d, x)


@pytest.mark.parametrize("name,options", [("lbfgs", {"lr": 0.002}), ("adam", {})])
def test_stuck_row_stalls_after_patience_while_a_slow_row_goes_on(name, options):
  """The plateau row stalls after exactly `patience` iterations; the bowl row, which
  L-BFGS at lr 0.002 descends by ~0.4 % per iteration, runs to the limit."""
  res = optimize.minimize(
    name,
    _plateau_or_bowl,
    np.ones([2, 3], np.float32),
    {"stuck": np.array([1.0, 0.0], np.float32)},
    iterations=300,
    tolerance=1e-30,
    check_every=7,
    patience=40,
    jit_compile=False,
    **options,
  )
  assert res.status[0] == "stalled" and res.iterations[0] == 40
  if name == "lbfgs":
    assert res.status[1] == "max_iterations" and res.iterations[1] == 300
    assert res.loss[1] < 0.5 * 3.0  # it kept improving


def _textbook_direction(pairs, g, hdiag):
  """H g by the n-space two-loop recursion (PyTorch's), float64; pairs oldest first."""
  q = g.astype(np.float64)
  alphas = []
  for s, y in reversed(pairs):
    alphas.append(np.dot(s, q) / np.dot(y, s))
    q = q - alphas[-1] * y
  r = hdiag * q
  for (s, y), alpha in zip(pairs, reversed(alphas)):
    r = r + s * (alpha - np.dot(y, r) / np.dot(y, s))
  return r


@pytest.mark.parametrize("solve", [False, True])  # loops (XLA) or triangular solves (graph)
@pytest.mark.parametrize("pushes", [3, 6, 9])  # before and after the ring (history 5) wraps
def test_gram_two_loop_matches_textbook_recursion(pushes, solve):
  rng = np.random.default_rng(pushes)
  history, n = 5, 40
  skipped = {1}  # a pair with y.s <= 1e-10 is stored as zeros and skipped
  g0 = rng.normal(size=(2, n)).astype(np.float32)
  st = lbfgs.add_history({}, tf.constant(g0), tf.constant(g0), history)
  pushed = []
  for k in range(pushes):
    s = rng.normal(size=(2, n)).astype(np.float32)
    y = (s * rng.uniform(0.5, 2.0, size=(2, n)) + 0.1 * rng.normal(size=(2, n))).astype(np.float32)
    ok = np.array([k not in skipped, True])
    s, y = s * ok[:, None], y * ok[:, None]
    g = rng.normal(size=(2, n)).astype(np.float32)
    hist, sg, yg = lbfgs.push_pair(st, tf.constant(s), tf.constant(y), tf.constant(g), ok, history)
    st.update(hist)
    pushed.append((s, y, ok))
  hdiag = np.array([0.7, 1.3], np.float32)
  got = lbfgs.two_loop(
    hist, sg, yg, tf.constant(g), tf.constant(hdiag), history, solve=solve
  ).numpy()
  for slot in range(2):
    # The ring holds the last `history` pushes; a skipped pair still takes its position.
    pairs = [(s[slot], y[slot]) for s, y, ok in pushed[-history:] if ok[slot]]
    want = _textbook_direction(pairs, g[slot], hdiag[slot])
    np.testing.assert_allclose(got[slot], want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


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


def _six_problems():
  rng = np.random.default_rng(1)
  value_fn = _quadratic(
    rng.uniform(0.5, 5.0, size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
  )
  x0 = rng.normal(size=(6, 8)).astype(np.float32)
  scale = np.array([1.0, 30.0, 0.2, 3.0, 100.0, 0.5], np.float32)
  return optimize.build("lbfgs", value_fn, 300, jit_compile=True), x0, {"scale": scale}


@pytest.mark.parametrize("lanes", [2, 3])
def test_lanes_share_one_queue_and_match_one_lane(lanes):
  compiled, x0, consts = _six_problems()
  one = optimize.ArrayQueue(x0, consts, 1e-7)
  optimize.run_queue(compiled, one, 4, 300, check_every=7)
  queue = optimize.ArrayQueue(x0, consts, 1e-7)
  seen = []
  optimize.run_lanes(
    compiled, queue, 2, 300, lanes, check_every=7, on_chunk=lambda j, st: seen.append(j)
  )
  # Every job ran exactly once, in some lane, with exactly its one-lane result.
  assert [r is not None for r in queue.finished] == [True] * 6
  np.testing.assert_array_equal(queue.result().position, one.result().position)
  np.testing.assert_array_equal(queue.result().iterations, one.result().iterations)
  assert {len(j) for j in seen} == {2}  # 2 slots per lane


class _FailingQueue(optimize.ArrayQueue):
  def rows(self, job):
    if job == 4:
      raise RuntimeError("job 4 cannot be read")
    return super().rows(job)


def test_error_in_one_lane_stops_all_and_is_raised():
  compiled, x0, consts = _six_problems()
  queue = _FailingQueue(x0, consts, 1e-7)
  with pytest.raises(RuntimeError, match="job 4 cannot be read"):
    optimize.run_lanes(compiled, queue, 2, 300, 2, check_every=7)
  assert queue.finished[5] is None  # nothing was started after the failure


def test_build_rejects_unknown_optimizer_and_option():
  with pytest.raises(ValueError, match="optimizer='sgd'"):
    optimize.build("sgd", None, 10)
  with pytest.raises(ValueError, match="history"):
    optimize.build("adam", None, 10, history=5)


@pytest.mark.parametrize("jit", [False, True])
def test_the_new_rows_s_y_is_never_read(jit):
  """Leaving the new s's row of s_i . y_j out (the library) against computing it with a
  third product over the buffer (the code before): the same iterates (bit for bit without
  XLA) across a wrapped ring (history 5, 12 iterations) on a rotated quadratic of condition 1,000."""
  rng = np.random.default_rng(3)
  n = 30
  u, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = tf.constant((u * np.logspace(0, 3, n)) @ u.T, tf.float32)
  t = tf.constant(rng.normal(size=n).astype(np.float32))

  def value_fn(x, c):
    del c
    with tf.GradientTape() as tape:
      tape.watch(x)
      d = 0.5 * tf.reduce_sum((x - t) * tf.linalg.matvec(a, x - t), 1)
    return d, d, tape.gradient(d, x)

  x0 = tf.constant(rng.normal(size=(2, n)).astype(np.float32))
  tol = tf.constant([1e-30, 1e-30])
  out = {}
  for new_row in (False, True):
    opt = lbfgs.build_lbfgs(value_fn, jit_compile=jit, history=5, new_row=new_row)
    st = opt.init_fn(x0, {}, tol, tf.constant([True, True]))
    out[new_row] = opt.chunk_fn(st, {}, tol, 12, 10_000, 1, 0)
  assert out[True]["valid"].numpy().all()  # the ring is full of real pairs
  assert not np.array_equal(out[False]["sy"], out[True]["sy"])  # the rows differ ...
  if jit:  # ... XLA may sum the diagonal s . y in another order: rounding only ...
    np.testing.assert_allclose(out[False]["x"], out[True]["x"], rtol=1e-4, atol=1e-5)
  else:  # ... and without it never the iterates
    np.testing.assert_array_equal(out[False]["x"], out[True]["x"])
    np.testing.assert_array_equal(out[False]["loss"], out[True]["loss"])
  assert list(out[False]["iters"].numpy()) == [12, 12]
