"""Attack engine speed: one at a time, one continuous batch, and restarts, same images.

  python benchmarks/attack_speed.py --datasets=lfw_subset,digits,photos --num_images=32

For each dataset, `--num_images` fixed training images (lfw_subset: faces only, indices
< 100; images the tests do not use) are attacked undefended with iDLG on the attack
LeNet (`models.attack_lenet`) three ways, in one process:

  one at a time   each attack alone on one slot (XLA compiled once, then reused);
  batch           all attacks as one continuous batch on `--slots` slots, shared out
                  among `--lanes` loops on threads (0: auto, one per usable core on a CPU);
  restarts        the same batch with `--restarts` seeded starts per image (the
                  lowest-numbered converged one wins and later siblings leave; if none
                  converges, the smallest matching distance wins).

Each way runs once per `--stop_rules` entry (default: the relative stop rule, then the
capped rule it replaced, issue 35) on the same images, and the ratios of each rule to the
first are printed last. Reported per way and rule: total wall seconds (compilation excluded by a warm-up on the same
shapes), the process's CPU seconds (user + system: what lanes buy is the idle core),
attacks per minute, recovered (SSIM >= 0.9), median iterations and objective evaluations
per image (all restarts), and for restarts
which restart won how often; then the cold-start wall time of one command-line attack
(`python -m experiments.attack --dataset=digits --index=1203`, a fresh process, set-up
included; `--cold_starts` runs, their median reported, since one run on a shared CPU can
take twice another). Beside them: the reference PyTorch iDLG figures of issue 10 (12 images per
dataset, measured on this CPU class; PyTorch is not installed here, so they are
constants). Timings on a shared CPU are noisy: the load average is printed with them.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# First: imports TensorFlow quietly and before absl's app.run (see experiments.cli).
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from experiments import cli  # noqa: E402
from tf_dlg import data, metrics, models  # noqa: E402
from tf_dlg import io as io_lib
from tf_dlg.attacks import observe_gradient, run_attacks, runner, schedule  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
  "datasets",
  ["lfw_subset", "digits", "photos"],
  "Datasets (any name tf_dlg.data.load_dataset knows).",
)
flags.DEFINE_integer("num_images", 32, "Images per dataset.", lower_bound=1)
flags.DEFINE_integer("iterations", 4000, "Maximum iterations per attack.", lower_bound=1)
flags.DEFINE_integer("slots", 8, "Slots of the continuous batch.", lower_bound=1)
flags.DEFINE_integer("restarts", 4, "Restarts of the third way.", lower_bound=1)
flags.DEFINE_integer(
  "lanes", 0, "Lanes of the batch ways (0: auto, see schedule.auto_lanes).", lower_bound=0
)
flags.DEFINE_list("ways", ["one", "batch", "restarts"], "Which ways to run.")
flags.DEFINE_list(
  "stop_rules",
  ["relative", "capped"],
  "Euclidean stop rules to run side by side on the same images (objectives.STOP_RULES): "
  "relative (the default), capped (the rule before issue 35).",
)
flags.DEFINE_bool("cold_start", True, "Time one command-line attack in a fresh process.")
flags.DEFINE_integer(
  "cold_starts", 3, "Cold-start runs (median reported).", lower_bound=1, upper_bound=20
)
flags.DEFINE_string("output", "outputs/benchmarks/attack_speed.json", "JSON output path.")

# Reference PyTorch iDLG (its own early-stop rule), 12 images per dataset, measured on a
# 2-core CPU of this class (issue 10): (total seconds, recovered of 12).
REFERENCE = {"lfw_subset": (70.6, 12), "digits": (53.4, 11), "photos": (618.0, 11)}
FIRST_INDEX = {"lfw_subset": 40, "digits": 100, "photos": 100}


def _images(name):
  ds = data.load_dataset(name)
  start = FIRST_INDEX.get(name, 100)
  stop = start + FLAGS.num_images
  if name == "lfw_subset" and stop > 100:
    raise ValueError(
      f"--num_images={FLAGS.num_images}: lfw_subset has faces at indices "
      f"< 100 only ({start}.. used here)."
    )
  return ds, np.arange(start, min(stop, len(ds.x_train)))


def _cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _way(model, obs, way, stop_rule):
  """(results, wall seconds, CPU seconds, (lanes, slots per lane)) of one way,
  compilation excluded by a warm-up."""
  if way == "one":
    config = runner.AttackConfig(iterations=FLAGS.iterations, slots=1, seed=0, stop_rule=stop_rule)
  else:
    config = runner.AttackConfig(
      iterations=FLAGS.iterations,
      slots=FLAGS.slots,
      lanes=FLAGS.lanes or None,
      seed=0,
      restarts=FLAGS.restarts if way == "restarts" else 1,
      stop_rule=stop_rule,
    )
  layout = schedule.lane_layout(config, len(obs) * config.restarts)
  # Compile every batch shape the timed run meets: a lane's slots and the halves its tail
  # shrinks to (never below 2, see batching._compact), each with a refill (one job more
  # than slots). Compiled code does not depend on the lane count.
  shapes, size = {layout[1]}, layout[1]
  while size > 2:
    size = max(2, size // 2)
    shapes.add(size)
  for size in sorted(shapes):
    warm = dataclasses.replace(config, iterations=2, slots=size, lanes=1)
    run_attacks(model, obs[: size + 1], config=warm)
  t0, cpu0 = time.perf_counter(), _cpu_seconds()
  if way == "one":
    results = [
      run_attacks(model, [o], config=dataclasses.replace(config, seed=i))[0]
      for i, o in enumerate(obs)
    ]
  else:
    results = run_attacks(model, obs, config=config)
  return results, time.perf_counter() - t0, _cpu_seconds() - cpu0, layout


def _evaluations(r):
  """Objective evaluations of an attack, all its restarts (L-BFGS: one per iteration,
  plus the start)."""
  return sum(k + 1 for k in r.restart_iterations if k is not None)


def _row(name, way, results, seconds, cpu, layout, stop_rule):
  ssims = [r["ssim"] for r in metrics.score_results(results)]
  wins = np.bincount([r.restart for r in results], minlength=FLAGS.restarts)
  return {
    "dataset": name,
    "way": way,
    "stop_rule": stop_rule,
    "median_evaluations": float(np.median([_evaluations(r) for r in results])),
    "attacks": len(results),
    "seconds": seconds,
    "cpu_seconds": cpu,
    "lanes_and_slots": layout,
    "attacks_per_minute": 60.0 * len(results) / seconds,
    "recovered": int(np.sum(np.asarray(ssims) >= 0.9)),
    "median_iterations": float(np.median([r.iterations for r in results])),
    "restart_wins": wins.tolist() if way == "restarts" else None,
    "statuses": dict(collections.Counter(r.status for r in results)),
    "load_average": os.getloadavg()[0],
    "ssims": ssims,
  }


def _cold_start():
  """Wall seconds of each of `--cold_starts` fresh command-line attacks."""
  return [_one_cold_start() for _ in range(FLAGS.cold_starts)]


def _one_cold_start():
  out = os.path.join(os.path.dirname(os.path.abspath(FLAGS.output)), "cold_start")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  t0 = time.perf_counter()
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.attack",
      "--dataset=digits",
      "--index=1203",
      f"--output_dir={out}",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=600,
  )
  seconds = time.perf_counter() - t0
  if proc.returncode != 0:
    raise RuntimeError(f"cold-start attack failed: {proc.stderr[-2000:]}")
  return seconds


def _counts(counter):
  return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()))


def _print(rows, cold):
  print(
    "\n| dataset | way | lanes x slots | images | total s | CPU s | s/image | attacks/min "
    "| recovered (SSIM>=0.9) | median iterations | median evaluations | restart wins "
    "| statuses | load |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['dataset']} | {r['way']}, {r['stop_rule']} "
      f"| {r['lanes_and_slots'][0]} x {r['lanes_and_slots'][1]} "
      f"| {r['attacks']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
      f"{r['seconds'] / r['attacks']:.2f} | {r['attacks_per_minute']:.1f} | "
      f"{r['recovered']}/{r['attacks']} | {r['median_iterations']:.0f} | "
      f"{r['median_evaluations']:.0f} | "
      f"{r['restart_wins'] or ''} | {_counts(r['statuses'])} | {r['load_average']:.1f} |"
    )
  print("\nreference PyTorch iDLG, measured on this CPU class (issue 10, 12 images each):")
  for name, (total, ok) in REFERENCE.items():
    print(f"  {name}: {total:.1f} s total, {total / 12:.2f} s/image, {ok}/12 recovered")
  if cold is not None:
    runs = ", ".join(f"{c:.1f}" for c in cold)
    print(
      "\ncold start, one command-line attack (digits 1203, set-up included): "
      f"median {np.median(cold):.1f} s of {len(cold)} runs ({runs})"
    )


def _dataset_rows(name, ways):
  """Rows of every way x stop rule on one dataset's images (same inputs for all)."""
  ds, idx = _images(name)
  model = models.attack_lenet(ds.input_shape, ds.num_classes, seed=0)
  obs = [
    observe_gradient(
      model,
      ds.x_train[i : i + 1],
      ds.y_train[i : i + 1],
      metadata={"dataset": name, "index": int(i)},
    )
    for i in idx
  ]
  rows = []
  for way in ways:
    for rule in FLAGS.stop_rules:
      results, seconds, cpu, layout = _way(model, obs, way, rule)
      rows.append(_row(name, way, results, seconds, cpu, layout, rule))
      r = rows[-1]
      print(
        f"{name} {way} {rule}: {seconds:.1f} s, {r['recovered']}/{len(obs)} recovered, "
        f"median {r['median_iterations']:.0f} iterations, {r['median_evaluations']:.0f} "
        f"evaluations, wins {r['restart_wins']}",
        flush=True,
      )
  return rows


def _print_ratios(rows):
  """Each stop rule against the first, same dataset and way, same run."""
  base = {(r["dataset"], r["way"]): r for r in rows if r["stop_rule"] == FLAGS.stop_rules[0]}
  for r in rows:
    b = base[(r["dataset"], r["way"])]
    if r is b:
      continue
    print(
      f"{r['dataset']} {r['way']}: {r['stop_rule']} / {b['stop_rule']}: wall "
      f"{r['seconds'] / b['seconds']:.2f}x, CPU {r['cpu_seconds'] / b['cpu_seconds']:.2f}x, "
      f"median evaluations {r['median_evaluations']:.0f} vs {b['median_evaluations']:.0f}, "
      f"recovered {r['recovered']} vs {b['recovered']} of {r['attacks']}"
    )


def main(argv):
  del argv
  ways = cli_check_ways(FLAGS.ways)
  from tf_dlg import validation
  from tf_dlg.attacks import objectives

  validation.check_choices("--stop_rules", FLAGS.stop_rules, tuple(objectives.STOP_RULES))
  rows = [row for name in FLAGS.datasets for row in _dataset_rows(name, ways)]
  cold = _cold_start() if FLAGS.cold_start else None
  _print(rows, cold)
  _print_ratios(rows)
  io_lib.atomic_write_text(
    FLAGS.output,
    io_lib.dumps(
      {
        "rows": rows,
        "cold_start_seconds": cold,
        "reference": REFERENCE,
        "iterations": FLAGS.iterations,
        "slots": FLAGS.slots,
        "restarts": FLAGS.restarts,
        "stop_rules": FLAGS.stop_rules,
        "note": "shared CPU: timings noisy; reference figures are constants",
      },
      indent=2,
    ),
  )
  print(f"\nwrote {os.path.abspath(FLAGS.output)}")


def cli_check_ways(ways):
  from tf_dlg import validation

  return validation.check_choices("--ways", ways, ("one", "batch", "restarts"))


if __name__ == "__main__":
  cli.run(main)
