"""`experiments.convergence` end to end: a second process shares the grid, every run once."""

import csv
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = [
  "--defense_params=masking:0.01",
  "--dataset=mnist",
  "--train_examples=40",
  "--test_examples=20",
  "--seeds=0,1,2",
  "--rounds=2",
  "--num_clients=2",
  "--aggregators=mean",
  "--partitions=iid,dirichlet",
]


def _histories(out):
  found = {}
  for path in sorted(glob.glob(os.path.join(out, "runs", "*", "seed*", "history.csv"))):
    with open(path, newline="") as f:
      found[os.path.relpath(path, out)] = [
        {k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)
      ]
  return found


def test_the_driver_splits_its_grid_and_trains_each_run_once(tmp_path):
  out = str(tmp_path / "conv")
  done = subprocess.run(
    [sys.executable, "-m", "experiments.convergence", *SETTINGS, f"--output_dir={out}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  m = re.search(r"\[convergence\] 12 runs, (\d+) of them trained by a second process", done.stdout)
  assert m and 0 <= int(m.group(1)) <= 12, done.stdout
  histories = _histories(out)
  assert len(histories) == 12 and all(len(h) == 2 for h in histories.values())
  # One TensorBoard file per run: no run was started twice (a resumed one adds a file).
  for run in glob.glob(os.path.join(out, "runs", "*", "seed*")):
    assert len(glob.glob(os.path.join(run, "tensorboard", "events.*"))) == 1, run
  with open(os.path.join(out, "convergence.csv"), newline="") as f:
    assert len(list(csv.DictReader(f))) == 4
  # The same runs trained by one fresh process alone give the same rounds (a fresh one:
  # a test process's TensorFlow may carry other tests' settings).
  alone = str(tmp_path / "alone")
  done = subprocess.run([sys.executable, "-c", ALONE, alone], cwd=ROOT, timeout=600)
  assert done.returncode == 0
  assert _histories(alone) == histories


ALONE = """
import sys
from experiments import cli  # TensorFlow imported as the driver imports it
from tf_dlg.study import convergence

convergence.Convergence(
  sys.argv[1],
  {"masking": (0.01, "given")},
  aggregators=("mean",),
  partitions=("iid", "dirichlet"),
  seeds=(0, 1, 2),
  subsets=(40, 20),
  progress=False,
  dataset="mnist",
  rounds=2,
  num_clients=2,
).train()
"""
