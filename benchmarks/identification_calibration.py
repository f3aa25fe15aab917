r"""Calibration of identification (`tf_dlg.analysis.identification`) on real offline data.

  python -m benchmarks.identification_calibration [--datasets=mnist,cifar10_sample,lfw_faces,digits]
      [--images=200] [--ssim_images=40] [--attack_images=8] [--attack_iterations=3000] [--seed=0]

For each dataset and each kind of "reconstruction", the attacker ranks the gallery by
correlation (`abs_pearson` unless the row says otherwise) and the table reports the top-1 /
top-5 identification rates with exact 95 % intervals over images, the chance level k/N,
the median rank, and for comparison the fraction whose adjusted SSIM reaches the paper's
0.8 bar (on the first `--ssim_images` images of the row; adjusted SSIM is slow).

Galleries: `mnist` its 10,000 test images (targets drawn from them); the others all their
images (`cifar10_sample` has only 20: chance is 1/20 and 5/20, a tiny gallery).
Reconstructions:
  original / brightness / contrast / inverted: the target image transformed;
  uniform / gaussian noise, unrelated image: nothing of the target (targets uniform, so
    the expected rate is exactly k/N: a check of the ranking code, not of the similarity);
    the unrelated image is held out of the gallery (mnist: a training image; otherwise
    leave-one-out, N - 1 candidates);
  half-converged: 0.5 * target + Gaussian noise at an SNR (signal / noise variance, dB);
  blur: Gaussian blur of the target, sigma in pixels;
  iDLG (mnist only, `--attack_images` > 0): a real undefended iDLG attack on the
    attack LeNet's single-image gradient.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from scipy import ndimage

from tf_dlg import data, metrics
from tf_dlg.analysis import identification as idf

SNRS_DB = (-30, -25, -20, -15, -10, -5, 0, 10)
BLURS = (1.0, 2.0, 4.0)
DATASETS = ("mnist", "cifar10_sample", "lfw_faces", "digits")


def _noisy(x, rng, snr_db):
  signal = 0.5 * x
  std = signal.reshape(len(x), -1).std(axis=1) * 10 ** (-snr_db / 20)
  return signal + std[:, None, None, None] * rng.normal(size=x.shape)


def _blur(x, sigma):
  return np.stack([ndimage.gaussian_filter(im, (sigma, sigma, 0)) for im in x])


def transforms():
  """(row name, similarity, function(target images, rng) -> reconstructions)."""
  rows = [
    ("original", idf.DEFAULT_SIMILARITY, lambda x, rng: x),
    ("brightness 0.4x+0.3", idf.DEFAULT_SIMILARITY, lambda x, rng: 0.4 * x + 0.3),
    (
      "contrast clip(2.5x-0.6)",
      idf.DEFAULT_SIMILARITY,
      lambda x, rng: np.clip(2.5 * x - 0.6, 0, 1),
    ),
    ("inverted 1-x", idf.DEFAULT_SIMILARITY, lambda x, rng: 1.0 - x),
    ("inverted 1-x", "pearson", lambda x, rng: 1.0 - x),
  ]
  for snr in SNRS_DB:
    rows.append((f"half-converged SNR {snr:+d} dB", idf.DEFAULT_SIMILARITY, _snr_fn(snr)))
  for sigma in BLURS:
    rows.append((f"blur sigma {sigma:g} px", idf.DEFAULT_SIMILARITY, _blur_fn(sigma)))
  return rows


def _snr_fn(snr):
  return lambda x, rng: _noisy(x, rng, snr)


def _blur_fn(sigma):
  return lambda x, rng: _blur(x, sigma)


def _ssim_leaks(originals, recs) -> str:
  """Fraction with adjusted SSIM >= the default bar (with its count)."""
  scores = [metrics.adjusted_ssim(o, r)[0] for o, r in zip(originals, recs)]
  hits = [s >= metrics.DEFAULT_LEAK_SSIM for s in scores]
  return f"{np.mean(hits):.2f} ({len(hits)})" if hits else "-"


def _row(name, similarity, result, gallery_size, ssim):
  rates = result.rates()
  return {
    "case": name,
    "similarity": similarity,
    "n": len(result.rank),
    "top1": rates[1].format("{:.3f}").rsplit(" (", 1)[0],
    "top5": rates[5].format("{:.3f}").rsplit(" (", 1)[0],
    "chance": f"{1 / gallery_size:.4f} / {min(1.0, 5 / gallery_size):.4f}",
    "median_rank": f"{np.median(result.rank):g}",
    "ssim_bar": ssim,
    "_result": result,
  }


def _galleries(name):
  ds = data.load_dataset(name)
  if name == "mnist":
    return ds.x_test, ds.x_train  # gallery, held-out unrelated images
  images = ds.x_train if ds.x_test is None else np.concatenate([ds.x_train, ds.x_test])
  return images, None


def _chance_rows(images, held_out, n, rng, ssim_n):
  """Noise and unrelated-image rows: targets uniform, independent of the reconstruction."""
  gallery = idf.Gallery(images)
  shape = (n,) + images.shape[1:]
  targets = rng.integers(0, len(images), n)
  rows = []
  for name, recs in (
    ("uniform noise", rng.uniform(size=shape)),
    ("gaussian noise N(0.5, 0.25)", rng.normal(0.5, 0.25, size=shape)),
  ):
    res = idf.identify(recs, gallery, targets)
    ssim = _ssim_leaks(images[targets[:ssim_n]], recs[:ssim_n])
    rows.append(_row(name, idf.DEFAULT_SIMILARITY, res, len(images), ssim))
  if held_out is not None:
    recs = held_out[rng.integers(0, len(held_out), n)]
    res = idf.identify(recs, gallery, targets)
    rows.append(_row("unrelated (held-out image)", idf.DEFAULT_SIMILARITY, res, len(images), "-"))
    return rows
  # Leave-one-out: the unrelated image j is no candidate; its target is any other image.
  # In the full gallery j itself (similarity 1) ranks above every target: one rank less.
  j = rng.integers(0, len(images), n)
  others = (j + 1 + rng.integers(0, len(images) - 1, n)) % len(images)
  rank = idf.identify(images[j], gallery, others).rank - 1
  res = idf.Identification(rank, {k: rank <= k for k in (1, 5)}, j, None, None, len(images) - 1, "")
  rows.append(_row("unrelated (leave-one-out)", idf.DEFAULT_SIMILARITY, res, len(images) - 1, "-"))
  return rows


def _attack_row(images, n, rng, iterations):
  """A real undefended iDLG attack on `n` images of the gallery."""
  from tf_dlg import models
  from tf_dlg.attacks import AttackConfig, observe_gradient, run_attacks

  ds = data.load_dataset("mnist")
  idx = rng.choice(len(images), n, replace=False)
  model = models.attack_lenet(ds.input_shape, ds.num_classes, seed=0)
  obs = [observe_gradient(model, images[i : i + 1], ds.y_test[i : i + 1], seed=int(i)) for i in idx]
  start = time.perf_counter()
  config = AttackConfig(attack="idlg", iterations=iterations, seed=tuple(int(i) for i in idx))
  results = run_attacks(model, obs, config)
  seconds = time.perf_counter() - start
  recs = np.stack([r.images[0] for r in results])
  res = idf.identify(recs, images, idx)
  name = f"iDLG undefended ({iterations} it, {seconds:.0f} s)"
  adjusted = [metrics.adjusted_ssim(images[i], r)[0] for i, r in zip(idx, recs)]
  note = "iDLG per image (gallery index: rank, adjusted SSIM, attack status): " + ", ".join(
    f"{i}: {k}, {a:.2f}, {r.status}" for i, k, a, r in zip(idx, res.rank, adjusted, results)
  )
  return _row(name, idf.DEFAULT_SIMILARITY, res, len(images), _ssim_leaks(images[idx], recs)), note


def calibrate(name, n=200, ssim_n=40, seed=0, attack_images=0, attack_iterations=3000):
  """Calibration rows of one dataset, seconds of the identification calls, notes."""
  images, held_out = _galleries(name)
  rng = np.random.default_rng(seed)
  n_targets = min(n, len(images))
  start = time.perf_counter()
  gallery = idf.Gallery(images)
  rows, notes, seconds = [], [], time.perf_counter() - start
  for row_name, similarity, fn in transforms():
    idx = rng.choice(len(images), n_targets, replace=False)
    recs = fn(images[idx], rng)
    start = time.perf_counter()
    res = idf.identify(recs, gallery, idx, similarity=similarity)
    seconds += time.perf_counter() - start
    ssim = _ssim_leaks(images[idx[:ssim_n]], recs[:ssim_n])
    rows.append(_row(row_name, similarity, res, len(images), ssim))
  rows += _chance_rows(images, held_out, n, rng, ssim_n)
  if name == "mnist" and attack_images:
    row, note = _attack_row(images, attack_images, rng, attack_iterations)
    rows.append(row)
    notes.append(note)
  return rows, seconds, notes


def timing(repeats: int = 3):
  """Seconds to standardise MNIST galleries and to rank queries against them."""
  ds = data.load_dataset("mnist")
  out = {}
  for label, fn in (
    ("standardise 10k test gallery", lambda: idf.Gallery(ds.x_test)),
    ("standardise 70k train+test gallery", lambda: idf.Gallery.from_dataset(ds)),
  ):
    out[label] = min(_timed(fn) for _ in range(repeats))
  full = idf.Gallery.from_dataset(ds)
  out["one top-1 verdict vs 70k"] = min(
    _timed(lambda: idf.identified(ds.x_train[0], full, 0)) for _ in range(repeats)
  )
  gallery = idf.Gallery(ds.x_test)
  recs, idx = ds.x_train[:1000], np.arange(1000)
  out["rank 1,000 queries vs 10k"] = min(
    _timed(lambda: idf.identify(recs, gallery, idx)) for _ in range(repeats)
  )
  return out


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


COLUMNS = ("case", "similarity", "n", "top1", "top5", "chance", "median_rank", "ssim_bar")
HEADER = (
  "reconstruction",
  "similarity",
  "n",
  "top-1 [95 % CI]",
  "top-5 [95 % CI]",
  "chance 1/N / 5/N",
  "median rank",
  "adj. SSIM >= 0.8 (n)",
)


def print_table(name, size, rows):
  print(f"\n### {name} (gallery {size} images)\n")
  print("| " + " | ".join(HEADER) + " |")
  print("|" + "---|" * len(HEADER))
  for r in rows:
    print("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--datasets", default=",".join(DATASETS))
  p.add_argument("--images", type=int, default=200, help="Targets per row (at most the gallery).")
  p.add_argument(
    "--ssim_images", type=int, default=40, help="Images per row scored by adjusted SSIM."
  )
  p.add_argument(
    "--attack_images", type=int, default=8, help="MNIST images attacked by iDLG (0: none)."
  )
  p.add_argument("--attack_iterations", type=int, default=3000)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  names = [d for d in args.datasets.split(",") if d]
  for d in names:
    if d not in DATASETS:
      p.error(f"--datasets: {d!r} is not one of {', '.join(DATASETS)}.")
  for flag in ("images", "ssim_images", "attack_images", "attack_iterations"):
    if getattr(args, flag) < (1 if flag == "images" else 0):
      p.error(f"--{flag}={getattr(args, flag)} must be >= {1 if flag == 'images' else 0}.")
  start = time.perf_counter()
  for d in names:
    rows, seconds, notes = calibrate(
      d, args.images, args.ssim_images, args.seed, args.attack_images, args.attack_iterations
    )
    print_table(d, len(_galleries(d)[0]), rows)
    for note in notes:
      print(f"\n{note}")
    print(f"\nidentification calls: {seconds:.2f} s in all")
  if "mnist" in names:
    print("\n### Speed (MNIST, best of 3)\n")
    for label, s in timing().items():
      print(f"- {label}: {s:.3f} s")
  print(f"\nwall time {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
