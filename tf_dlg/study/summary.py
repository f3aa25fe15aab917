"""The report's first screen: against the strongest attacker, which setting protects, at what cost.

`first_screen` returns the Markdown that opens report.md and writes its one figure. Per
defence it names the attacker (the strongest searched, or the paper's attack where the
strongest were not searched, said so), the weakest setting that protects against it, the
top-1 identification rate there, and the accuracy that setting costs FedAvg at convergence
(paired by seed, beside the undefended baseline's accuracy); then one verdict line each.
Provenance (data, images, seeds, attacker, training cell) is stated once, above them.

A setting *protects* when it holds under both leak criteria of the threshold search (the
paper's adjusted-SSIM bar and identification): the stronger of the two thresholds. A cost
is quoted only for training at that very setting; where training ran at another one, the
cost there is given with what the attacker still identifies at it.

A cost is conclusive only when its interval excludes both zero (else the interval is
wider than the effect) and the margin of "almost no cost" (else it cannot say whether
the cost is small).

With frontier rows (dicts with `defense`, `setting`, `attack`, `top1`, `top1_low`,
`top1_high`, `cost`, `cost_low`, `cost_high`, and `epsilon` for DP-FedAvg points, None
elsewhere), the table and figure use the frontier instead: per defence its cheapest
setting at which no attacked image is identified, and DP-FedAvg beside the others.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_dlg.analysis import figures
from tf_dlg.study import matching, tables
from tf_dlg.study.records import UNTESTED, attack_untested

# The claims' "almost no cost" (two points of accuracy), the margin a cost is judged by.
MARGIN = 0.02
HEADING = "Which setting protects, and what it costs"
PAPER_ATTACK = "idlg"
# The training cell the first screen quotes (FedAvg's default: mean aggregation, IID).
CELL = ("mean", "iid")
PROTECTS, NOT_REACHED, NOT_SEARCHED = "protects", "does not protect", "not searched"
FRONTIER_KEYS = ("defense", "setting", "attack", "top1", "top1_low", "top1_high")
FRONTIER_KEYS += ("cost", "cost_low", "cost_high")


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


def _rate(row: Dict[str, Any], name: str) -> Optional[Tuple[float, float, float]]:
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
    return Protection(NOT_REACHED, attacker, end, text, _rate(row, rate))
  sign = 1.0 if row["stronger"] == "higher" else -1.0
  strongest = max(sign * c[1]["threshold"] for c in tested)
  picked = [c for c in tested if sign * c[1]["threshold"] == strongest]
  name = picked[0][0] if len(picked) == 1 else "both criteria"
  text = f"{tables.format_threshold(picked[-1][1])} ({name})"
  return Protection(PROTECTS, attacker, picked[-1][1]["threshold"], text, _rate(row, picked[-1][2]))


def _same(a: Optional[float], b: Optional[float]) -> bool:
  return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def top1_at(row: Optional[Dict[str, Any]], param: Optional[float]):
  """(rate, low, high) of top-1 identification at `param` by `row`'s attacker, or None."""
  if row is None or param is None:
    return None
  pairs = [("threshold", "top1_at_threshold"), ("id_threshold", "top1_at_id_threshold")]
  for setting, rate in pairs:
    if _same(row.get(setting), param) and row.get(rate) is not None:
      return _rate(row, rate)
  if row["status"] == "not_reached" and _same(_strongest_end(row), param):
    return _rate(row, "top1_at_threshold")
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
      any(_same(x.get(k), r["param"]) for x in threshold_rows if x["dataset"] == d for k in keys)
      for r in trained
    )
  ]
  if len(matching) != 1:
    raise ValueError(
      f"cannot tell which of the datasets {datasets} the convergence runs trained on "
      f"(matching thresholds: {matching}); pass dataset= one of them."
    )
  return matching[0]


def _pp(row: Dict[str, Any]) -> str:
  """`+0.1 pp [-0.3, +0.4]`: a row's accuracy cost with its interval, in points."""
  c, lo, hi = (100 * row[k] for k in ("cost", "cost_low", "cost_high"))
  return figures.with_interval(c, lo, hi, "{:+.1f}", " pp")


def _acc(row: Dict[str, Any]) -> str:
  return f"{100 * row['final_test_accuracy']:.1f} %"


def _baseline(row: Dict[str, Any]) -> str:
  """`97.6 % [97.1, 98.0]`: the baseline accuracy with its interval over seeds."""
  lo, hi = (100 * row[k] for k in ("final_low", "final_high"))
  if not figures.has_interval(lo, hi):
    return f"{_acc(row)} ({figures.NO_INTERVAL})"
  return f"{_acc(row)} [{lo:.1f}, {hi:.1f}]"


def _seeds(row: Dict[str, Any]) -> str:
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


def format_top1(rate: Optional[Tuple[float, float, float]]) -> str:
  """`0.75 [0.35, 0.97]`, as the threshold tables print rates; `-` if not measured."""
  if rate is None:
    return "-"
  return f"{rate[0]:.2g} [{rate[1]:.2g}, {rate[2]:.2g}]"


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
  at_p = next((r for r in trained if _same(r["param"], p.setting)), None)
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
      safe = p.state == PROTECTS and _same(r["param"], p.setting)
      points.append(_point(f"{defense} {r['param']:.3g}", r, rate, safe))
  verdict = _verdict(defense, p, clause, _elsewhere(threshold_rows, dataset, defense))
  verdict += _measured_at(thr, p.setting)
  return Line(defense, p, cell, _short(p, clause), verdict, points)


def _measured_at(row: Optional[Dict[str, Any]], setting: Optional[float]) -> str:
  """` At 0.99: identified by reconstruction 1/8, gallery matching 8/8; median rank ...`
  where the search measured its protective setting (the one the verdict names)."""
  if row is None or not _same(row.get("protective_setting"), setting):
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


def _cost_axis(ax, lines: Sequence[Line], margin: float) -> None:
  """The first screen's x axis: accuracy cost, to the costliest point's interval."""
  # One seed gives no cost interval: its point estimate bounds the axis instead.
  costs = [q["cost"] for x in lines for q in x.points]
  right = max([100 * margin] + [c[2] if figures.has_interval(c[1], c[2]) else c[0] for c in costs])
  bare = not all(figures.has_interval(c[1], c[2]) for c in costs)
  ax.set_xlim(right=right * 1.15 + 0.1)
  if right > 10:  # costs from tenths of a point to tens: keep the small ones apart
    from matplotlib import ticker

    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xticks([t for t in (0, 1, 2, 5, 10, 20, 50, 100) if t <= right * 1.15 + 0.1])
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  bars = "95 % t interval over seeds" + (f"; {figures.NO_INTERVAL}" if bare else "")
  ax.set_xlabel(f"accuracy cost at convergence, pp ({bars})", fontsize=8)


def plot(lines: Sequence[Line], path: str, title: str, reference=None, margin=MARGIN) -> str:
  """The first screen's figure: top-1 identification against accuracy cost, with intervals.

  One colour per defence; a filled marker where the setting protects (no attacked image
  identified), hollow where the attacker still identifies some; DP-FedAvg points are
  stars labelled with their epsilon. `reference`: (label, (rate, low, high)) at zero cost.
  """
  import matplotlib

  matplotlib.use("Agg")  # headless: figures are files, never windows
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8.4, 2.7))
  for i, line in enumerate(lines):
    color = plt.get_cmap("tab10")(i % 10)
    pts = sorted(line.points, key=lambda q: q["cost"][0])
    if len(pts) > 1:
      ax.plot([q["cost"][0] for q in pts], [q["top1"][0] for q in pts], color=color, lw=1)
    for j, q in enumerate(pts):
      (x, xlo, xhi), (y, ylo, yhi) = q["cost"], q["top1"]
      ax.errorbar(
        x,
        y,
        xerr=[[x - xlo], [xhi - x]] if figures.has_interval(xlo, xhi) else None,
        yerr=[[y - ylo], [yhi - y]],
        fmt="*" if q["epsilon"] is not None else "o",
        ms=8,
        color=color,
        mfc=color if q["protects"] else "white",
        capsize=3,
        label=line.defense if j == 0 else None,
      )
      eps = "" if q["epsilon"] is None else f" (ε={q['epsilon']:.3g})"
      # Staggered by defence so that labels of points at one place stay readable.
      offset = (6, 6 - 11 * (i % 3))
      ax.annotate(q["label"] + eps, (x, y), xytext=offset, textcoords="offset points", fontsize=7)
  if reference is not None:
    y, ylo, yhi = reference[1]
    ax.errorbar(0, y, yerr=[[y - ylo], [yhi - y]], fmt="s", color="black", capsize=3)
    ax.annotate(
      reference[0], (0, y), xytext=(-6, 0), textcoords="offset points", fontsize=7, ha="right"
    )
  ax.axvline(100 * margin, color="grey", ls="--", lw=0.8, label=f"{100 * margin:.0f} pp margin")
  ax.set_ylim(-0.08, 1.17)
  ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
  _cost_axis(ax, lines, margin)
  ax.set_ylabel("identified, top-1 rate\n(95 % exact interval)", fontsize=8)
  # Wrapped: with several strongest attackers per defence the title outgrew the axes.
  ax.set_title(textwrap.fill(title, 90), fontsize=8.5)
  ax.grid(alpha=0.3)
  if any(x.points for x in lines):
    # Room right of the costliest point for its label, which would run into the legend.
    left, right_edge = ax.get_xlim()
    ax.set_xlim(left, right_edge * 2.2 if right_edge > 10 else right_edge + 0.3)
    legend = dict(loc="center left", bbox_to_anchor=(1.01, 0.5), title_fontsize=7)
    ax.legend(fontsize=7, title="filled: protects", **legend)
  else:
    ax.text(0.5, 0.5, "no cost measured: see the table", transform=ax.transAxes, ha="center")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


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
    base = f"{_seeds(baseline)}; baseline {_baseline(baseline)}"
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
    f"Identified by {attackers} vs accuracy cost; baseline accuracy {_baseline(baseline)} "
    f"({baseline['aggregator']}, {baseline['partition']}, "
    f"{_seeds(baseline)})"
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
    convergence_rows: convergence.csv rows (`convergence.read_convergence`, or `Convergence.run`'s);
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
  reference = _rate(first, "undefended_top1") if first else None
  prov = provenance(threshold_rows, dataset, cell_rows, training_data, frontier_rows or [])
  link = os.path.relpath(os.path.abspath(figure_path), os.path.abspath(report_dir))
  attackers = ", ".join(dict.fromkeys(x.protection.attacker.split(" ")[0] for x in lines))
  title = _title(baseline, attackers)
  plot(lines, figure_path, title, reference and ("no defence", reference), margin)
  return _markdown(lines, prov, baseline, link, bool(frontier_rows))
