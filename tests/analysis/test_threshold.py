"""Tests of the threshold bisection: per dataset (older) and per image with intervals."""

import math

import numpy as np
import pytest

from tf_dlg.analysis import threshold


def _monotone(true_threshold, space):
  calls = []

  def evaluate(p):
    calls.append(p)
    defended = not space.is_stronger(true_threshold, p)  # p at least as strong as threshold
    return {"defended": defended, "score": p}

  return evaluate, calls


@pytest.mark.parametrize(
  "space, true",
  [
    (threshold.SearchSpace(0.01, 0.99, "linear", "higher"), 0.37),
    (threshold.SearchSpace(1e-4, 10.0, "log", "lower"), 0.05),
    (threshold.SearchSpace(1e-4, 1.0, "log", "higher"), 2e-3),
  ],
)
def test_bisection_brackets_a_monotone_threshold(space, true):
  evaluate, calls = _monotone(true, space)
  res = threshold.find_threshold(evaluate, space, steps=6)
  assert res.status == "found"
  assert len(calls) == 8 and len(set(calls)) == 8
  assert res.outcome(res.threshold)["defended"] and not res.outcome(res.weaker)["defended"]
  assert not space.is_stronger(true, res.threshold)
  assert space.is_stronger(true, res.weaker)


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
    threshold.find_threshold(
      lambda p: {"defended": True}, threshold.SearchSpace(0.1, 1.0), steps=-1
    )


@pytest.mark.parametrize("verdict", [float("nan"), None, 1.0, "yes"])
def test_a_non_boolean_verdict_is_refused_never_counted_as_defended(verdict):
  space = threshold.SearchSpace(0.1, 0.9, "linear", "higher")
  with pytest.raises(ValueError, match="never counts as defended"):
    threshold.find_threshold(lambda p: {"defended": verdict}, space, steps=2)


# ---------------------------------------------------------------------- per image
def _images_evaluate(truths, space):
  """A batch evaluate with known per-image thresholds (None: never defended)."""
  calls = []

  def evaluate(requests):
    calls.append(list(requests))
    return [truths[i] is not None and not space.is_stronger(truths[i], p) for i, p in requests]

  return evaluate, calls


@pytest.mark.parametrize(
  "space, truths, resolution",
  [
    (threshold.SearchSpace(1e-4, 0.99, "log", "higher"), [2e-3, 0.05, 0.3, 1.1e-4], 1.5),
    (threshold.SearchSpace(1e-3, 1e4, "log", "lower"), [0.05, 3.0, 700.0, 20.0], 1.25),
    (threshold.SearchSpace(0.01, 0.99, "linear", "higher"), [0.37, 0.9, 0.05, 0.5], 0.05),
    (threshold.SearchSpace(0.01, 0.99, "linear", "higher"), [0.37, 0.9, 0.05, 0.5], 0.02),
  ],
)
def test_per_image_bisection_reaches_the_resolution_with_exact_brackets(space, truths, resolution):
  evaluate, calls = _images_evaluate(truths, space)
  res = threshold.per_image_thresholds(evaluate, space, [True] * len(truths), resolution)
  for truth, im in zip(truths, res):
    assert im.status == "found", (truth, im)
    # Defended at the threshold, leaked at the weaker end, the truth between them.
    assert not space.is_stronger(truth, im.threshold) and space.is_stronger(truth, im.weaker)
    assert threshold.bracket_width(space, im.threshold, im.weaker) <= resolution
    assert (im.threshold, True) in im.points and (im.weaker, False) in im.points
  # Every call holds each still-bisecting image once: one batch per step.
  for c in calls:
    assert len({i for i, _ in c}) == len(c)
  assert sum(len(c) for c in calls) == sum(len(im.points) for im in res)
  assert (
    len(calls)
    <= 2
    + math.ceil(
      math.log2(
        (math.log(space.high / space.low) / math.log(resolution))
        if space.scale == "log"
        else (space.high - space.low) / resolution
      )
    )
    + 1
  )


def test_all_images_of_a_step_go_in_one_call():
  space = threshold.SearchSpace(1e-4, 1.0, "log", "higher")
  truths = [1e-3, 1e-3, 0.5, 0.02, 2e-4, 0.1]
  evaluate, calls = _images_evaluate(truths, space)
  threshold.per_image_thresholds(evaluate, space, [True] * 6, 1.5)
  # First the strongest end for all 6 images, then the weakest for all 6, then bisection.
  assert [p for _, p in calls[0]] == [1.0] * 6 and [p for _, p in calls[1]] == [1e-4] * 6
  assert [i for i, _ in calls[2]] == list(range(6))


def test_not_reached_untested_and_at_weakest():
  space = threshold.SearchSpace(0.01, 0.99, "linear", "higher")
  truths = [None, 0.5, 0.005, 0.3]
  evaluate, calls = _images_evaluate(truths, space)
  res = threshold.per_image_thresholds(evaluate, space, [True, True, True, False], 0.05)
  assert [im.status for im in res] == ["not_reached", "found", "at_weakest", "untested"]
  assert res[0].threshold is None and res[0].points == [(0.99, False)]
  assert res[2].threshold == 0.01 and res[3].points == []
  assert all(i != 3 for c in calls for i, _ in c)  # untested images are never attacked
  assert res[0].strength(space) == threshold.NOT_REACHED_STRENGTH
  assert math.isnan(res[3].strength(space))


def test_per_image_bisection_refuses_bad_resolutions_and_verdicts():
  log = threshold.SearchSpace(1e-4, 1.0, "log", "higher")
  with pytest.raises(ValueError, match="factor > 1"):
    threshold.per_image_thresholds(lambda r: [True] * len(r), log, [True], 1.0)
  lin = threshold.SearchSpace(0.0, 1.0, "linear", "higher")
  with pytest.raises(ValueError, match="> 0 on a linear"):
    threshold.per_image_thresholds(lambda r: [True] * len(r), lin, [True], 0.0)
  with pytest.raises(ValueError, match="never counts as defended"):
    threshold.per_image_thresholds(lambda r: [float("nan")] * len(r), lin, [True], 0.1)
  with pytest.raises(ValueError, match="1 verdicts for 2"):
    threshold.per_image_thresholds(lambda r: [True], lin, [True, True], 0.1)


def _made(space, params, statuses=None):
  statuses = statuses or ["found"] * len(params)
  return [threshold.ImageThreshold(s, p) for s, p in zip(statuses, params)]


@pytest.mark.parametrize("fraction, rank", [(1.0, 8), (0.75, 6), (0.5, 4), (0.1, 1)])
def test_dataset_threshold_is_the_order_statistic_inside_its_interval(fraction, rank):
  space = threshold.SearchSpace(1e-4, 1.0, "log", "higher")
  params = [0.5, 1e-3, 0.02, 0.002, 0.1, 3e-4, 0.05, 0.01]
  agg = threshold.dataset_threshold(_made(space, params), space, fraction)
  assert agg.rank == rank and agg.num_tested == 8
  assert agg.threshold == pytest.approx(sorted(params)[rank - 1])
  assert agg.low <= agg.threshold <= agg.high
  assert agg.low >= space.low and agg.high <= space.high
  # Defends at least the asked fraction, and one step weaker would not.
  assert np.mean([p <= agg.threshold for p in params]) >= fraction
  assert agg.status == "found"


def test_dataset_threshold_with_lower_is_stronger_and_not_reached():
  space = threshold.SearchSpace(1e-3, 1e4, "log", "lower")
  imgs = _made(space, [10.0, 1.0, 0.1, None], ["found", "found", "found", "not_reached"])
  agg = threshold.dataset_threshold(imgs, space, 0.75)
  assert agg.threshold == pytest.approx(0.1) and agg.rank == 3  # the 3rd weakest: smallest
  assert agg.low <= 0.1 <= agg.high
  every = threshold.dataset_threshold(imgs, space, 1.0)
  assert every.status == "not_reached" and every.threshold is None
  assert every.open_strong_end and every.low == 1e-3  # clipped to the strongest end


def test_dataset_threshold_leaves_untested_images_out():
  space = threshold.SearchSpace(0.01, 0.99, "linear", "higher")
  imgs = _made(space, [0.3, None, 0.5], ["found", "untested", "found"])
  agg = threshold.dataset_threshold(imgs, space, 1.0)
  assert agg.num_tested == 2 and agg.threshold == 0.5
  none = threshold.dataset_threshold(_made(space, [None], ["untested"]), space, 1.0)
  assert none.status == "untested" and none.threshold is None


def test_strength_inverts_param():
  for space in (
    threshold.SearchSpace(1e-4, 10.0, "log", "lower"),
    threshold.SearchSpace(0.01, 0.99, "linear", "higher"),
  ):
    for s in (0.0, 0.25, 0.5, 1.0):
      assert threshold.strength_of(space, space.param(s)) == pytest.approx(s, abs=2e-3)
