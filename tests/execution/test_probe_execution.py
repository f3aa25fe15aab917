"""Probe defects of the execution layer: taken ports, unreachable and stopped workers,
and drivers that hid real tracebacks behind one-line usage errors."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import portpicker
import pytest

from tf_dlg.execution import runtime, worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(*args, timeout=180):
  return subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
  )


def test_launcher_on_a_taken_port_fails_and_never_claims_to_listen():
  with socket.socket() as held:
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    proc = _python("-m", "tf_dlg.execution.worker", f"--port={port}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "listening on loopback" not in proc.stderr and "(checked" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and f"without listening on port {port}" in last
  assert "is the port in use?" in last


def test_an_unreachable_worker_is_refused_at_once_with_the_safe_command():
  port = portpicker.pick_unused_port()
  with pytest.raises(worker.WorkerUnavailable) as e:
    runtime.check_workers(f"127.0.0.1:{port}", timeout=5.0)
  message = str(e.value)
  assert f"python -m tf_dlg.execution.worker --port={port}" in message
  assert "worker_binary --port" not in message and "\n" not in message
  assert runtime.check_workers("") == []


def test_federated_driver_with_an_unreachable_worker_is_one_line(tmp_path):
  port = portpicker.pick_unused_port()
  proc = _python(
    "-m",
    "experiments.federated",
    f"--workers=127.0.0.1:{port}",
    "--rounds=1",
    f"--output_dir={tmp_path / 'out'}",
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f"error: no TFF worker answers at 127.0.0.1:{port}")
  assert "python -m tf_dlg.execution.worker" in lines[0]
  assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("stop", [signal.SIGSTOP, signal.SIGKILL])
def test_a_round_on_a_stopped_or_dead_worker_fails_past_its_deadline(monkeypatch, stop):
  tff = runtime.import_tff()
  import tensorflow as tf

  proc, address = runtime.start_local_worker()
  monkeypatch.setattr(runtime, "CALL_TIMEOUT", 3.0)
  try:
    with runtime.execution_target([address]):

      @tff.tensorflow.computation(tf.int32)
      def plus_one(x):
        return x + 1

      assert plus_one(1) == 2
      os.kill(proc.pid, stop)
      with pytest.raises(worker.WorkerUnavailable, match=r"did not answer within 3 s"):
        plus_one(2)
  finally:
    if stop == signal.SIGSTOP:
      os.kill(proc.pid, signal.SIGCONT)
    runtime.stop_worker(proc)
  assert proc.poll() is not None


_DRIVER = textwrap.dedent(
  """
  import os
  from experiments import cli

  def main(argv):
    if os.environ.get("BEGUN"):
      cli.work_begins()
    raise ValueError("inner detail")

  cli.run(main)
  """
)


@pytest.mark.parametrize("begun", [False, True])
def test_only_errors_before_the_work_are_usage_errors(tmp_path, begun):
  script = tmp_path / "driver.py"
  script.write_text(_DRIVER)
  env = dict(os.environ, PYTHONPATH=ROOT, BEGUN="1" if begun else "")
  proc = subprocess.run(
    [sys.executable, str(script)],
    capture_output=True,
    text=True,
    env=env,
    timeout=180,
    cwd=ROOT,
  )
  if begun:  # a bug in the work: its traceback, not a usage line
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().endswith("ValueError: inner detail")
  else:
    assert proc.returncode == 2 and proc.stderr.strip() == "error: inner detail", proc.stderr
