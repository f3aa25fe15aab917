"""Batched optimisation loops over a fixed number of slots: L-BFGS (two kinds) and Adam.

A problem is a compiled `value_fn(position, consts) -> (loss [S], distance [S],
d loss / d position [S, n])` over S *slots*; `position` is [S, n] and every tensor of
`consts` has the slot axis first. Each slot holds one independent attack. Per slot,
after every iteration:

* distance < tolerance[s] -> `converged` (reference DLG/iDLG rule, checked every
  iteration inside the compiled loop);
* a non-finite loss, distance or gradient -> `failed`; the others go on;
* `iterations` spent -> `max_iterations`.

A slot's result is its best point: the converged one, else the lowest loss seen.

This module is the entry point: the registry `OPTIMIZERS`, `build` and `minimize`, with
Adam and tfp's L-BFGS; the fixed-step L-BFGS is in `lbfgs`, the per-slot state machine
they share in `slot_state`, and the scheduling below in `batching`.

`run_queue` is continuous batching: compiled chunks of at most `check_every` iterations
run on the slots, and between chunks every finished slot is handed back and refilled
from the queue with fresh optimiser state (nothing of the previous occupant is kept). A
chunk ends early as soon as a slot finishes while work is queued. Every step is a
row-wise function of its slot's state, so an attack's trajectory does not depend on
which slot it runs in, when it entered or what its neighbours do.

`run_lanes` runs several such loops ("lanes") on threads that share one queue. On a
CPU a small attack's ops (LeNet on 28x28 images: ~0.1-1 MFLOP each) are too small for
XLA to spread over cores, so one loop keeps one core busy whatever its slot count;
lanes keep the others busy. Since a trajectory does not depend on its slot, results do
not depend on the number of lanes either.

Optimisers (`OPTIMIZERS`, the one registry):
  lbfgs      L-BFGS as PyTorch's `torch.optim.LBFGS` without line search, which the
             reference DLG/iDLG code uses (lr 1, history 100; first step scaled by
             1/|g|_1): one objective evaluation per iteration.
  tfp_lbfgs  `tfp.optimizer.lbfgs_minimize` (Hager-Zhang line search, ~3 evaluations
             per iteration; monotone but slower). Its state is not per slot, so its
             slots are not refilled: a batch runs until its slowest attack stops.
  adam       Adam, step decayed x0.1 at 3/8, 5/8, 7/8 of `iterations` (Inverting
             Gradients' schedule), counted per slot.

One PyTorch `LBFGS.step` of the reference code runs up to 20 iterations, so 300
reference steps are up to 6,000 iterations here: compare time-to-recovery.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping

import numpy as np
import tensorflow as tf

from tf_dlg.attacks.batching import ArrayQueue, JobQueue, run_lanes, run_queue
from tf_dlg.attacks.lbfgs import build_lbfgs
from tf_dlg.attacks.slot_state import (
  MAXED,
  RUNNING,
  STALLED,
  STATUS_NAMES,
  Compiled,
  OptimizationResult,
  base_state,
  compile_step,
  finite_rows,
  keep_where,
  record,
)

__all__ = [
  "ArrayQueue",
  "Compiled",
  "JobQueue",
  "OPTIMIZERS",
  "OptimizationResult",
  "STATUS_NAMES",
  "build",
  "minimize",
  "run_lanes",
  "run_queue",
]


def build_adam(
  value_fn: Callable, iterations: int, jit_compile: bool = True, learning_rate: float = 0.1
) -> Compiled:
  """Adam with a per-slot step count (its decay schedule depends on `iterations`)."""
  milestones = tf.constant([int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], tf.int32)

  def init_state(x, c, tol, active):
    loss, dist, g = value_fn(x, c)
    st = base_state(x, loss, dist, g, tol, active)
    st.update(m=tf.zeros_like(x), v=tf.zeros_like(x), k=tf.zeros(tf.shape(x)[:1], tf.int32))
    return st

  def step(st, c, tol):
    running = tf.equal(st["status"], RUNNING)
    g = st["g"]
    k = st["k"] + 1
    decay = tf.reduce_sum(tf.cast(st["k"][:, None] >= milestones[None], g.dtype), 1)
    lr = learning_rate * tf.pow(tf.constant(0.1, g.dtype), decay)
    m = 0.9 * st["m"] + 0.1 * g
    v = 0.999 * st["v"] + 0.001 * g * g
    kf = tf.cast(k, g.dtype)[:, None]
    upd = lr[:, None] * (m / (1 - 0.9**kf)) / (tf.sqrt(v / (1 - 0.999**kf)) + 1e-8)
    x = st["x"] - keep_where(running, upd, tf.zeros_like(upd))
    loss, dist, g_new = value_fn(x, c)
    st = record(st, x, loss, dist, g_new, tol, running)
    return dict(st, x=x, loss=loss, dist=dist, g=g_new, m=m, v=v, k=k)

  return compile_step(init_state, step, jit_compile)


def build_tfp_lbfgs(
  value_fn: Callable, iterations: int = 0, jit_compile: bool = True, history: int = 100
) -> Compiled:
  """`tfp.optimizer.lbfgs_minimize` on all slots at once (no refill).

  Our stopping rule enters tfp through the gradient: a member whose distance is below
  its tolerance (or whose value is not finite) reports a zero gradient, which tfp treats
  as converged (tolerance 0 means |g| <= 0), and is frozen from then on.
  """
  del iterations
  import tensorflow_probability as tfp

  def vg(c, tol):
    def value_and_gradients(x):
      loss, dist, g = value_fn(x, c)
      stop = (dist < tol) | ~finite_rows(loss, dist, g)
      return (tf.where(finite_rows(loss), loss, np.inf), keep_where(stop, tf.zeros_like(g), g))

    return value_and_gradients

  @tf.function(jit_compile=jit_compile, reduce_retracing=True, autograph=False)
  def init_fn(x, c, tol, active):
    loss, dist, g = value_fn(x, c)
    st = base_state(x, loss, dist, g, tol, active)
    st["opt"] = tfp.optimizer.lbfgs_minimize(
      vg(c, tol), initial_position=x, max_iterations=0, num_correction_pairs=history, tolerance=0.0
    )
    return st

  @tf.function(jit_compile=jit_compile, reduce_retracing=True, autograph=False)
  def chunk_fn(st, c, tol, steps, max_iters, min_running, patience):
    del min_running, patience  # tfp stops a member that stops moving itself
    running = tf.equal(st["status"], RUNNING)
    opt = st["opt"]
    opt = opt._replace(converged=opt.converged | ~running)
    opt = tfp.optimizer.lbfgs_minimize(
      vg(c, tol),
      initial_position=None,
      previous_optimizer_results=opt,
      max_iterations=opt.num_iterations + steps,
      num_correction_pairs=history,
      tolerance=0.0,
      max_line_search_iterations=20,
    )
    loss, dist, g = value_fn(opt.position, c)
    new = record(st, opt.position, loss, dist, g, tol, running)
    # tfp stops moving a member it considers converged or failed: finished too.
    stuck = tf.equal(new["status"], RUNNING) & (opt.converged | opt.failed)
    new["status"] = tf.where(stuck, STALLED, new["status"])
    new["iters"] = st["iters"] + tf.where(running, opt.num_iterations - st["opt"].num_iterations, 0)
    capped = tf.equal(new["status"], RUNNING) & (new["iters"] >= max_iters)
    new["status"] = tf.where(capped, MAXED, new["status"])
    new["opt"] = opt
    return new

  return Compiled(init_fn, chunk_fn, None)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One registered optimiser: its builder and the options it accepts (defaults)."""

  build: Callable
  defaults: Mapping[str, Any]


OPTIMIZERS: Dict[str, OptimizerSpec] = {
  "lbfgs": OptimizerSpec(build_lbfgs, {"history": 100, "lr": 1.0}),
  "tfp_lbfgs": OptimizerSpec(build_tfp_lbfgs, {"history": 100}),
  "adam": OptimizerSpec(build_adam, {"learning_rate": 0.1}),
}


def build(
  name: str, value_fn: Callable, iterations: int, jit_compile: bool = True, **options
) -> Compiled:
  """Compiled functions of optimiser `name`; unknown names or options raise ValueError."""
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}.")
  spec = OPTIMIZERS[name]
  unknown = sorted(set(options) - set(spec.defaults))
  if unknown:
    raise ValueError(f"optimizer={name!r} takes options {sorted(spec.defaults)}, not {unknown}.")
  return spec.build(
    value_fn, iterations=iterations, jit_compile=jit_compile, **dict(spec.defaults, **options)
  )


def minimize(
  name: str,
  value_fn: Callable,
  position,
  consts,
  iterations: int,
  tolerance=1e-6,
  check_every: int = 50,
  **options,
) -> OptimizationResult:
  """Minimises the problems stacked in `position` / `consts` (one slot per row).

  `options`: `jit_compile` (default True), `patience` (`run_queue`'s, default 0: never
  stall), and the optimiser's own (e.g. L-BFGS's `history` and `lr`).
  """
  jit_compile = options.pop("jit_compile", True)
  patience = options.pop("patience", 0)
  compiled = build(name, value_fn, iterations, jit_compile, **options)
  queue = ArrayQueue(position, consts, tolerance)
  run_queue(
    compiled, queue, len(queue.position), iterations, check_every=check_every, patience=patience
  )
  return queue.result()
