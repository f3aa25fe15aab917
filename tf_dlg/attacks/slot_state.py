"""The per-slot state machine every batched optimiser of `optimize` shares.

A slot is one independent attack. Its state holds the position, loss, distance and
gradient, a status (`RUNNING` ... `SUPERSEDED`), its best point and the stall marks;
`record` advances it after an evaluation and `stall_or_cap` ends rows that stopped
making progress or spent their iterations. `compile_step` wraps an optimiser's
row-wise `step` into the compiled init / chunk / refill functions (`Compiled`), traced
once for any slot count.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

RUNNING, CONVERGED, FAILED, STALLED, MAXED, IDLE, SUPERSEDED = range(7)
STATUS_NAMES = {
  RUNNING: "running",
  CONVERGED: "converged",
  FAILED: "failed",
  STALLED: "stalled",
  MAXED: "max_iterations",
  IDLE: "idle",
  SUPERSEDED: "superseded",
}


@dataclasses.dataclass
class OptimizationResult:
  """Per problem: final position [A, n], distance, loss, iterations run and status."""

  position: np.ndarray
  distance: np.ndarray
  loss: np.ndarray
  iterations: np.ndarray
  status: np.ndarray


@dataclasses.dataclass(frozen=True)
class Compiled:
  """Compiled functions of one optimiser for one objective.

  init_fn(x, c, tol, active) -> state; chunk_fn(state, c, tol, steps, max_iters,
  min_running, patience) -> state; refill_fn(state, x, c, tol, entering) -> state, or None when
  the optimiser cannot refill single slots. Every state entry but slot-free scalars
  has the slot axis first.
  """

  init_fn: Callable
  chunk_fn: Callable
  refill_fn: Optional[Callable]


def finite_rows(*tensors):
  ok = None
  for t in tensors:
    f = tf.math.is_finite(t)
    if t.shape.rank > 1:
      f = tf.reduce_all(f, axis=list(range(1, t.shape.rank)))
    ok = f if ok is None else ok & f
  return ok


def classify(status, loss, dist, grad, tol):
  """New status of running rows after an evaluation."""
  finite = finite_rows(loss, dist, grad)
  running = tf.equal(status, RUNNING)
  status = tf.where(running & ~finite, FAILED, status)
  return tf.where(running & finite & (dist < tol), CONVERGED, status)


def keep_where(mask, new, old):
  """Rows of `new` where mask [S], else those of `old` (slot axis first)."""
  mask = tf.reshape(mask, [-1] + [1] * (new.shape.rank - 1))
  return tf.where(mask, new, old)


def merge(mask, new, old):
  """State `new` in the slots of mask, `old` elsewhere; slot-free scalars stay `old`."""
  return {k: (old[k] if old[k].shape.rank == 0 else keep_where(mask, new[k], old[k])) for k in old}


def base_state(x, loss, dist, grad, tol, active):
  s = tf.shape(x)[0]
  status = tf.where(active, tf.zeros([s], tf.int32), IDLE)
  status = classify(status, loss, dist, grad, tol)
  ok = tf.not_equal(status, FAILED)
  return {
    "x": x,
    "loss": loss,
    "dist": dist,
    "g": grad,
    "status": status,
    "iters": tf.zeros([s], tf.int32),
    "best_x": x,
    "best_loss": tf.where(ok, loss, np.inf),
    "best_dist": tf.where(ok, dist, np.inf),
    "mark_loss": tf.where(ok, loss, np.inf),  # best loss at the last real progress
    "mark_iter": tf.zeros([s], tf.int32),
  }


def record(st, x, loss, dist, grad, tol, was_running):
  """Advances running rows; every row keeps its best point (lowest loss, or converged).

  The optimiser goes on from its newest point, but the result is the best one seen: a
  fixed-step L-BFGS can leave a near-solution and wander (no ground truth is needed to
  prefer the lower loss), and a failed row keeps its best finite point.
  """
  status = classify(st["status"], loss, dist, grad, tol)
  ok = was_running & tf.not_equal(status, FAILED)
  better = ok & ((loss < st["best_loss"]) | tf.equal(status, CONVERGED))
  return dict(
    st,
    status=status,
    iters=st["iters"] + tf.cast(was_running, tf.int32),
    best_x=keep_where(better, x, st["best_x"]),
    best_loss=tf.where(better, loss, st["best_loss"]),
    best_dist=tf.where(better, dist, st["best_dist"]),
  )


# Real progress: the best loss falls by at least this fraction.
PROGRESS = 1e-2


def stall_or_cap(st, max_iters, patience):
  """Running rows without real progress for `patience` iterations (> 0) -> stalled;
  rows that spent `max_iters` -> max_iterations."""
  progress = st["best_loss"] < st["mark_loss"] * (1.0 - PROGRESS)
  st = dict(
    st,
    mark_loss=tf.where(progress, st["best_loss"], st["mark_loss"]),
    mark_iter=tf.where(progress, st["iters"], st["mark_iter"]),
  )
  running = tf.equal(st["status"], RUNNING)
  stalled = running & (patience > 0) & (st["iters"] - st["mark_iter"] >= patience)
  capped = running & ~stalled & (st["iters"] >= max_iters)
  return dict(st, status=tf.where(stalled, STALLED, tf.where(capped, MAXED, st["status"])))


def compile_step(
  init_state: Callable,
  step: Callable,
  jit_compile: bool,
) -> Compiled:
  """init / chunk / refill functions around a row-wise `step(state, c, tol)`."""

  @tf.function(jit_compile=jit_compile, autograph=False)
  def init_fn(x, c, tol, active):
    return init_state(x, c, tol, active)

  @tf.function(jit_compile=jit_compile, autograph=False)
  def refill_fn(st, x, c, tol, entering):
    return merge(entering, init_state(x, c, tol, entering), st)

  @tf.function(jit_compile=jit_compile, autograph=False)
  def chunk_fn(st, c, tol, steps, max_iters, min_running, patience):
    def count(st):
      return tf.reduce_sum(tf.cast(tf.equal(st["status"], RUNNING), tf.int32))

    def body(k, st):
      st = stall_or_cap(step(st, c, tol), max_iters, patience)
      return k + 1, st

    return tf.while_loop(
      lambda k, st: (k < steps) & (count(st) >= min_running), body, (tf.constant(0), st)
    )[1]

  return Compiled(_slot_generic(init_fn), _slot_generic(chunk_fn), _slot_generic(refill_fn))


def _relaxed_spec(value):
  """TensorSpec of `value` (a nest) with the leading slot axis unknown."""
  value = tf.convert_to_tensor(value)
  shape = value.shape.as_list()
  if shape:
    shape[0] = None
  return tf.TensorSpec(shape, value.dtype)


def _slot_generic(fn):
  """`fn` traced once with the slot count unknown, then reused for every slot count.

  Otherwise TensorFlow traces the first call for its exact slot count and later ones
  generically; XLA then compiles the two traces differently and an attack's float
  rounding would depend on which one (init or refill, first or later batch) it met.
  """
  traced = []

  def call(*args):
    if not traced:
      fn.get_concrete_function(*tf.nest.map_structure(_relaxed_spec, list(args)))
      traced.append(True)
    return fn(*args)

  call.python_function = fn
  return call
