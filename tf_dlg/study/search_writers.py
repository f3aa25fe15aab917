"""The threshold search's writers: thresholds.csv / .md, strip plots and leak grids."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Sequence

from tf_dlg import io as io_lib
from tf_dlg.study import matching, records, tables
from tf_dlg.study.records import RECON_FORMAT, point_key


def write_csv(output_dir: str, rows: List[Dict[str, Any]]) -> None:
  """thresholds.csv."""
  records.write_csv(os.path.join(output_dir, "thresholds.csv"), records.THRESHOLD_FIELDS, rows)


def write_tables(search, rows: List[Dict[str, Any]]) -> None:
  """thresholds.csv and thresholds.md of `search` (a `ThresholdSearch`)."""
  write_csv(search.output_dir, rows)
  sources = {d: search.case(d)[0].source for d in search.datasets}
  text = tables.thresholds_markdown(rows, search, sources)
  io_lib.atomic_write_text(os.path.join(search.output_dir, "thresholds.md"), text)


def write_strip_plots(
  output_dir: str, rows: List[Dict[str, Any]], defenses: Sequence[str]
) -> List[str]:
  """figures/thresholds_<defence>.png: per-image thresholds per dataset and search."""
  from tf_dlg.analysis import threshold_figures

  paths = []
  for defense in defenses:
    cells = [r for r in rows if r["defense"] == defense]
    path = os.path.join(output_dir, "figures", f"thresholds_{defense}.png")
    paths.append(
      threshold_figures.threshold_strips(
        cells,
        path,
        title=f"{defense}: per-image thresholds",
        footer="data: " + "; ".join(sorted({r["dataset_source"] for r in cells})),
      )
    )
  return paths


def write_grids(output_dir: str, cells: Sequence[Any], log, cases) -> List[str]:
  """The paper's Figures 2-4 for the median-threshold image of each cell, with the
  dataset image the attacker would pick beside each reconstruction.

  `cells` are `cell_search.SearchedCell`s, `log` the points and `cases` their `SearchCases`.
  """
  from tf_dlg.analysis import threshold_figures

  paths = []
  for cell in cells:
    r = cell.row.to_dict()
    pick = _representative(cell.images, r["search_scale"], r["stronger"])
    if pick is None:
      continue
    i, im = pick
    settings = [("no defence", "none", None)]
    if im.weaker is not None:
      settings.append((f"{r['defense']} {im.weaker:g} (weaker)", r["defense"], im.weaker))
    settings.append((f"{r['defense']} {im.threshold:g} (threshold)", r["defense"], im.threshold))
    grid = [
      _grid_entry(output_dir, log, cases, (r["dataset"], r["attack"].split("+"), f, p, i), label)
      for label, f, p in settings
    ]
    name = f"grid_{r['dataset']}_{r['attack']}_{r['defense']}.png"
    path = os.path.join(output_dir, "figures", name)
    threshold_figures.leak_grid_with_pick(
      grid,
      path,
      title=f"{r['attack']} vs {r['defense']} on {r['dataset']}"
      f" (image {grid[0]['index']}, median threshold)",
      footer=f"data: {r['dataset_source']}",
    )
    paths.append(path)
  return paths


def _grid_entry(output_dir, log, cases, point, label):
  """The best attacker's reconstruction of `image` at one setting."""
  dataset, attackers, defense, param, image = point
  # The grid shows reconstructions; a gallery pick only where no reconstruction ran.
  drawn = [a for a in attackers if a != matching.NAME] or list(attackers)
  recs = [log.get(point_key(dataset, a, defense, param, image=image)) for a in drawn]
  rec = max((x for x in recs if x is not None), key=lambda x: _finite(x["adjusted_ssim"]))
  _, z = io_lib.load_npz(os.path.join(output_dir, rec["recon"]), RECON_FORMAT)
  j = rec["recon_row"]
  return {
    "label": label,
    "leaked": z["leaked"][j],
    "adjusted": z["adjusted"][j],
    "original": z["original"][j],
    "ssim": rec["ssim"],
    "index": rec["index"],
    "adjusted_ssim": rec["adjusted_ssim"],
    "pick": None if rec["pick"] < 0 else cases.gallery_image(dataset, rec["pick"]),
    "rank": rec["rank"],
    "top1": rec["top1"],
  }


def _finite(x: float) -> float:
  return x if math.isfinite(x) else -math.inf


def _representative(images, scale, stronger):
  """(image, ImageThreshold) at the median threshold among those with one, or None."""
  from tf_dlg.analysis import threshold as threshold_lib

  found = [(i, im) for i, im in enumerate(images) if im.status in ("found", "at_weakest")]
  if not found:
    return None
  space = threshold_lib.SearchSpace(1.0, 2.0, scale, stronger)  # direction only
  order = sorted(
    found, key=lambda x: -x[1].threshold if space.stronger == "lower" else x[1].threshold
  )
  return order[(len(order) - 1) // 2]
