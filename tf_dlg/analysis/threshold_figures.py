"""Figures of the threshold search: per-image threshold strips, leak grids with the pick.

Strip plots of per-image defence thresholds (one figure per defence).

Each dataset is a column; each search (plain attack or adaptive attacker) a coloured
strip of its images' thresholds, jittered sideways. Images the strongest setting does
not stop are drawn at the strong end of the range as open triangles; untested images
(not recovered even undefended) are left out and counted in the legend. The dataset
threshold is a black bar with its 95 % interval as a vertical line.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Sequence

import numpy as np

from tf_dlg.analysis import figures


def _per_image(row: Dict[str, Any], key: str):
  value = row.get(key)
  return json.loads(value) if isinstance(value, str) else list(value or [])


def threshold_strips(
  rows: Sequence[Dict[str, Any]], path: str, title: str = "", footer: str = ""
) -> str:
  """Saves the strip plot of one defence's thresholds.csv rows to `path` (PNG).

  Args:
    rows: thresholds.csv rows of one defence (per_image / per_image_status as JSON text
      or lists); several datasets and searches (kind, attack).
    path: PNG path.
    title, footer: Figure title; small print (name the data sources).
  """
  plt = figures.pyplot()
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  searches = list(dict.fromkeys((r.get("kind", "plain"), r["attack"]) for r in rows))
  fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(1, len(datasets)), 3.6))
  rng = np.random.default_rng(0)
  width = 0.7 / max(1, len(searches))
  for s, (kind, attack) in enumerate(searches):
    color = f"C{s}"
    for d, dataset in enumerate(datasets):
      r = next(
        (
          x
          for x in rows
          if (x["dataset"], x.get("kind", "plain"), x["attack"]) == (dataset, kind, attack)
        ),
        None,
      )
      if r is None:
        continue
      x0 = d - 0.35 + width * (s + 0.5)
      _draw_cell(ax, r, x0, width, color, rng)
    ax.plot([], [], "o", color=f"C{s}", label=f"{kind}: {attack}")
  ax.plot([], [], "^", mfc="none", color="gray", label="not reached (drawn at strong end)")
  ax.set_xticks(range(len(datasets)))
  ax.set_xticklabels(datasets, fontsize=8)
  if rows and rows[0].get("search_scale") == "log":
    # The search range fixes the axis: a cell of untested images draws no point.
    low, high = float(rows[0]["search_low"]), float(rows[0]["search_high"])
    ax.set_ylim(low / 1.5, high * 1.5)
    ax.set_yscale("log")
  if rows:
    ax.set_ylabel(
      f"{rows[0]['defense']} {rows[0].get('unit') or 'parameter'}"
      f" ({'higher' if rows[0]['stronger'] == 'higher' else 'lower'} = stronger)",
      fontsize=8,
    )
  ax.legend(fontsize=6, loc="best")
  if title:
    ax.set_title(title, fontsize=9)
  if footer:
    fig.text(0.01, 0.005, footer, fontsize=5, ha="left", va="bottom", wrap=True)
  fig.tight_layout(rect=(0, 0.04 if footer else 0, 1, 1))
  return figures.save(fig, path)


def _draw_cell(ax, r, x0, width, color, rng):
  """One search's strip in one dataset column, with its dataset threshold and interval."""
  values, statuses = _per_image(r, "per_image"), _per_image(r, "per_image_status")
  strong_end = r["search_high"] if r["stronger"] == "higher" else r["search_low"]
  found = [v for v, st in zip(values, statuses) if v is not None]
  missed = sum(st == "not_reached" for st in statuses)
  jitter = lambda n: x0 + (rng.random(n) - 0.5) * width * 0.6  # noqa: E731
  if found:
    ax.plot(jitter(len(found)), found, "o", color=color, alpha=0.7, ms=4)
  if missed:
    ax.plot(jitter(missed), [strong_end] * missed, "^", mfc="none", color=color, ms=5)
  if r.get("threshold") is not None and r.get("low") is not None:
    ax.plot([x0 - width * 0.4, x0 + width * 0.4], [r["threshold"]] * 2, "-", color="k", lw=2)
    ax.plot([x0, x0], [r["low"], r["high"]], "-", color="k", lw=1)


_GRID_COLUMNS = (
  ("leaked", "leaked"),
  ("adjusted", "best brightness-adjusted"),
  ("original", "original"),
  ("pick", "attacker's pick"),
)


def leak_grid_with_pick(
  rows: Sequence[Dict[str, Any]], path: str, title: str = "", footer: str = ""
) -> str:
  """Saves a grid: one row per setting, columns leaked | adjusted | original | pick.

  Args:
    rows: Dicts with `label`, `leaked`, `adjusted`, `original` (HxWxC in [0, 1]), `pick`
      (the dataset image the attacker ranks first, None when the reconstruction is not
      finite), `rank` (of the original) and `top1`, and optional `ssim`, `adjusted_ssim`.
    path: PNG path.
    title, footer: Figure title; small print (name the data source).
  """
  return figures.leak_grid(rows, path, _GRID_COLUMNS, _grid_caption, title, footer, width=7.8)


def _grid_caption(row: Dict[str, Any], col: str) -> str:
  if col == "leaked" and "ssim" in row:
    return f"SSIM {row['ssim']:.2f}"
  if col == "adjusted" and "adjusted_ssim" in row:
    return f"adj. SSIM {row['adjusted_ssim']:.2f}"
  if col == "pick":
    if row["pick"] is None:
      return "none (not finite)"
    return ("identified" if row["top1"] else "wrong") + f", original rank {row['rank']}"
  return ""
