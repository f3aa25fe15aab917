"""TFF workers: loopback only, no orphans after SIGTERM / SIGKILL, clear setup errors.

The listening address is read from /proc/net/tcp{,6} through the worker's own socket
inodes (not by port or name), so other tests' workers never interfere.
"""

import ipaddress
import os
import signal
import subprocess
import sys
import time

import portpicker
import pytest

from tf_dlg.execution import runtime, shim, worker

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LISTEN = "0A"


def _socket_inodes(pid):
  inodes = set()
  for fd in os.listdir(f"/proc/{pid}/fd"):
    try:
      target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
      continue
    if target.startswith("socket:["):
      inodes.add(target[8:-1])
  return inodes


def _hex_address(text):
  """An address of /proc/net/tcp{,6} (hex, host-endian 32-bit words) as ip_address."""
  words = [bytes.fromhex(text[i : i + 8])[::-1] for i in range(0, len(text), 8)]
  return ipaddress.ip_address(b"".join(words))


def listening_addresses(pid):
  """The (address, port) pairs on which process `pid` listens (TCP, v4 and v6)."""
  inodes = _socket_inodes(pid)
  found = []
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as f:
      for line in f.readlines()[1:]:
        cols = line.split()
        if cols[3] == _LISTEN and cols[9] in inodes:
          addr, port = cols[1].split(":")
          found.append((_hex_address(addr), int(port, 16)))
  return found


def _is_loopback(address):
  mapped = getattr(address, "ipv4_mapped", None)
  return (mapped or address).is_loopback


def _wait_listening(pid, timeout=60.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    found = listening_addresses(pid)
    if found:
      return found
    time.sleep(0.2)
  raise AssertionError(f"worker {pid} never listened")


def _alive(pid):
  """True unless `pid` is gone or a zombie (a dead child nobody reaped yet)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _worker_children(pid):
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          if ppid == pid and b"worker_binary" in f.read():
            out.append(int(entry))
      except (OSError, ValueError, IndexError):
        pass
  return out


# --------------------------------------------------------------------------- loopback


def test_default_local_worker_listens_on_loopback_only():
  tff = runtime.import_tff()
  import tensorflow as tf

  @tff.tensorflow.computation
  def three():
    return tf.constant(3)

  assert three() == 3  # starts the local worker of the default context
  pids = _worker_children(os.getpid())
  assert pids, "no local worker_binary child"
  for pid in pids:
    found = _wait_listening(pid)
    assert all(_is_loopback(a) for a, _ in found), found


def test_remote_worker_is_loopback_unless_exposed():
  proc, address = runtime.start_local_worker()
  try:
    found = _wait_listening(proc.pid)
    assert all(_is_loopback(a) for a, _ in found), found
    assert int(address.rsplit(":", 1)[1]) in {p for _, p in found}
  finally:
    runtime.stop_worker(proc)
  # Without the shim the same binary listens on every interface: what the shim prevents.
  proc, _ = runtime.start_local_worker(expose=True)
  try:
    found = _wait_listening(proc.pid)
    assert any(a.is_unspecified for a, _ in found), found
  finally:
    runtime.stop_worker(proc)


def test_worker_launcher_defaults_to_loopback_and_stops_on_sigterm():
  port = portpicker.pick_unused_port()
  launcher = subprocess.Popen(
    [sys.executable, "-m", "tf_dlg.execution.worker", f"--port={port}"],
    cwd=REPO,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 30
    while not _worker_children(launcher.pid) and time.time() < deadline:
      time.sleep(0.1)
    (pid,) = _worker_children(launcher.pid)
    # The banner comes after the launcher has verified the worker's sockets: wait for it
    # (a SIGTERM before it would race the check), then stop the launcher.
    seen = ""
    while "loopback only" not in seen:
      line = launcher.stderr.readline()
      assert line, f"launcher closed stderr without the banner: {seen!r}"
      seen += line
    found = _wait_listening(pid)
    assert found and all(_is_loopback(a) for a, _ in found), found
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(60)  # generous: a loaded 2-core machine
    deadline = time.time() + 60  # the worker dies on its parent-death signal, a moment later
    while _alive(pid) and time.time() < deadline:
      time.sleep(0.1)
    assert not _alive(pid)
  finally:
    if launcher.poll() is None:
      launcher.kill()


def test_launcher_rejects_a_bad_port():
  proc = subprocess.run(
    [sys.executable, "-m", "tf_dlg.execution.worker", "--port=0"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 2
  assert "--port=0 must be an integer in [1, 65535]" in proc.stderr


def test_no_compiler_is_a_one_line_error_unless_exposure_is_allowed(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached shim
  monkeypatch.setattr(shim, "find_compiler", lambda: None)
  monkeypatch.delenv(shim.ALLOW_EXPOSED_ENV, raising=False)
  with pytest.raises(
    shim.WorkerSetupError,
    match=r"install gcc .* "
    r"TF_DLG_ALLOW_EXPOSED_WORKER=1",
  ):
    shim.shim_path()
  monkeypatch.setenv(shim.ALLOW_EXPOSED_ENV, "1")
  with pytest.warns(RuntimeWarning, match="EVERY interface"):
    env = worker.worker_env()
  assert shim.shim_path() is None and "loopback_shim" not in env.get("LD_PRELOAD", "")


def test_shim_is_cached_by_source_hash(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  path = shim.shim_path()
  assert path.startswith(str(tmp_path / "tf_dlg" / "loopback_shim-"))
  mtime = os.stat(path).st_mtime_ns
  assert shim.shim_path() == path and os.stat(path).st_mtime_ns == mtime
  assert path in worker.worker_env()["LD_PRELOAD"]


# --------------------------------------------------------------------------- orphans


_CHILD = """
import sys, time
from tf_dlg.execution import runtime
proc, _ = runtime.start_local_worker(expose=sys.argv[1] == "expose")
print(proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("mode", ["loopback", "expose"])
def test_worker_dies_with_a_sigkilled_parent(mode):
  """Shim constructor (loopback) or preexec prctl (exposed, no shim): both guard."""
  parent = subprocess.Popen(
    [sys.executable, "-c", _CHILD, mode], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  try:
    pid = int(parent.stdout.readline())
    _wait_listening(pid)
    parent.kill()
    parent.wait(60)  # polled waits with generous limits: a loaded 2-core machine
    deadline = time.time() + 60
    while _alive(pid) and time.time() < deadline:
      time.sleep(0.05)
    assert not _alive(pid), f"worker {pid} outlived its SIGKILLed parent"
  finally:
    if parent.poll() is None:
      parent.kill()


# SIGTERM's clean-up is also covered by the fast tests/experiments/test_fail_closed_sigterm.py.
@pytest.mark.parametrize(
  "sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGKILL]
)
def test_killed_federated_run_leaves_no_worker(tmp_path, sig):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  run = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "experiments.federated",
      "--num_clients=3",
      "--rounds=500",
      "--local_epochs=1",
      "--model=lenet",
      f"--output_dir={tmp_path}",
      "--noprogress",
    ],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 240
    pids = []
    while not pids and time.time() < deadline and run.poll() is None:
      pids = _worker_children(run.pid)
      time.sleep(0.2)
    assert pids, f"no worker appeared (exit {run.poll()})"
    for pid in pids:
      _wait_listening(pid)
    # During a round: one has finished (a history row), the next is in flight.
    history = tmp_path / "history.csv"
    while time.time() < deadline and run.poll() is None:
      if history.exists() and len(history.read_text().splitlines()) >= 2:
        break
      time.sleep(0.1)
    assert run.poll() is None and len(history.read_text().splitlines()) >= 2
    t0 = time.time()
    run.send_signal(sig)
    while (run.poll() is None or any(_alive(p) for p in pids)) and time.time() - t0 < 120:
      time.sleep(0.02)
    stopped_after = time.time() - t0
    assert not any(_alive(p) for p in pids), f"worker outlived {sig.name}"
    # A stopped run is gone, workers included (polled with a generous deadline: the
    # run would otherwise train on for minutes).
    assert run.poll() is not None, f"run still alive {stopped_after:.0f} s after {sig.name}"
    if sig == signal.SIGTERM:
      assert run.returncode == 130 and "interrupted" in run.stderr.read()
    else:
      assert run.returncode == -signal.SIGKILL
  finally:
    if run.poll() is None:
      run.kill()


def test_unreachable_worker_is_a_clear_error():
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  with pytest.raises(worker.WorkerUnavailable, match="no TFF worker answers"):
    with runtime.execution_target([address], timeout=1.0):
      pass


@pytest.mark.parametrize("bad", ["localhost", "host:0", "h:99999", "h:x"])
def test_bad_worker_address(bad):
  with pytest.raises(ValueError, match="must be host:port"):
    runtime.parse_workers(bad)
