"""Leakage metrics: how much of a private image a reconstruction reveals.

All functions take images as float arrays in [0, 1], [H, W, C] (or [H, W]).

* `ssim`: structural similarity via `skimage.metrics.structural_similarity` with its
  default 7x7 uniform window (fits 28x28 and 32x32 images; the 11x11 Gaussian window
  of `tf.image.ssim` would leave only a 22x22 valid map on 32x32 inputs), data range 1,
  colour channels averaged.
* `psnr`, `mse`: pixel error (PSNR capped at 100 dB for identical images).
* `adjusted_ssim`: brightness-adjusted SSIM. Gradient inversion often recovers an image
  up to brightness/contrast (notably under scale-invariant attacks or defences that
  rescale updates), which plain SSIM punishes although the content has leaked. The score
  is the best SSIM of the original against this family of adjustments of the leaked
  image L, each clipped to [0, 1]:
    - identity (so adjusted >= plain SSIM always);
    - min-max normalisation  M = (L - min L) / (max L - min L);
    - for B in {L, M}: g * B + o for gains g in `ADJUST_GAINS` (0.25..4, 9 on a log
      grid) and offsets o in `ADJUST_OFFSETS` (-0.5..0.5, step 0.1);
    - the least-squares affine fit a * L + b to the original with gain a in [0.25, 4]
      (the continuous optimum of the grid; it makes a pure brightness/contrast change of
      the original, without clipping, score exactly 1).
  Adjustments are global (one gain and offset for all channels): a brightness change,
  not a per-channel colour correction. Returns the score and the adjusted image.
* `label_accuracy`: fraction of correct labels (order-free for batches).
* `leaked`: the verdict adjusted SSIM >= `DEFAULT_LEAK_SSIM`.

Non-finite values never count as defended. An original (ground truth) with a NaN or inf
pixel is bad input: every metric raises `ValueError`. A reconstruction with one cannot
be measured: `ssim` / `adjusted_ssim` / `mse` return NaN (PSNR 0 dB), and `leaked` of a
NaN (or any non-finite score) is True with a `RuntimeWarning`, so a broken measurement
can make a defence look weaker, never stronger.

`DEFAULT_LEAK_SSIM = 0.8` (applied to the adjusted SSIM): the bar must sit above what
an image that leaked nothing reaches. `python -m tf_dlg.metrics` measures that on the
offline datasets: plain / adjusted SSIM of *unrelated* image pairs of one dataset reach,
at the 99th percentile, 0.73 / 0.73 on digits (one "1" against another), 0.53 / 0.75 on
photos, and 0.48 / 0.95 on lfw_subset, whose flat non-face crops match one another after
a brightness adjustment (95th percentile 0.83). 0.8 keeps false leaks under 1 % on
digits and photos and ~5 % on lfw_subset, while the recognisable reconstructions of a
working attack score 0.9-1.0. Callers can pass another threshold, e.g. plain SSIM >= 0.6.

`score(result)` / `score_results(results)` turn `tf_dlg.attacks.AttackResult`s into
per-image dicts with the keys experiments write.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy.ndimage import uniform_filter
from skimage.metrics import structural_similarity

DEFAULT_LEAK_SSIM = 0.8
ADJUST_GAINS = np.geomspace(0.25, 4.0, 9)
ADJUST_OFFSETS = np.round(np.arange(-0.5, 0.5001, 0.1), 4)


def _as_hwc(image) -> np.ndarray:
  image = np.asarray(image, np.float64)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(f"Expected an image [H, W, C] or [H, W], got shape {image.shape}.")
  return image


def _check_pair(original, leaked):
  original, leaked = _as_hwc(original), _as_hwc(leaked)
  if original.shape != leaked.shape:
    raise ValueError(f"Image shapes differ: original {original.shape}, leaked {leaked.shape}.")
  bad = int(np.size(original) - np.count_nonzero(np.isfinite(original)))
  if bad:
    raise ValueError(
      f"original image has {bad} non-finite pixels; the ground truth must be "
      "finite to score a reconstruction against it."
    )
  # Scored with data range 1: an original in [0, 255] would make a perfect copy "not
  # leaked" (the unsafe side), so it is refused, never rescaled by guess.
  if original.size and (original.min() < 0.0 or original.max() > 1.0):
    raise ValueError(
      f"original image has values in [{original.min():g}, {original.max():g}]; the metrics "
      "take images in [0, 1] (divide 8-bit images by 255)."
    )
  if min(original.shape[:2]) < 7:
    raise ValueError(f"images of shape {original.shape} are smaller than the 7x7 SSIM window.")
  return original, leaked


def ssim(original, leaked) -> float:
  """SSIM in [-1, 1] (7x7 uniform window, data range 1); NaN if `leaked` is non-finite."""
  original, leaked = _check_pair(original, leaked)
  if not np.all(np.isfinite(leaked)):
    return math.nan
  return float(structural_similarity(original, leaked, data_range=1.0, channel_axis=-1))


def mse(original, leaked) -> float:
  """Mean squared pixel error."""
  original, leaked = _check_pair(original, leaked)
  return float(np.mean(np.square(original - leaked)))


def psnr(original, leaked) -> float:
  """Peak signal-to-noise ratio in dB for data range 1, capped at 100."""
  err = mse(original, leaked)
  if not np.isfinite(err):
    return 0.0
  return float(min(100.0, 10.0 * np.log10(1.0 / max(err, 1e-10))))


def brightness_adjustments(original, leaked):
  """Yields (description, adjusted image) of the documented family (see module doc)."""
  original, leaked = _check_pair(original, leaked)
  yield "identity", np.clip(leaked, 0.0, 1.0)
  lo, hi = float(leaked.min()), float(leaked.max())
  bases = [("leaked", leaked)]
  if hi - lo > 1e-12:
    normalised = (leaked - lo) / (hi - lo)
    yield "minmax", normalised
    bases.append(("minmax", normalised))
  for name, base in bases:
    for g in ADJUST_GAINS:
      for o in ADJUST_OFFSETS:
        yield f"{g:.3f}*{name}{o:+.2f}", np.clip(g * base + o, 0.0, 1.0)
  var = float(np.var(leaked))
  if var > 1e-12:
    gain = float(np.mean((leaked - leaked.mean()) * (original - original.mean()))) / var
    gain = float(np.clip(gain, ADJUST_GAINS[0], ADJUST_GAINS[-1]))
    offset = float(original.mean() - gain * leaked.mean())
    yield f"lstsq {gain:.3f}*leaked{offset:+.3f}", np.clip(gain * leaked + offset, 0.0, 1.0)


def ssim_many(original, candidates) -> np.ndarray:
  """`ssim(original, c)` for every image c of `candidates` [N, H, W, C], as one array.

  skimage's `structural_similarity` scores one pair per call (a Python loop of five
  `uniform_filter`s per channel); the brightness family of `adjusted_ssim` needs ~200
  per reconstruction, which made scoring ~13 % of a threshold search cell. This is the same
  computation (7x7 uniform window, sample covariance, K1 0.01, K2 0.03, data range 1,
  3-pixel border cropped, channels averaged) with the filters run over all candidates
  at once: `uniform_filter` of size 1 along the candidate axis filters each image alone,
  with the same operations in the same order. `tests/analysis/test_metrics.py` checks it against
  skimage pair by pair; `python -m benchmarks.metrics_speed` times both.
  """
  original = _as_hwc(original)
  candidates = np.asarray(candidates, np.float64)
  if candidates.ndim == 3:
    candidates = candidates[..., None]
  if candidates.shape[1:] != original.shape:
    raise ValueError(
      f"candidates have shape {candidates.shape[1:]} per image; the original {original.shape}."
    )
  win, pad = 7, 3
  if min(original.shape[:2]) < win:
    raise ValueError(f"images of shape {original.shape} are smaller than the 7x7 SSIM window.")
  cov_norm = win**2 / (win**2 - 1)
  c1, c2 = 0.01**2, 0.03**2
  per_channel = []
  for ch in range(original.shape[-1]):
    x, y = original[..., ch], candidates[..., ch]
    ux = uniform_filter(x, size=win)[None]
    uxx = uniform_filter(x * x, size=win)[None]
    uy = uniform_filter(y, size=(1, win, win))
    uyy = uniform_filter(y * y, size=(1, win, win))
    uxy = uniform_filter(x[None] * y, size=(1, win, win))
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    per_channel.append(s[:, pad:-pad, pad:-pad].reshape(len(y), -1).mean(axis=1, dtype=np.float64))
  return np.mean(per_channel, axis=0)


def adjusted_ssim(original, leaked) -> Tuple[float, np.ndarray]:
  """Best SSIM over brightness adjustments of `leaked`; returns (score, adjusted image)."""
  original, leaked = _check_pair(original, leaked)
  if not np.all(np.isfinite(leaked)):
    return math.nan, np.zeros(leaked.shape, np.float32)
  images = np.stack([image for _, image in brightness_adjustments(original, leaked)])
  scores = ssim_many(original, images)
  best = int(np.argmax(scores))  # the first of equal scores, as a loop keeping "s > best"
  return float(scores[best]), images[best].astype(np.float32)


def label_accuracy(true_labels, predicted_labels) -> float:
  """Fraction of labels recovered, as multisets (a batch's order is not observable)."""
  true_labels = list(np.asarray(true_labels).reshape(-1))
  predicted = list(np.asarray(predicted_labels).reshape(-1))
  if not true_labels:
    return 1.0
  hits = 0
  for p in predicted:
    if p in true_labels:
      true_labels.remove(p)
      hits += 1
  return hits / max(len(predicted), hits + len(true_labels))


def leaked(adjusted_ssim_value: float, threshold: float = DEFAULT_LEAK_SSIM) -> bool:
  """Leak verdict: the (brightness-adjusted) SSIM reaches `threshold`.

  A non-finite score (an unmeasurable reconstruction) counts as leaked, with a warning:
  it must never make a defence look like it works.
  """
  value = float(adjusted_ssim_value)
  if not math.isfinite(value):
    warnings.warn(
      f"non-finite leak score {value!r} counts as leaked (never as defended).",
      RuntimeWarning,
      stacklevel=2,
    )
    return True
  return bool(value >= threshold)


def match_images(originals: np.ndarray, leaked_images: np.ndarray) -> np.ndarray:
  """Order of `leaked_images` best matching `originals` (max total SSIM assignment)."""
  n = len(originals)
  if n == 1:
    return np.zeros(1, np.int64)
  from scipy.optimize import linear_sum_assignment

  cost = np.array([[-ssim(o, rec) for rec in leaked_images] for o in originals])
  cost = np.nan_to_num(cost, nan=2.0)  # unmeasurable pairs match last (SSIM >= -1)
  _, cols = linear_sum_assignment(cost)
  return cols


def score_images(
  originals,
  leaked_images,
  true_labels=None,
  predicted_labels=None,
  threshold: float = DEFAULT_LEAK_SSIM,
) -> List[Dict]:
  """Per-image metric dicts (batch reconstructions matched to originals by SSIM)."""
  originals = np.asarray(originals)
  leaked_images = np.asarray(leaked_images)
  order = match_images(originals, leaked_images)
  label_ok = None
  if true_labels is not None and predicted_labels is not None:
    label_ok = label_accuracy(true_labels, predicted_labels)
  rows = []
  for i, j in enumerate(order):
    adj, adj_image = adjusted_ssim(originals[i], leaked_images[j])
    rows.append(
      {
        "ssim": ssim(originals[i], leaked_images[j]),
        "adjusted_ssim": adj,
        "psnr": psnr(originals[i], leaked_images[j]),
        "mse": mse(originals[i], leaked_images[j]),
        "label_accuracy": label_ok,
        "label_correct": None if label_ok is None else bool(label_ok == 1.0),
        "leaked": leaked(adj, threshold),
        "leak_threshold": threshold,
        "adjusted_image": adj_image,
        "leaked_image": leaked_images[j],
        "original_image": originals[i],
      }
    )
  return rows


def score(result, threshold: float = DEFAULT_LEAK_SSIM, keep_images: bool = False) -> Dict:
  """Metrics of one `AttackResult` (mean over its images for batches > 1).

  Keys: ssim, adjusted_ssim, psnr, mse, label_accuracy, label_correct, leaked,
  leak_threshold, status, distance, iterations, seconds, attack, num_images; with
  `keep_images` also leaked_image / adjusted_image / original_image (first image).
  """
  obs = result.observed
  if obs is None or obs.true_images is None:
    raise ValueError("Scoring needs the observed update's true_images (ground truth).")
  rows = score_images(obs.true_images, result.images, obs.true_labels, result.labels, threshold)
  out = {k: float(np.mean([r[k] for r in rows])) for k in ("ssim", "adjusted_ssim", "psnr", "mse")}
  out.update(
    label_accuracy=rows[0]["label_accuracy"],
    label_correct=rows[0]["label_correct"],
    leaked=leaked(out["adjusted_ssim"], threshold),
    leak_threshold=threshold,
    status=result.status,
    failed=result.status == "failed",
    distance=result.distance,
    iterations=result.iterations,
    seconds=result.seconds,
    attack=result.attack,
    num_images=len(rows),
    per_image_ssim=[r["ssim"] for r in rows],
  )
  if keep_images:
    out.update(
      leaked_image=rows[0]["leaked_image"],
      adjusted_image=rows[0]["adjusted_image"],
      original_image=rows[0]["original_image"],
    )
  return out


def score_results(results: Sequence, threshold: float = DEFAULT_LEAK_SSIM) -> List[Dict]:
  """`score` of each result."""
  return [score(r, threshold) for r in results]


def _non_leak_baseline(per_dataset: int = 60, seed: int = 0):
  """Adjusted SSIM of images against other images of the same dataset (no leak)."""
  from tf_dlg import data

  rng = np.random.default_rng(seed)
  out = {}
  for name in data.OFFLINE_DATASETS:
    ds = data.load_dataset(name)
    idx = rng.choice(len(ds.x_train), size=(per_dataset, 2), replace=True)
    pairs = [(i, j) for i, j in idx if i != j]
    adj = [adjusted_ssim(ds.x_train[i], ds.x_train[j])[0] for i, j in pairs]
    plain = [ssim(ds.x_train[i], ds.x_train[j]) for i, j in pairs]
    out[name] = {
      q: (float(np.percentile(plain, q)), float(np.percentile(adj, q))) for q in (50, 95, 99)
    }
  return out


if __name__ == "__main__":
  print("SSIM / adjusted SSIM of unrelated image pairs of one dataset (no leak):")
  for name, qs in _non_leak_baseline(per_dataset=200).items():
    print(f"  {name}: " + ", ".join(f"p{q} {p:.3f} / {a:.3f}" for q, (p, a) in qs.items()))
