"""Markdown of the threshold search: thresholds.md and robustness.md, and threshold cells."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tf_dlg.study.records import INCONCLUSIVE, UNTESTED, attack_untested


def _markdown_table(header, rows) -> str:
  from tf_dlg.analysis import figures

  return figures.markdown_table(header, rows)


def inconclusive(row: Dict[str, Any]) -> bool:
  """The interval spans the whole search range, or most images are untested."""
  n, tested = row.get("num_images"), row.get("num_tested")
  if n and tested is not None and tested < n / 2:
    return True
  low, high = row.get("low"), row.get("high")
  if low is None or high is None:
    return False
  higher = row["stronger"] == "higher"
  weak, strong = (low, high) if higher else (high, low)
  weak_end_hit = weak == (row["search_low"] if higher else row["search_high"])
  strong_end_hit = strong == (row["search_high"] if higher else row["search_low"])
  return weak_end_hit and (strong_end_hit or row.get("interval_open") in (True, "True"))


def usable(row) -> bool:
  return not attack_untested(row) and not inconclusive(row)


def format_threshold(row: Dict[str, Any]) -> str:
  """`value [low, high] (n=tested/images)`, or what stands in its place."""
  if attack_untested(row):
    return UNTESTED
  strong_end = row["search_high"] if row["stronger"] == "higher" else row["search_low"]
  if row["status"] == "not_reached":
    text = f"not reached (leaks at {strong_end:g})"
  elif row.get("low") is None:  # an older per-dataset file
    text = f"{row['threshold']:g}"
  else:
    text = f"{row['threshold']:.3g}"
  if row.get("low") is not None and row["status"] != "not_reached":
    lo, hi = f"{row['low']:.3g}", f"{row['high']:.3g}"
    if row.get("interval_open") in (True, "True"):  # resamples not reached: beyond the end
      lo, hi = (lo, f"> {hi}") if row["stronger"] == "higher" else (f"< {lo}", hi)
    text += f" [{lo}, {hi}] (n={row['num_tested']:.0f}/{row['num_images']:.0f})"
  if row["status"] == "at_weakest":
    text = f"<= {text} (weakest tried)"
  return f"{INCONCLUSIVE}: {text}" if inconclusive(row) else text


_CRITERION_KEYS = (
  "status",
  "threshold",
  "low",
  "high",
  "interval_open",
  "num_tested",
  "rank",
  "per_image",
  "per_image_status",
  "attack_works_undefended",
)


def identification_view(row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
  """The row with its identification threshold in the threshold's place (None: no such
  columns, e.g. a file of an older search)."""
  if row.get("id_status") is None:
    return None
  return dict(row, **{k: row.get(f"id_{k}") for k in _CRITERION_KEYS})


def format_rate(row: Dict[str, Any], name: str) -> str:
  """`0.25 [0.032, 0.65]` of the rate column `name` (and its _low / _high), or `-`."""
  value = row.get(name)
  if value is None:
    return "-"
  return f"{value:.2g} [{row[name + '_low']:.2g}, {row[name + '_high']:.2g}]"


_BOTH_HEADER = [
  "dataset",
  "attacker",
  "defence",
  "adj.-SSIM threshold [95 %] (n)",
  "top-1 at it",
  "identification threshold [95 %] (n)",
  "top-1 at that",
  "top-1 undefended",
]


def both_criteria_rows(rows: Sequence[Dict[str, Any]]) -> List[List[str]]:
  """Per row: both thresholds and the top-1 identification rates at each."""
  out = []
  for r in rows:
    view = identification_view(r)
    out.append(
      [
        r["dataset"],
        r["attack"] if r["kind"] == "plain" else f"{r['attack']} (strongest)",
        r["defense"],
        format_threshold(r),
        format_rate(r, "top1_at_threshold"),
        "-" if view is None else format_threshold(view),
        format_rate(r, "top1_at_id_threshold"),
        format_rate(r, "undefended_top1"),
      ]
    )
  return out


def both_criteria_table(rows: Sequence[Dict[str, Any]]) -> str:
  """Markdown: both criteria per (dataset, attacker, defence)."""
  return _markdown_table(_BOTH_HEADER, both_criteria_rows(rows))


def _cell(rows, kind, attack, dataset, defense) -> str:
  """A table cell: the threshold of one search (adaptive ones name their attacker)."""
  r = next(
    (
      x
      for x in rows
      if (x["kind"], x["dataset"], x["defense"]) == (kind, dataset, defense)
      and attack in (None, x["attack"])
    ),
    None,
  )
  if r is None:
    return "-"
  return format_threshold(r) + (f" ({r['attack']})" if attack is None else "")


def _spread_row(r: Dict[str, Any]) -> List[Any]:
  values = [v for v in json.loads(r["per_image"]) if v is not None]
  statuses = json.loads(r["per_image_status"])
  spread = (
    "-" if not values else f"{min(values):.3g} / {float(np.median(values)):.3g} / {max(values):.3g}"
  )
  return [
    r["dataset"],
    r["kind"],
    r["attack"],
    r["defense"],
    r["unit"],
    r["status"],
    format_threshold(r),
    f"{r['num_tested']} / {r['num_images']}",
    spread,
    statuses.count("not_reached"),
    r["absolute_equivalent"],
    r["relative_equivalent"],
    r["points_evaluated"],
    f"{r['seconds']:.0f}",
  ]


_SPREAD_HEADER = [
  "dataset",
  "kind",
  "attack",
  "defence",
  "unit",
  "status",
  "threshold [95 %]",
  "tested / images",
  "per image: min / median / max",
  "not reached",
  "absolute eq.",
  "relative eq.",
  "points",
  "seconds",
]


def thresholds_markdown(rows: Sequence[Dict[str, Any]], search, sources: Dict[str, str]) -> str:
  """thresholds.md of a finished search (`search` gives its settings and cover)."""
  lines = [
    "# Defence thresholds against gradient inversion\n\n",
    f"Per image: the weakest setting at which the attack no longer recovers it "
    f"(adjusted SSIM < {search.leak_ssim}), bisected to a factor {search.log_resolution:g} "
    f"(log scales) or {search.linear_resolution:g} (linear), best of {search.restarts} "
    f"restarts, iterations {search.iterations}, seed {search.seed}. Per dataset: the "
    f"smallest setting that defends {search.defended_fraction:.0%} of the images the "
    f"attack recovers undefended, value [95 % bootstrap interval over images] "
    f"(n = tested / attacked images).\n",
    _lead_tables(rows, search),
  ]
  tables = [("plain", a, f"Plain threshold, attack `{a}`") for a in search.attacks]
  if search.adaptive:
    tables.append(
      ("adaptive", None, "Adaptive threshold (strongest attacker, `STRONGEST_ATTACKER`)")
    )
  for kind, attack, heading in tables:
    lines.append(f"\n## {heading}\n\n")
    table = [
      [f] + [_cell(rows, kind, attack, d, f) for d in search.datasets] for f in search.defenses
    ]
    lines.append(_markdown_table(["defence"] + list(search.datasets), table))
  lines.append(comparison(rows, search.attacks))
  lines.append("\n## Per-image spread\n\n")
  lines.append(_markdown_table(_SPREAD_HEADER, [_spread_row(r) for r in rows]))
  lines.append(
    "\nFigures: `figures/thresholds_<defence>.png` (per-image thresholds), "
    "`figures/grid_<dataset>_<attack>_<defence>.png` (median-threshold image, with the "
    "dataset image the attacker would pick).\n"
    "\nData:\n\n"
  )
  for dataset in search.datasets:
    lines.append(f"- `{dataset}`: {sources[dataset]}\n")
  return "".join(lines)


STRONGEST_HEADING = "Against each defence's strongest attacker"


def _lead_tables(rows: Sequence[Dict[str, Any]], search) -> str:
  """Both criteria against the strongest attackers first, then the paper's plain attack."""
  adaptive = [r for r in rows if r["kind"] == "adaptive"]
  plain = [r for r in rows if r["kind"] == "plain"]
  text = (
    "\nTwo leak criteria. *Adjusted SSIM*: an image leaks when its brightness-adjusted SSIM "
    "reaches the bar above. *Identification*: it leaks when the attacker, ranking all "
    f"{_gallery(rows)} images of the dataset by brightness-tolerant correlation with the "
    "reconstruction, picks its original first (top-1; `tf_dlg.analysis.identification`). "
    "Each threshold is searched per image and aggregated as above; *top-1 at it / that*: "
    "the fraction of the attacked images identified at that threshold (at the strongest setting "
    "searched when not reached), exact 95 % binomial interval. n = tested / attacked "
    "images; tested = leaking undefended under that criterion.\n"
    f"\n## {STRONGEST_HEADING}\n\n"
  )
  if adaptive:
    text += (
      "Each defence against the attackers known to break it (its row's "
      "`strongest_attackers` in `tf_dlg.study.defense_table`; with two, an image leaks if either recovers it).\n\n"
      + both_criteria_table(adaptive)
    )
  else:
    text += (
      "Not searched in this run (`--adaptive` off): the thresholds below hold against "
      "the paper's attack only, a weaker attacker than those known to break each defence.\n"
    )
  if plain:
    attacks = ", ".join(f"`{a}`" for a in search.attacks)
    text += f"\n## The paper's reproduction: plain {attacks}\n\n" + both_criteria_table(plain)
  return text


def _gallery(rows) -> str:
  sizes = sorted({int(r["gallery_size"]) for r in rows if r.get("gallery_size")})
  return "/".join(str(n) for n in sizes) or "the"


def _plain_of(rows, attack: str, adaptive_row) -> Optional[Dict[str, Any]]:
  a = adaptive_row
  return next(
    (
      r
      for r in rows
      if r["kind"] == "plain"
      and r["attack"] == attack
      and (r["dataset"], r["defense"]) == (a["dataset"], a["defense"])
    ),
    None,
  )


def comparison(rows, attacks: Sequence[str]) -> str:
  """Plain vs adaptive threshold and their ratio (first plain attack), when both ran."""
  adaptive = [r for r in rows if r["kind"] == "adaptive"]
  if not adaptive or not attacks:
    return ""
  table = []
  for a in adaptive:
    p = _plain_of(rows, attacks[0], a)
    if p is None:
      continue
    ratio = ""
    if p["threshold"] and a["threshold"] and usable(p) and usable(a):
      ratio = f"{a['threshold'] / p['threshold']:.3g}"
    table.append(
      [
        a["dataset"],
        a["defense"],
        f"{format_threshold(p)} ({p['attack']})",
        f"{format_threshold(a)} ({a['attack']})",
        ratio,
      ]
    )
  return (
    f"\n## Plain (`{attacks[0]}`) vs adaptive thresholds\n\n"
    "ratio = adaptive / plain (> 1: the adaptive attacker needs a larger parameter; "
    "for clipping, where lower is stronger, < 1).\n\n"
    + _markdown_table(["dataset", "defence", "plain", "adaptive", "ratio"], table)
  )


_ROBUSTNESS_COLUMNS = (
  ("dataset", "dataset"),
  ("defence", "defense"),
  ("threshold", "threshold"),
  ("attack", "attack"),
  ("update", "update"),
  ("undefended adj. SSIM", "undefended_adjusted_ssim"),
  ("defended", "fraction_defended"),
  ("adj. SSIM", "adjusted_ssim"),
  ("max adj. SSIM", "max_adjusted_ssim"),
  ("verdict", "verdict"),
)


def robustness_markdown(out: Sequence[Dict[str, Any]], search) -> str:
  """robustness.md: each threshold attacked again by other attackers."""
  text = (
    "# Do the thresholds hold against stronger attackers?\n\n"
    f"Each threshold is attacked again by adaptive attackers on the single-image "
    f"gradient, and by `idlg` on a {search.local_steps}-step FedAvg client delta "
    f"(learning rate {search.local_lr}). *broken*: fewer than "
    f"{search.defended_fraction:.0%} of the images stay below adjusted SSIM "
    f"{search.leak_ssim} at the threshold. A verdict of *holds* needs the same "
    "attacker to recover undefended images.\n\n"
  )
  return text + _markdown_table(
    [h for h, _ in _ROBUSTNESS_COLUMNS], [[o[k] for _, k in _ROBUSTNESS_COLUMNS] for o in out]
  )
