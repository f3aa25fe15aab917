"""Gallery matching inside a study: one attack call's points, scored like reconstructions.

The threshold search and the frontier ask every attacker the same question about a
defended update: which gallery image is it, and does the answer look like the original?
A reconstruction attacker answers with an image that is then identified by correlation;
the gallery matcher (`tf_dlg.attacks.gallery`) answers with a gallery image directly,
its pick. So its point carries the rank of the original by update cosine (among the
non-members, ties against the attacker), and the pick stands where a reconstruction
would: it is scored by the same adjusted SSIM against the original (1.0 when the pick is
the original), and drawn in the grids.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

NAME = "gallery_match"


def gallery_arrays(dataset) -> Tuple[np.ndarray, np.ndarray]:
  """The dataset's images and labels, train then test (training index i is index i)."""
  x = np.concatenate([dataset.x_train, dataset.x_test])
  y = np.concatenate([dataset.y_train, dataset.y_test]).astype(np.int64)
  return x, y


def score_matches(
  model, observed: Sequence, arrays, indices: Sequence[int], leak_ssim: float, cache_dir=None
) -> Tuple[List[Dict[str, Any]], List[np.ndarray], List[np.ndarray]]:
  """(per-image score dicts, picks, brightness-adjusted picks) of one matching call.

  The score dicts hold the fields a threshold-search point needs (those of
  `point_evaluator.score_reconstructions` for a reconstruction), `status` "matched".
  """
  from tf_dlg import metrics
  from tf_dlg.attacks import gallery

  x, y = arrays
  results = gallery.match_gallery(
    model, observed, x, y, [[int(i)] for i in indices], cache_dir=cache_dir
  )
  per_image, picks, adjusted = [], [], []
  for index, res in zip(indices, results):
    original, pick = x[int(index)], x[res.pick]
    adj, adj_image = metrics.adjusted_ssim(original, pick)
    rank = int(res.ranks[0])
    per_image.append(
      {
        "index": int(index),
        "status": "matched",
        "iterations": 0,
        "restart": 0,
        "ssim": float(metrics.ssim(original, pick)),
        "adjusted_ssim": float(adj),
        "psnr": float(metrics.psnr(original, pick)),
        "mse": float(metrics.mse(original, pick)),
        "label_correct": bool(res.pick_label == int(y[int(index)])),
        "leaked": bool(metrics.leaked(adj, leak_ssim)) or not math.isfinite(adj),
        "rank": rank,
        "top1": rank == 1,
        "top5": rank <= 5,
        "pick": int(res.pick),
        "pick_similarity": float(res.pick_score),
        "gallery_size": len(x),
        "id_defended": rank != 1,
      }
    )
    picks.append(pick)
    adjusted.append(adj_image)
  return per_image, picks, adjusted


# The leak measures of one setting, every attacker together and each kind apart; the
# keys name thresholds.csv / frontier.csv columns (with a suffix there).
MEASURES = (
  "top1",
  "top1_low",
  "top1_high",
  "top1_reconstruction",
  "top1_gallery",
  "median_rank",
  "auc",
  "auc_low",
  "auc_high",
  "tpr1fpr",
  "tpr1fpr_low",
  "tpr1fpr_high",
)


def column(name: str, suffix: str) -> str:
  """The CSV column of measure `name` at `suffix`: `auc` -> `auc_at_protective`, and an
  interval bound keeps its ending last (`auc_low` -> `auc_at_protective_low`)."""
  for end in ("_low", "_high"):
    if name.endswith(end):
      return f"{name[: -len(end)]}{suffix}{end}"
  return f"{name}{suffix}"


def identified_by(records_by_attacker, attackers) -> Any:
  """Per image: some attacker of `attackers` ranks its original first (None: no attackers)."""
  if not attackers:
    return None
  n = len(next(iter(records_by_attacker.values())))
  return np.array(
    [any(bool(records_by_attacker[a][i]["top1"]) for a in attackers) for i in range(n)]
  )


def leak_measures(records_by_attacker: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
  """{MEASURES: value} (and `num_images`) of one setting from each attacker's points.

  An image is identified when some attacker ranks its original first; its rank is the
  best (lowest) over the attackers, and the membership measures
  (`tf_dlg.analysis.membership`) read those ranks. `top1_reconstruction` /
  `top1_gallery`: the fraction identified by the reconstruction attackers alone and by
  gallery matching alone (None when no attacker of that kind ran).
  """
  from tf_dlg.analysis import identification, membership

  names = list(records_by_attacker)
  recon = [a for a in names if a != NAME]
  gallery = [a for a in names if a == NAME]
  every = identified_by(records_by_attacker, names)
  top1 = identification.identification_rate(every)
  n = len(every)
  ranks = [min(records_by_attacker[a][i]["rank"] for a in names) for i in range(n)]
  sizes = [records_by_attacker[names[0]][i]["gallery_size"] for i in range(n)]
  auc = membership.auc(ranks, sizes)
  tpr = membership.tpr_at_fpr(ranks, sizes)
  part = lambda kind: None if not kind else float(np.mean(identified_by(records_by_attacker, kind)))
  return dict(
    num_images=n,
    top1=top1.estimate,
    top1_low=top1.low,
    top1_high=top1.high,
    top1_reconstruction=part(recon),
    top1_gallery=part(gallery),
    median_rank=membership.median_rank(ranks),
    auc=auc.estimate,
    auc_low=auc.low,
    auc_high=auc.high,
    tpr1fpr=tpr.estimate,
    tpr1fpr_low=tpr.low,
    tpr1fpr_high=tpr.high,
  )


def who_identifies(row: Dict[str, Any], num_images: int, suffix: str = "") -> str:
  """One clause of `MEASURES` read from `row` (columns `<measure><suffix>`), e.g.
  `reconstruction 1/8, gallery matching 8/8; median rank 1; membership AUC 1.00
  [1.00, 1.00], TPR at 1 % FPR 1.00 [0.63, 1.00]`; "" where the row has none of them."""
  get = lambda name: row.get(column(name, suffix))
  if any(get(k) is None for k in MEASURES if k not in ("top1_reconstruction", "top1_gallery")):
    return ""
  parts = []
  for kind, label in (("reconstruction", "reconstruction"), ("gallery", "gallery matching")):
    rate = get(f"top1_{kind}")
    if rate is not None:
      parts.append(f"{label} {int(round(rate * num_images))}/{num_images}")
  ranked = f"median rank {get('median_rank'):.3g}"
  auc = f"membership AUC {get('auc'):.2f} [{get('auc_low'):.2f}, {get('auc_high'):.2f}]"
  tpr = f"TPR at 1 % FPR {get('tpr1fpr'):.2f} [{get('tpr1fpr_low'):.2f}, {get('tpr1fpr_high'):.2f}]"
  return f"identified by {', '.join(parts)}; {ranked}; {auc}, {tpr}"
