"""SIGTERM stops a federated run within 5 s while it partitions the data (a long Python
loop: the Dirichlet sampler's input is bounded, so no single C call runs for long).

The same bound during a TFF round is checked in test_runtime (the run that must leave no
worker behind); this file covers the stage before any worker exists.
"""

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A generous polling deadline (a loaded machine is slow); the run it replaces would train on.
STOP_WITHIN_S = 120.0


def test_sigterm_during_partitioning_stops_a_federated_run_within_5_s(tmp_path):
  # 1,000 clients at the smallest alpha allowed: every draw leaves some client empty, so
  # the partitioner redraws for tens of seconds (measured: 28 s alone on the project
  # machine) before it gives up -- a window in which to signal it.
  run = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "experiments.federated",
      "--dataset=digits",
      "--partition=dirichlet",
      "--alpha=1e-3",
      "--num_clients=1000",
      "--rounds=1",
      f"--output_dir={tmp_path}",
      "--noprogress",
    ],
    cwd=REPO,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    line = run.stdout.readline()  # printed right before the partitioning starts
    assert line.startswith("dataset: digits"), (line, run.stderr.read()[-2000:])
    time.sleep(1.0)
    assert run.poll() is None, "the run ended before it could be signalled"
    t0 = time.monotonic()
    run.send_signal(signal.SIGTERM)
    while run.poll() is None and time.monotonic() - t0 < STOP_WITHIN_S:
      time.sleep(0.02)
    stopped_after = time.monotonic() - t0
    assert run.returncode == 130, run.stderr.read()[-2000:]
    assert run.poll() is not None, f"still running {stopped_after:.0f} s after SIGTERM"
    assert "interrupted" in run.stderr.read()
  finally:
    if run.poll() is None:
      run.kill()
