"""Brightness-adjusted SSIM: skimage pair by pair vs `metrics.ssim_many`, same images.

  python -m benchmarks.metrics_speed [--pairs=24]

For each offline dataset (digits 28x28x1, lfw_subset 25x25x1, photos 32x32x3), `--pairs`
(original, reconstruction) pairs, the reconstruction a noisy, rescaled other image of
the dataset, are scored by `metrics.adjusted_ssim` (all ~200 brightness adjustments in
one `ssim_many` pass) and by the plain loop it replaced (one skimage
`structural_similarity` call per adjustment); the scores must be equal. Prints seconds
per pair of each and their ratio. A threshold search scores every attacked point this
way (~1,200 points in the quick preset).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402  (imports TensorFlow quietly first)
from tf_dlg import data, metrics  # noqa: E402

FLAGS = flags.FLAGS
DATASETS = ("digits", "lfw_subset", "photos")


def plain_adjusted_ssim(original, leaked) -> float:
  """The loop `metrics.adjusted_ssim` replaced: one skimage call per adjustment."""
  from skimage.metrics import structural_similarity

  original = np.asarray(original, np.float64)
  return max(
    float(structural_similarity(original, image, data_range=1.0, channel_axis=-1))
    for _, image in metrics.brightness_adjustments(original, leaked)
  )


def pairs(dataset: str, n: int, seed: int = 0):
  x = data.load_dataset(dataset).x_train
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(x), size=(n, 2), replace=len(x) < 2 * n)
  return [(x[i], x[j] * 1.5 - 0.2 + rng.normal(0.0, 0.15, x[j].shape)) for i, j in idx]


def main(argv):
  del argv
  print(
    f"{'dataset':12s} {'shape':10s} {'plain s/pair':>13s} {'batched s/pair':>15s} {'ratio':>6s}"
  )
  for name in DATASETS:
    work = pairs(name, FLAGS.pairs)
    t = time.perf_counter()
    plain = [plain_adjusted_ssim(o, r) for o, r in work]
    t_plain = (time.perf_counter() - t) / len(work)
    t = time.perf_counter()
    fast = [metrics.adjusted_ssim(o, r)[0] for o, r in work]
    t_fast = (time.perf_counter() - t) / len(work)
    if plain != fast:
      raise SystemExit(f"{name}: the batched scores differ from skimage's: {plain} vs {fast}")
    shape = "x".join(map(str, work[0][0].shape))
    print(f"{name:12s} {shape:10s} {t_plain:13.4f} {t_fast:15.4f} {t_plain / t_fast:6.1f}")
  print(
    f"scores equal on all pairs; load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
  )


if __name__ == "__main__":
  flags.DEFINE_integer("pairs", 24, "Pairs scored per dataset.", lower_bound=1, upper_bound=10_000)
  cli.run(main)
