"""The frontier's table and claim: frontier.md (`frontier_markdown`) and the "at equal
protection, which defence costs least, and does any beat DP?" row (`claims_row`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Sequence

from tf_dlg import validation
from tf_dlg.analysis import figures
from tf_dlg.study import matching
from tf_dlg.study.frontier_points import DP, FrontierPoint

# A setting protects when no attacked image is identified (the threshold search's
# "defends every image"); a looser level trades that for fewer settings.
DEFAULT_LEVEL = 0.0


def _pp(value: float, low: float, high: float) -> str:
  """`+1.0 [+0.5, +1.5]`: the table's cost cell (its header names the unit, pp)."""
  return figures.cost_pp(value, low, high, unit="")


def _rate(p: FrontierPoint) -> str:
  return f"{p.top1:.2f} [{p.top1_low:.2f}, {p.top1_high:.2f}] ({p.identified}/{p.num_images})"


def _who(p: FrontierPoint) -> str:
  return matching.who_identifies(dataclasses.asdict(p), p.num_images) or "not measured"


def frontier_markdown(points: Sequence[FrontierPoint], source: str = "") -> str:
  """The frontier table: one row per point, DP points with their (epsilon, delta)."""
  rows = [
    [
      "DP (local view)" if p.defense == DP else p.defense,
      f"{p.unit} {p.param:g}",
      p.attackers,
      _rate(p),
      f"{p.undefended_identified}/{p.num_images}",
      f"{_pp(p.cost, p.cost_low, p.cost_high)} ({len(p.seeds.split())})",
      f"{p.baseline_accuracy:.3f} [{p.baseline_low:.3f}, {p.baseline_high:.3f}]",
      "" if p.epsilon is None else f"{p.epsilon:.3g} ({p.delta:g})",
      _who(p),
    ]
    for p in points
  ]
  head = points[0] if points else None
  intro = "# Privacy-utility frontier\n\n" + (
    f"`{head.dataset}` ({source}). Identification: fraction of {head.num_images} attacked "
    "images whose original some attacker picks top-1 among all the dataset's images, "
    "with the exact (Clopper-Pearson) 95 % interval; who: the reconstruction attackers "
    "(their reconstruction identified by correlation) and gallery matching (candidates "
    "ranked by their own update's cosine with the observed one) apart, the originals' "
    "median best rank, and membership measures read off those ranks (AUC, bootstrap "
    "interval; TPR at 1 % FPR, exact interval). Cost: undefended minus defended "
    f"final accuracy of FedAvg (mean aggregation, IID clients, {head.rounds} rounds; "
    f"engine `{head.engine}`), "
    "paired by seed, in points with the 95 % t interval (seeds). DP: epsilon for the "
    "attacked client's own clipped, noised update seen every round.\n\n"
    if head
    else "No points.\n"
  )
  header = [
    "defence",
    "setting",
    "attacker(s)",
    "top-1 identified [95 %] (k/n)",
    "undefended",
    "cost pp [95 %] (seeds)",
    "baseline acc. [95 %]",
    "epsilon (delta)",
    "who identifies; rank; membership",
  ]
  return intro + figures.markdown_table(header, rows) + "\n![frontier](figures/frontier.png)\n"


def _cheapest_protecting(points: Sequence[FrontierPoint], level: float) -> Dict[str, FrontierPoint]:
  """{defence: its cheapest setting whose top-1 identification rate is <= level}."""
  out: Dict[str, FrontierPoint] = {}
  for p in points:
    if p.top1 <= level and math.isfinite(p.cost):
      if p.defense not in out or p.cost < out[p.defense].cost:
        out[p.defense] = p
  return out


def _describe(p: FrontierPoint) -> str:
  eps = "" if p.epsilon is None else f", epsilon {p.epsilon:.3g}"
  return (
    f"{p.defense} {p.param:g}{eps}: identified {p.identified}/{p.num_images} "
    f"(<= {p.top1_high:.2f}), cost {_pp(p.cost, p.cost_low, p.cost_high)} pp"
  )


def equal_protection(points: Sequence[FrontierPoint], level: float = DEFAULT_LEVEL):
  """(cheapest defence or "inconclusive" / "none protects", DP verdict, evidence list).

  A setting protects at `level` when its top-1 identification rate is <= level (the
  default 0: no attacked image identified; the evidence quotes the interval). Among the defences (DP apart), each one's cheapest protecting setting
  competes: a defence costs least only if its cost interval lies wholly below every
  other's. A defence beats DP if its cost interval lies wholly below the cheapest
  protecting DP point's; DP wins the other way round; otherwise "inconclusive".
  """
  validation.check_number("level", level, 0, 1)
  best = _cheapest_protecting(points, level)
  dp_point = best.pop(DP, None)
  evidence = [_describe(p) for p in best.values()]
  evidence += [] if dp_point is None else [_describe(dp_point)]
  if not best:
    return "none protects", "only DP protects" if dp_point else "nothing protects", evidence
  ranked = sorted(best.values(), key=lambda p: p.cost)
  lead = ranked[0]
  clear = all(lead.cost_high < p.cost_low for p in ranked[1:])
  cheapest = lead.defense if clear else "inconclusive"
  if dp_point is None:
    return cheapest, "no DP point protects", evidence
  winners = [p.defense for p in ranked if p.cost_high < dp_point.cost_low]
  if winners:
    dp_verdict = f"{', '.join(winners)} beat{'s' if len(winners) == 1 else ''} DP"
  elif all(dp_point.cost_high < p.cost_low for p in ranked):
    dp_verdict = "DP costs less"
  else:
    dp_verdict = "inconclusive"
  return cheapest, dp_verdict, evidence


def claims_row(points: Sequence[FrontierPoint], level: float = DEFAULT_LEVEL) -> List[str]:
  """[claim, our measurement, data, verdict]: the "at equal protection" claims row."""
  cheapest, dp_verdict, evidence = equal_protection(points, level)
  claim = (
    f"At equal protection (top-1 identification rate <= {level:g} of the attacked images), "
    "which defence "
    "costs least, and does any beat DP?"
  )
  head = points[0] if points else None
  data = (
    f"{head.dataset}, {head.num_images} images, seeds {head.seeds}, {head.rounds} rounds"
    if head
    else ""
  )
  verdict = f"cheapest: {cheapest}; vs DP: {dp_verdict}"
  return [claim, "; ".join(evidence) or "no setting protects", data, verdict]
