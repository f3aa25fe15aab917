"""Intervals and interval-based verdicts: the evidence every reported number carries.

Two sources of uncertainty appear in the experiments, and each gets the interval that
fits it:

* over **images** (a dataset's threshold is a statistic of per-image thresholds): a
  percentile bootstrap (`scipy.stats.bootstrap` cannot take an order statistic with
  ties well at n = 8, so the resampling is done here with a seeded generator: it is 5
  lines and keeps results reproducible);
* over **seeds** (an accuracy, or the paired difference of two accuracies run with the
  same seeds): Student's t interval from `scipy.stats`.

`verdict` turns an interval of a difference and a claim's margin into
agrees / disagrees / inconclusive, so a claim is never decided by noise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
from scipy import stats

AGREES, DISAGREES, INCONCLUSIVE = "agrees", "disagrees", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Interval:
  """A point estimate with a two-sided interval, and the sample size behind it."""

  estimate: float
  low: float
  high: float
  n: int
  level: float = 0.95
  method: str = ""

  @property
  def width(self) -> float:
    return self.high - self.low

  def excludes(self, value: float) -> bool:
    return value < self.low or value > self.high

  def format(self, fmt: str = "{:.3g}") -> str:
    """E.g. `0.012 [0.008, 0.02] (n=8)`."""
    est, lo, hi = (fmt.format(v) for v in (self.estimate, self.low, self.high))
    return f"{est} [{lo}, {hi}] (n={self.n})"


def bootstrap(
  values: Sequence[float],
  statistic: Callable[[np.ndarray], float],
  level: float = 0.95,
  resamples: int = 2000,
  seed: int = 0,
  log: bool = False,
) -> Interval:
  """Percentile bootstrap interval of `statistic` over `values` (e.g. images).

  Args:
    values: One number per independent unit (e.g. each image's threshold).
    statistic: Maps a 1-D array to a number (e.g. a quantile).
    log: Resample as usual but report the interval of a log-scale statistic (the
      statistic is applied to the values themselves either way; `log` only guards
      that they are positive, as log-scale parameters must be).
  """
  x = np.asarray(values, dtype=np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"bootstrap needs a non-empty 1-D sample, got shape {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError("bootstrap sample has non-finite values.")
  if log and np.any(x <= 0):
    raise ValueError("a log-scale sample must be positive.")
  estimate = float(statistic(x))
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, x.size, size=(resamples, x.size))
  boot = np.array([statistic(x[i]) for i in idx])
  alpha = (1.0 - level) / 2
  low, high = np.quantile(boot, [alpha, 1 - alpha])
  return Interval(
    estimate,
    float(min(low, estimate)),
    float(max(high, estimate)),
    int(x.size),
    level,
    "percentile bootstrap over images",
  )


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
  """Mean with a Student's t interval (e.g. over seeds); n = 1 gives an infinite one."""
  x = np.asarray(values, dtype=np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"mean_interval needs a non-empty 1-D sample, got shape {x.shape}.")
  mean = float(np.mean(x))
  if x.size == 1:
    return Interval(mean, -math.inf, math.inf, 1, level, "t interval over seeds")
  sem = float(stats.sem(x))
  if sem == 0.0:
    return Interval(mean, mean, mean, int(x.size), level, "t interval over seeds")
  low, high = stats.t.interval(level, x.size - 1, loc=mean, scale=sem)
  return Interval(mean, float(low), float(high), int(x.size), level, "t interval over seeds")


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
  """Interval of mean(a - b) for runs paired by seed (same seeds, same order)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}.")
  iv = mean_interval(a - b, level)
  return dataclasses.replace(iv, method="t interval of the paired difference over seeds")


def verdict(difference: Interval, margin: float, claim: str) -> str:
  """Judges a claim about a difference against a margin by its interval.

  Args:
    difference: Interval of (cost) = baseline - defended accuracy, say.
    margin: The claim's threshold on the same scale (e.g. 0.02 = two points).
    claim: `at_most` (the claim says the difference is <= margin, e.g. "almost no
      cost") or `more_than` (it says the difference exceeds the margin, e.g. "noising
      costs accuracy").

  Returns:
    `agrees` / `disagrees` when the whole interval is on one side of the margin,
    otherwise `inconclusive`.
  """
  if claim not in ("at_most", "more_than"):
    raise ValueError(f"claim={claim!r} must be 'at_most' or 'more_than'.")
  if difference.high <= margin:
    below = True
  elif difference.low > margin:
    below = False
  else:
    return INCONCLUSIVE
  return AGREES if below == (claim == "at_most") else DISAGREES
