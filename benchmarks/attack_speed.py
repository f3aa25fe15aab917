"""Throughput of batched gradient-inversion attacks on this machine.

  python benchmarks/attack_speed.py [--datasets=lfw_subset,photos] [--batch_sizes=1,8,32,64]

For each dataset and batch size B, B independent undefended attacks (training images
0..B-1, one observed gradient each, DLG LeNet) run as one batch. Reported: seconds per
attack (batch wall time / B, XLA compilation excluded by a warm-up on the same shapes),
attacks per minute, median SSIM, recovered share (SSIM >= 0.9) and the speed-up over the
reference PyTorch iDLG figures measured on a 2-core CPU of this kind (issue 4): 2 s per
32x32 grey LFW image and 19 s per 32x32 colour crop. PyTorch is not installed here, so
the reference cannot be re-run side by side; its figures are constants.

Timings on a shared CPU are noisy: other processes change them by tens of percent.
Prints a table and writes JSON (--output).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

# TensorFlow must be imported before absl parses flags: imported inside main(), Keras
# layers built there fail (Flatten: "Attempt to convert a value (None)").
from tf_dlg import data, metrics, models  # noqa: E402
from tf_dlg.attacks import observe_gradient, run_attacks  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["lfw_subset", "photos"], "Offline datasets.")
flags.DEFINE_list("batch_sizes", ["1", "8", "32", "64"], "Attacks per batch.")
flags.DEFINE_string("attack", "idlg", "Attack name.")
flags.DEFINE_integer("iterations", 4000, "Maximum iterations per attack.")
flags.DEFINE_integer("single_runs", 2, "Attacks timed one by one for batch size 1.")
flags.DEFINE_string("output", "outputs/benchmarks/attack_speed.json", "JSON output path.")

REFERENCE_SECONDS = {"lfw_subset": 2.0, "photos": 19.0, "digits": 2.0}


def main(argv):
  del argv
  rows = []
  for name in FLAGS.datasets:
    ds = data.load_dataset(name)
    model = models.attack_lenet(ds.input_shape, ds.num_classes, seed=0)
    for b in [int(v) for v in FLAGS.batch_sizes]:
      count = FLAGS.single_runs if b == 1 else b
      obs = [observe_gradient(model, ds.x_train[i:i + 1], ds.y_train[i:i + 1])
             for i in range(count)]
      run_attacks(model, obs[:b], FLAGS.attack, iterations=1)  # compile these shapes
      load = os.getloadavg()[0]
      t0 = time.perf_counter()
      results = []
      for start in range(0, count, b):
        results += run_attacks(model, obs[start:start + b], FLAGS.attack,
                               iterations=FLAGS.iterations, seed=start)
      seconds = (time.perf_counter() - t0) / count
      ssims = [r["ssim"] for r in metrics.score_results(results)]
      row = {"dataset": name, "batch_size": b, "attacks": count,
             "seconds_per_attack": seconds, "attacks_per_minute": 60.0 / seconds,
             "median_ssim": float(np.median(ssims)),
             "recovered_share": float(np.mean(np.asarray(ssims) >= 0.9)),
             "median_iterations": float(np.median([r.iterations for r in results])),
             "reference_seconds": REFERENCE_SECONDS.get(name),
             "speedup_vs_reference": REFERENCE_SECONDS.get(name, np.nan) / seconds,
             "load_average_at_start": load, "cpu_count": psutil.cpu_count()}
      rows.append(row)
      print(f"{name:10s} B={b:3d}: {seconds:6.2f} s/attack, {row['attacks_per_minute']:6.1f} "
            f"attacks/min, median SSIM {row['median_ssim']:.3f}, recovered "
            f"{row['recovered_share']:.0%}, x{row['speedup_vs_reference']:.2f} vs reference "
            f"(load {load:.1f})", flush=True)
  print()
  print("| dataset | batch | s/attack | attacks/min | median SSIM | recovered | vs reference |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['dataset']} | {r['batch_size']} | {r['seconds_per_attack']:.2f} | "
          f"{r['attacks_per_minute']:.1f} | {r['median_ssim']:.3f} | "
          f"{r['recovered_share']:.0%} | x{r['speedup_vs_reference']:.2f} |")
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  with open(FLAGS.output, "w", encoding="utf-8") as f:
    json.dump({"attack": FLAGS.attack, "iterations": FLAGS.iterations,
               "reference_seconds": REFERENCE_SECONDS, "rows": rows,
               "note": "shared CPU: timings noisy; reference figures are constants"}, f,
              indent=2)
  print(f"\nwrote {os.path.abspath(FLAGS.output)}")


if __name__ == "__main__":
  app.run(main)
