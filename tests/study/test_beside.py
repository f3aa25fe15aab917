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
  trainer = beside.TrainBeside(functools.partial(fake_make, str(log)))
  assert _lines(log, 1) == [{}]  # before any offer: the baseline only
  trainer.offer({"masking": (0.1, "plain threshold")})
  assert _lines(log, 2)[1] == {"masking": [0.1, "plain threshold"]}
  trainer.offer({"masking": (0.1, "plain threshold")})  # nothing new: nothing trained
  trainer.finish()
  assert len(_lines(log, 2)) == 2
  assert trainer.trained == 1 + 2


def test_an_error_in_the_child_reaches_the_caller_with_its_type(log):
  trainer = beside.TrainBeside(functools.partial(fake_make, str(log)))
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
  trainer = beside.TrainBeside(functools.partial(fake_make, str(log)))
  trainer.offer({"masking": (0.1, "")})
  with pytest.raises(RuntimeError, match=r"parameters \['masking'\] changed"):
    trainer.offer({"masking": (0.2, "")})
  trainer.finish()


def test_stop_without_waiting_ends_the_child_at_once(log):
  trainer = beside.TrainBeside(functools.partial(fake_make, str(log)))
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

  trainer = beside.TrainBeside(functools.partial(fake_make, str(log)))
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


def test_a_fixed_grid_trains_in_the_child_while_the_block_runs(log):
  """`training`: the child trains the grid it was given (no parameter sets to wait for)."""
  grid = FakeConvergence(str(log), {"fixed": [0.5, "grid"]})
  with beside.training(grid) as child:
    assert _lines(log, 1) == [{"fixed": [0.5, "grid"]}]  # before the block ends
  assert child.trained == 2 and child._process.returncode == 0
  with beside.training(grid, enabled=False) as none:
    assert none is None
  assert len(_lines(log, 1)) == 1  # no second child


def test_an_error_in_the_block_ends_the_child_and_propagates(log):
  grid = FakeConvergence(str(log), {"slow": [1.0, ""]})
  start = time.time()
  with pytest.raises(KeyboardInterrupt):
    with beside.training(grid) as child:
      _lines(log, 1)
      raise KeyboardInterrupt
  assert time.time() - start < 120 and child._process.returncode != 0  # killed, not waited


def test_a_convergence_grid_travels_without_its_data(tmp_path):
  """The child rebuilds the data from the settings: a pickled grid carries no images."""
  import pickle

  from tf_dlg.study import convergence

  grid = convergence.Convergence(
    str(tmp_path), {"masking": (0.1, "t")}, seeds=(0, 1), subsets=(40, 20), dataset="digits"
  )
  grid.prepare()
  assert grid._dataset is not None and grid.fingerprints
  copy = pickle.loads(pickle.dumps(grid))
  assert copy._dataset is None and copy.fingerprints == {}
  assert copy.configs == grid.configs and copy.keys() == grid.keys()
  copy.prepare()
  assert copy.fingerprints == grid.fingerprints
  assert len(pickle.dumps(grid)) < 100_000
