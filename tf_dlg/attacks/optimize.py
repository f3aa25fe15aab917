"""Batched optimisation loops: L-BFGS (two variants) and Adam.

Each minimises A independent problems at once. A problem is a compiled
`value_fn(position, consts) -> (loss [A], distance [A], d loss / d position [A, n])`
with `position` [A, n] and `consts` a dict of tensors whose leading axis is the attack
axis. Per attack, after every iteration:

* distance < tolerance[a] -> `converged`, the attack stops moving (reference DLG/iDLG
  rule: gradient distance below 1e-6; checking every iteration instead of every 10
  costs nothing inside the compiled loop);
* a non-finite loss, distance or gradient -> `failed`: that attack stops at its last
  finite position; the others go on;
* the loop of the batch ends once no attack is running (or after `iterations`), so
  finished attacks cost work only until the slowest attack of their batch is done.

The loop runs in compiled chunks of `check_every` iterations (one XLA while-loop each);
between chunks the host only updates the progress bar.

Optimisers (`OPTIMIZERS`):
  lbfgs      L-BFGS as in PyTorch's `torch.optim.LBFGS` without line search, which the
             reference DLG/iDLG code uses (lr 1, history 100; first step scaled by
             1/|g|_1): one objective evaluation per iteration, all in one XLA loop.
  tfp_lbfgs  `tfp.optimizer.lbfgs_minimize` with batched positions (Hager-Zhang line
             search, ~3 evaluations per iteration; slower, but monotone).
  adam       Adam, step decayed x0.1 at 3/8, 5/8, 7/8 of `iterations` (Inverting
             Gradients' schedule).

`iterations` counts optimiser iterations. One PyTorch `LBFGS.step` of the reference
code runs up to 20 iterations, so 300 reference steps are up to 6,000 iterations here:
compare time-to-recovery, not iteration counts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

OPTIMIZERS = ("lbfgs", "tfp_lbfgs", "adam")
RUNNING, CONVERGED, FAILED, STALLED = 0, 1, 2, 3
_STATUS_NAMES = {RUNNING: "max_iterations", CONVERGED: "converged", FAILED: "failed",
                 STALLED: "stalled"}


@dataclasses.dataclass
class OptimizationResult:
  """Per attack: final position [A, n], distance, loss, iterations run and status."""
  position: np.ndarray
  distance: np.ndarray
  loss: np.ndarray
  iterations: np.ndarray
  status: np.ndarray


def _finite_rows(*tensors):
  ok = None
  for t in tensors:
    f = tf.math.is_finite(t)
    if t.shape.rank > 1:
      f = tf.reduce_all(f, axis=list(range(1, t.shape.rank)))
    ok = f if ok is None else ok & f
  return ok


def _classify(status, loss, dist, grad, tol):
  """New status of running rows after an evaluation."""
  finite = _finite_rows(loss, dist, grad)
  running = tf.equal(status, RUNNING)
  status = tf.where(running & ~finite, FAILED, status)
  status = tf.where(running & finite & (dist < tol), CONVERGED, status)
  return status


def _keep_where(mask, new, old):
  """Rows of `new` where mask [A], else rows of `old` (any rank with leading A)."""
  m = tf.reshape(mask, [-1] + [1] * (new.shape.rank - 1))
  return tf.where(m, new, old)


def _drive(init_fn, chunk_fn, position, consts, iterations, tolerance, check_every,
           progress):
  """Runs compiled chunks until every attack has finished or `iterations` are spent."""
  a = int(position.shape[0])
  tol = tf.constant(np.broadcast_to(np.asarray(tolerance, np.float32), (a,)))
  state = init_fn(position, consts, tol)
  done = int(np.sum(state["status"].numpy() != RUNNING))
  if progress is not None:
    progress.update(done)
  spent = 0
  while spent < iterations and done < a:
    steps = min(int(check_every), iterations - spent)
    state = chunk_fn(state, consts, tol, tf.constant(steps))
    spent += steps
    now = int(np.sum(state["status"].numpy() != RUNNING))
    if progress is not None:
      progress.update(now - done)
    done = now
  status = state["status"].numpy()
  return OptimizationResult(
      position=state["best_x"].numpy(), distance=state["best_dist"].numpy(),
      loss=state["best_loss"].numpy(), iterations=state["iters"].numpy(),
      status=np.array([_STATUS_NAMES[int(s)] for s in status]))


def _base_state(x, loss, dist, grad, tol):
  a = tf.shape(x)[0]
  status = _classify(tf.zeros([a], tf.int32), loss, dist, grad, tol)
  ok = tf.not_equal(status, FAILED)
  return {"x": x, "loss": loss, "dist": dist, "g": grad, "status": status,
          "iters": tf.zeros([a], tf.int32),
          "best_x": x, "best_loss": tf.where(ok, loss, np.inf),
          "best_dist": tf.where(ok, dist, np.inf)}


def _record(st, x, loss, dist, grad, tol, was_running):
  """Advances running rows; failed rows keep their last finite point."""
  status = _classify(st["status"], loss, dist, grad, tol)
  ok = was_running & tf.not_equal(status, FAILED)
  return dict(st, status=status, iters=st["iters"] + tf.cast(was_running, tf.int32),
              best_x=_keep_where(ok, x, st["best_x"]),
              best_loss=tf.where(ok, loss, st["best_loss"]),
              best_dist=tf.where(ok, dist, st["best_dist"]))


def lbfgs(value_fn: Callable, position: tf.Tensor, consts: Dict, iterations: int,
          tolerance=1e-6, check_every: int = 50, progress=None, compiled=None,
          **options) -> OptimizationResult:
  """Batched fixed-step L-BFGS (PyTorch semantics, no line search).

  `options`: history (100), lr (1.0), jit_compile (True). `compiled`: functions from
  `build_lbfgs` to reuse (saves the XLA compilation of repeated calls).
  """
  init_fn, chunk_fn = compiled or build_lbfgs(value_fn, **options)
  return _drive(init_fn, chunk_fn, position, consts, iterations, tolerance, check_every,
                progress)


def build_lbfgs(value_fn: Callable, history: int = 100, lr: float = 1.0,
                jit_compile: bool = True, iterations: int = 0):
  """Compiled (init_fn, chunk_fn) of the fixed-step L-BFGS."""
  del iterations

  @tf.function(jit_compile=jit_compile, reduce_retracing=True)
  def init_fn(x, c, tol):
    loss, dist, g = value_fn(x, c)
    st = _base_state(x, loss, dist, g, tol)
    a, n = tf.shape(x)[0], tf.shape(x)[1]
    zeros = tf.zeros([history, a, n], x.dtype)
    st.update(S=zeros, Y=zeros, rho=tf.zeros([history, a], x.dtype),
              head=tf.constant(0), hdiag=tf.ones([a], x.dtype), d=tf.zeros_like(x),
              t=tf.zeros([a], x.dtype), gprev=g, first=tf.ones([a], tf.bool))
    return st

  def step(st, c, tol):
    g, first = st["g"], st["first"]
    running = tf.equal(st["status"], RUNNING)
    # Curvature pair of the previous step; pairs with y.s <= 1e-10 are skipped (rho 0).
    s = st["d"] * st["t"][:, None]
    y = g - st["gprev"]
    ys = tf.reduce_sum(y * s, 1)
    ok = (ys > 1e-10) & ~first & running
    rho_new = tf.where(ok, 1.0 / tf.where(ok, ys, 1.0), 0.0)
    h = st["head"]
    S = tf.tensor_scatter_nd_update(st["S"], [[h]], (s * tf.cast(ok, s.dtype)[:, None])[None])
    Y = tf.tensor_scatter_nd_update(st["Y"], [[h]], (y * tf.cast(ok, y.dtype)[:, None])[None])
    rho = tf.tensor_scatter_nd_update(st["rho"], [[h]], rho_new[None])
    head = (h + 1) % history
    hdiag = tf.where(ok, ys / tf.maximum(tf.reduce_sum(y * y, 1), 1e-30), st["hdiag"])
    # Two-loop recursion over the ring buffer, newest pair first.
    alphas = tf.TensorArray(g.dtype, size=history)
    def backward(k, q, alphas):
      i = (head - 1 - k) % history
      alpha = tf.reduce_sum(S[i] * q, 1) * rho[i]
      return k + 1, q - alpha[:, None] * Y[i], alphas.write(i, alpha)
    _, q, alphas = tf.while_loop(lambda k, *_: k < history, backward,
                                 (tf.constant(0), -g, alphas))
    alphas = alphas.stack()
    def forward(k, r):
      i = (head + k) % history
      beta = tf.reduce_sum(Y[i] * r, 1) * rho[i]
      return k + 1, r + S[i] * (alphas[i] - beta)[:, None]
    _, r = tf.while_loop(lambda k, *_: k < history, forward,
                         (tf.constant(0), q * hdiag[:, None]))
    d = _keep_where(first, -g, r)
    t0 = tf.minimum(1.0, 1.0 / tf.maximum(tf.reduce_sum(tf.abs(g), 1), 1e-30)) * lr
    t = tf.where(running, tf.where(first, t0, lr * tf.ones_like(t0)), 0.0)
    x = st["x"] + t[:, None] * d
    loss, dist, g_new = value_fn(x, c)
    st = _record(st, x, loss, dist, g_new, tol, running)
    still = tf.equal(st["status"], RUNNING)
    return dict(st, x=_keep_where(still, x, st["best_x"]), loss=loss, dist=dist,
                g=g_new, gprev=g, d=d, t=t, S=S, Y=Y, rho=rho, head=head, hdiag=hdiag,
                first=first & ~running)

  return init_fn, _chunk_fn(step, jit_compile)



def _chunk_fn(step: Callable, jit_compile: bool):
  """Compiled loop of up to `steps` optimiser steps that ends early once none is running."""

  @tf.function(jit_compile=jit_compile, reduce_retracing=True)
  def chunk_fn(st, c, tol, steps):
    def cond(k, st):
      return (k < steps) & tf.reduce_any(tf.equal(st["status"], RUNNING))
    return tf.while_loop(cond, lambda k, st: (k + 1, step(st, c, tol)),
                         (tf.constant(0), st))[1]

  return chunk_fn

def adam(value_fn: Callable, position: tf.Tensor, consts: Dict, iterations: int,
         tolerance=1e-6, check_every: int = 50, progress=None, compiled=None,
         **options) -> OptimizationResult:
  """Batched Adam with Inverting Gradients' step decay.

  `options`: learning_rate (0.1), jit_compile (True).
  """
  init_fn, chunk_fn = compiled or build_adam(value_fn, iterations=iterations, **options)
  return _drive(init_fn, chunk_fn, position, consts, iterations, tolerance, check_every,
                progress)


def build_adam(value_fn: Callable, iterations: int, learning_rate: float = 0.1,
               jit_compile: bool = True):
  """Compiled (init_fn, chunk_fn) of Adam (its decay schedule depends on `iterations`)."""
  milestones = tf.constant([int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], tf.int32)

  @tf.function(jit_compile=jit_compile, reduce_retracing=True)
  def init_fn(x, c, tol):
    loss, dist, g = value_fn(x, c)
    st = _base_state(x, loss, dist, g, tol)
    st.update(m=tf.zeros_like(x), v=tf.zeros_like(x), k=tf.constant(0))
    return st

  def step(st, c, tol):
    running = tf.equal(st["status"], RUNNING)
    g = st["g"]
    k = st["k"] + 1
    decay = tf.reduce_sum(tf.cast(st["k"] >= milestones, g.dtype))
    lr = learning_rate * tf.pow(tf.constant(0.1, g.dtype), decay)
    m = 0.9 * st["m"] + 0.1 * g
    v = 0.999 * st["v"] + 0.001 * g * g
    kf = tf.cast(k, g.dtype)
    upd = lr * (m / (1 - 0.9 ** kf)) / (tf.sqrt(v / (1 - 0.999 ** kf)) + 1e-8)
    x = st["x"] - _keep_where(running, upd, tf.zeros_like(upd))
    loss, dist, g_new = value_fn(x, c)
    st = _record(st, x, loss, dist, g_new, tol, running)
    return dict(st, x=x, loss=loss, dist=dist, g=g_new, m=m, v=v, k=k)

  return init_fn, _chunk_fn(step, jit_compile)


def tfp_lbfgs(value_fn: Callable, position: tf.Tensor, consts: Dict, iterations: int,
              tolerance=1e-6, check_every: int = 50, progress=None, compiled=None,
              **options) -> OptimizationResult:
  """Batched `tfp.optimizer.lbfgs_minimize`; `options`: history (100), jit_compile.

  Our stopping rule enters tfp through the gradient: a member whose distance is below
  its tolerance (or whose value is not finite) reports a zero gradient, which tfp treats
  as converged (tolerance 0 means |g| <= 0), and is frozen from then on.
  """

  init_fn, chunk_fn = compiled or build_tfp_lbfgs(value_fn, **options)
  return _drive(init_fn, chunk_fn, position, consts, iterations, tolerance, check_every,
                progress)


def build_tfp_lbfgs(value_fn: Callable, history: int = 100, jit_compile: bool = True,
                    iterations: int = 0):
  """Compiled (init_fn, chunk_fn) around `tfp.optimizer.lbfgs_minimize`."""
  del iterations

  def vg(c, tol):
    def value_and_gradients(x):
      loss, dist, g = value_fn(x, c)
      stop = (dist < tol) | ~_finite_rows(loss, dist, g)
      return (tf.where(_finite_rows(loss), loss, np.inf),
              _keep_where(stop, tf.zeros_like(g), g))
    return value_and_gradients

  @tf.function(jit_compile=jit_compile, reduce_retracing=True)
  def init_fn(x, c, tol):
    loss, dist, g = value_fn(x, c)
    st = _base_state(x, loss, dist, g, tol)
    st["opt"] = tfp.optimizer.lbfgs_minimize(vg(c, tol), initial_position=x,
                                             max_iterations=0, num_correction_pairs=history,
                                             tolerance=0.0)
    return st

  @tf.function(jit_compile=jit_compile, reduce_retracing=True)
  def chunk_fn(st, c, tol, steps):
    running = tf.equal(st["status"], RUNNING)
    opt = st["opt"]
    opt = opt._replace(converged=opt.converged | ~running)
    opt = tfp.optimizer.lbfgs_minimize(
        vg(c, tol), initial_position=None, previous_optimizer_results=opt,
        max_iterations=opt.num_iterations + steps, num_correction_pairs=history,
        tolerance=0.0, max_line_search_iterations=20)
    loss, dist, g = value_fn(opt.position, c)
    new = _record(st, opt.position, loss, dist, g, tol, running)
    # tfp stops moving a member it considers converged or failed: finished too.
    stuck = tf.equal(new["status"], RUNNING) & (opt.converged | opt.failed)
    new["status"] = tf.where(stuck, STALLED, new["status"])
    steps_done = opt.num_iterations - st["opt"].num_iterations
    new["iters"] = st["iters"] + tf.where(running, steps_done, 0)
    new["opt"] = opt
    return new

  return init_fn, chunk_fn


BUILDERS = {"lbfgs": build_lbfgs, "tfp_lbfgs": build_tfp_lbfgs, "adam": build_adam}
