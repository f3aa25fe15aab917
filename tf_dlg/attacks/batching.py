"""Continuous batching: a queue of jobs run on the slots of compiled optimiser loops.

`run_queue` runs compiled chunks of at most `check_every` iterations; between chunks
every finished slot is handed back and refilled from the queue with fresh optimiser
state. `run_lanes` runs several such loops on threads sharing one queue.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import numpy as np
import tensorflow as tf

from tf_dlg.attacks.slot_state import (
  RUNNING,
  STATUS_NAMES,
  SUPERSEDED,
  Compiled,
  OptimizationResult,
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
