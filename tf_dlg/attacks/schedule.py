"""Which attack runs where and when: lanes and slots (`lane_layout`), restart seeds
(`restart_seed`) and the restart order whose winner no schedule can change
(`RestartQueue`)."""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np
import tensorflow as tf

from tf_dlg.attacks import optimize


def auto_lanes() -> int:
  """Lanes when `AttackConfig.lanes` is None: 1 with a GPU (it batches the slots
  itself), else the CPU cores this process may use (an attack's ops are too small for
  XLA to spread one loop over cores: measured on 2 cores, digits, 32 attacks on 8 slots,
  one loop used 1.1 cores; 2 lanes of 4 slots took 0.56x its wall time, same results)."""
  if tf.config.list_physical_devices("GPU"):
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, int(cores or 1))


def lane_layout(config, jobs: int) -> Tuple[int, int]:
  """(lanes, slots per lane) for `jobs` attacks: never more lanes than pairs of jobs or
  of slots, never one slot unless `slots=1` is asked (XLA specialises a size-1 slot
  axis, whose rounding differs from every larger slot count, which all agree)."""
  lanes = config.lanes or auto_lanes()
  lanes = max(1, min(lanes, config.slots // 2, -(-jobs // 2)))
  if lanes == 1:
    return 1, min(config.slots, max(jobs, 2))
  return lanes, max(2, min(config.slots // lanes, -(-jobs // lanes)))


def restart_seed(seed: int, restart: int) -> int:
  """Seed of restart `restart` of an attack seeded `seed` (restart 0: `seed` itself)."""
  if restart == 0:
    return int(seed)
  mixed = np.random.SeedSequence([int(seed) % 2**63, int(restart)]).generate_state(1)
  return int(mixed[0]) % (2**31 - 1)


class RestartQueue(optimize.JobQueue):
  """Jobs (observation, restart), restart-major: every observation's restart 0 first,
  so when observations outnumber slots the later restarts of an observation whose
  earlier one converged are dropped before they start.

  When restart r converges only restarts > r leave (queued ones are skipped, running
  ones superseded): restarts < r run on, since one of them may converge too. So the
  lowest-numbered restart that converges on its own trajectory always runs to the end
  and wins, whatever the schedule (slots, lanes, thread timing) -- a rule "first to
  converge wins" would depend on it.

  `group` is the `group.GroupJob` whose observations these are (it imports this module,
  so it is not imported here); `bar` an optional tqdm bar of decided observations."""

  def __init__(self, group, starts, bar):
    self.group, self.starts, self.bar = group, starts, bar
    r, n = group.config.restarts, len(group.obs)
    self.jobs = [(i, k) for k in range(r) for i in range(n)]
    self.job_of = {ik: j for j, ik in enumerate(self.jobs)}
    self.rows_done: List[Dict[int, Dict]] = [{} for _ in group.obs]
    self.cancelled = set()
    self.reported = set()
    self._next = 0

  def next(self):
    while self._next < len(self.jobs) and self._next in self.cancelled:
      self._next += 1
    if self._next >= len(self.jobs):
      return None
    self._next += 1
    return self._next - 1

  def rows(self, job):
    i, r = self.jobs[job]
    start = None if self.starts is None or r else self.starts[i]
    return self.group.start(i, r, start), self.group.consts_row(i), self.group.tol[i]

  def decided(self, i: int) -> bool:
    """Observation i's winner is known: a restart converged after all earlier ones
    ended, or every restart ended."""
    done = self.rows_done[i]
    for r in range(self.group.config.restarts):
      if r not in done:
        return False
      if done[r]["status"] == "converged":
        return True
    return True

  def finish(self, job, row):
    i, r = self.jobs[job]
    self.rows_done[i][r] = row
    if i not in self.reported and self.decided(i):
      self.reported.add(i)
      if self.bar is not None:
        self.bar.update(1)
    if row["status"] != "converged":
      return ()
    later = range(r + 1, self.group.config.restarts)
    siblings = {self.job_of[i, k] for k in later if k not in self.rows_done[i]}
    self.cancelled |= siblings
    return siblings
