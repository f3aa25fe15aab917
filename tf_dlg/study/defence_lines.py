"""The first screen's line of one defence: its table cells, verdict and figure points.

`defence_line` builds it from the threshold search and the convergence run,
`frontier_line` from the privacy-utility frontier's points. A cost is conclusive only
when its interval excludes both zero (else the interval is wider than the effect) and the
margin of "almost no cost" (else it cannot say whether the cost is small). A cost is
quoted only for training at the protecting setting itself; where training ran at another
one, the cost there is given with what the attacker still identifies at it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from tf_dlg.analysis import figures
from tf_dlg.study import matching
from tf_dlg.study.protection import (
  NOT_REACHED,
  PROTECTS,
  Protection,
  format_top1,
  protection,
  same_setting,
  threshold_row,
  top1_near,
)
from tf_dlg.study.records import UNTESTED

# The claims' "almost no cost" (two points of accuracy), the margin a cost is judged by.
MARGIN = 0.02
FRONTIER_KEYS = ("defense", "setting", "attack", "top1", "top1_low", "top1_high")


FRONTIER_KEYS += ("cost", "cost_low", "cost_high")


def _pp(row: Dict[str, Any]) -> str:
  """`+0.1 pp [-0.3, +0.4]`: a row's accuracy cost with its interval, in points."""
  return figures.cost_pp(row["cost"], row["cost_low"], row["cost_high"])


def _acc(row: Dict[str, Any]) -> str:
  return f"{100 * row['final_test_accuracy']:.1f} %"


def baseline_text(row: Dict[str, Any]) -> str:
  """`97.6 % [97.1, 98.0]`: the baseline accuracy with its interval over seeds."""
  lo, hi = (100 * row[k] for k in ("final_low", "final_high"))
  if not figures.has_interval(lo, hi):
    return f"{_acc(row)} ({figures.NO_INTERVAL})"
  return f"{_acc(row)} [{lo:.1f}, {hi:.1f}]"


def seeds_text(row: Dict[str, Any]) -> str:
  n = len(str(row.get("seeds") or "").split())
  return f"n={n} seeds" if n else "seeds not recorded"


def cost_phrase(row: Dict[str, Any], baseline: Dict[str, Any], margin: float = MARGIN) -> str:
  """`costs +1.1 pp [+0.4, +1.8] of 97.6 %`, or why the cost is inconclusive."""
  lo, hi = row["cost_low"], row["cost_high"]
  text = f"{_pp(row)} of {_acc(baseline)}"
  if not figures.has_interval(lo, hi):  # one seed: a point estimate, judged by nothing
    return f"cost inconclusive: point estimate {text}"
  if lo <= 0.0 <= hi:
    below = f"; below the {100 * margin:.0f} pp margin" if hi < margin else ""
    return f"cost inconclusive: interval wider than the effect ({text}{below})"
  if lo <= margin <= hi:
    return f"cost inconclusive: interval contains the {100 * margin:.0f} pp margin ({text})"
  return f"costs {text}"


@dataclasses.dataclass
class Line:
  """One defence on the first screen: its table row, verdict line and figure points.

  `cost`: the table's cost cell; `short`: the table's verdict cell.
  """

  defense: str
  protection: Protection
  cost: str
  short: str
  verdict: str
  points: List[Dict[str, Any]]


def _point(label: str, cost_row: Dict[str, Any], top1, protects: bool, eps=None) -> Dict[str, Any]:
  """A figure point: cost (pp, interval) against top-1 rate (interval)."""
  cost = tuple(100 * cost_row[k] for k in ("cost", "cost_low", "cost_high"))
  return dict(label=label, cost=cost, top1=top1, protects=protects, epsilon=eps)


def _short(p: Protection, clause: str) -> str:
  """The table's verdict: protection, then the state of its cost in a few words."""
  if clause.startswith("costs"):
    cost = "cost " + clause.split(" of ")[0].split(" ", 1)[1]
  elif clause.startswith("cost inconclusive"):
    cost = "cost inconclusive"
  else:
    cost = "cost not measured there" if p.state == PROTECTS else ""
  return p.state + (f"; {cost}" if cost else "")


def _cost(p: Protection, thr, trained, baseline, margin) -> Tuple[str, str]:
  """(table cell, verdict clause): the cost at p's setting, or why it is not there."""
  if baseline is None:
    return "not measured (no convergence run)", "cost not measured (no convergence run)"
  if not trained:
    return "not measured (not trained)", "cost not measured (not trained in the convergence run)"
  at_p = next((r for r in trained if same_setting(r["param"], p.setting)), None)
  if at_p is not None:
    return _pp(at_p), cost_phrase(at_p, baseline, margin)
  # The run trained at the threshold of the kind shown (plain or adaptive) if it could.
  adaptive = thr is not None and thr.get("kind") == "adaptive"
  row = next((r for r in trained if ("@" in r["label"]) == adaptive), trained[0])
  rate, inferred = top1_near(thr, row["param"])
  attack = thr["attack"] if thr is not None else "the attacker"
  seen = f"identification by {attack} not measured"
  if rate:
    how = " by the per-image thresholds" if inferred else ""
    seen = f"{format_top1(rate)} identified{how}"
  cell = f"not measured there; at {row['param']:.3g} ({seen}): {_pp(row)}"
  clause = (
    f"cost not measured there; trained at {row['param']:.3g} ({seen}), "
    f"{cost_phrase(row, baseline, margin)}"
  )
  return cell, clause


def _verdict(defense: str, p: Protection, cost: str, elsewhere: str) -> str:
  attack = p.attacker.split(" ")[0]
  if p.state == PROTECTS:
    text = f"protects against {attack} from {p.setting:.3g}; {cost}"
  elif p.state == NOT_REACHED:
    seen = f"identifies {format_top1(p.top1)}" if p.top1 else "leaks"
    text = (
      f"does not protect within its range: {attack} still {seen} at the strongest "
      f"setting searched, {p.setting:g}; {cost}"
    )
  elif p.state == UNTESTED:
    text = f"untested: {attack} recovers no image even undefended; {cost}"
  else:
    text = f"not searched on this dataset; {cost}"
  return f"**{defense}** {text}." + (f" Other datasets: {elsewhere}." if elsewhere else "")


def _elsewhere(threshold_rows, dataset: str, defense: str) -> str:
  """`lfw_faces from 0.418, cifar10_sample not within its range`."""
  parts = []
  for other in dict.fromkeys(r["dataset"] for r in threshold_rows if r["dataset"] != dataset):
    p = protection(threshold_row(threshold_rows, other, defense))
    if p.state == PROTECTS:
      parts.append(f"{other} from {p.setting:.3g}")
    elif p.state == NOT_REACHED:
      parts.append(f"{other} not within its range")
    elif p.state == UNTESTED:
      parts.append(f"{other} untested")
  return ", ".join(parts)


def defence_line(defense, threshold_rows, dataset, trained, baseline, margin=MARGIN) -> Line:
  """The first screen's line of one defence from the threshold search and convergence."""
  thr = threshold_row(threshold_rows, dataset, defense)
  p = protection(thr)
  cell, clause = _cost(p, thr, trained, baseline, margin)
  points = []
  for r in trained:
    rate, _ = top1_near(thr, r["param"])
    if rate is not None and baseline is not None:
      safe = p.state == PROTECTS and same_setting(r["param"], p.setting)
      points.append(_point(f"{defense} {r['param']:.3g}", r, rate, safe))
  verdict = _verdict(defense, p, clause, _elsewhere(threshold_rows, dataset, defense))
  verdict += _measured_at(thr, p.setting)
  return Line(defense, p, cell, _short(p, clause), verdict, points)


def _measured_at(row: Optional[Dict[str, Any]], setting: Optional[float]) -> str:
  """` At 0.99: identified by reconstruction 1/8, gallery matching 8/8; median rank ...`
  where the search measured its protective setting (the one the verdict names)."""
  if row is None or not same_setting(row.get("protective_setting"), setting):
    return ""
  n = int(row.get("num_images") or 0)
  clause = matching.who_identifies(row, n, "_at_protective") if n else ""
  return f" At {setting:.3g}: {clause}." if clause else ""


def frontier_line(defense: str, rows, baseline, margin=MARGIN) -> Line:
  """The first screen's line of one defence from its frontier points (cheapest protecting)."""
  for r in rows:
    missing = [k for k in FRONTIER_KEYS if k not in r]
    if missing:
      raise ValueError(f"frontier row {r!r} lacks {missing}; expected keys {FRONTIER_KEYS}.")
  rate = lambda r: (r["top1"], r["top1_low"], r["top1_high"])
  eps = lambda r: f" (ε={r['epsilon']:.3g})" if r.get("epsilon") is not None else ""
  safe = [r for r in rows if r["top1"] <= 0.0]
  best = min(safe, key=lambda r: r["cost"]) if safe else min(rows, key=lambda r: r["top1"])
  state = PROTECTS if safe else NOT_REACHED
  shown = f"{best['setting']:.3g}{eps(best)}"
  # The column names protecting settings: where there is none, it says so.
  text = shown if safe else f"none (fewest identified at {shown})"
  p = Protection(state, best["attack"], best["setting"], text, rate(best))
  clause = cost_phrase(best, baseline, margin) if baseline else f"cost {_pp(best)}"
  if state == PROTECTS:
    verdict = f"**{defense}** protects against {best['attack']} from {p.text}; {clause}."
  else:
    verdict = (
      f"**{defense}** does not protect within its range: {best['attack']} still identifies "
      f"{format_top1(rate(best))} at its best setting, {shown}; {clause}."
    )
  who = (
    matching.who_identifies(best, int(best.get("num_images") or 0))
    if best.get("num_images")
    else ""
  )
  verdict += f" At {best['setting']:.3g}: {who}." if who else ""
  # Labelled: the setting the verdict names, and every DP point (its epsilon).
  points = [
    _point(
      f"{r['setting']:.3g}" if r is best or r.get("epsilon") is not None else "",
      r,
      rate(r),
      r["top1"] <= 0.0,
      r.get("epsilon"),
    )
    for r in rows
  ]
  return Line(defense, p, _pp(best), _short(p, clause), verdict, points)
