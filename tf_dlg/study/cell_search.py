"""The bisection of one threshold-search cell: each image's threshold, then the dataset's.

A cell is one (dataset, kind, attackers, defence). Each image is bisected under both
leak criteria (adjusted SSIM, and identification among the dataset's images) on the
points of the search's cached evaluator; the per-image thresholds make the dataset's
threshold with its interval (`tf_dlg.analysis.threshold`), and the cell's thresholds.csv
row carries both, the top-1 rates and the leak measures at the protective setting.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tf_dlg.study import defense_table, matching, records


@dataclasses.dataclass
class SearchedCell:
  """One searched (dataset, kind, attackers, defence): its row and per-image thresholds."""

  row: records.ThresholdRow
  images: List[Any]  # tf_dlg.analysis.threshold.ImageThreshold per image (adjusted SSIM)
  id_images: List[Any]  # the same under the identification criterion


def search_cell(
  evaluator, resolution, dataset: str, kind: str, attackers: Sequence[str], defense: str
) -> SearchedCell:
  """Per-image bisection of one cell under both leak criteria; its row and images.

  An image leaks at a setting if any of the attackers recovers it: adjusted SSIM at
  or above the bar (`defended` false), or identified top-1 among all the dataset's
  images (`id_defended` false). Both bisections share the attacked points.

  `evaluator` is the search's `PointEvaluator`; `resolution(scale)` the bracket width at
  which an image's bisection stops.
  """
  from tf_dlg.analysis import threshold as threshold_lib

  start = time.perf_counter()
  space = threshold_lib.SearchSpace(*defense_table.PARAMETER_SEARCH[defense])
  ev, n = evaluator, evaluator.num_images
  base = {a: ev.evaluate(dataset, a, "none", None)["images"] for a in attackers}
  found = {}
  for verdict in ("defended", "id_defended"):
    leaks = [not all(base[a][i][verdict] for a in attackers) for i in range(n)]
    images = _bisect(ev, resolution, (dataset, attackers, defense), space, verdict, leaks)
    agg = threshold_lib.dataset_threshold(images, space, ev.defended_fraction, seed=ev.seed)
    found[verdict] = (images, agg)
  row = _row(ev, resolution, (dataset, kind, attackers, defense), space, found)
  undefended = [max(base[a][i]["adjusted_ssim"] for a in attackers) for i in range(n)]
  row.undefended_adjusted_ssim = float(np.median(undefended))
  row.points_evaluated = sum(len(im.points) for im in found["defended"][0])
  rates = (
    ("undefended_top1", "none", None),
    ("top1_at_threshold", defense, _rated(row.threshold, space)),
    ("top1_at_id_threshold", defense, _rated(row.id_threshold, space)),
  )
  for name, defence, value in rates:
    iv = ev.top1_rate(dataset, attackers, defence, value)
    setattr(row, name, iv.estimate)
    setattr(row, f"{name}_low", iv.low)
    setattr(row, f"{name}_high", iv.high)
  setting = _protective(row, space)
  row.protective_setting = setting
  measured = ev.measures(dataset, attackers, defense, setting)
  for name in matching.MEASURES:
    setattr(row, matching.column(name, "_at_protective"), measured[name])
  row.seconds = time.perf_counter() - start
  return SearchedCell(row, found["defended"][0], found["id_defended"][0])


def _bisect(evaluator, resolution, cell, space, verdict, leaks):
  """Per-image thresholds where `verdict` (a point's boolean field) means defended."""
  from tf_dlg.analysis import threshold as threshold_lib

  dataset, attackers, defense = cell

  def evaluate(requests):
    recs = [evaluator.evaluate_images(dataset, a, defense, requests) for a in attackers]
    return [all(r[j][verdict] for r in recs) for j in range(len(requests))]

  return threshold_lib.per_image_thresholds(evaluate, space, leaks, resolution(space.scale))


def _row(evaluator, resolution, cell, space, found) -> records.ThresholdRow:
  """The thresholds.csv row of one searched cell (before its rates and measures)."""
  dataset, kind, attackers, defense = cell
  ev = evaluator
  ssim = _criterion(*found["defended"], space)
  absolute, relative = ev.equivalents(dataset, defense, ssim["threshold"])
  ident = _criterion(*found["id_defended"], space)
  return records.ThresholdRow(
    dataset=dataset,
    dataset_source=ev.cases.case(dataset)[0].source,
    kind=kind,
    attack="+".join(attackers),
    defense=defense,
    unit=defense_table.row(defense).param_name,
    **ssim,
    num_images=len(found["defended"][0]),
    restarts=ev.restarts,
    seed=ev.seed,
    iterations=ev.iterations[dataset],
    defended_fraction=ev.defended_fraction,
    resolution=resolution(space.scale),
    absolute_equivalent=absolute,
    relative_equivalent=relative,
    search_low=space.low,
    search_high=space.high,
    search_scale=space.scale,
    stronger=space.stronger,
    gallery_size=len(ev.cases.gallery(dataset)),
    **{f"id_{k}": v for k, v in ident.items()},
  )


def _criterion(images, agg, space) -> Dict[str, Any]:
  """The thresholds.csv fields of one criterion's per-image and dataset thresholds."""
  untested = agg.status == "untested"
  return dict(
    status="at_weakest" if untested else agg.status,
    threshold=space.weakest() if untested else agg.threshold,
    low=agg.low,
    high=agg.high,
    interval_open=agg.open_strong_end,
    num_tested=agg.num_tested,
    rank=agg.rank,
    per_image=json.dumps(
      [im.threshold if im.status in ("found", "at_weakest") else None for im in images]
    ),
    per_image_status=json.dumps([im.status for im in images]),
    # Without a leak to stop, "the weakest setting defends" means nothing.
    attack_works_undefended=not untested,
  )


def _rated(threshold: Optional[float], space) -> float:
  """Where a threshold's identification rate is measured: at it, or (not reached) at
  the strongest setting searched."""
  return space.strongest() if threshold is None else threshold


def _protective(row: records.ThresholdRow, space) -> float:
  """The setting that protects under both criteria: the stronger of the two thresholds,
  or the strongest searched where either criterion is not reached."""
  if "not_reached" in (row.status, row.id_status):
    return space.strongest()
  values = [v for v in (row.threshold, row.id_threshold) if v is not None]
  return max(values) if space.stronger == "higher" else min(values)
