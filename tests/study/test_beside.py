"""Training beside the search: a child process trains each newest parameter set.

The fake `Convergence` below stands in for training (the real one runs in
tests/study/test_report_numbers.py's miniature pipeline); it logs the parameters it was
built with, so the tests see what the child trained and in which order.
"""

import functools
import json
import os
import pathlib
import time

import pytest

from tf_dlg.study import beside
from tf_dlg.study.run_store import CellError


class FakeConvergence:
  def __init__(self, log, params):
    self.log, self.params = log, params

  def train(self, stop):
    with open(self.log, "a") as f:
      f.write(json.dumps(self.params) + "\n")
    if "refused" in self.params:
      raise CellError(f"{self.log}: a run of another configuration")
    if "slow" in self.params:
      time.sleep(300)
    return 1 + len(self.params)


def fake_make(log, params):
  return FakeConvergence(log, params)


@pytest.fixture
def log(tmp_path, monkeypatch):
  # The child unpickles `fake_make` by its module name (this file, imported by pytest).
  here = str(pathlib.Path(__file__).parent)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
  return tmp_path / "trained.jsonl"


def _lines(log, n, timeout=120.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if log.exists() and len(log.read_text().splitlines()) >= n:
      return [json.loads(line) for line in log.read_text().splitlines()]
    time.sleep(0.1)
  raise AssertionError(f"the child logged fewer than {n} trainings in {timeout} s")


def test_trains_the_baseline_at_once_then_each_newest_offer(log):
  trainer = beside.TrainBesideSearch(functools.partial(fake_make, str(log)))
  assert _lines(log, 1) == [{}]  # before any offer: the baseline only
  trainer.offer({"masking": (0.1, "plain threshold")})
  assert _lines(log, 2)[1] == {"masking": [0.1, "plain threshold"]}
  trainer.offer({"masking": (0.1, "plain threshold")})  # nothing new: nothing trained
  trainer.finish()
  assert len(_lines(log, 2)) == 2
  assert trainer.trained == 1 + 2


def test_an_error_in_the_child_reaches_the_caller_with_its_type(log):
  trainer = beside.TrainBesideSearch(functools.partial(fake_make, str(log)))
  _lines(log, 1)
  trainer.offer({"refused": (1.0, "")})
  _lines(log, 2)
  with pytest.raises(CellError, match="a run of another configuration"):
    deadline = time.time() + 60
    while time.time() < deadline:  # offer raises it once the child has ended
      trainer.offer({"refused": (1.0, ""), "later": (2.0, "")})
      time.sleep(0.2)
  with pytest.raises(CellError):
    trainer.finish()


def test_a_parameter_that_changes_is_refused(log):
  trainer = beside.TrainBesideSearch(functools.partial(fake_make, str(log)))
  trainer.offer({"masking": (0.1, "")})
  with pytest.raises(RuntimeError, match=r"parameters \['masking'\] changed"):
    trainer.offer({"masking": (0.2, "")})
  trainer.finish()


def test_stop_without_waiting_ends_the_child_at_once(log):
  trainer = beside.TrainBesideSearch(functools.partial(fake_make, str(log)))
  trainer.offer({"slow": (1.0, "")})
  deadline = time.time() + 120
  while "slow" not in (log.read_text() if log.exists() else ""):  # it has started
    assert time.time() < deadline, "the slow training never started"
    time.sleep(0.1)
  start = time.time()
  trainer.stop(wait=False)
  assert time.time() - start < 120  # far below the 300 s the slow training sleeps
  assert trainer._process.returncode != 0


def test_a_killed_child_is_named_killed_not_pointed_at_an_error_above(log):
  """Killing the child (OOM killer, a user) says so; it printed no error to point at."""
  import signal

  trainer = beside.TrainBesideSearch(functools.partial(fake_make, str(log)))
  trainer.offer({"slow": (1.0, "")})
  deadline = time.time() + 120
  while "slow" not in (log.read_text() if log.exists() else ""):
    assert time.time() < deadline, "the slow training never started"
    time.sleep(0.1)
  os.kill(trainer._process.pid, signal.SIGKILL)
  with pytest.raises(RuntimeError) as e:
    trainer.finish()
  assert "killed by SIGKILL" in str(e.value) and "above" not in str(e.value)
  assert beside._no_result(3).endswith("(whatever it printed is above).")


def test_drain_trains_the_given_part_to_the_end_then_the_child_exits(log):
  trainer = beside.TrainBesideSearch(functools.partial(fake_make, str(log)))
  _lines(log, 1)
  trainer.offer({"masking": (0.1, "t"), "pruning": (0.5, "t")})
  _lines(log, 2)
  trainer.drain({"masking": (0.1, "t")})  # a part of what it had: trained to the end
  trainer.finish_drain()
  lines = _lines(log, 3)
  assert lines[-1] == {"masking": [0.1, "t"]} and len(lines) == 3
  assert trainer.trained == 1 + 3 + 2


def test_two_trainers_of_one_run_take_turns(tmp_path):
  """`io.waiting_lock`: the second holder enters only after the first has left."""
  import subprocess
  import sys

  lock, events = tmp_path / "run" / ".training.lock", tmp_path / "events"
  child = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time\n"
      "from tf_dlg import io\n"
      "with io.waiting_lock(sys.argv[1]):\n"
      "  open(sys.argv[2], 'a').write('child in\\n')\n"
      "  time.sleep(1.0)\n"
      "  open(sys.argv[2], 'a').write('child out\\n')\n",
      str(lock),
      str(events),
    ]
  )
  deadline = time.time() + 60
  while not (events.exists() and "child in" in events.read_text()) and time.time() < deadline:
    time.sleep(0.05)
  from tf_dlg import io

  with io.waiting_lock(str(lock)):
    with open(events, "a") as f:
      f.write("parent in\n")
  child.wait()
  assert events.read_text().splitlines() == ["child in", "child out", "parent in"]


class _Pending:
  def __init__(self, labels):
    self.labels = labels

  def pending(self):
    return [("mean", "iid", label, 0) for label in self.labels]


def test_the_runs_left_are_split_in_training_order_at_about_half():
  from tf_dlg.study import pipeline

  params = {k: (0.5, "t") for k in ("masking", "clipping_ratio", "pruning", "noising_ratio")}
  left = ["none"] + ["masking"] * 2 + ["clipping_ratio"] * 3 + ["pruning"] * 3 + ["noising_ratio"]
  theirs, mine = pipeline.split_training(_Pending(left), params)
  assert list(theirs) == ["masking", "clipping_ratio"] and list(mine) == [
    "pruning",
    "noising_ratio",
  ]
  assert pipeline.split_training(_Pending([]), params) == ({}, {})
