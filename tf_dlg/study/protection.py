"""Where a defence protects: one threshold row read under both leak criteria.

A setting *protects* when it holds under both leak criteria of the threshold search (the
paper's adjusted-SSIM bar and identification): the stronger of the two thresholds.
`protection` reads that off a thresholds.csv row; `top1_at` / `top1_inferred` /
`top1_near` give the top-1 identification rate at a setting the row measured or implies;
`threshold_row` picks the row of a defence's strongest attacker.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

from tf_dlg.study import tables
from tf_dlg.study.records import UNTESTED, attack_untested

PAPER_ATTACK = "idlg"
PROTECTS, NOT_REACHED, NOT_SEARCHED = "protects", "does not protect", "not searched"


@dataclasses.dataclass(frozen=True)
class Protection:
  """Where a defence protects against one attacker on one dataset.

  `state`: PROTECTS, NOT_REACHED (leaks at the strongest setting searched), UNTESTED or
  NOT_SEARCHED. `setting`: the weakest protecting setting, or the strongest searched
  where it does not protect. `text`: that setting with its interval, n and criterion.
  `top1`: (rate, low, high) of top-1 identification there, None where not measured.
  """

  state: str
  attacker: str
  setting: Optional[float]
  text: str
  top1: Optional[Tuple[float, float, float]]


def _attacker(row: Dict[str, Any]) -> str:
  if row.get("kind") == "adaptive":
    return f"{row['attack']} (strongest searched)"
  return f"{row['attack']} (the paper's; strongest not searched)"


def interval_of(row: Dict[str, Any], name: str) -> Optional[Tuple[float, float, float]]:
  """(rate, low, high) of the row's `name` column and its interval; None if not measured."""
  if row.get(name) is None:
    return None
  return (row[name], row[f"{name}_low"], row[f"{name}_high"])


def _strongest_end(row: Dict[str, Any]) -> float:
  return row["search_high"] if row["stronger"] == "higher" else row["search_low"]


def protection(row: Optional[Dict[str, Any]]) -> Protection:
  """Where the threshold row `row` protects under both criteria (None: not searched)."""
  if row is None:
    return Protection(NOT_SEARCHED, "-", None, NOT_SEARCHED, None)
  attacker = _attacker(row)
  criteria = [("adj. SSIM", row, "top1_at_threshold")]
  view = tables.identification_view(row)
  if view is not None:
    criteria.append(("identification", view, "top1_at_id_threshold"))
  tested = [c for c in criteria if not attack_untested(c[1])]
  if not tested:
    return Protection(UNTESTED, attacker, None, UNTESTED, None)
  failing = [c for c in tested if c[1]["status"] == "not_reached"]
  if failing:  # identification (listed last) first: the attacker's own criterion
    name, _, rate = failing[-1]
    end = _strongest_end(row)
    text = f"not reached ({name}: leaks at {end:g})"
    return Protection(NOT_REACHED, attacker, end, text, interval_of(row, rate))
  sign = 1.0 if row["stronger"] == "higher" else -1.0
  strongest = max(sign * c[1]["threshold"] for c in tested)
  picked = [c for c in tested if sign * c[1]["threshold"] == strongest]
  name = picked[0][0] if len(picked) == 1 else "both criteria"
  text = f"{tables.format_threshold(picked[-1][1])} ({name})"
  return Protection(
    PROTECTS, attacker, picked[-1][1]["threshold"], text, interval_of(row, picked[-1][2])
  )


def same_setting(a: Optional[float], b: Optional[float]) -> bool:
  """Whether two settings are the same number (as written to and read from a CSV)."""
  return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def top1_at(row: Optional[Dict[str, Any]], param: Optional[float]):
  """(rate, low, high) of top-1 identification at `param` by `row`'s attacker, or None."""
  if row is None or param is None:
    return None
  pairs = [("threshold", "top1_at_threshold"), ("id_threshold", "top1_at_id_threshold")]
  for setting, rate in pairs:
    if same_setting(row.get(setting), param) and row.get(rate) is not None:
      return interval_of(row, rate)
  if row["status"] == "not_reached" and same_setting(_strongest_end(row), param):
    return interval_of(row, "top1_at_threshold")
  return None


def _json_list(value) -> Optional[list]:
  if value is None or value == "":
    return None
  return json.loads(value) if isinstance(value, str) else list(value)


def top1_inferred(row: Optional[Dict[str, Any]], param: Optional[float]):
  """(rate, low, high) of top-1 identification at `param` read off the per-image thresholds.

  For a setting the search did not attack at. Its bisection assumes that an image
  defended at a setting stays defended at every stronger one; under that rule an image
  whose identification threshold is t (`found`, or `at_weakest`: stopped by the weakest
  setting) is identified at every setting weaker than t (within the search's
  resolution), one never stopped is identified everywhere, and one the attack misses
  undefended nowhere. None where a status allows no reading.
  """
  from tf_dlg.analysis import identification

  if row is None or param is None:
    return None
  thresholds = _json_list(row.get("id_per_image"))
  statuses = _json_list(row.get("id_per_image_status"))
  if not statuses or thresholds is None or len(thresholds) != len(statuses):
    return None
  higher = row["stronger"] == "higher"
  hits = []
  for t, status in zip(thresholds, statuses):
    if status in ("found", "at_weakest") and t is not None:
      hits.append(param < t if higher else param > t)
    elif status in ("not_reached", "untested"):
      hits.append(status == "not_reached")
    else:
      return None
  iv = identification.identification_rate(np.array(hits, dtype=bool))
  return (iv.estimate, iv.low, iv.high)


def top1_near(row: Optional[Dict[str, Any]], param: Optional[float]):
  """(rate, inferred): `top1_at` where the search attacked at `param`, else `top1_inferred`."""
  rate = top1_at(row, param)
  if rate is not None:
    return rate, False
  rate = top1_inferred(row, param)
  return rate, rate is not None


def threshold_row(rows, dataset: str, defense: str) -> Optional[Dict[str, Any]]:
  """The search of `defense` on `dataset` against its strongest attacker, else the paper's."""
  mine = [r for r in rows if (r["dataset"], r["defense"]) == (dataset, defense)]
  adaptive = [r for r in mine if r.get("kind") == "adaptive"]
  plain = [r for r in mine if (r.get("kind") or "plain") == "plain"]
  plain.sort(key=lambda r: r["attack"] != PAPER_ATTACK)
  return (adaptive or plain or [None])[0]


def format_top1(rate: Optional[Tuple[float, float, float]]) -> str:
  """`0.75 [0.35, 0.97]`, as the threshold tables print rates; `-` if not measured."""
  if rate is None:
    return "-"
  return f"{rate[0]:.2g} [{rate[1]:.2g}, {rate[2]:.2g}]"
