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
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

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
  return tf.where(running & finite & (dist < tol), CONVERGED, status)


def _keep_where(mask, new, old):
  """Rows of `new` where mask [S], else those of `old` (slot axis first)."""
  mask = tf.reshape(mask, [-1] + [1] * (new.shape.rank - 1))
  return tf.where(mask, new, old)


def _merge(mask, new, old):
  """State `new` in the slots of mask, `old` elsewhere; slot-free scalars stay `old`."""
  return {k: (old[k] if old[k].shape.rank == 0 else _keep_where(mask, new[k], old[k])) for k in old}


def _base_state(x, loss, dist, grad, tol, active):
  s = tf.shape(x)[0]
  status = tf.where(active, tf.zeros([s], tf.int32), IDLE)
  status = _classify(status, loss, dist, grad, tol)
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


def _record(st, x, loss, dist, grad, tol, was_running):
  """Advances running rows; every row keeps its best point (lowest loss, or converged).

  The optimiser goes on from its newest point, but the result is the best one seen: a
  fixed-step L-BFGS can leave a near-solution and wander (no ground truth is needed to
  prefer the lower loss), and a failed row keeps its best finite point.
  """
  status = _classify(st["status"], loss, dist, grad, tol)
  ok = was_running & tf.not_equal(status, FAILED)
  better = ok & ((loss < st["best_loss"]) | tf.equal(status, CONVERGED))
  return dict(
    st,
    status=status,
    iters=st["iters"] + tf.cast(was_running, tf.int32),
    best_x=_keep_where(better, x, st["best_x"]),
    best_loss=tf.where(better, loss, st["best_loss"]),
    best_dist=tf.where(better, dist, st["best_dist"]),
  )


# Real progress: the best loss falls by at least this fraction.
PROGRESS = 1e-2


def _stall_or_cap(st, max_iters, patience):
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


def _compile(
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
    return _merge(entering, init_state(x, c, tol, entering), st)

  @tf.function(jit_compile=jit_compile, autograph=False)
  def chunk_fn(st, c, tol, steps, max_iters, min_running, patience):
    def count(st):
      return tf.reduce_sum(tf.cast(tf.equal(st["status"], RUNNING), tf.int32))

    def body(k, st):
      st = _stall_or_cap(step(st, c, tol), max_iters, patience)
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


def _lbfgs_state(st, x, g, history: int):
  """`st` plus L-BFGS's per-slot curvature history, empty (exact zeros).

  `pairs` [S, 2m, n] holds s_i in rows 0..m-1 and y_i in rows m..2m-1 at ring positions
  (one buffer, so one matrix product reads all pairs); `sy` [S, m, m] = s_i . y_j and
  `yy` [S, m, m] = y_i . y_j are kept up to date, so a step never loops over the pairs.
  """
  s, n = tf.shape(x)[0], tf.shape(x)[1]
  square = tf.zeros([s, history, history], x.dtype)
  st.update(
    pairs=tf.zeros([s, 2 * history, n], x.dtype),
    sy=square,
    yy=square,
    valid=tf.zeros([s, history], tf.bool),
    head=tf.zeros([s], tf.int32),
    hdiag=tf.ones([s], x.dtype),
    d=tf.zeros_like(x),
    t=tf.zeros([s], x.dtype),
    gprev=g,
    first=tf.ones([s], tf.bool),
  )
  return st


def build_lbfgs(
  value_fn: Callable,
  iterations: int = 0,
  jit_compile: bool = True,
  history: int = 100,
  lr: float = 1.0,
) -> Compiled:
  """Fixed-step L-BFGS (PyTorch semantics, no line search), per-slot history.

  The direction is PyTorch's two-loop recursion (`_two_loop`). Every slot has its own
  ring head, reset when it enters, so its pairs sit at the same positions and are
  summed in the same order whether it ran alone, in a batch or entered a slot late.
  """
  del iterations

  def init_state(x, c, tol, active):
    loss, dist, g = value_fn(x, c)
    return _lbfgs_state(_base_state(x, loss, dist, g, tol, active), x, g, history)

  def step(st, c, tol):
    g, first = st["g"], st["first"]
    running = tf.equal(st["status"], RUNNING)
    # Curvature pair of the previous step; pairs with y.s <= 1e-10 are skipped (zeros).
    s = st["d"] * st["t"][:, None]
    y = g - st["gprev"]
    ys = tf.reduce_sum(y * s, 1)
    ok = (ys > 1e-10) & ~first & running
    okf = tf.cast(ok, s.dtype)[:, None]
    hist, sg, yg = _push_pair(st, s * okf, y * okf, g, ok, history)
    hdiag = tf.where(ok, ys / tf.maximum(tf.reduce_sum(y * y, 1), 1e-30), st["hdiag"])
    direction = _two_loop(hist, sg, yg, g, hdiag, history, solve=not jit_compile)
    d = _keep_where(first, -g, -direction)
    t0 = tf.minimum(1.0, 1.0 / tf.maximum(tf.reduce_sum(tf.abs(g), 1), 1e-30)) * lr
    t = tf.where(running, tf.where(first, t0, lr * tf.ones_like(t0)), 0.0)
    x = st["x"] + t[:, None] * d
    loss, dist, g_new = value_fn(x, c)
    st = _record(st, x, loss, dist, g_new, tol, running)
    still = tf.equal(st["status"], RUNNING)
    return dict(
      st,
      x=_keep_where(still, x, st["best_x"]),
      loss=loss,
      dist=dist,
      g=g_new,
      gprev=g,
      d=d,
      t=t,
      hdiag=hdiag,
      first=first & ~running,
      **hist,
    )

  return _compile(init_state, step, jit_compile)


def _push_pair(st, s, y, g, ok, history):
  """(history with pair (s, y) written at the head, S^T g, Y^T g after it).

  The pair is written first, so the buffer is updated in place, and one product of the
  new buffer with [g, s, y] then gives every new inner product.
  """
  m, h = history, st["head"]  # h: [S]
  b = tf.shape(g)[0]
  rows = tf.stack([h, h + m], 1)[:, :, None]
  idx = tf.concat([tf.tile(tf.range(b)[:, None, None], [1, 2, 1]), rows], 2)  # [S, 2, 2]
  pairs = tf.tensor_scatter_nd_update(st["pairs"], idx, tf.stack([s, y], 1))
  prod = tf.linalg.matmul(pairs, tf.stack([g, s, y], axis=2))  # [S, 2m, 3]
  at = tf.one_hot(h, m, on_value=True, off_value=False)  # [S, m]

  def put_cross(mat, row, col):  # row h <- row, column h <- col
    return tf.where(at[:, :, None], row[:, None, :], tf.where(at[:, None, :], col[:, :, None], mat))

  hist = {
    "pairs": pairs,
    "sy": put_cross(st["sy"], prod[:, m:, 1], prod[:, :m, 2]),
    "yy": put_cross(st["yy"], prod[:, m:, 2], prod[:, m:, 2]),
    "valid": tf.where(at, ok[:, None], st["valid"]),
    "head": (h + 1) % m,
  }
  return hist, prod[:, :m, 0], prod[:, m:, 0]


def _two_loop(hist, sg, yg, g, hdiag, history, solve=False):
  """H g for L-BFGS's inverse Hessian H: PyTorch's two-loop recursion, run on Gram matrices.

  Every inner product the recursion takes with an n-vector is a combination of
  `sg` = S^T g, `yg` = Y^T g (ring order) and the maintained s_i . y_j, y_i . y_j, so both loops run over
  m-vectors (m = `history`), and the pairs are read once more, to form
  H g = hdiag g + S (alpha - beta) - hdiag Y alpha. On a CPU a batch's pairs do not fit
  in the cache; reading them 2m times, as the textbook loops over n-vectors do, cost
  several times the attack's own gradient evaluation. Skipped and empty pairs have
  rho = 0 and contribute exact zeros.

  Each loop is a triangular system in the m-vector: (I + diag(rho) triu(SY, 1)) alpha =
  rho a, then (I + diag(rho) tril(SY^T, -1)) c = alpha - rho yq. `solve=True` hands both
  to `tf.linalg.triangular_solve`: without XLA, 2 x m loop iterations of small ops cost
  ~8 ms per step (measured: a 180-iteration attack ran 10 ms per iteration), which the
  one-call solve removes; under XLA the loops are cheaper than XLA CPU's solve (measured
  3x slower for one slot), so compiled runs keep them.
  """
  m = history
  head = hist["head"][:, None]  # [S, 1]
  order = (head + tf.range(m)[None]) % m  # ring position of age rank 0 (oldest) .. m-1

  def aged(v, axis=1):
    return tf.gather(v, order, axis=axis, batch_dims=1)

  sy = aged(aged(hist["sy"]), 2)  # [S, m, m]: s_i . y_j by age
  yy = aged(aged(hist["yy"]), 2)
  ys = tf.linalg.diag_part(sy)
  rho = tf.where(aged(hist["valid"]), 1.0 / tf.where(aged(hist["valid"]), ys, 1.0), 0.0)
  a, b = aged(sg), aged(yg)
  if solve:
    return _two_loop_solved(hist, (sy, yy, rho, a, b), g, hdiag, head, m)

  def backward(i, alpha):  # newest first: alpha_i = rho_i s_i . (g - sum_{j>i} alpha_j y_j)
    ai = rho[:, i] * (a[:, i] - tf.reduce_sum(sy[:, i, :] * alpha, 1))
    return i - 1, alpha + ai[:, None] * tf.one_hot(i, m, dtype=g.dtype)[None]

  alpha = tf.while_loop(lambda i, _: i >= 0, backward, (m - 1, tf.zeros_like(a)))[1]
  yq = hdiag[:, None] * (b - tf.linalg.matvec(yy, alpha))  # y_i . (hdiag q)

  def forward(i, c):  # oldest first: beta_i = rho_i y_i . r, c_j = alpha_j - beta_j
    beta = rho[:, i] * (yq[:, i] + tf.reduce_sum(sy[:, :, i] * c, 1))
    return i + 1, c + (alpha[:, i] - beta)[:, None] * tf.one_hot(i, m, dtype=g.dtype)[None]

  c = tf.while_loop(lambda i, _: i < m, forward, (0, tf.zeros_like(a)))[1]
  return _direction(hist, c, alpha, g, hdiag, head, m)


def _direction(hist, c, alpha, g, hdiag, head, m):
  """hdiag g + S c - hdiag Y alpha, with c and alpha by age, the pairs by ring position."""
  back = (tf.range(m)[None] - head) % m  # age rank of each ring position
  both = tf.concat([c, -hdiag[:, None] * alpha], 1)
  coef = tf.gather(both, tf.concat([back, back + m], 1), axis=1, batch_dims=1)
  return hdiag[:, None] * g + tf.linalg.matmul(coef[:, None, :], hist["pairs"])[:, 0, :]


def _two_loop_solved(hist, aged_terms, g, hdiag, head, m):
  """`_two_loop`'s recursions as two triangular solves (same H g up to rounding)."""
  sy, yy, rho, a, b = aged_terms
  eye = tf.eye(m, dtype=g.dtype)[None]
  upper = eye + rho[:, :, None] * tf.linalg.band_part(sy, 0, -1) * (1.0 - eye)
  alpha = tf.linalg.triangular_solve(upper, (rho * a)[:, :, None], lower=False)[:, :, 0]
  yq = hdiag[:, None] * (b - tf.linalg.matvec(yy, alpha))
  syt = tf.linalg.matrix_transpose(sy)
  lower = eye + rho[:, :, None] * tf.linalg.band_part(syt, -1, 0) * (1.0 - eye)
  c = tf.linalg.triangular_solve(lower, (alpha - rho * yq)[:, :, None], lower=True)[:, :, 0]
  return _direction(hist, c, alpha, g, hdiag, head, m)


def build_adam(
  value_fn: Callable, iterations: int, jit_compile: bool = True, learning_rate: float = 0.1
) -> Compiled:
  """Adam with a per-slot step count (its decay schedule depends on `iterations`)."""
  milestones = tf.constant([int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], tf.int32)

  def init_state(x, c, tol, active):
    loss, dist, g = value_fn(x, c)
    st = _base_state(x, loss, dist, g, tol, active)
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
    x = st["x"] - _keep_where(running, upd, tf.zeros_like(upd))
    loss, dist, g_new = value_fn(x, c)
    st = _record(st, x, loss, dist, g_new, tol, running)
    return dict(st, x=x, loss=loss, dist=dist, g=g_new, m=m, v=v, k=k)

  return _compile(init_state, step, jit_compile)


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
      stop = (dist < tol) | ~_finite_rows(loss, dist, g)
      return (tf.where(_finite_rows(loss), loss, np.inf), _keep_where(stop, tf.zeros_like(g), g))

    return value_and_gradients

  @tf.function(jit_compile=jit_compile, reduce_retracing=True, autograph=False)
  def init_fn(x, c, tol, active):
    loss, dist, g = value_fn(x, c)
    st = _base_state(x, loss, dist, g, tol, active)
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
    new = _record(st, opt.position, loss, dist, g, tol, running)
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


class JobQueue:
  """What `run_queue` needs from its caller (see `ArrayQueue` for the simplest one).

  next() -> the next job id or None; rows(job) -> (x0 [n], consts row (a nest of arrays
  without the slot axis), tolerance); finish(job, row) -> ids of jobs to cancel
  (queued ones are skipped, running ones leave as `superseded`); `row` is a dict of
  x, distance, loss, iterations, status (a name).
  """

  def next(self) -> Optional[int]:
    raise NotImplementedError

  def rows(self, job: int):
    raise NotImplementedError

  def finish(self, job: int, row: Dict) -> Iterable[int]:
    raise NotImplementedError

  def stopped(self) -> bool:
    """True: `run_queue` returns after its current chunk, dropping running jobs."""
    return False

  def cancelled_jobs(self) -> Set[int]:
    """Jobs cancelled through other lanes' `finish` calls (see `run_lanes`)."""
    return set()


class _SharedQueue(JobQueue):
  """A queue several lanes pull from: calls serialised, cancellations seen by all lanes,
  and setting `aborted` stops every lane after its current chunk (one lane failed)."""

  def __init__(self, queue: JobQueue):
    self.queue = queue
    self.lock = threading.Lock()
    self.cancelled = set()
    self.aborted = threading.Event()

  def next(self):
    with self.lock:
      return None if self.aborted.is_set() else self.queue.next()

  def rows(self, job):
    with self.lock:
      return self.queue.rows(job)

  def finish(self, job, row):
    with self.lock:
      cancel = set(self.queue.finish(job, row))
      self.cancelled |= cancel
      return cancel

  def stopped(self):
    return self.aborted.is_set() or self.queue.stopped()

  def cancelled_jobs(self):
    with self.lock:
      return set(self.cancelled)


class ArrayQueue(JobQueue):
  """Jobs 0..A-1 given as stacked arrays; collects an `OptimizationResult`."""

  def __init__(self, position, consts, tolerance):
    self.position = np.asarray(position, np.float32)
    self.consts = tf.nest.map_structure(np.asarray, consts)
    a = len(self.position)
    self.tolerance = np.broadcast_to(np.asarray(tolerance, np.float32), (a,))
    self._next = 0
    self.finished = [None] * a

  def next(self):
    if self._next >= len(self.position):
      return None
    self._next += 1
    return self._next - 1

  def rows(self, job):
    return (
      self.position[job],
      tf.nest.map_structure(lambda v: v[job], self.consts),
      self.tolerance[job],
    )

  def finish(self, job, row):
    self.finished[job] = row
    return ()

  def result(self) -> OptimizationResult:
    rows = self.finished
    return OptimizationResult(
      position=np.stack([r["x"] for r in rows]),
      distance=np.array([r["distance"] for r in rows]),
      loss=np.array([r["loss"] for r in rows]),
      iterations=np.array([r["iterations"] for r in rows]),
      status=np.array([r["status"] for r in rows]),
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


class _Slots:
  """Host side of the slots: which job sits where and the stacked per-slot inputs."""

  def __init__(self, queue: JobQueue, num_slots: int, first: int):
    self.queue = queue
    self.exhausted = False
    self.jobs: List[Optional[int]] = [None] * num_slots
    x, c, tol = queue.rows(first)
    self.x = np.repeat(np.asarray(x, np.float32)[None], num_slots, 0)
    self.c = tf.nest.map_structure(lambda v: np.repeat(np.asarray(v)[None], num_slots, 0), c)
    self.tol = np.full(num_slots, tol, np.float32)
    self._put(0, first, x, c, tol)

  def _put(self, slot, job, x, c, tol):
    self.jobs[slot] = job
    self.x[slot] = x
    for dst, src in zip(tf.nest.flatten(self.c), tf.nest.flatten(c)):
      dst[slot] = src
    self.tol[slot] = tol

  def fill(self, free: Iterable[int]) -> np.ndarray:
    """Puts queued jobs into the `free` slots; returns the mask of slots filled."""
    entering = np.zeros(len(self.jobs), bool)
    for slot in free:
      job = self.queue.next()
      if job is None:
        self.exhausted = True
        break
      self._put(slot, job, *self.queue.rows(job))
      entering[slot] = True
    return entering

  def take(self, idx: List[int]) -> None:
    """Keeps only slots `idx`, in that order."""
    self.jobs = [self.jobs[i] for i in idx]
    self.x, self.tol = self.x[idx], self.tol[idx]
    self.c = tf.nest.map_structure(lambda v: v[idx], self.c)

  def tensors(self):
    return (tf.constant(self.x), tf.nest.map_structure(tf.constant, self.c), tf.constant(self.tol))


def _compact(st, slots: _Slots):
  """Halves the slots while at most half are busy and the queue is empty.

  Idle slots still cost a full row of every batched op, so a long last attack would
  otherwise pay for all slots. Every slot count >= 2 rounds alike under XLA, so moving
  an attack to a smaller batch does not change its result.
  """
  busy = [i for i, j in enumerate(slots.jobs) if j is not None]
  size = len(slots.jobs)
  while size > 2 and len(busy) <= size // 2:
    size = max(2, size // 2)  # never 1: XLA rounds a size-1 slot axis differently
  if size == len(slots.jobs):
    return st, False
  idle = [i for i, j in enumerate(slots.jobs) if j is None]
  idx = busy + idle[: size - len(busy)]
  slots.take(idx)
  return {k: v if v.shape.rank == 0 else tf.gather(v, idx) for k, v in st.items()}, True


def _harvest(st, slots: _Slots) -> Dict:
  """Hands finished slots' results to the queue and supersedes cancelled jobs."""
  status = st["status"].numpy()
  done = [s for s, j in enumerate(slots.jobs) if j is not None and status[s] != RUNNING]
  shared = slots.queue.cancelled_jobs()  # cancellations from other lanes
  if not done and not any(j in shared for j in slots.jobs if j is not None):
    return st
  fields = {k: st[k].numpy() for k in ("best_x", "best_dist", "best_loss", "iters")}

  def row(s, name):
    return {
      "x": fields["best_x"][s],
      "distance": float(fields["best_dist"][s]),
      "loss": float(fields["best_loss"][s]),
      "iterations": int(fields["iters"][s]),
      "status": name,
    }

  cancel = set(shared)
  for s in done:
    cancel.update(slots.queue.finish(slots.jobs[s], row(s, STATUS_NAMES[int(status[s])])))
    slots.jobs[s] = None
  gone = [s for s, j in enumerate(slots.jobs) if j is not None and j in cancel]
  for s in gone:
    slots.queue.finish(slots.jobs[s], row(s, STATUS_NAMES[SUPERSEDED]))
    slots.jobs[s] = None
  if gone:
    mask = np.zeros(len(status), bool)
    mask[gone] = True
    st = dict(st, status=tf.where(mask, SUPERSEDED, st["status"]))
  return st


def run_queue(
  compiled: Compiled,
  queue: JobQueue,
  num_slots: int,
  iterations: int,
  check_every: int = 50,
  on_chunk: Optional[Callable] = None,
  upgrade: Optional[Tuple[Compiled, int]] = None,
  patience: int = 0,
) -> None:
  """Continuous batching: runs every job of `queue` on `num_slots` slots.

  Args:
    compiled: From `build`.
    queue: The jobs; results go back through `queue.finish`.
    num_slots: Slots of the compiled loop (its batch size).
    iterations: Maximum iterations per job.
    check_every: Most iterations per compiled chunk.
    on_chunk: Optional `on_chunk(jobs, state)` after every chunk (`jobs[s]`: the job in
      slot s or None; `state`: the optimiser state, `best_x` [S, n] etc.). Costs
      nothing when None.
    upgrade: Optional (compiled, after): once a slot has run `after` iterations, go on
      with these functions (same state; e.g. XLA ones whose compilation only long runs
      repay).
    patience: A job whose best loss has not fallen by `PROGRESS` (relative) for this
      many iterations leaves as `stalled`; 0: never.
  """
  first = queue.next()
  if first is None:  # nothing queued (e.g. other lanes took every job)
    return
  slots = _Slots(queue, num_slots, first)
  entering = slots.fill(range(1, num_slots))
  entering[0] = True
  x, c, tol = slots.tensors()
  st = compiled.init_fn(x, c, tol, tf.constant(entering))
  steps, max_iters, stall_after = (tf.constant(int(v)) for v in (check_every, iterations, patience))
  while True:
    st = _harvest(st, slots)
    free = [s for s, j in enumerate(slots.jobs) if j is None]
    if free and (compiled.refill_fn is not None or len(free) == num_slots):
      entering = slots.fill(free)
      if entering.any():
        x, c, tol = slots.tensors()
        if compiled.refill_fn is None:
          st = compiled.init_fn(x, c, tol, tf.constant(entering))
        else:
          st = compiled.refill_fn(st, x, c, tol, tf.constant(entering))
        continue  # an entering job may already be finished at its starting point
    running = sum(j is not None for j in slots.jobs)
    if not running:
      return
    if compiled.refill_fn is not None and slots.exhausted:
      st, changed = _compact(st, slots)
      if changed:
        x, c, tol = slots.tensors()
    # With refills a chunk ends as soon as one slot finishes, so it is refilled at once.
    min_running = tf.constant(running if compiled.refill_fn is not None else 1)
    if upgrade is not None and int(tf.reduce_max(st["iters"])) >= upgrade[1]:
      compiled, upgrade = upgrade[0], None
    st = compiled.chunk_fn(st, c, tol, steps, max_iters, min_running, stall_after)
    if on_chunk is not None:
      on_chunk(list(slots.jobs), st)
    if queue.stopped():
      return


def run_lanes(
  compiled: Compiled, queue: JobQueue, slots_per_lane: int, iterations: int, lanes: int, **options
) -> None:
  """`run_queue` on `lanes` threads sharing `queue`, `slots_per_lane` slots each.

  `options` are `run_queue`'s; an `on_chunk` is called under a lock (one lane at a time). The first error of any lane
  stops the others after their current chunk and is raised here.
  """
  if lanes <= 1:
    return run_queue(compiled, queue, slots_per_lane, iterations, **options)
  shared = _SharedQueue(queue)
  if options.get("on_chunk") is not None:
    on_chunk, lock = options["on_chunk"], threading.Lock()

    def locked(*args):
      with lock:
        on_chunk(*args)

    options["on_chunk"] = locked
  errors = []

  def lane():
    try:
      run_queue(compiled, shared, slots_per_lane, iterations, **options)
    except BaseException as e:  # noqa: BLE001 -- re-raised in the calling thread
      errors.append(e)
      shared.aborted.set()

  # Daemon threads: an interrupted caller does not wait for lanes at exit.
  threads = [
    threading.Thread(target=lane, name=f"attack-lane-{k}", daemon=True) for k in range(lanes)
  ]
  for t in threads:
    t.start()
  try:
    for t in threads:
      t.join()
  finally:
    shared.aborted.set()
  if errors:
    raise errors[0]
