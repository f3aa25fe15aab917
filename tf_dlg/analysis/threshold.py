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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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


def find_threshold(
  evaluate: Callable[[float], Dict[str, Any]], space: SearchSpace, steps: int = 4
) -> ThresholdResult:
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
      raise ValueError(
        f"evaluate({param}) returned defended={defended!r}; expected True or "
        "False (a missing or NaN verdict never counts as defended)."
      )
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


# ---------------------------------------------------------------------- per image
IMAGE_STATUSES = ("found", "at_weakest", "not_reached", "untested")
# Strength given to an image the strongest setting does not stop: beyond the range (1),
# finite so that the bootstrap can resample it.
NOT_REACHED_STRENGTH = 2.0


def strength_of(space: SearchSpace, param: float) -> float:
  """Inverse of `SearchSpace.param`: 0 at the weakest end, 1 at the strongest."""
  if space.scale == "log":
    t = (math.log(param) - math.log(space.low)) / (math.log(space.high) - math.log(space.low))
  else:
    t = (param - space.low) / (space.high - space.low)
  return t if space.stronger == "higher" else 1.0 - t


def bracket_width(space: SearchSpace, a: float, b: float) -> float:
  """Width of [a, b] in the resolution's unit: a factor on log scales, a difference else."""
  if space.scale == "log":
    return max(a, b) / min(a, b)
  return abs(a - b)


@dataclasses.dataclass
class ImageThreshold:
  """One image's threshold.

  Attributes:
    status: `found` (leaks at `weaker`, defended at `threshold`, within the resolution),
      `at_weakest` (the weakest setting defends), `not_reached` (the strongest leaks) or
      `untested` (the image does not leak even undefended: nothing to stop).
    threshold: Weakest evaluated parameter that defended (None: not_reached / untested).
    weaker: Strongest evaluated parameter weaker than `threshold` that leaked (found).
    points: Every evaluated (param, defended) of this image, in order.
  """

  status: str
  threshold: Optional[float] = None
  weaker: Optional[float] = None
  points: List[Tuple[float, bool]] = dataclasses.field(default_factory=list)

  def strength(self, space: SearchSpace) -> float:
    """Position on the strength axis; not_reached beyond the range (untested: NaN)."""
    if self.status == "not_reached":
      return NOT_REACHED_STRENGTH
    if self.threshold is None:
      return math.nan
    return strength_of(space, self.threshold)


def _verdicts(evaluate, requests):
  """Calls `evaluate` once and checks it returned one real boolean per request."""
  out = list(evaluate(requests))
  if len(out) != len(requests):
    raise ValueError(f"evaluate returned {len(out)} verdicts for {len(requests)} requests.")
  for (image, param), v in zip(requests, out):
    v = v.get("defended") if isinstance(v, dict) else v
    # bool(nan) is True: only a real verdict may count as defended.
    if not isinstance(v, (bool, np.bool_)):
      raise ValueError(
        f"evaluate(image {image}, {param}) returned defended={v!r}; expected "
        "True or False (a missing or NaN verdict never counts as defended)."
      )
    yield bool(v)


def per_image_thresholds(
  evaluate: Callable[[List[Tuple[int, float]]], Sequence[Any]],
  space: SearchSpace,
  leaks_undefended: Sequence[bool],
  resolution: float,
) -> List[ImageThreshold]:
  """Bisects every image to its own threshold; one `evaluate` call per step.

  Args:
    evaluate: Maps a list of (image, param) requests (all images still bisecting at
      this step) to one verdict each: a bool `defended`, or a dict holding one.
    space: The parameter's `SearchSpace`.
    leaks_undefended: Per image, whether the attack recovers it without a defence;
      images that do not are `untested` and never evaluated.
    resolution: Stop when an image's bracket is this narrow: a factor > 1 on a log
      scale (leaked and defended parameters within this ratio), a difference > 0 on a
      linear one.
  """
  if space.scale == "log" and not resolution > 1:
    raise ValueError(f"resolution={resolution!r} must be a factor > 1 on a log scale.")
  if space.scale == "linear" and not resolution > 0:
    raise ValueError(f"resolution={resolution!r} must be > 0 on a linear scale.")
  out = [ImageThreshold("untested" if not leaks else "") for leaks in leaks_undefended]
  active = [i for i, o in enumerate(out) if not o.status]

  def step(params: Dict[int, float]) -> Dict[int, bool]:
    requests = sorted(params.items())
    verdicts = dict(zip((i for i, _ in requests), _verdicts(evaluate, requests)))
    for i, p in requests:
      out[i].points.append((p, verdicts[i]))
    return verdicts

  strongest, weakest = space.strongest(), space.weakest()
  if active:
    held = step({i: strongest for i in active})
    for i in active:
      if not held[i]:
        out[i].status = "not_reached"
    active = [i for i in active if held[i]]
  if active:
    held = step({i: weakest for i in active})
    for i in active:
      if held[i]:
        out[i].status, out[i].threshold = "at_weakest", weakest
    active = [i for i in active if not held[i]]
  brackets = {i: (0.0, 1.0) for i in active}  # (leaked, defended) strengths
  while brackets:
    mids, done = {}, []
    for i, (lo, hi) in brackets.items():
      p_lo, p_hi, p_mid = space.param(lo), space.param(hi), space.param((lo + hi) / 2)
      # Rounding to 3 significant figures can stop a bracket from narrowing further.
      if bracket_width(space, p_lo, p_hi) <= resolution or p_mid in (p_lo, p_hi):
        done.append(i)
      else:
        mids[i] = (lo + hi) / 2
    for i in done:
      lo, hi = brackets.pop(i)
      out[i].status, out[i].threshold, out[i].weaker = "found", space.param(hi), space.param(lo)
    if mids:
      held = step({i: space.param(s) for i, s in mids.items()})
      for i, s in mids.items():
        lo, hi = brackets[i]
        brackets[i] = (lo, s) if held[i] else (s, hi)
  return out


@dataclasses.dataclass
class DatasetThreshold:
  """The smallest setting that defends a fraction of a dataset's images.

  Attributes:
    status: found / at_weakest / not_reached (of the order statistic), or `untested`
      when no image leaks undefended.
    threshold: The parameter (None unless found / at_weakest).
    low, high: 95 % bootstrap interval over images, as parameters (weaker, stronger end
      in the parameter's own order: low <= high); the strong end is clipped to the
      search range, and `open_strong_end` says it lay beyond (resamples not reached).
    rank: Which order statistic (1-based) of the `num_tested` tested images.
    num_tested: Images that leak undefended (the others are excluded: untested).
  """

  status: str
  threshold: Optional[float]
  low: Optional[float]
  high: Optional[float]
  rank: int
  num_tested: int
  open_strong_end: bool = False


def required_rank(defended_fraction: float, n: int) -> int:
  """The k (1-based) such that the k-th weakest threshold defends >= the fraction."""
  return max(1, min(n, math.ceil(defended_fraction * n - 1e-9)))


def dataset_threshold(
  images: Sequence[ImageThreshold],
  space: SearchSpace,
  defended_fraction: float,
  level: float = 0.95,
  seed: int = 0,
) -> DatasetThreshold:
  """The order statistic of per-image thresholds, with a bootstrap interval over images.

  A setting defends image i iff it is at least as strong as i's threshold, so the
  smallest setting defending >= `defended_fraction` of the n tested images is the
  k-th weakest per-image threshold, k = ceil(fraction x n). Not-reached images count
  as infinitely strong; untested images are left out (they prove nothing).
  """
  from tf_dlg.analysis import intervals

  s = np.array([im.strength(space) for im in images if im.status != "untested"])
  if s.size == 0:
    return DatasetThreshold("untested", None, None, None, 0, 0)
  k = required_rank(defended_fraction, s.size)

  def stat(x):
    return float(np.sort(x)[k - 1])

  iv = intervals.bootstrap(s, stat, level=level, seed=seed)
  est = iv.estimate
  if est > 1.0:
    status = "not_reached"
  elif est <= 0.0:
    status = "at_weakest"
  else:
    status = "found"
  ends = sorted(space.param(min(t, 1.0)) for t in (iv.low, iv.high))
  return DatasetThreshold(
    status,
    None if est > 1.0 else space.param(est),
    ends[0],
    ends[1],
    k,
    int(s.size),
    open_strong_end=iv.high > 1.0,
  )
