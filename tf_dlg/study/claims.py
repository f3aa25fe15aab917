"""claims.md: the paper's claims, this run's numbers with intervals, and a verdict.

A cost verdict is agrees / disagrees only where the interval of the difference lies wholly
on one side of the claim's margin (`intervals.verdict`), else inconclusive; where the
attack already fails without a defence, a threshold claim is "untested" or
"inconclusive", never "agrees". Rows marked (ours) go beyond the paper.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

from tf_dlg import io as io_lib
from tf_dlg.analysis import figures, intervals
from tf_dlg.study import defense_table, records
from tf_dlg.study.records import UNTESTED

# "Almost no accuracy cost": a drop of at most this much final test accuracy (absolute).
ALMOST_NO_COST = 0.02
# The paper's Figure 5 claims (each defence's row says which it makes, `paper_cost`):
# (side of the margin, how the settings combine, the claim's wording with the margin in pp).
COST_CLAIMS = {
  "almost_none": (
    "at_most",
    "all",
    "costs almost no accuracy (cost <= {:.0f} pp in every setting)",
  ),
  "degrades": ("more_than", "most", "degrades accuracy (cost > {:.0f} pp in most settings)"),
}


def _interval(row: Dict[str, Any], prefix: str = "cost"):
  """The cost interval of a convergence row (`intervals.Interval`)."""
  return intervals.Interval(
    row[prefix], row[f"{prefix}_low"], row[f"{prefix}_high"], len(str(row["seeds"]).split())
  )


def _pp(iv) -> str:
  """`+0.3 pp [-1.2, +1.8] (n=3 seeds)`; one seed: `+0.3 pp (n=1: no interval)`."""
  if not figures.has_interval(iv.low, iv.high):
    return figures.with_interval(100 * iv.estimate, iv.low, iv.high, "{:+.1f}", " pp")
  return f"{100 * iv.estimate:+.1f} pp [{100 * iv.low:+.1f}, {100 * iv.high:+.1f}] (n={iv.n} seeds)"


def combine(verdicts: Sequence[str], rule: str = "all") -> str:
  """One verdict from per-setting ones.

  `all`: agrees if every setting agrees, disagrees if any disagrees, else inconclusive.
  `most`: agrees if more than half agree, disagrees if at least half disagree (so most
  cannot agree), else inconclusive.
  """
  n = len(verdicts)
  agree, disagree = verdicts.count(intervals.AGREES), verdicts.count(intervals.DISAGREES)
  if not n:
    return intervals.INCONCLUSIVE
  if rule == "all":
    return (
      intervals.DISAGREES
      if disagree
      else intervals.AGREES
      if agree == n
      else intervals.INCONCLUSIVE
    )
  return (
    intervals.AGREES
    if agree > n / 2
    else intervals.DISAGREES
    if disagree >= n / 2
    else intervals.INCONCLUSIVE
  )


def cost_claim(
  claim: str,
  rows: List[Dict[str, Any]],
  margin: float,
  side: str,
  rule: str = "all",
  evidence: str = "",
) -> List[str]:
  """A claim about the accuracy cost of some convergence rows, judged by interval.

  Each row's cost interval (none - defended, paired over seeds) is judged against
  `margin` with `intervals.verdict(interval, margin, side)`; `combine(rule)` merges the
  settings. A threshold that is untested (the attack fails undefended) never agrees.
  """
  per = [intervals.verdict(_interval(r), margin, side) for r in rows]
  ours = "; ".join(
    f"{r['aggregator']}/{r['partition']}: {_pp(_interval(r))} {v}{_rounds(r)}"
    for r, v in zip(rows, per)
  )
  verdict = combine(per, rule)
  if any(UNTESTED in str(r.get("param_source")) for r in rows) and verdict == "agrees":
    verdict = "inconclusive (threshold untested: the attack fails undefended)"
  elif verdict == intervals.INCONCLUSIVE and not all(
    figures.has_interval(r["cost_low"], r["cost_high"]) for r in rows
  ):
    verdict = f"inconclusive (point estimates only: {figures.NO_INTERVAL})"
  elif verdict == intervals.INCONCLUSIVE:
    verdict = f"inconclusive (an interval contains the {100 * margin:.0f} pp margin)"
  return [claim, ours, evidence, verdict]


def _rounds(row: Dict[str, Any]) -> str:
  """The communication cost beside the accuracy cost: extra rounds to the target."""
  seeds = str(row.get("per_seed_rounds") or "").split()
  if not seeds:
    return ""
  target = f"rounds to {float(row['target_accuracy']):.3f}"
  if "-" in seeds:
    return f" ({target} not reached in {seeds.count('-')}/{len(seeds)} seeds)"
  if row.get("round_cost") in (None, ""):
    return ""
  cost = [float(row[k]) for k in ("round_cost", "round_cost_low", "round_cost_high")]
  return f" ({figures.with_interval(*cost, '{:+.1f}')} {target})"


def _base(defense: str) -> str:
  """The paper's name of a defence in any unit: clipping_ratio -> clipping."""
  return defense_table.row(defense).family


def _format_threshold(r: Dict[str, Any]) -> str:
  """`0.012 [0.008, 0.02]`, or why there is no number."""
  if records.attack_untested(r):
    return UNTESTED
  if r["threshold"] is None:
    return "not reached"
  if r.get("low") is not None and r.get("high") is not None:
    return f"{r['threshold']:.3g} [{r['low']:.3g}, {r['high']:.3g}]"
  return f"{r['threshold']:.3g}"


def _threshold_claims(thresholds: List[Dict[str, Any]]) -> List[List[str]]:
  """ "A threshold of X stops the attack on every dataset", per defence (plain kind)."""
  rows = []
  plain = [r for r in thresholds if (r.get("kind") or "plain") == "plain"]
  datasets = sorted({r["dataset"] for r in plain})
  for defense in sorted({r["defense"] for r in plain}):
    cells = [r for r in plain if r["defense"] == defense]
    untested = [r["dataset"] for r in cells if records.attack_untested(r)]
    tested = [r for r in cells if r["dataset"] not in untested]
    ours = ", ".join(f"{r['dataset']} ({r['attack']}): {_format_threshold(r)}" for r in cells)
    evidence = "; ".join(
      f"{r['dataset']}: {r.get('dataset_source') or '?'}, {r.get('num_images') or '?'} images"
      for r in cells
    )
    if any(r["status"] == "not_reached" for r in tested):
      verdict = "disagrees"
    elif not tested:
      verdict = UNTESTED
    elif untested:
      verdict = f"inconclusive (attack fails undefended on {', '.join(untested)})"
    else:
      verdict = "agrees"
    rows.append(
      [
        f"A threshold of {defense} stops the attack on every dataset ({', '.join(datasets)})",
        ours,
        evidence,
        verdict,
      ]
    )
  return rows


def _clipping_acts_claim(acting: List[Dict[str, Any]], margin: float, evidence: str):
  """(ours) "clipping costs nothing", only where clipping changed updates."""
  fractions = [r.get("clipped_fraction") for r in acting]
  claim = (
    "(ours) clipping costs nothing, at a setting that acts in training "
    f"(cost <= {100 * margin:.0f} pp)"
  )
  if all(f is not None and f > 0 for f in fractions):
    row = cost_claim(claim, acting, margin, "at_most", "all", evidence)
    row[1] += "; clipped fraction of client updates: " + ", ".join(f"{f:.2f}" for f in fractions)
    return row
  measured = ", ".join("not measured" if f is None else f"{f:.2f}" for f in fractions)
  return [
    claim,
    f"clipped fraction: {measured}",
    evidence,
    "inconclusive (clipping did not act in training)",
  ]


def _cost_claims(conv: List[Dict[str, Any]], margin: float, evidence: str) -> List[List[str]]:
  """The paper's Figure 5 claims, and (ours) clipping that acts and adaptive costs."""
  rows = []
  plain = [r for r in conv if "@" not in r["label"] and r["label"] != "none"]
  for family, claim in defense_table.paper_cost_claims().items():
    side, rule, says = COST_CLAIMS[claim]
    d = [r for r in plain if _base(r["defense"]) == family]
    if d:
      claim = f"{family} ({d[0]['defense']}) at its threshold {says.format(100 * margin)}"
      rows.append(cost_claim(claim, d, margin, side, rule, evidence))
  acting = [r for r in plain if _base(r["defense"]) == "clipping"]
  if acting:
    rows.append(_clipping_acts_claim(acting, margin, evidence))
  for label in sorted({r["label"] for r in conv if "@" in r["label"]}):
    d = [r for r in conv if r["label"] == label]
    rows.append(
      cost_claim(
        f"(ours) {d[0]['defense']} at its adaptive threshold ({d[0]['param']:.3g}; "
        f"{d[0]['param_source']}) costs almost no accuracy (cost <= {100 * margin:.0f} pp)",
        d,
        margin,
        "at_most",
        "all",
        evidence,
      )
    )
  return rows


def _robustness_claims(robustness: List[Dict[str, Any]]) -> List[List[str]]:
  """(ours) Each threshold against adaptive attackers and multi-step FedAvg deltas."""
  rows = []
  for defense in sorted({r["defense"] for r in robustness}):
    rs = [r for r in robustness if r["defense"] == defense]
    broken = [r for r in rs if r["verdict"] == "broken"]
    untested = [
      f"{r['dataset']}/{r['attack']}/{r['update']}" for r in rs if r["verdict"] == UNTESTED
    ]
    ours = f"broken in {len(broken)} of {len(rs)} (dataset, attacker) cells" + (
      ": " + ", ".join(f"{r['dataset']}/{r['attack']}/{r['update']}" for r in broken)
      if broken
      else ""
    )
    verdict = (
      "disagrees"
      if broken
      else UNTESTED
      if len(rs) == len(untested)
      else f"inconclusive (attack fails undefended on {', '.join(untested)})"
      if untested
      else "agrees"
    )
    rows.append(
      [
        f"(ours) {defense} at its threshold also stops adaptive attackers and "
        "multi-step FedAvg deltas",
        ours,
        ", ".join(sorted({r["dataset"] for r in rs})),
        verdict,
      ]
    )
  return rows


def append_claims(output_dir: str, rows: List[List[str]]) -> str:
  """Adds rows (claim, measurement, data, verdict) to the end of claims.md's table."""
  path = os.path.join(output_dir, "claims.md")
  with open(path, encoding="utf-8") as f:
    text = f.read().rstrip("\n") + "\n"
  text += "".join(figures.markdown_row(r) + "\n" for r in rows)
  return io_lib.atomic_write_text(path, text)


def write_claims(
  output_dir: str,
  thresholds: List[Dict[str, Any]],
  robustness: List[Dict[str, Any]],
  convergence: List[Dict[str, Any]],
  evidence: str = "",
  margin: float = ALMOST_NO_COST,
) -> str:
  """claims.md: the paper's claims, our numbers with intervals beside them, a verdict.

  Verdicts: agrees / disagrees only where the interval of the difference lies wholly on
  one side of the claim's margin (`intervals.verdict`), else inconclusive; and, where the
  attack already fails without a defence, "untested" or "inconclusive", never "agrees".
  """
  rows = _threshold_claims(thresholds)
  rows += _cost_claims(convergence, margin, evidence) if convergence else []
  rows += _robustness_claims(robustness) if robustness else []
  text = (
    "# The paper's claims, tested\n\n"
    "Claims of Kim & Park (2024), *Random Gradient Masking as a Defensive Measure to "
    "Deep Leakage in Federated Learning*, with this run's numbers. Rows marked (ours) "
    "go beyond the paper. Costs are accuracy without defence minus with it, paired "
    "by seed: mean [95 % t interval]; a cost verdict is agrees / disagrees only when "
    f"the interval excludes the claim's margin ({100 * margin:.0f} pp), otherwise "
    "inconclusive. Thresholds: value [bootstrap 95 % interval over images].\n\n"
    + figures.markdown_table(["claim", "our measurement", "data", "verdict"], rows)
  )
  return io_lib.atomic_write_text(os.path.join(output_dir, "claims.md"), text)
