"""Beyond top-1: how far the original stands out, as a membership-inference measure.

"0 of 16 ranked first" is not "nothing leaked": an original that ranks 3rd of 70,000
still gives the client away to an attacker who shortlists. Every attacker here ranks the
original among the gallery (a reconstruction by correlation, `identification.identify`;
gallery matching by update cosine, `tf_dlg.attacks.gallery`), and that rank is the
whole membership story of one attacked update:

* `auc`: the area under the ROC curve of "is this candidate a member?" for one update
  is the fraction of non-members scoring below the original, 1 - (rank - 1) / (N - 1)
  with ties counted against the attacker (as the rank counts them). Reported as the
  mean over attacked images with a percentile bootstrap interval over images; 0.5 is
  chance, 1 a perfect separation.
* `tpr_at_fpr`: the attacker flags, per update, the candidates scoring above the
  non-members' (1 - fpr) quantile; the true-positive rate is the fraction of originals
  flagged, i.e. with fewer than fpr x (N - 1) non-members at or above them. Exact
  (Clopper-Pearson) interval over images. At fpr = 1 % of 70,000 images an original in
  the top 699 counts.

Both are computed from ranks alone, so they apply unchanged to every attacker and to
points written before this module existed.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tf_dlg.analysis import intervals

DEFAULT_FPR = 0.01


def _check(ranks, gallery_sizes):
  r = np.asarray(ranks, np.float64)
  n = np.broadcast_to(np.asarray(gallery_sizes, np.float64), r.shape)
  if r.ndim != 1 or r.size == 0:
    raise ValueError(f"ranks must be a non-empty 1-D array, got shape {r.shape}.")
  if np.any(n < 2) or np.any(r < 1) or np.any(r > n) or not np.all(np.isfinite(r)):
    raise ValueError(
      f"each rank must be in [1, gallery size] with a gallery of >= 2 images; got ranks "
      f"{r.tolist()} for gallery sizes {sorted(set(n.tolist()))}."
    )
  return r, n


def per_image_auc(ranks, gallery_sizes) -> np.ndarray:
  """1 - (rank - 1) / (N - 1) per image: the share of non-members the original outscores."""
  r, n = _check(ranks, gallery_sizes)
  return 1.0 - (r - 1.0) / (n - 1.0)


def auc(ranks, gallery_sizes, level: float = 0.95, seed: int = 0) -> intervals.Interval:
  """Mean membership AUC over images with a percentile bootstrap interval over images."""
  values = per_image_auc(ranks, gallery_sizes)
  iv = intervals.bootstrap(values, np.mean, level=level, seed=seed)
  return intervals.Interval(
    iv.estimate, iv.low, iv.high, iv.n, level, "membership AUC, bootstrap over images"
  )


def flagged(ranks, gallery_sizes, fpr: float = DEFAULT_FPR) -> np.ndarray:
  """Per image: the original beats all but fewer than fpr x (N - 1) non-members."""
  if not 0 < fpr < 1:
    raise ValueError(f"fpr={fpr!r} must be in (0, 1).")
  r, n = _check(ranks, gallery_sizes)
  return (r - 1.0) < np.maximum(np.floor(fpr * (n - 1.0)), 1.0)


def tpr_at_fpr(
  ranks, gallery_sizes, fpr: float = DEFAULT_FPR, level: float = 0.95
) -> intervals.Interval:
  """True-positive rate at `fpr` false positives, exact interval over images."""
  from tf_dlg.analysis import identification

  iv = identification.identification_rate(flagged(ranks, gallery_sizes, fpr), level)
  return intervals.Interval(
    iv.estimate, iv.low, iv.high, iv.n, level, f"TPR at {fpr:g} FPR, exact over images"
  )


def median_rank(ranks: Sequence[float]) -> float:
  r = np.asarray(ranks, np.float64)
  return float(np.median(r)) if r.size else math.nan
