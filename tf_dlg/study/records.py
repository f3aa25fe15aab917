"""Typed records of the threshold search: one schema each, and their file formats.

* `Point`: one evaluated (dataset, attack, defence, parameter, image), one line of
  points.jsonl (through `tf_dlg.study.results.ResultsLog`).
* `ThresholdRow`: one search of one (dataset, kind, attack, defence), one line of
  thresholds.csv; `THRESHOLD_FIELDS` is its column order, `read_thresholds` reads it back
  (numbers as floats, empty cells None, JSON lists parsed) and refuses what it does not
  know.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

from tf_dlg import io as io_lib

KINDS = ("plain", "adaptive")
STATUSES = ("found", "at_weakest", "not_reached")
UPDATE_KINDS = ("gradient", "fedavg_delta")
RECON_FORMAT = "tf_dlg.threshold_search.recon/v2"
# What a threshold means when the attack already fails without a defence.
UNTESTED = "untested (attack fails undefended)"
INCONCLUSIVE = "inconclusive"


def point_key(
  dataset: str,
  attack: str,
  defense: str,
  param: Optional[float],
  update: str = "gradient",
  image: Optional[int] = None,
) -> str:
  """Key of one evaluated point (of one image of the sample, when `image` is given)."""
  key = f"{dataset}|{attack}|{defense}|{'-' if param is None else repr(float(param))}"
  key = key if update == "gradient" else f"{key}|{update}"
  return key if image is None else f"{key}|image{int(image)}"


@dataclasses.dataclass(frozen=True)
class Point:
  """One image attacked at one setting: its scores and where its images are stored.

  `image` is its position in the search's sample, `index` its training-set index; `recon`
  / `recon_row` locate its leaked, adjusted and original images in an npz. `leaked` is the
  adjusted-SSIM verdict (non-finite reconstructions leak). Identification among the
  `gallery_size` images of the dataset (train then test, so `index` is the original's
  gallery index): `rank` of the original, `top1` / `top5` hits, `pick` (the gallery image
  the attacker would name, -1 when the reconstruction is not finite) and its similarity,
  and `id_defended` (not identified top-1; a non-finite reconstruction is not defended).
  """

  dataset: str
  dataset_source: str
  attack: str
  defense: str
  param: Optional[float]
  update: str
  image: int
  index: int
  status: str
  iterations: int
  restart: int
  ssim: float
  adjusted_ssim: float
  psnr: float
  mse: float
  label_correct: bool
  leaked: bool
  defense_config: Optional[Dict[str, Any]]
  recon: str
  recon_row: int
  seconds: float
  rank: int
  top1: bool
  top5: bool
  pick: int
  pick_similarity: float
  gallery_size: int
  id_defended: bool

  def to_record(self) -> Dict[str, Any]:
    """The points.jsonl record (with `defended`, the verdict a bisection step reads)."""
    return dict(dataclasses.asdict(self), defended=not self.leaked)

  @classmethod
  def from_record(cls, record: Dict[str, Any]) -> "Point":
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in record]
    if missing:
      raise ValueError(f"point {record.get('key')!r} lacks fields {missing}.")
    return cls(**{n: record[n] for n in names})


@dataclasses.dataclass
class ThresholdRow:
  """One thresholds.csv row; see the column list in `experiments/threshold_search.py`."""

  dataset: str
  dataset_source: str
  kind: str
  attack: str
  defense: str
  unit: str
  status: str
  threshold: Optional[float]
  low: Optional[float]
  high: Optional[float]
  interval_open: bool
  num_images: int
  num_tested: int
  rank: int
  restarts: int
  seed: int
  iterations: int
  defended_fraction: float
  resolution: float
  per_image: str  # JSON list: per-image thresholds, null for not_reached / untested
  per_image_status: str  # JSON list of statuses
  absolute_equivalent: Optional[float]
  relative_equivalent: Optional[float]
  attack_works_undefended: bool
  search_low: float
  search_high: float
  search_scale: str
  stronger: str
  undefended_adjusted_ssim: Optional[float] = None
  points_evaluated: Optional[int] = None
  seconds: Optional[float] = None
  # The same threshold under the identification criterion (leaks: identified top-1).
  id_status: Optional[str] = None
  id_threshold: Optional[float] = None
  id_low: Optional[float] = None
  id_high: Optional[float] = None
  id_interval_open: Optional[bool] = None
  id_num_tested: Optional[int] = None
  id_rank: Optional[int] = None
  id_per_image: Optional[str] = None
  id_per_image_status: Optional[str] = None
  id_attack_works_undefended: Optional[bool] = None
  # Top-1 identification rates over the attacked images, exact 95 % interval.
  undefended_top1: Optional[float] = None
  undefended_top1_low: Optional[float] = None
  undefended_top1_high: Optional[float] = None
  top1_at_threshold: Optional[float] = None
  top1_at_threshold_low: Optional[float] = None
  top1_at_threshold_high: Optional[float] = None
  top1_at_id_threshold: Optional[float] = None
  top1_at_id_threshold_low: Optional[float] = None
  top1_at_id_threshold_high: Optional[float] = None
  gallery_size: Optional[int] = None
  # At the protective setting (the stronger of the two thresholds; the strongest searched
  # where either is not reached): who identifies, and how far the originals stand out
  # (`tf_dlg.study.matching.MEASURES`; rank and membership measures over the best
  # attacker per image).
  protective_setting: Optional[float] = None
  top1_at_protective: Optional[float] = None
  top1_at_protective_low: Optional[float] = None
  top1_at_protective_high: Optional[float] = None
  top1_reconstruction_at_protective: Optional[float] = None
  top1_gallery_at_protective: Optional[float] = None
  median_rank_at_protective: Optional[float] = None
  auc_at_protective: Optional[float] = None
  auc_at_protective_low: Optional[float] = None
  auc_at_protective_high: Optional[float] = None
  tpr1fpr_at_protective: Optional[float] = None
  tpr1fpr_at_protective_low: Optional[float] = None
  tpr1fpr_at_protective_high: Optional[float] = None

  def to_dict(self) -> Dict[str, Any]:
    return {k: getattr(self, k) for k in THRESHOLD_FIELDS}


def _columns(first: str, last: str) -> tuple:
  """The `ThresholdRow` fields from `first` to `last`, in their declared order."""
  names = [f.name for f in dataclasses.fields(ThresholdRow)]
  return tuple(names[names.index(first) : names.index(last) + 1])


# Top-1 identification rates over the attacked images, and the gallery they rank in.
RATE_FIELDS = _columns("undefended_top1", "gallery_size")
# The identification criterion's columns and the top-1 rates (after the paper's columns).
ID_FIELDS = _columns("id_status", "id_attack_works_undefended") + RATE_FIELDS
PROTECTIVE_FIELDS = _columns("protective_setting", "tpr1fpr_at_protective_high")
THRESHOLD_FIELDS = (
  "dataset",
  "dataset_source",
  "kind",
  "attack",
  "defense",
  "unit",
  "status",
  "threshold",
  "low",
  "high",
  "interval_open",
  "num_images",
  "num_tested",
  "rank",
  "restarts",
  "seed",
  "iterations",
  "defended_fraction",
  "resolution",
  "per_image",
  "per_image_status",
  "absolute_equivalent",
  "relative_equivalent",
  "attack_works_undefended",
  "undefended_adjusted_ssim",
  "search_low",
  "search_high",
  "search_scale",
  "stronger",
  "points_evaluated",
  "seconds",
  *ID_FIELDS,
  *PROTECTIVE_FIELDS,
)
assert set(THRESHOLD_FIELDS) == {f.name for f in dataclasses.fields(ThresholdRow)}
# What every thresholds.csv has, old (per-dataset search) or new; the rest is optional.
REQUIRED_FIELDS = (
  "dataset",
  "attack",
  "defense",
  "status",
  "threshold",
  "search_low",
  "search_high",
  "search_scale",
  "stronger",
)
OPTIONAL_FIELDS = tuple(f for f in THRESHOLD_FIELDS if f not in REQUIRED_FIELDS)
NUMERIC_FIELDS = (
  "threshold",
  "low",
  "high",
  "num_images",
  "num_tested",
  "rank",
  "restarts",
  "seed",
  "defended_fraction",
  "resolution",
  "absolute_equivalent",
  "relative_equivalent",
  "undefended_adjusted_ssim",
  "search_low",
  "search_high",
  "points_evaluated",
  "seconds",
  "id_threshold",
  "id_low",
  "id_high",
  "id_num_tested",
  "id_rank",
  *RATE_FIELDS,
  *PROTECTIVE_FIELDS,
  # older files
  "fraction_defended",
  "ssim_at_threshold",
  "adjusted_ssim_at_threshold",
  "weaker_param",
  "fraction_defended_weaker",
  "ssim_weaker",
  "adjusted_ssim_weaker",
)
_FINITE_FIELDS = (
  "threshold",
  "low",
  "high",
  "weaker_param",
  "search_low",
  "search_high",
  "id_threshold",
  "id_low",
  "id_high",
)
_LIST_FIELDS = {
  "per_image": "numbers or null",
  "per_image_status": "statuses",
  "id_per_image": "numbers or null",
  "id_per_image_status": "statuses",
}


def attack_untested(row: Dict[str, Any]) -> bool:
  """Whether a thresholds row's attack already failed without a defence."""
  works = row.get("attack_works_undefended")
  return works is False or works == "False"


def write_csv(path: str, fields: Sequence[str], rows: Sequence[Dict[str, Any]]) -> str:
  """Atomically writes `rows` (None as an empty cell) under the header `fields`."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
  return io_lib.atomic_write_text(path, buf.getvalue())


def read_thresholds(path: str) -> List[Dict[str, Any]]:
  """Reads thresholds.csv back (numbers as floats, empty cells as None, JSON lists parsed).

  Files without the newer columns (the per-dataset search) read with them None and
  `kind` = `plain`.

  Raises:
    ValueError: naming the file, line and column of a cell that is not what the
      threshold search writes (a number, a known status or kind, a JSON list, a
      threshold where the status says one was found).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; run experiments.threshold_search first.")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = set(REQUIRED_FIELDS) - set(reader.fieldnames or [])
    if missing:
      raise ValueError(f"{path} is not a thresholds.csv (missing columns: {sorted(missing)}).")
    return [_threshold_row(r, f"{path}, line {reader.line_num}") for r in reader]


def _parse_cell(k: str, v: Optional[str], where: str):
  if v is None:
    return None
  if k in NUMERIC_FIELDS:
    try:
      x = float(v)
    except ValueError:
      raise ValueError(f"{where}, column {k!r}: {v!r} is not a number.") from None
    if k in _FINITE_FIELDS and not math.isfinite(x):
      raise ValueError(f"{where}, column {k!r}: {v!r} is not a finite number.")
    return x
  if k in _LIST_FIELDS:
    try:
      x = json.loads(v)
    except json.JSONDecodeError:
      raise ValueError(f"{where}, column {k!r}: {v!r} is not a JSON list.") from None
    ok = (str,) if _LIST_FIELDS[k] == "statuses" else (int, float, type(None))
    if not isinstance(x, list) or not all(isinstance(e, ok) and not isinstance(e, bool) for e in x):
      raise ValueError(f"{where}, column {k!r}: {v!r} is not a JSON list of {_LIST_FIELDS[k]}.")
    return x
  return v


def _threshold_row(raw: Dict[str, str], where: str) -> Dict[str, Any]:
  """One parsed thresholds.csv row; `where` names the file and line in errors."""
  if None in raw:
    raise ValueError(f"{where}: more cells than the header has columns.")
  row: Dict[str, Any] = {k: None for k in OPTIONAL_FIELDS}
  for k, v in raw.items():
    v = None if v is None or v.strip() == "" else v.strip()
    row[k] = _parse_cell(k, v, where)
  row["kind"] = row["kind"] or "plain"
  for k, allowed in (("status", STATUSES), ("kind", KINDS), ("id_status", STATUSES)):
    if row.get(k) not in allowed and not (k == "id_status" and row[k] is None):
      raise ValueError(f"{where}, column {k!r}: {raw.get(k)!r} is not one of {', '.join(allowed)}.")
  need = ("threshold",) if row["status"] != "not_reached" else ("search_low", "search_high")
  for k in need + ("dataset", "attack", "defense"):
    if row.get(k) is None:
      raise ValueError(f"{where}, column {k!r}: empty, but status {row['status']!r} needs it.")
  if row["id_status"] not in (None, "not_reached") and row["id_threshold"] is None:
    raise ValueError(
      f"{where}, column 'id_threshold': empty, but id_status {row['id_status']!r} needs it."
    )
  return row
