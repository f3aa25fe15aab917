"""Finding a defence's threshold: its weakest setting that stops an attack.

The attack's outcome is close to monotone in defence strength (more masking, tighter
clipping, more noise -> less leakage), so the threshold is found by bisection between
the weakest and strongest parameter of a `SearchSpace`, on a log or linear scale,
instead of a blind grid. Every evaluated point is kept, so a table can show the outcome
at the threshold and one step weaker, and a test can check that the reported threshold
is consistent with the points actually measured.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional

import numpy as np

SCALES = ("log", "linear")
DIRECTIONS = ("higher", "lower")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """A defence parameter's range and which end is stronger.

  Attributes:
    low, high: Inclusive range of the parameter (low < high; both > 0 on a log scale).
    scale: `log` (bisect in log-space: noise std, clipping norm) or `linear` (rates).
    stronger: `higher` if a larger value defends more (masking rate, noise std),
      `lower` if a smaller one does (clipping norm).
  """

  low: float
  high: float
  scale: str = "log"
  stronger: str = "higher"

  def __post_init__(self):
    if self.scale not in SCALES:
      raise ValueError(f"scale={self.scale!r} must be one of {SCALES}.")
    if self.stronger not in DIRECTIONS:
      raise ValueError(f"stronger={self.stronger!r} must be one of {DIRECTIONS}.")
    if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
      raise ValueError(f"Search range [{self.low}, {self.high}] must be finite with low < high.")
    if self.scale == "log" and self.low <= 0:
      raise ValueError(f"A log-scale search needs low > 0, got low={self.low}.")

  def param(self, strength: float) -> float:
    """Parameter at `strength` in [0, 1] (0 = weakest end, 1 = strongest end)."""
    t = strength if self.stronger == "higher" else 1.0 - strength
    if self.scale == "log":
      value = math.exp(math.log(self.low) + t * (math.log(self.high) - math.log(self.low)))
    else:
      value = self.low + t * (self.high - self.low)
    return _round_sig(value)

  def weakest(self) -> float:
    return self.param(0.0)

  def strongest(self) -> float:
    return self.param(1.0)

  def is_stronger(self, a: float, b: float) -> bool:
    """Whether parameter `a` defends more than `b`."""
    return a > b if self.stronger == "higher" else a < b


def _round_sig(x: float, sig: int = 3) -> float:
  """Rounds to `sig` significant figures, so points read well and make stable keys."""
  if x == 0 or not math.isfinite(x):
    return x
  return round(x, sig - 1 - int(math.floor(math.log10(abs(x)))))


@dataclasses.dataclass
class ThresholdResult:
  """Outcome of one threshold search.

  Attributes:
    status: `found` (leaks at `weaker`, defended at `threshold`), `at_weakest` (even the
      weakest setting defends), or `not_reached` (even the strongest setting leaks).
    threshold: Weakest evaluated parameter that defended (None if `not_reached`).
    weaker: The strongest evaluated parameter weaker than `threshold` that leaked
      (None unless `found`).
    points: Every evaluated (param, outcome) in evaluation order.
  """

  status: str
  threshold: Optional[float]
  weaker: Optional[float]
  points: List[Dict[str, Any]]

  def outcome(self, param: Optional[float]) -> Optional[Dict[str, Any]]:
    for p in self.points:
      if param is not None and p["param"] == param:
        return p["outcome"]
    return None


def find_threshold(evaluate: Callable[[float], Dict[str, Any]], space: SearchSpace,
                   steps: int = 4) -> ThresholdResult:
  """Bisects for the weakest parameter whose outcome has `defended` true.

  Args:
    evaluate: Maps a parameter to an outcome dict with a boolean `defended` (and any
      scores to keep). It may be served from a cache when an experiment resumes.
    space: The parameter's `SearchSpace`.
    steps: Bisection steps after the two end points (precision: range / 2**steps on
      the space's scale).
  """
  if not isinstance(steps, int) or steps < 0:
    raise ValueError(f"steps={steps!r} must be an integer >= 0.")
  points: List[Dict[str, Any]] = []

  def run(strength):
    param = space.param(strength)
    for p in points:  # rounding can map two strengths to one parameter
      if p["param"] == param:
        return p["outcome"]["defended"]
    outcome = evaluate(param)
    defended = outcome.get("defended") if isinstance(outcome, dict) else None
    # bool(nan) is True: only a real verdict may count as defended.
    if not isinstance(defended, (bool, np.bool_)):
      raise ValueError(f"evaluate({param}) returned defended={defended!r}; expected True or "
                       "False (a missing or NaN verdict never counts as defended).")
    points.append({"param": param, "outcome": outcome})
    return bool(defended)

  if not run(1.0):
    return ThresholdResult("not_reached", None, None, points)
  if run(0.0):
    return ThresholdResult("at_weakest", space.weakest(), None, points)
  leaked, defended = 0.0, 1.0
  for _ in range(steps):
    mid = (leaked + defended) / 2
    if run(mid):
      defended = mid
    else:
      leaked = mid
  return ThresholdResult("found", space.param(defended), space.param(leaked), points)
