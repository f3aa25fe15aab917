"""The frontier's typed rows: `FrontierPoint` and frontier.csv (`write_frontier`,
`read_frontier`), the one file every frontier reader shares."""

from __future__ import annotations

import csv
import dataclasses
import typing
from typing import List, Optional, Sequence

# The defence whose points are DP points (epsilon and delta set).
DP = "dp"


@dataclasses.dataclass(frozen=True)
class FrontierPoint:
  """One defence setting on the frontier: its identification rate and accuracy cost.

  Rates are fractions of `num_images` (`identified` of them, exact interval); accuracies
  and costs are fractions (cost = baseline - defended accuracy, paired by seed).
  `epsilon` / `delta` are set for DP points only.
  """

  defense: str
  label: str
  param: float
  unit: str
  attackers: str  # "+"-joined
  dataset: str
  num_images: int
  identified: int
  top1: float
  top1_low: float
  top1_high: float
  undefended_identified: int
  seeds: str  # space-separated
  rounds: int
  final_accuracy: float
  final_low: float
  final_high: float
  cost: float
  cost_low: float
  cost_high: float
  baseline_accuracy: float
  baseline_low: float
  baseline_high: float
  epsilon: Optional[float] = None
  delta: Optional[float] = None
  # Who identifies (fractions of num_images; None where no attacker of that kind ran),
  # the originals' median best rank and the membership measures (`matching.MEASURES`).
  top1_reconstruction: Optional[float] = None
  top1_gallery: Optional[float] = None
  median_rank: Optional[float] = None
  auc: Optional[float] = None
  auc_low: Optional[float] = None
  auc_high: Optional[float] = None
  tpr1fpr: Optional[float] = None
  tpr1fpr_low: Optional[float] = None
  tpr1fpr_high: Optional[float] = None
  # The federated engine that measured the cost (`tf_dlg.study.convergence.ENGINES`).
  engine: str = "tff"


FRONTIER_FIELDS = tuple(f.name for f in dataclasses.fields(FrontierPoint))
_TYPES = typing.get_type_hints(FrontierPoint)


def write_frontier(path: str, points: Sequence[FrontierPoint]) -> str:
  """frontier.csv: one row per point (None as an empty cell), written atomically."""
  from tf_dlg.study import records

  return records.write_csv(path, FRONTIER_FIELDS, [dataclasses.asdict(p) for p in points])


def _parse(name: str, text: str, where: str):
  kind = _TYPES[name]
  if kind == Optional[float]:  # equality: typing caches can be cleared between calls
    if text == "":
      return None
    kind = float
  try:
    return kind(text) if kind is not float else float(text)
  except ValueError:
    raise ValueError(f"{where}, column {name!r}: {text!r} is not a {kind.__name__}.") from None


def read_frontier(path: str) -> List[FrontierPoint]:
  """frontier.csv back as `FrontierPoint`s; ValueError naming file, line and column."""
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    # Files written before the engine column are TFF's (the only engine then).
    missing = sorted(set(FRONTIER_FIELDS) - set(reader.fieldnames or []) - {"engine"})
    if missing:
      raise ValueError(f"{path} is not a frontier.csv (missing columns: {missing}).")
    return [
      FrontierPoint(
        **{
          k: _parse(k, row[k], f"{path}, line {reader.line_num}")
          for k in FRONTIER_FIELDS
          if k in row
        }
      )
      for row in reader
    ]
