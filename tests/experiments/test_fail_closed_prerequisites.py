"""Without a C compiler (so no confined TFF worker), every driver that trains exits 2 in
one line before any other work: no data read, no output directory, nothing printed.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINING_DRIVERS = {
  "federated": ["--dataset=digits", "--rounds=1"],
  "convergence": ["--dataset=digits", "--defense_params=masking:0.5", "--rounds=1"],
  "reproduce": ["--preset=quick"],
}


@pytest.fixture
def no_compiler_env(tmp_path):
  empty_path = tmp_path / "bin"  # PATH without cc, gcc or clang
  empty_path.mkdir()
  env = dict(
    os.environ,
    PATH=str(empty_path),
    XDG_CACHE_HOME=str(tmp_path / "cache"),  # no shim built by an earlier run
    TMPDIR=str(tmp_path),
    TF_CPP_MIN_LOG_LEVEL="2",
  )
  for name in ("CC", "TF_DLG_ALLOW_EXPOSED_WORKER"):
    env.pop(name, None)
  return env


def test_training_drivers_without_a_compiler_exit_2_before_work(tmp_path, no_compiler_env):
  procs = {}
  for driver, args in TRAINING_DRIVERS.items():
    out = tmp_path / f"out-{driver}"
    procs[driver] = (
      out,
      subprocess.Popen(
        [sys.executable, "-m", f"experiments.{driver}", *args, f"--output_dir={out}"],
        cwd=REPO,
        env=no_compiler_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      ),
    )
  for driver, (out, proc) in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, (driver, stderr[-2000:])
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tf-dlg needs a C compiler"), (
      driver,
      stderr[-2000:],
    )
    assert "apt-get install gcc" in lines[0] and "TF_DLG_ALLOW_EXPOSED_WORKER=1" in lines[0]
    assert stdout == "" and not out.exists(), (driver, stdout)
