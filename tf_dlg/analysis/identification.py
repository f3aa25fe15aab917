"""Identification: would an attacker holding a reconstruction pick out whose image it is?

A similarity bar (adjusted SSIM >= 0.8, `tf_dlg.metrics`) asks whether a reconstruction
looks like its original. An attacker asks something else: among all the images the
client could have held (the *gallery*, e.g. every image of the dataset), which one is
this? `identify` ranks each reconstruction's original among the gallery and reports the
rank, top-k hits, the attacker's pick (the nearest gallery image) and its similarity;
`identification_rate` turns hits into a rate over images with an exact binomial
interval.

Similarity (brightness-tolerant). Each image is flattened and standardised to zero mean
and unit norm over all its pixels and channels, so the score of a reconstruction L
against a gallery image G is their Pearson correlation r. This is the least-squares
affine fit `a * L + b` that `metrics.adjusted_ssim` also tries (one gain and offset for
all channels, a brightness change rather than a colour correction): the fit's residual,
relative to G's variance, is 1 - r**2, so ranking by r is ranking by how well a
brightness/contrast change of L explains G. SSIM itself is not used for ranking because
adjusted SSIM costs ~200 SSIM evaluations per pair, far too many for 10,000 gallery
images; the correlation is one matrix product of standardised vectors.

* `pearson`: r (a positive gain only, like `adjusted_ssim`'s gains).
* `abs_pearson` (default): |r|, which also accepts the negated / inverted image
  (1 - x). An attacker can trivially look at both polarities, and a leak measure must
  not call a defence effective because the reconstruction came out inverted.

Rank, ties and failures:

* rank = 1 + the number of *other* gallery images whose similarity is at least the
  original's (within `TIE_TOLERANCE`, above float32 rounding of the product). Ties
  count against the attacker: an exact duplicate of the original in the gallery makes
  rank 2, and top-1 fails, as it should (the attacker cannot tell the two apart).
* A reconstruction with a non-finite pixel is never identified: rank = gallery size,
  pick -1, similarities NaN. A constant one (no contrast) correlates 0 with everything
  and ties with the whole gallery: rank = gallery size.
* A constant gallery image has no contrast to correlate: its similarity is 0.

For a threshold search, `identified` is the top-1 verdict of one reconstruction and
`defended_verdicts` the per-image verdicts a bisection step needs; there a non-finite
reconstruction counts as *not defended* (with a warning), as in `metrics.leaked`: a
broken measurement may make a defence look weaker, never stronger.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from tf_dlg.analysis import intervals

SIMILARITIES = ("abs_pearson", "pearson")
DEFAULT_SIMILARITY = "abs_pearson"
DEFAULT_K = (1, 5)
TIE_TOLERANCE = 1e-5
_FLAT = 1e-12  # below this an image's variance counts as zero (no contrast)
_CHUNK = 512  # reconstructions per matrix product: bounds memory on large galleries


def standardise(images) -> np.ndarray:
  """[N, ...] images -> [N, D] float32 rows of zero mean and unit norm (constant rows: 0)."""
  x = np.asarray(images)
  x = x.reshape(len(x), -1)
  out = np.empty(x.shape, np.float32)
  for start in range(0, len(x), 4 * _CHUNK):  # float64 per chunk: precise, bounded memory
    part = x[start : start + 4 * _CHUNK].astype(np.float64)
    # Scale each row to max |x| = 1 first: the mean and norm of a huge-valued image
    # (1e200 x an original) would overflow to inf and standardise it to zeros.
    peak = np.max(np.abs(part), axis=1, keepdims=True) if part.size else part
    part = np.divide(part, peak, out=np.zeros_like(part), where=np.isfinite(peak) & (peak > 0))
    part -= part.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(part, axis=1, keepdims=True)
    flat = norm <= math.sqrt(_FLAT * max(x.shape[1], 1))
    out[start : start + len(part)] = np.divide(part, norm, out=np.zeros_like(part), where=~flat)
  return out


class Gallery:
  """The images an attacker chooses among, standardised once for repeated queries."""

  def __init__(self, images):
    images = np.asarray(images)
    if images.ndim < 2 or len(images) == 0:
      raise ValueError(f"gallery must be a non-empty stack of images, got shape {images.shape}.")
    bad = int(images.size - np.count_nonzero(np.isfinite(images)))
    if bad:
      raise ValueError(f"gallery has {bad} non-finite pixels; gallery images must be finite.")
    self.image_shape = tuple(images.shape[1:])
    self.vectors = standardise(images)

  def __len__(self) -> int:
    return len(self.vectors)

  @classmethod
  def from_dataset(cls, dataset, splits: Sequence[str] = ("train", "test")) -> "Gallery":
    """All images of an `ImageDataset`: x_train then x_test (train index i stays i)."""
    parts = []
    for split in splits:
      if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not one of train, test.")
      x = getattr(dataset, f"x_{split}")
      if x is not None:
        parts.append(x)
    return cls(np.concatenate(parts))


@dataclasses.dataclass
class Identification:
  """Per reconstruction: rank of its original, top-k hits, the attacker's pick.

  Attributes:
    rank: 1-based rank of the original in the gallery (ties pessimistic; failures: N).
    hits: k -> bool array, rank <= k.
    pick: Index of the most similar gallery image (-1 for a non-finite reconstruction).
    pick_similarity: Its similarity (NaN for a non-finite reconstruction).
    true_similarity: Similarity to the original (NaN for a non-finite reconstruction).
    gallery_size: N.
    similarity: Name of the similarity used.
  """

  rank: np.ndarray
  hits: Dict[int, np.ndarray]
  pick: np.ndarray
  pick_similarity: np.ndarray
  true_similarity: np.ndarray
  gallery_size: int
  similarity: str

  def rates(self, level: float = 0.95) -> Dict[int, intervals.Interval]:
    """Top-k identification rate per k, with exact binomial intervals over images."""
    return identification_rates(self.hits, level)


def _as_gallery(gallery) -> Gallery:
  return gallery if isinstance(gallery, Gallery) else Gallery(gallery)


def _check_k(k, n: int) -> tuple:
  ks = (k,) if isinstance(k, (int, np.integer)) else tuple(k)
  if not ks:
    raise ValueError("k must name at least one rank cut-off.")
  for v in ks:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= n:
      raise ValueError(f"k={v!r} must be an integer in [1, {n}] (the gallery size).")
  return tuple(int(v) for v in ks)


def _check_inputs(reconstructions, gallery: Gallery, true_index):
  recs = np.asarray(reconstructions, np.float64)
  if recs.shape[1:] != gallery.image_shape:
    raise ValueError(
      f"reconstructions of shape {recs.shape[1:]} (after the batch axis) do not match "
      f"the gallery's images {gallery.image_shape}."
    )
  idx = np.asarray(true_index)
  if idx.shape != (len(recs),) or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(
      f"true_index must hold one integer per reconstruction ({len(recs)}), got "
      f"{idx.dtype} of shape {idx.shape}."
    )
  if len(idx) and (idx.min() < 0 or idx.max() >= len(gallery)):
    raise ValueError(f"true_index values must be in [0, {len(gallery) - 1}], got {idx.tolist()}.")
  return recs, idx.astype(np.int64)


def _scores(vectors: np.ndarray, gallery: Gallery, similarity: str) -> np.ndarray:
  s = vectors @ gallery.vectors.T
  return np.abs(s) if similarity == "abs_pearson" else s


def identify(
  reconstructions,
  gallery,
  true_index,
  k=DEFAULT_K,
  similarity: str = DEFAULT_SIMILARITY,
) -> Identification:
  """Ranks each reconstruction's original among the gallery (see the module doc).

  Args:
    reconstructions: [n, *image_shape] leaked images (any intensity range).
    gallery: A `Gallery`, or a [N, *image_shape] array of candidate images.
    true_index: [n] index of each reconstruction's original in the gallery.
    k: Rank cut-off(s) of the reported hits, each in [1, N].
    similarity: One of `SIMILARITIES`.
  """
  if similarity not in SIMILARITIES:
    raise ValueError(f"similarity={similarity!r} is not one of {', '.join(SIMILARITIES)}.")
  gallery = _as_gallery(gallery)
  n_gallery = len(gallery)
  ks = _check_k(k, n_gallery)
  recs, idx = _check_inputs(reconstructions, gallery, true_index)
  n = len(recs)
  finite = np.isfinite(recs.reshape(n, -1)).all(axis=1)
  rank = np.full(n, n_gallery, np.int64)
  pick = np.full(n, -1, np.int64)
  pick_sim = np.full(n, np.nan)
  true_sim = np.full(n, np.nan)
  rows = np.flatnonzero(finite)
  vectors = standardise(recs[rows]) if len(rows) else np.zeros((0, 1), np.float32)
  for start in range(0, len(rows), _CHUNK):
    part = rows[start : start + _CHUNK]
    s = _scores(vectors[start : start + _CHUNK], gallery, similarity)
    own = s[np.arange(len(part)), idx[part]]
    # >= with a tolerance: ties (and the original itself) count against the attacker.
    rank[part] = np.count_nonzero(s >= own[:, None] - TIE_TOLERANCE, axis=1)
    pick[part] = np.argmax(s, axis=1)
    pick_sim[part] = s[np.arange(len(part)), pick[part]]
    true_sim[part] = own
  hits = {v: rank <= v for v in ks}
  return Identification(rank, hits, pick, pick_sim, true_sim, n_gallery, similarity)


def identification_rate(hits, level: float = 0.95) -> intervals.Interval:
  """Fraction of hits with an exact (Clopper-Pearson) binomial interval over images.

  Exact rather than bootstrap or Wald: hits are a binomial count over a few images
  (often 8), and rates sit at 0 or 1 exactly where it matters; there a bootstrap or
  Wald interval collapses to a point, while Clopper-Pearson keeps >= `level` coverage.
  """
  h = np.asarray(hits)
  if h.ndim != 1 or h.size == 0 or h.dtype != np.bool_:
    raise ValueError(f"hits must be a non-empty 1-D boolean array, got {h.dtype} {h.shape}.")
  if not 0 < level < 1:
    raise ValueError(f"level={level!r} must be in (0, 1).")
  count, n = int(np.count_nonzero(h)), int(h.size)
  ci = stats.binomtest(count, n).proportion_ci(confidence_level=level, method="exact")
  return intervals.Interval(
    count / n, float(ci.low), float(ci.high), n, level, "Clopper-Pearson exact over images"
  )


def identification_rates(
  hits: Mapping[int, Sequence[bool]], level: float = 0.95
) -> Dict[int, intervals.Interval]:
  """`identification_rate` of each top-k hit array (e.g. `Identification.hits`)."""
  return {k: identification_rate(v, level) for k, v in hits.items()}


def identified(
  reconstruction, gallery, true_index: int, similarity: str = DEFAULT_SIMILARITY
) -> bool:
  """Top-1 verdict for one reconstruction [*image_shape]: the attacker picks its original."""
  result = identify(np.asarray(reconstruction)[None], gallery, [int(true_index)], 1, similarity)
  return bool(result.hits[1][0])


def defended_verdicts(
  reconstructions, gallery, true_index, similarity: str = DEFAULT_SIMILARITY
) -> List[Dict[str, object]]:
  """Per reconstruction, `{"defended": not identified top-1, rank, pick}`.

  The form `threshold.per_image_thresholds`'s `evaluate` returns per request. A
  non-finite reconstruction is not defended (warned): a failed attack is not a defence.
  """
  result = identify(reconstructions, gallery, true_index, 1, similarity)
  out = []
  for i in range(len(result.rank)):
    broken = result.pick[i] < 0
    if broken:
      warnings.warn(
        f"reconstruction {i} has non-finite pixels; it counts as not defended.",
        RuntimeWarning,
        stacklevel=2,
      )
    out.append(
      {
        "defended": bool(not result.hits[1][i] and not broken),
        "rank": int(result.rank[i]),
        "pick": int(result.pick[i]),
        "pick_similarity": float(result.pick_similarity[i]),
      }
    )
  return out


def describe(result: Identification, level: float = 0.95) -> Dict[str, Optional[str]]:
  """Printable rates, e.g. {"top1": "0.5 [0.16, 0.84] (n=8)"} (also median rank)."""
  out: Dict[str, Optional[str]] = {f"top{k}": iv.format() for k, iv in result.rates(level).items()}
  out["median_rank"] = f"{float(np.median(result.rank)):g}" if len(result.rank) else None
  return out
