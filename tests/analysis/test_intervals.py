"""Intervals: coverage on known distributions, and verdicts that refuse noise."""

import math

import numpy as np
import pytest

from tf_dlg.analysis import intervals


def test_mean_interval_covers_true_mean_at_about_the_level():
  rng = np.random.default_rng(0)
  hits = 0
  for _ in range(2000):
    iv = intervals.mean_interval(rng.normal(1.0, 2.0, size=5))
    hits += iv.low <= 1.0 <= iv.high
  assert 0.93 <= hits / 2000 <= 0.97


def test_mean_interval_single_value_is_unbounded():
  iv = intervals.mean_interval([0.7])
  assert iv.estimate == 0.7 and math.isinf(iv.low) and math.isinf(iv.high)


def test_bootstrap_of_median_brackets_and_is_seeded():
  x = np.arange(1.0, 21.0)
  a = intervals.bootstrap(x, np.median, seed=3)
  b = intervals.bootstrap(x, np.median, seed=3)
  assert a == b
  assert a.low <= 10.5 <= a.high and a.low >= 1 and a.high <= 20 and a.n == 20


def test_bootstrap_max_of_identical_values_is_a_point():
  iv = intervals.bootstrap([0.3] * 8, np.max)
  assert iv.low == iv.high == iv.estimate == 0.3


def test_bootstrap_rejects_nan_and_bad_log():
  with pytest.raises(ValueError, match="non-finite"):
    intervals.bootstrap([1.0, float("nan")], np.median)
  with pytest.raises(ValueError, match="positive"):
    intervals.bootstrap([1.0, 0.0], np.median, log=True)


def test_paired_difference_uses_pairing():
  base = np.array([0.80, 0.90, 0.70])
  iv = intervals.paired_difference(base + 0.01, base)
  assert iv.low == pytest.approx(0.01) and iv.high == pytest.approx(0.01)
  with pytest.raises(ValueError, match="shape"):
    intervals.paired_difference([1, 2], [1, 2, 3])


@pytest.mark.parametrize(
  "low,high,claim,expected",
  [
    (-0.01, 0.01, "at_most", "agrees"),
    (0.03, 0.05, "at_most", "disagrees"),
    (0.00, 0.05, "at_most", "inconclusive"),
    (0.03, 0.05, "more_than", "agrees"),
    (-0.01, 0.01, "more_than", "disagrees"),
    (0.01, 0.03, "more_than", "inconclusive"),
  ],
)
def test_verdict_needs_the_whole_interval_on_one_side(low, high, claim, expected):
  iv = intervals.Interval((low + high) / 2, low, high, 3)
  assert intervals.verdict(iv, 0.02, claim) == expected
