"""The one-attack command line (`experiments.attack`): outputs, flag errors, checks first."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_cli(tmp_path, *flags):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run(
    [sys.executable, "-m", "experiments.attack", *flags],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_entry_point_writes_json_and_png(tmp_path):
  out = tmp_path / "run"
  proc = _run_cli(
    tmp_path,
    "--dataset=digits",
    "--index=0",
    "--attack=idlg",
    "--iterations=1500",
    f"--output_dir={out}",
    "--seed=0",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads((out / "attack.json").read_text())
  for key in (
    "dataset",
    "dataset_source",
    "index",
    "attack",
    "defense",
    "ssim",
    "adjusted_ssim",
    "psnr",
    "mse",
    "label_correct",
    "seconds",
    "iterations",
  ):
    assert key in record, key
  assert record["dataset"] == "digits" and "sklearn" in record["dataset_source"]
  assert record["ssim"] > 0.95 and record["adjusted_ssim"] >= record["ssim"] - 1e-9
  assert record["label_correct"] is True
  png = (out / "attack.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
  assert record["restart"] == 0 and len(record["restart_distances"]) == 1
  assert set(record["timing"]) >= {"startup", "data", "attack", "total"}
  events = list((out / "tensorboard").glob("events.out.tfevents.*"))
  tags = {
    v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0])) for v in e.summary.value
  }
  assert {"attack_0/distance", "attack_0/ssim", "attack_0/reconstruction"} <= tags, tags


@pytest.mark.parametrize(
  "flags,message",
  [
    (["--dataset=imagenet"], "error: --dataset='imagenet' is not one of"),
    (
      ["--dataset=digits", "--index=5000"],
      "error: --index=5000 is out of range for --dataset=digits with --batch=1: expected 0..1437",
    ),
    (
      ["--dataset=digits", "--iterations=0"],
      "error: --iterations=0 must be an integer in [1, inf]",
    ),
    (
      ["--dataset=digits", "--defense=none", "--defense_param=0.3"],
      "error: --defense_param=0.3 given with --defense=none",
    ),
    (["--dataset=digits", "--restarts=0"], "error: --restarts=0 must be an integer in [1, 64]"),
    (["--dataset=digits", "--nojit", "--tolerance=0"], "error: --tolerance=0.0 must be a number"),
  ],
)
def test_entry_point_rejects_bad_flags(tmp_path, flags, message):
  proc = _run_cli(tmp_path, *flags, f"--output_dir={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not (tmp_path / "attack.json").exists()


def test_entry_point_checks_output_location_before_attacking(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  proc = _run_cli(tmp_path, "--dataset=digits", f"--output_dir={blocker}")
  assert proc.returncode == 2 and "exists and is not a directory" in proc.stderr
  assert "[attack]" not in proc.stdout  # refused before any attack ran
  # A read-only place even for root: nothing can be created under /proc.
  proc = _run_cli(tmp_path, "--dataset=digits", "--output_dir=/proc/tf_dlg_attack_out")
  assert proc.returncode == 2 and "cannot be created" in proc.stderr, proc.stderr
  assert "[attack]" not in proc.stdout


def test_entry_point_refuses_a_folder_another_live_run_writes(tmp_path):
  out = tmp_path / "run"
  code = (
    f"from tf_dlg import io; io.lock_directory({str(out)!r}); print('locked', flush=True); "
    "import time; time.sleep(300)"
  )
  env = dict(os.environ, PYTHONPATH=ROOT)
  holder = subprocess.Popen(
    [sys.executable, "-c", code], env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    proc = _run_cli(tmp_path, "--dataset=digits", "--iterations=50", f"--output_dir={out}")
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"in use by another run (pid {holder.pid})" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert "[attack]" not in proc.stdout and not (out / "attack.json").exists()
