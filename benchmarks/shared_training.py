r"""One trainer against two sharing a convergence grid: wall seconds for the same runs.

  python -m benchmarks.shared_training [--seeds=2] [--rounds=15]

The grid is the quick preset's training (real MNIST, its seeded 6,000 / 2,000 subset,
10 clients, batch 64, client Adam 2e-3), median aggregation, IID and Dirichlet clients,
no defence and masking at 0.05, `--seeds` seeds: 4 x seeds runs. It is trained twice
into fresh folders, each time by fresh processes (each pays its own start-up and TFF
builds): once by one process (`Convergence.train()`), once by two at once, one from
each end of the grid (`train()` and `train(from_end=True)`, as the reproduce pipeline's
child and its convergence stage do; `run_store.hold` keeps each run to one of them).
It prints both wall times and their ratio, how many runs each of the two trained, and
fails unless every run's history (seconds aside) is the same both ways.
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
  flags.DEFINE_integer("seeds", 2, "Seeds per cell (runs: 4 x seeds).", lower_bound=1)
  flags.DEFINE_integer("rounds", 15, "FedAvg rounds per run.", lower_bound=1)
  # Internal: the trainer processes the benchmark starts.
  flags.DEFINE_string("train_dir", None, "(internal) train this folder's grid and exit.")
  flags.DEFINE_bool("from_end", False, "(internal) train the grid from its end.")


def grid(output_dir: str, seeds: int, rounds: int):
  """The benchmark's Convergence grid (the quick preset's training settings)."""
  from tf_dlg.study import convergence

  quick = presets.PRESETS["quick"]
  return convergence.Convergence(
    output_dir,
    {"masking": (0.05, "benchmark")},
    aggregators=("median",),
    partitions=("iid", "dirichlet"),
    seeds=range(seeds),
    subsets=(quick.train_examples, quick.test_examples),
    progress=False,
    dataset=quick.convergence_dataset,
    rounds=rounds,
    num_clients=quick.num_clients,
    batch_size=quick.batch_size,
    client_lr=quick.client_lr,
  )


def _trainers(output_dir: str, ends) -> tuple:
  """Starts one trainer process per entry of `ends` (from_end flags) at once; returns
  (wall seconds until all ended, runs each trained)."""
  base = [sys.executable, "-m", "benchmarks.shared_training", f"--train_dir={output_dir}"]
  base += [f"--seeds={FLAGS.seeds}", f"--rounds={FLAGS.rounds}"]
  t = time.perf_counter()
  procs = [
    subprocess.Popen(base + [f"--from_end={end}"], stdout=subprocess.PIPE, text=True)
    for end in ends
  ]
  outs = [p.communicate()[0] for p in procs]
  seconds = time.perf_counter() - t
  for p in procs:
    if p.returncode:
      raise RuntimeError(f"a trainer exited with status {p.returncode} (its error is above).")
  return seconds, [int(o.split()[-1]) for o in outs]


def histories(conv) -> dict:
  """{run: its history rows without the seconds column}."""
  from tf_dlg.federated import simulation

  return {
    key: [
      {k: v for k, v in row.items() if k != "seconds"}
      for row in simulation.read_history(os.path.join(conv.run_dir(*key), simulation.HISTORY_NAME))
    ]
    for key in conv.keys()
  }


def main(argv):
  del argv
  if FLAGS.train_dir:
    trained = grid(FLAGS.train_dir, FLAGS.seeds, FLAGS.rounds).train(from_end=FLAGS.from_end)
    print(f"trained {trained}")
    return
  with tempfile.TemporaryDirectory() as tmp:
    one, two = os.path.join(tmp, "one"), os.path.join(tmp, "two")
    conv = grid(one, FLAGS.seeds, FLAGS.rounds)  # checks the settings before any work
    runs = len(conv.keys())
    print(f"{runs} runs x {FLAGS.rounds} rounds, {conv.dataset}, median, iid + dirichlet")
    alone, _ = _trainers(one, [False])
    shared, split = _trainers(two, [False, True])
    if histories(conv) != histories(grid(two, FLAGS.seeds, FLAGS.rounds)):
      raise RuntimeError("the two ways trained different histories.")
  print(f"one trainer:            {alone:7.1f} s ({alone / runs:.1f} s a run)")
  print(f"two trainers:           {shared:7.1f} s (runs each: {split[0]} / {split[1]})")
  print(f"one / two:              {alone / shared:7.2f}  (histories identical, seconds aside)")
  print(f"load average after:     {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
