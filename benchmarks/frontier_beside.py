r"""The frontier trained by one process against a second one beside its attacks.

  python -m benchmarks.frontier_beside [--images=4] [--seeds=2] [--rounds=8]

A reduced `frontier` preset (real MNIST, the quick preset's training; masking at 0.5
and 0.99, noising_ratio at 1 and 10, DP at z = 1; `--images` attacked images, each
defence's strongest attackers with gallery matching on all 70,000 images) is run twice
into fresh folders, each time by a fresh process: once alone (`Frontier(...,
train_beside=False)`: the attacks, then every FedAvg run), once with a child process
that trains the grid from its front from the start (the default). It prints both wall
times, their ratio and how many runs the child trained, and fails unless the two
frontier.csv files and every run's history (seconds aside) are the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from absl import flags

# First: imports TensorFlow quietly and before absl's app.run (see experiments.cli).
from experiments import cli
from tf_dlg.study import presets

FLAGS = flags.FLAGS


def define_flags():
  """The benchmark's flags (defined on demand, so drivers can share one process)."""
  flags.DEFINE_integer("images", 4, "Attacked images per setting.", lower_bound=1)
  flags.DEFINE_integer("seeds", 2, "Seeds per trained setting.", lower_bound=1)
  flags.DEFINE_integer("rounds", 8, "FedAvg rounds per run.", lower_bound=1)
  # Internal: the frontier processes the benchmark starts.
  flags.DEFINE_string("run_dir", None, "(internal) run the frontier into this folder and exit.")
  flags.DEFINE_bool("alone", False, "(internal) no child trainer.")


def preset():
  return presets.PRESETS["frontier"].override(
    convergence_defenses=("masking", "noising_ratio"),
    frontier_grids={"masking": (0.5, 0.99), "noising_ratio": (1.0, 10.0)},
    dp_multipliers=(1.0,),
    frontier_images=FLAGS.images,
    seeds=FLAGS.seeds,
    rounds=FLAGS.rounds,
  )


def _run(out: str, alone: bool) -> tuple:
  args = [sys.executable, "-m", "benchmarks.frontier_beside", f"--run_dir={out}"]
  args += [f"--alone={alone}", f"--images={FLAGS.images}", f"--seeds={FLAGS.seeds}"]
  t = time.perf_counter()
  done = subprocess.run(args + [f"--rounds={FLAGS.rounds}"], stdout=subprocess.PIPE, text=True)
  if done.returncode:
    raise RuntimeError(f"a frontier run exited with status {done.returncode} (error above).")
  return time.perf_counter() - t, int(done.stdout.split()[-1])


def _results(out: str) -> tuple:
  """frontier.csv's points and every run's history, the seconds column aside."""
  from benchmarks import shared_training
  from tf_dlg.study import frontier, frontier_points

  conv = frontier.Frontier(out, preset(), progress=False).convergence
  points = frontier_points.read_frontier(os.path.join(out, "frontier.csv"))
  return points, shared_training.histories(conv)


def main(argv):
  del argv
  from tf_dlg.study import frontier

  if FLAGS.run_dir:
    fr = frontier.Frontier(FLAGS.run_dir, preset(), progress=False, train_beside=not FLAGS.alone)
    fr.run()
    print(f"trained beside {fr.trained_beside}")
    return
  p = frontier.check(preset())
  settings = frontier.settings(p)
  runs = (len(settings) + 1) * p.seeds
  print(f"{len(settings)} settings x {p.frontier_images} images, {runs} runs x {p.rounds} rounds")
  with tempfile.TemporaryDirectory() as tmp:
    one, two = os.path.join(tmp, "alone"), os.path.join(tmp, "beside")
    alone, _ = _run(one, alone=True)
    shared, child = _run(two, alone=False)
    if _results(one) != _results(two):
      raise RuntimeError("the two ways gave different frontiers or histories.")
  print(f"one process:            {alone:7.1f} s")
  print(f"a child trainer beside: {shared:7.1f} s (it trained {child} of {runs} runs)")
  print(f"alone / beside:         {alone / shared:7.2f}  (frontier.csv and histories identical)")
  print(f"load average after:     {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
