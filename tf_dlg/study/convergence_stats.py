"""The convergence grid's statistics over seeds: final accuracy, cost, rounds to target.

Every interval is over seeds (`tf_dlg.analysis.intervals`): final accuracy as a mean t
interval, costs as the paired difference against the undefended run of the same seed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from tf_dlg import validation
from tf_dlg.study.defense_params import defense_of

FINAL_ROUNDS = 3  # "final accuracy" averages this many last rounds
# Rounds to target (communication cost): the first round whose test accuracy reaches this
# fraction of the undefended cell's final accuracy (mean over seeds). Relative, so one
# rule serves every dataset and aggregator; the table states the target it used.
TARGET_FRACTION = 0.95


def clipped_fraction(history: List[Dict[str, Any]]) -> Optional[float]:
  """Mean over a run's rounds of the fraction of clients clipping changed, or None.

  The history holds what the defence's TFF factory measured in each round (empty for
  a defence that does not clip).
  """
  values = [h["clipped_fraction"] for h in history if h.get("clipped_fraction") is not None]
  return float(np.mean(values)) if values else None


def seed_rows(label: str, param, provenance: str, runs) -> Dict[str, Any]:
  """One table row from the per-seed runs [(seed, history, clipped fraction)] of a cell."""
  from tf_dlg.analysis import intervals

  finals = [
    float(np.mean([h["test_accuracy"] for h in hist[-FINAL_ROUNDS:]])) for _, hist, _ in runs
  ]
  iv = intervals.mean_interval(finals)
  clipped = [c for _, _, c in runs if c is not None]
  return {
    "defense": defense_of(label),
    "label": label,
    "param": param,
    "param_source": provenance,
    "seeds": " ".join(str(s) for s, _, _ in runs),
    "rounds": min(len(h) for _, h, _ in runs),
    "final_test_accuracy": iv.estimate,
    "final_low": iv.low,
    "final_high": iv.high,
    "best_test_accuracy": float(np.mean([max(x["test_accuracy"] for x in h) for _, h, _ in runs])),
    "clipped_fraction": float(np.mean(clipped)) if clipped else None,
    "seconds": float(sum(x["seconds"] for _, h, _ in runs for x in h)),
    "per_seed": " ".join(f"{v:.4f}" for v in finals),
  }


def _baseline(rows: List[Dict[str, Any]], row: Dict[str, Any]) -> Dict[str, Any]:
  """The undefended ("none") row of `row`'s (aggregator, partition) cell."""
  cell = (row["aggregator"], row["partition"], "none")
  return next(x for x in rows if (x["aggregator"], x["partition"], x["label"]) == cell)


def add_costs(rows: List[Dict[str, Any]]) -> None:
  """Cost vs no defence: the paired difference (none - defended) over seeds, in place."""
  from tf_dlg.analysis import intervals

  for r in rows:
    none = _baseline(rows, r)
    iv = intervals.paired_difference(
      [float(v) for v in none["per_seed"].split()], [float(v) for v in r["per_seed"].split()]
    )
    r.update(cost=iv.estimate, cost_low=iv.low, cost_high=iv.high)


def rounds_to(history: List[Dict[str, Any]], target: float) -> Optional[int]:
  """The first round (1-based) whose test accuracy reaches `target`, or None."""
  for i, h in enumerate(history):
    if h["test_accuracy"] >= target:
      return i + 1
  return None


def add_rounds_to_target(rows: List[Dict[str, Any]], histories, fraction: float) -> None:
  """Rounds to target per row (in place), paired by seed with the undefended row.

  `histories[(aggregator, partition, label)]` is the list of per-seed histories in seed
  order. A seed that never reaches the target is censored: the row then carries no
  mean or interval (a censored run has no number of rounds), only `per_seed_rounds`
  with "-" for it, which the table prints as "not reached in k/n seeds".
  """
  from tf_dlg.analysis import intervals

  validation.check_number("target fraction", fraction, low=0.0, high=1.0, low_open=True)
  per_row = {}
  for r in rows:
    cell = (r["aggregator"], r["partition"])
    none = _baseline(rows, r)
    target = round(fraction * none["final_test_accuracy"], 4)
    rounds = [rounds_to(h, target) for h in histories[(*cell, r["label"])]]
    per_row[id(r)] = rounds
    r.update(target_accuracy=target, per_seed_rounds=" ".join(str(x or "-") for x in rounds))
    if None not in rounds:
      iv = intervals.mean_interval(rounds)
      r.update(rounds_to_target=iv.estimate, rounds_low=iv.low, rounds_high=iv.high)
  for r in rows:
    none = _baseline(rows, r)
    mine, base = per_row[id(r)], per_row[id(none)]
    if None not in mine and None not in base:
      iv = intervals.paired_difference(mine, base)  # extra rounds the defence costs
      r.update(round_cost=iv.estimate, round_cost_low=iv.low, round_cost_high=iv.high)


def accuracy_curves(rows: List[Dict[str, Any]], histories) -> Dict[Any, Dict[str, Any]]:
  """{(aggregator, partition): {label: [(round, mean, low, high)]}} over seeds.

  `histories[(aggregator, partition, label)]` is the list of per-seed histories.
  """
  from tf_dlg.analysis import intervals

  curves = {}
  for r in rows:
    hists = histories[(r["aggregator"], r["partition"], r["label"])]
    points = []
    for i in range(min(len(h) for h in hists)):
      iv = intervals.mean_interval([h[i]["test_accuracy"] for h in hists])
      points.append((i + 1, iv.estimate, iv.low, iv.high))
    name = r["label"] if r["param"] is None else f"{r['label']} {r['param']:.3g}"
    curves.setdefault((r["aggregator"], r["partition"]), {})[name] = points
  return curves
