"""The report's first screen: against the strongest attacker, which setting protects, at what cost.

`first_screen` returns the Markdown that opens report.md and writes its one figure. Per
defence it names the attacker (the strongest searched, or the paper's attack where the
strongest were not searched, said so), the weakest setting that protects against it, the
top-1 identification rate there, and the accuracy that setting costs FedAvg at convergence
(paired by seed, beside the undefended baseline's accuracy); then one verdict line each.
Provenance (data, images, seeds, attacker, training cell) is stated once, above them.

Where a setting protects: `tf_dlg.study.protection`; each defence's line (cost, verdict,
figure points): `tf_dlg.study.defence_lines`; the figure: `tf_dlg.study.summary_figure`.

With frontier rows (dicts with `defense`, `setting`, `attack`, `top1`, `top1_low`,
`top1_high`, `cost`, `cost_low`, `cost_high`, and `epsilon` for DP-FedAvg points, None
elsewhere), the table and figure use the frontier instead: per defence its cheapest
setting at which no attacked image is identified, and DP-FedAvg beside the others.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

from tf_dlg.analysis import figures
from tf_dlg.study import summary_figure
from tf_dlg.study.defence_lines import (
  MARGIN,
  Line,
  baseline_text,
  defence_line,
  frontier_line,
  seeds_text,
)
from tf_dlg.study.protection import (
  PAPER_ATTACK,
  format_top1,
  interval_of,
  same_setting,
  threshold_row,
)

HEADING = "Which setting protects, and what it costs"
# The training cell the first screen quotes (FedAvg's default: mean aggregation, IID).
CELL = ("mean", "iid")


def pick_cell(convergence_rows) -> Optional[Tuple[str, str]]:
  """CELL when the run has it, else its first (aggregator, partition); None: no rows."""
  cells = [(r["aggregator"], r["partition"]) for r in convergence_rows]
  return CELL if CELL in cells else (cells[0] if cells else None)


def infer_dataset(threshold_rows, convergence_rows) -> str:
  """The searched dataset whose thresholds the convergence runs trained with."""
  datasets = list(dict.fromkeys(r["dataset"] for r in threshold_rows))
  if len(datasets) == 1:
    return datasets[0]
  trained = [r for r in convergence_rows if r.get("param") is not None]
  keys = ("threshold", "id_threshold", "search_low", "search_high")
  matching = [
    d
    for d in datasets
    if trained
    and all(
      any(
        same_setting(x.get(k), r["param"])
        for x in threshold_rows
        if x["dataset"] == d
        for k in keys
      )
      for r in trained
    )
  ]
  if len(matching) != 1:
    raise ValueError(
      f"cannot tell which of the datasets {datasets} the convergence runs trained on "
      f"(matching thresholds: {matching}); pass dataset= one of them."
    )
  return matching[0]


def provenance(threshold_rows, dataset, cell_rows, training_data, frontier=None) -> str:
  """The one paragraph that says what every number of the first screen rests on.

  `frontier`: the frontier rows the first screen reads, if any (they name their images).
  """
  from tf_dlg.study.convergence_stats import FINAL_ROUNDS

  mine = [r for r in threshold_rows if r["dataset"] == dataset]
  if any(r.get("kind") == "adaptive" for r in mine):
    attackers = "Attacker: each defence's strongest searched (named in the table)."
  else:
    attackers = (
      f"**Attacker: the paper's {PAPER_ATTACK} only; the strongest attackers were not "
      "searched in this run.**"
    )
  images = "/".join(sorted({f"{r['num_images']:.0f}" for r in mine if r.get("num_images")}))
  gallery = "/".join(sorted({f"{r['gallery_size']:.0f}" for r in mine if r.get("gallery_size")}))
  source = mine[0].get("dataset_source") if mine else None
  if frontier:  # the frontier attacks images of its own
    per_setting = sorted({int(r["num_images"]) for r in frontier if r.get("num_images")})
    images = f"{'/'.join(map(str, per_setting)) or '?'} attacked images per frontier setting"
  else:
    images = f"{images or '?'} attacked images"
  text = (
    f"Leakage: `{dataset}` ({source or 'source not recorded'}), {images}; *identified*: the "
    f"attacker ranks the original first among the dataset's {gallery or '?'} images. "
    f"{attackers}"
  )
  if frontier:
    text += " Settings and DP-FedAvg points: the privacy-utility frontier."
  if not cell_rows:
    return text + " Costs: not measured (no convergence run)."
  r0 = cell_rows[0]
  rounds = f"{r0['rounds']:.0f}" if r0.get("rounds") else "?"
  return text + (
    f" Costs: FedAvg on {training_data or 'the convergence dataset (source not given)'}, "
    f"{r0['aggregator']} aggregation, {r0['partition']} clients, {rounds} rounds, seeds "
    f"{', '.join(str(r0['seeds']).split())} (accuracy: mean of the last {FINAL_ROUNDS} rounds; cost: undefended "
    "minus defended, paired by seed)."
  )


def _table(lines: Sequence[Line], baseline, frontier: bool) -> str:

  base = "baseline not measured"
  if baseline is not None:
    base = f"{seeds_text(baseline)}; baseline {baseline_text(baseline)}"
  header = [
    "defence",
    "attacker",
    "protects from (frontier setting)" if frontier else "protects from [95 %] (n)",
    "identified there, top-1 [95 %]",
    f"accuracy cost at convergence [95 %] ({base})",
    "verdict",
  ]
  rows = [
    [x.defense, x.protection.attacker, x.protection.text, format_top1(x.protection.top1)]
    + [x.cost, x.short]
    for x in lines
  ]
  return figures.markdown_table(header, rows)


def _title(baseline, attackers: str) -> str:
  if baseline is None:
    return f"Identified by {attackers} vs accuracy cost (no convergence run: no costs)"
  return (
    f"Identified by {attackers} vs accuracy cost; baseline accuracy {baseline_text(baseline)} "
    f"({baseline['aggregator']}, {baseline['partition']}, "
    f"{seeds_text(baseline)})"
  )


def _markdown(lines: Sequence[Line], prov: str, baseline, link: str, frontier: bool) -> str:
  missing = [x.defense for x in lines if not x.points]
  note = (
    f"Not in the figure (no cost, or no identification rate, at a trained setting): "
    f"{', '.join(missing)}.\n\n"
    if missing
    else ""
  )
  dp = any(x.defense == "dp" or "dp" in x.defense.split("_") for x in lines)
  no_dp = (
    ""
    if frontier and dp
    else "- **DP-FedAvg**: not compared in this run (no privacy-utility frontier with DP points).\n"
  )
  return (
    f"## {HEADING}\n\n{prov}\n\n"
    + "".join(f"- {x.verdict}\n" for x in lines)
    + no_dp
    + f"\n![identification vs accuracy cost]({link})\n\n"
    + note
    + _table(lines, baseline, frontier)
    + "\n"
  )


def _frontier_baseline(frontier_rows, baseline):
  """The frontier's own undefended training as a convergence row (its costs are paired
  against it, not against the pipeline's cell); `baseline` where the rows carry none."""
  row = next((r for r in frontier_rows if r.get("baseline_accuracy") is not None), None)
  if row is None:
    return baseline
  return dict(
    {"aggregator": "mean", "partition": "iid", **(baseline or {})},
    final_test_accuracy=row["baseline_accuracy"],
    final_low=row["baseline_low"],
    final_high=row["baseline_high"],
    seeds=row.get("seeds"),
  )


def first_screen(
  threshold_rows,
  convergence_rows,
  figure_path: str,
  frontier_rows=None,
  *,
  report_dir: str,
  dataset: Optional[str] = None,
  training_data: Optional[str] = None,
  margin: float = MARGIN,
) -> str:
  """The report's opening Markdown (provenance, verdicts, figure, table); writes the figure.

  Args:
    threshold_rows: thresholds.csv rows (`records.read_thresholds`, or the search's rows).
    convergence_rows: convergence.csv rows (`convergence_report.read_convergence`, or `Convergence.run`'s);
      empty when there was no convergence run.
    figure_path: Where the PNG goes.
    frontier_rows: The privacy-utility frontier's points (see the module docstring), or
      None: then protection and cost come from the thresholds and the convergence run.
    report_dir: The folder of report.md (the figure is linked relative to it).
    dataset: The searched dataset to quote; default: the one the training used.
    training_data: The training data's source, named in the provenance.
    margin: The accuracy cost (a fraction) that counts as "almost none".
  """
  threshold_rows, convergence_rows = list(threshold_rows or []), list(convergence_rows or [])
  if not threshold_rows and not frontier_rows:
    raise ValueError("first_screen needs threshold rows or frontier rows; both are empty.")
  cell = pick_cell(convergence_rows)
  cell_rows = [r for r in convergence_rows if (r["aggregator"], r["partition"]) == cell]
  baseline = next((r for r in cell_rows if r["label"] == "none"), None)
  if frontier_rows:
    baseline = _frontier_baseline(frontier_rows, baseline)
  if threshold_rows:
    known = sorted({r["dataset"] for r in threshold_rows})
    dataset = dataset or infer_dataset(threshold_rows, cell_rows)
    if dataset not in known:
      raise ValueError(f"dataset={dataset!r} was not searched; the thresholds have {known}.")
  if frontier_rows:
    order = dict.fromkeys(r["defense"] for r in frontier_rows)
    lines = [
      frontier_line(d, [r for r in frontier_rows if r["defense"] == d], baseline, margin)
      for d in order
    ]
  else:
    order = dict.fromkeys(
      [r["defense"] for r in threshold_rows if r["dataset"] == dataset]
      + [r["defense"] for r in cell_rows if r["label"] != "none"]
    )
    lines = [
      defence_line(
        d, threshold_rows, dataset, [r for r in cell_rows if r["defense"] == d], baseline, margin
      )
      for d in order
    ]
  mine = [r for r in threshold_rows if r["dataset"] == dataset]
  first = threshold_row(mine, dataset, mine[0]["defense"]) if mine else None
  reference = interval_of(first, "undefended_top1") if first else None
  prov = provenance(threshold_rows, dataset, cell_rows, training_data, frontier_rows or [])
  link = os.path.relpath(os.path.abspath(figure_path), os.path.abspath(report_dir))
  attackers = ", ".join(dict.fromkeys(x.protection.attacker.split(" ")[0] for x in lines))
  title = _title(baseline, attackers)
  summary_figure.plot(lines, figure_path, title, reference and ("no defence", reference), margin)
  return _markdown(lines, prov, baseline, link, bool(frontier_rows))
