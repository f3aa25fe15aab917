"""Tests of the threshold bisection."""

import math

import pytest

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


@pytest.mark.parametrize("verdict", [float("nan"), None, 1.0, "yes"])
def test_a_non_boolean_verdict_is_refused_never_counted_as_defended(verdict):
  space = threshold.SearchSpace(0.1, 0.9, "linear", "higher")
  with pytest.raises(ValueError, match="never counts as defended"):
    threshold.find_threshold(lambda p: {"defended": verdict}, space, steps=2)
