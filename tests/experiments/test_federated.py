"""The federated driver (`experiments/federated.py`): a small run end to end, and bad
flags refused in one line (exit 2) before any work, leaving no TFF worker behind.
"""

import os
import subprocess
import sys

import pytest

from tf_dlg.attacks.threat_model import ObservedUpdate
from tf_dlg.federated import simulation as sim

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker_pids():
  pids = set()
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          if b"worker_binary" in f.read():
            pids.add(int(entry))
      except OSError:
        pass
  return pids


def _started_by(pid, parent):
  """Whether worker `pid` was started by process `parent` or is an orphan now.

  By pid, not by name: other tests on the machine run workers of their own.
  """
  try:
    with open(f"/proc/{pid}/environ", "rb") as f:
      if f"TF_DLG_WORKER_PARENT={parent}".encode() in f.read().split(b"\0"):
        return True
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[1]) == 1
  except (OSError, ValueError, IndexError):
    return False


def _run_entry(args, tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  before = _worker_pids()
  proc = subprocess.Popen(
    [sys.executable, "-m", "experiments.federated", *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  stdout, stderr = proc.communicate(timeout=300)
  leaked = {p for p in _worker_pids() - before if _started_by(p, proc.pid)}
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), leaked


def test_entry_point_small_run_writes_outputs_and_leaves_no_worker(tmp_path):
  out = tmp_path / "fl"
  proc, leaked = _run_entry(
    [
      "--dataset=digits",
      "--partition=dirichlet",
      "--alpha=1.0",
      "--num_clients=4",
      "--clients_per_round=3",
      "--rounds=2",
      "--aggregator=trimmed_mean",
      "--malicious_clients=1",
      "--capture_round=2",
      f"--output_dir={out}",
      "--seed=1",
      "--noprogress",
    ],
    tmp_path,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not leaked, f"worker_binary left running: {leaked}"
  assert "sklearn.datasets.load_digits" in proc.stdout
  history = sim.read_history(str(out / "history.csv"))
  assert [h["round"] for h in history] == [1, 2]
  assert all(0.0 <= h["test_accuracy"] <= 1.0 and h["seconds"] > 0 for h in history)
  assert (out / "curve.png").stat().st_size > 1000
  captures = list(out.glob("capture_round2_client*.npz"))
  assert len(captures) == 1 and ObservedUpdate.load(str(captures[0])).kind == "fedavg_delta"


def test_entry_point_bad_flag_is_one_clear_error(tmp_path):
  proc, leaked = _run_entry(
    ["--num_clients=10", "--malicious_clients=12", f"--output_dir={tmp_path}"], tmp_path
  )
  assert proc.returncode == 2
  assert "error: --malicious_clients=12 must be an integer in [0, 9]" in proc.stderr
  assert not leaked


@pytest.mark.parametrize(
  "args,message",
  [
    (
      ["--num_clients=3", "--malicious_clients=3"],
      "error: --malicious_clients=3 must be an integer in [0, 2] (--num_clients - 1)",
    ),
    (
      ["--defense=none", "--defense_param=0.3"],
      "error: --defense_param=0.3 is set but --defense='none'",
    ),
    (
      ["--defense=masking"],
      "error: Defence 'masking' needs a parameter; none was given (--defense_param=None)",
    ),
    (
      ["--client_optimizer=adamw"],
      "error: flag --client_optimizer=adamw: value should be one of <sgd|sgdm|adam>",
    ),
    (["--num_clients=0"], "error: --num_clients=0 must be an integer in [1, inf]"),
  ],
)
def test_entry_point_refuses_before_any_work(tmp_path, args, message):
  out = tmp_path / "fl"
  proc, leaked = _run_entry([*args, f"--output_dir={out}"], tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
  assert not leaked and not (out / "history.csv").exists()


def test_entry_point_refuses_a_file_as_output_dir(tmp_path):
  target = tmp_path / "a_file"
  target.write_text("x")
  proc, _ = _run_entry([f"--output_dir={target}"], tmp_path)
  assert proc.returncode == 2
  assert f"output_dir='{target}' exists and is not a directory" in proc.stderr
