"""Probe defects of the run folder and the disk: two runs on one --output_dir, a lock
left by a dead run, and a full disk (a raw Errno 28 traceback before)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tf_dlg import io as io_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TAKE = "from tf_dlg import io; io.lock_directory({path!r}); print('locked', flush=True); {then}"


def _python(code, **kwargs):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, text=True, **kwargs)


def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
  out = str(tmp_path / "run")
  holder = _python(
    _TAKE.format(path=out, then="import time; time.sleep(300)"), stdout=subprocess.PIPE
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(io_lib.DirectoryInUse, match=rf"in use by another run \(pid {holder.pid}\)"):
      io_lib.lock_directory(out)
  finally:
    holder.send_signal(signal.SIGKILL)  # dies holding it: no clean-up ran
    holder.wait()
  lock = io_lib.lock_directory(out)
  assert open(lock).read().strip() == str(os.getpid())
  assert io_lib.lock_directory(out) == lock  # held already: no-op
  # Now this process holds it: another one is refused, naming this pid.
  other = _python(_TAKE.format(path=out, then=""), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  _, err = other.communicate(timeout=120)
  assert other.returncode != 0 and f"in use by another run (pid {os.getpid()})" in err


_DRIVER = textwrap.dedent(
  """
  import os, time
  from experiments import cli
  cli.define_output_dir("unused")

  def main(argv):
    cli.work_begins()
    if os.environ.get("FILL"):
      with open("/dev/full", "w") as f:
        f.write("x" * 100000)
        f.flush()
    print("working", flush=True)
    time.sleep(float(os.environ.get("HOLD", "0")))

  cli.run(main)
  """
)


def _driver(tmp_path, out, **env):
  script = tmp_path / "driver.py"
  script.write_text(_DRIVER)
  return subprocess.Popen(
    [sys.executable, str(script), f"--output_dir={out}"],
    env=dict(os.environ, PYTHONPATH=ROOT, **env),
    cwd=ROOT,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )


def test_a_second_driver_on_one_output_dir_is_one_line(tmp_path):
  out = tmp_path / "run"
  first = _driver(tmp_path, out, HOLD="300")
  try:
    assert first.stdout.readline().strip() == "working"
    second = _driver(tmp_path, out)
    _, err = second.communicate(timeout=180)
    assert second.returncode == 2, err
    assert err.strip().splitlines() == [
      f"error: output_dir {str(out)!r} is in use by another run (pid {first.pid}); wait for "
      "it to end or choose another --output_dir."
    ]
  finally:
    first.kill()
    first.wait()
  again = _driver(tmp_path, out)  # the first run is dead: its lock is taken over
  assert again.communicate(timeout=180)[0].strip() == "working" and again.returncode == 0


def test_a_full_disk_is_one_line_not_a_traceback(tmp_path):
  proc = _driver(tmp_path, tmp_path / "run", FILL="1")
  _, err = proc.communicate(timeout=180)
  lines = err.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, err
  assert lines[0].startswith("error: no space left on the device") and "rerun" in lines[0]
  assert "Traceback" not in err
