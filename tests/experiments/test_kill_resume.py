"""SIGKILL mid-run, rerun the same command: the final tables equal an uninterrupted run's.

The drivers run as a user runs them (`python -m experiments.X` subprocesses, own process
group); a poll waits until the run has written part of its results, then the whole group
gets SIGKILL (no handler, no atexit, no flush) and the same command runs again to the end.
Timing columns aside, every table must equal that of a run never interrupted.
"""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMING = {"seconds"}  # the only timing column of thresholds.csv, convergence.csv, history.csv
# Generous: a poll only ends early on success; a stuck run fails after this long instead of
# hanging the suite (a whole miniature run takes 1-4 min on the shared 2-core machine).
POLL_LIMIT_S = 600

CONVERGENCE = [
  "convergence",
  "--defense_params=masking:0.01",
  "--dataset=mnist",
  "--train_examples=40",
  "--test_examples=20",
  "--seeds=0",
  "--rounds=2",
  "--num_clients=2",
  "--aggregators=mean",
  "--partitions=iid",
]
REPRODUCE = [
  "reproduce",
  "--preset=quick",
  "--datasets=mnist",
  "--defenses=masking",
  "--convergence_defenses=masking",
  "--num_images=1",
  "--iterations=60",
  "--restarts=1",
  "--rounds=2",
  "--num_clients=2",
  "--seeds=2",
  "--train_examples=40",
  "--partitions=iid",
]


def _start(args, out, log):
  module, *flags = args
  return subprocess.Popen(
    [sys.executable, "-m", f"experiments.{module}", *flags, f"--output_dir={out}"],
    cwd=ROOT,
    stdout=log,
    stderr=subprocess.STDOUT,
    start_new_session=True,  # its own process group: the kill reaches TFF's worker too
  )


def _tail(path):
  with open(path, errors="replace") as f:
    return f.read()[-3000:]


def _run_to_end(args, out, log_path):
  with open(log_path, "a") as log:
    proc = _start(args, out, log)
    try:
      assert proc.wait(timeout=POLL_LIMIT_S) == 0, _tail(log_path)
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def _kill_when(args, out, log_path, ready):
  """Starts the driver, polls `ready()` every 0.2 s, then SIGKILLs its process group."""
  with open(log_path, "a") as log:
    proc = _start(args, out, log)
    deadline = time.monotonic() + POLL_LIMIT_S
    try:
      while not ready():
        if proc.poll() is not None:
          pytest.fail(f"finished (status {proc.returncode}) before the kill:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
          pytest.fail(f"not ready after {POLL_LIMIT_S} s:\n{_tail(log_path)}")
        time.sleep(0.2)
    finally:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == -signal.SIGKILL


def _lines(path):
  try:
    with open(path) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def _table(path):
  with open(path, newline="") as f:
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]
  assert rows, path
  return rows


def _differences(got, want):
  """(row, column, resumed value, uninterrupted value) of every differing cell."""
  out = [(i, k, g.get(k), w.get(k)) for i, (g, w) in enumerate(zip(got, want)) for k in w]
  return [d for d in out if d[2] != d[3]] + [("rows", len(got), len(want))]


def _histories(out):
  found = {}
  for root, _, files in os.walk(os.path.join(out, "runs")):
    if "history.csv" in files:
      found[os.path.relpath(root, out)] = _table(os.path.join(root, "history.csv"))
  return found


@pytest.mark.slow  # resume and workers: shorter default tests cover them
def test_convergence_killed_mid_run_resumes_to_the_same_tables(tmp_path):
  ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
  log = str(tmp_path / "log.txt")
  _run_to_end(CONVERGENCE, ref, log)
  first = os.path.join(out, "runs", "mean_iid_none", "seed0", "history.csv")
  # Killed once the first run has finished a round (header + one row), mid-way through it.
  _kill_when(CONVERGENCE, out, log, lambda: _lines(first) >= 2)
  assert not os.path.exists(os.path.join(out, "convergence.csv"))
  _run_to_end(CONVERGENCE, out, log)
  got, want = (
    _table(os.path.join(out, "convergence.csv")),
    _table(os.path.join(ref, "convergence.csv")),
  )
  assert got == want, _differences(got, want)
  histories = _histories(out)
  assert len(histories) == 2  # none and masking, one seed
  assert histories == _histories(ref)
  assert all(len(h) == 2 for h in histories.values())  # every round once


@pytest.mark.slow
def test_reproduce_killed_in_each_stage_resumes_to_the_same_tables(tmp_path):
  ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
  log = str(tmp_path / "log.txt")
  _run_to_end(REPRODUCE, ref, log)
  points = os.path.join(out, "thresholds", "points.jsonl")
  # In the threshold search: after the header and two evaluated points.
  _kill_when(REPRODUCE, out, log, lambda: _lines(points) >= 3)
  history = os.path.join(out, "convergence", "runs", "mean_iid_none", "seed0", "history.csv")
  # Then in training: once the first FedAvg run has written a round.
  _kill_when(REPRODUCE, out, log, lambda: _lines(history) >= 2)
  _run_to_end(REPRODUCE, out, log)
  for rel in ("thresholds/thresholds.csv", "convergence/convergence.csv"):
    got, want = _table(os.path.join(out, rel)), _table(os.path.join(ref, rel))
    assert got == want, (rel, _differences(got, want))
  # claims.md differs only in the output folder of the command line it quotes.
  with open(os.path.join(ref, "claims.md")) as f:
    want = f.read().replace(ref, out)
  with open(os.path.join(out, "claims.md")) as f:
    assert f.read() == want
