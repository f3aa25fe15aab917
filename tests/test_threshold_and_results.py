"""Tests of the threshold bisection and the resumable results log."""

import json
import math

import pytest

from experiments import results
from tf_dlg.analysis import threshold


def _monotone(true_threshold, space):
  calls = []

  def evaluate(p):
    calls.append(p)
    defended = not space.is_stronger(true_threshold, p)  # p at least as strong as threshold
    return {"defended": defended, "score": p}
  return evaluate, calls


@pytest.mark.parametrize("space, true", [
    (threshold.SearchSpace(0.01, 0.99, "linear", "higher"), 0.37),
    (threshold.SearchSpace(1e-4, 10.0, "log", "lower"), 0.05),
    (threshold.SearchSpace(1e-4, 1.0, "log", "higher"), 2e-3),
])
def test_bisection_brackets_a_monotone_threshold(space, true):
  evaluate, calls = _monotone(true, space)
  res = threshold.find_threshold(evaluate, space, steps=6)
  assert res.status == "found"
  assert len(calls) == 8 and len(set(calls)) == 8
  # Defended at the threshold, leaked just weaker, and the true value lies between.
  assert res.outcome(res.threshold)["defended"] and not res.outcome(res.weaker)["defended"]
  assert not space.is_stronger(true, res.threshold)
  assert space.is_stronger(true, res.weaker)
  # Bracket width is range / 2**steps on the space's scale (allow rounding).
  if space.scale == "linear":
    assert abs(res.threshold - res.weaker) <= (space.high - space.low) / 2**6 * 1.05
  else:
    ratio = math.log(max(res.threshold, res.weaker) / min(res.threshold, res.weaker))
    assert ratio <= math.log(space.high / space.low) / 2**6 * 1.05


def test_bisection_end_cases():
  space = threshold.SearchSpace(0.1, 0.9, "linear", "higher")
  never = threshold.find_threshold(lambda p: {"defended": False}, space, steps=5)
  assert never.status == "not_reached" and never.threshold is None and len(never.points) == 1
  always = threshold.find_threshold(lambda p: {"defended": True}, space, steps=5)
  assert always.status == "at_weakest" and always.threshold == 0.1 and len(always.points) == 2


def test_search_space_errors():
  with pytest.raises(ValueError, match="low > 0"):
    threshold.SearchSpace(0.0, 1.0, "log")
  with pytest.raises(ValueError, match="scale='cubic'"):
    threshold.SearchSpace(0.1, 1.0, "cubic")
  with pytest.raises(ValueError, match="steps=-1"):
    threshold.find_threshold(lambda p: {"defended": True},
                             threshold.SearchSpace(0.1, 1.0), steps=-1)


def test_results_log_resumes_and_skips(tmp_path):
  path = str(tmp_path / "r.jsonl")
  log = results.ResultsLog(path, "exp", {"seed": 1})
  log.add("a", {"v": 1})
  log.add("b", {"v": 2})
  again = results.ResultsLog(path, "exp", {"seed": 1})
  assert "a" in again and "b" in again and "c" not in again
  assert again.get("b")["v"] == 2 and len(again) == 2


def test_results_log_drops_partial_last_line_from_a_kill(tmp_path):
  path = tmp_path / "r.jsonl"
  log = results.ResultsLog(str(path), "exp", {"seed": 1})
  log.add("a", {"v": 1})
  with open(path, "a") as f:
    f.write('{"key": "b", "v"')  # killed mid-write
  again = results.ResultsLog(str(path), "exp", {"seed": 1})
  assert len(again) == 1 and "b" not in again
  again.add("b", {"v": 2})
  assert [json.loads(l)["key"] for l in path.read_text().splitlines()[1:]] == ["a", "b"]


def test_results_log_refuses_foreign_corrupt_or_other_config(tmp_path):
  path = tmp_path / "r.jsonl"
  results.ResultsLog(str(path), "exp", {"seed": 1}).add("a", {"v": 1})
  with pytest.raises(results.ResultsFileError, match="differs in: seed"):
    results.ResultsLog(str(path), "exp", {"seed": 2})
  with pytest.raises(results.ResultsFileError, match="experiment 'exp', not 'other'"):
    results.ResultsLog(str(path), "other", {"seed": 1})
  lines = path.read_text().splitlines()
  path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
  with pytest.raises(results.ResultsFileError, match=r"r.jsonl:2: corrupt record"):
    results.ResultsLog(str(path), "exp", {"seed": 1})
  foreign = tmp_path / "f.jsonl"
  foreign.write_text("a,b,c\n1,2,3\n")
  with pytest.raises(results.ResultsFileError, match="not a tf-dlg results file"):
    results.ResultsLog(str(foreign), "exp", {})
  # Nothing was overwritten by the refusals.
  assert "not json" in path.read_text()
