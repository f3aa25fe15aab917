"""The convergence grid's report: convergence.csv (written and read back), convergence.md
and figures/convergence.png."""

from __future__ import annotations

import csv
import os
from typing import Any, Dict, List

from tf_dlg import io as io_lib
from tf_dlg.analysis import figures
from tf_dlg.study import records
from tf_dlg.study.convergence_stats import FINAL_ROUNDS, TARGET_FRACTION

CONVERGENCE_FIELDS = (
  "aggregator",
  "partition",
  "defense",
  "label",
  "param",
  "param_source",
  "seeds",
  "rounds",
  "final_test_accuracy",
  "final_low",
  "final_high",
  "cost",
  "cost_low",
  "cost_high",
  "target_accuracy",
  "rounds_to_target",
  "rounds_low",
  "rounds_high",
  "round_cost",
  "round_cost_low",
  "round_cost_high",
  "per_seed_rounds",
  "best_test_accuracy",
  "clipped_fraction",
  "seconds",
  "per_seed",
  "engine",
)
_TEXT_FIELDS = ("aggregator", "partition", "defense", "label", "param_source", "seeds")
_TEXT_FIELDS += ("per_seed", "per_seed_rounds", "engine")
_REQUIRED = ("aggregator", "partition", "defense", "label", "param", "seeds", "per_seed")
_REQUIRED += ("final_test_accuracy", "final_low", "final_high", "cost", "cost_low", "cost_high")


def read_convergence(path: str) -> List[Dict[str, Any]]:
  """convergence.csv as the rows `Convergence.run` returns (numbers as floats, empty None).

  Raises:
    ValueError: naming the file (and line and column) of a column that convergence.csv
      does not have, a missing one, or a cell that is not a number where one belongs.
  """
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    names = reader.fieldnames or []
    unknown = [n for n in names if n not in CONVERGENCE_FIELDS]
    missing = [n for n in _REQUIRED if n not in names]
    if unknown or missing:
      raise ValueError(
        f"{path} is not a convergence.csv (unknown columns {unknown}, missing {missing})."
      )
    rows = []
    for raw in reader:
      row = {}
      for k in names:
        v = (raw[k] or "").strip()
        if k in _TEXT_FIELDS or not v:
          row[k] = v or None
          continue
        try:
          row[k] = float(v)
        except ValueError:
          where = f"{path}, line {reader.line_num}, column {k!r}"
          raise ValueError(f"{where}: {v!r} is not a number.") from None
      rows.append(row)
  return rows


def format_rounds(r: Dict[str, Any]) -> str:
  """Rounds to target [95 %], or how many seeds never reached it."""
  per_seed = str(r.get("per_seed_rounds") or "").split()
  if not per_seed:
    return ""
  missed = per_seed.count("-")
  if missed:
    return f"not reached in {missed}/{len(per_seed)} seeds"
  if r.get("rounds_low") is None:
    return ""
  return figures.with_interval(
    float(r["rounds_to_target"]), float(r["rounds_low"]), float(r["rounds_high"]), "{:.1f}"
  )


def table_row(r: Dict[str, Any]) -> List[Any]:
  """One row of convergence.md."""
  return [
    r["aggregator"],
    r["partition"],
    r["label"],
    r["param"],
    r["param_source"],
    figures.with_interval(r["final_test_accuracy"], r["final_low"], r["final_high"]),
    ""
    if r["label"] == "none"
    else figures.with_interval(
      100 * r["cost"], 100 * r["cost_low"], 100 * r["cost_high"], "{:+.1f}"
    ),
    f"{r['target_accuracy']:.3f}",
    format_rounds(r),
    ""
    if r["label"] == "none" or r.get("round_cost") is None
    else figures.with_interval(
      r["round_cost"], r["round_cost_low"], r["round_cost_high"], "{:+.1f}"
    ),
    "" if r["clipped_fraction"] is None else f"{r['clipped_fraction']:.2f}",
  ]


def write_report(grid, rows: List[Dict[str, Any]], curves) -> None:
  """convergence.csv, convergence.md and figures/convergence.png of the grid's rows.

  `grid`: the `convergence.Convergence` run (its output folder, data, engine, clients,
  rounds, seeds, and the (aggregator, partition) panels in its order); `curves`:
  `convergence_stats.accuracy_curves`.
  """
  output_dir, dataset, dataset_source = grid.output_dir, grid.dataset, grid.dataset_source
  engine, num_clients, rounds = grid.engine, grid.base.num_clients, grid.rounds
  seeds = grid.seeds
  panel_order = [(a, p) for a in grid.aggregators for p in grid.partitions]
  records.write_csv(os.path.join(output_dir, "convergence.csv"), CONVERGENCE_FIELDS, rows)
  n_seeds, seeds = len(seeds), ", ".join(map(str, seeds))
  figures.accuracy_panel(
    curves,
    os.path.join(output_dir, "figures", "convergence.png"),
    title=f"FedAvg test accuracy, mean and 95 % band over seeds {seeds} ({dataset})"
    + (f"; {figures.NO_INTERVAL}" if n_seeds == 1 else ""),
    footer=f"data: {dataset_source}",
    panel_order=list(panel_order),
  )
  table = [table_row(r) for r in rows]
  text = (
    f"# Convergence with defences at their thresholds\n\n"
    f"FedAvg on `{dataset}` ({dataset_source}), engine `{engine}`, "
    f"{num_clients} clients, {rounds} rounds, seeds {seeds} "
    f"(n={n_seeds}). Final accuracy: mean of the last {FINAL_ROUNDS} rounds, "
    "mean [95 % t interval] over seeds; cost: accuracy without defence minus with "
    "it, paired by seed, in points [95 % t interval]. Rounds to target: the first "
    f"round reaching {TARGET_FRACTION:g} x the undefended cell's final accuracy "
    "(mean [95 % t interval] over seeds); extra rounds: defended minus undefended, "
    "paired by seed. Clipped: fraction of client "
    "updates that clipping changed."
    + (f" One seed: point estimates ({figures.NO_INTERVAL})." if n_seeds == 1 else "")
    + "\n\n"
    + figures.markdown_table(
      [
        "aggregator",
        "clients",
        "defence",
        "parameter",
        "from",
        "final acc. [95 %]",
        "cost pp [95 %]",
        "target",
        "rounds to target [95 %]",
        "extra rounds [95 %]",
        "clipped",
      ],
      table,
    )
    + "\n![convergence](figures/convergence.png)\n"
  )
  io_lib.atomic_write_text(os.path.join(output_dir, "convergence.md"), text)
