r"""TFF's C++ worker_binary, confined to loopback and tied to the life of its parent.

TFF 0.87's `worker_binary` serves its executor (which runs any TensorFlow graph it is
sent) on `[::]:PORT` with no authentication, and has no bind-address flag. Every worker
tf-dlg starts is therefore launched with `loopback_shim.c` preloaded (LD_PRELOAD, in the
worker only): its `bind()` turns an any-address into loopback, and it kills the worker
when the process that started it dies (also on SIGKILL, which no Python handler sees).
The shim is built, cached and checked by `tf_dlg.execution.shim`. Confinement is checked,
not assumed: each started worker must have the shim mapped and listen on loopback only
(`verify_confined`); otherwise the run stops with one line saying why.

Remote workers (a driver's `--workers=host:port`) are started with this module:

    python -m tf_dlg.execution.worker --port=8000            # loopback only (default)
    python -m tf_dlg.execution.worker --port=8000 --expose   # every interface

Keep the default and reach the worker through an SSH tunnel, a TLS-terminating proxy or
a private network namespace; `--expose` is for networks where every host is trusted.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

from tf_dlg.execution.shim import ALLOW_EXPOSED_ENV, HOW_TO_FIX, WorkerSetupError, shim_path

PARENT_ENV = "TF_DLG_WORKER_PARENT"
# Known start-up noise of the TF 2.14 CPU build, printed at ERROR level by every process
# that loads TensorFlow (the CUDA plugins are registered twice), GPU or not. Drivers and
# local workers drop exactly these lines; everything else a worker prints passes through.
TF_STARTUP_NOISE = (
  "Unable to register cuDNN factory",
  "Unable to register cuFFT factory",
  "Unable to register cuBLAS factory",
  "TF-TRT Warning: Could not find TensorRT",
  "SetPriority unimplemented for this stream",
)


def filtered_stderr():
  """A writable fd whose lines reach sys.stderr unless they are `TF_STARTUP_NOISE`.

  For a child's stderr: a daemon thread copies the lines until the child closes it.
  """
  read_fd, write_fd = os.pipe()

  def pump():
    with os.fdopen(read_fd, "r", errors="replace") as lines:
      for line in lines:
        if not any(n in line for n in TF_STARTUP_NOISE):
          sys.stderr.write(line)
          sys.stderr.flush()

  threading.Thread(target=pump, name="worker-stderr", daemon=True).start()
  return write_fd


_PR_SET_PDEATHSIG = 1


class WorkerUnavailable(RuntimeError):
  """A TFF worker does not answer: unreachable when the run starts, or a call to it (a
  round) outlived its deadline (the worker stopped, hung or died). One line for the user."""


# What to run on a worker's machine: the project's loopback-only worker (never the raw
# worker_binary, which listens on every interface without authentication).
WORKER_COMMAND = "python -m tf_dlg.execution.worker --port={port}"


def worker_binary_path() -> str:
  """Path of TFF's `worker_binary`, found without importing TFF (fast)."""
  spec = importlib.util.find_spec("tensorflow_federated")
  if spec is None or not spec.submodule_search_locations:
    raise WorkerSetupError("tensorflow_federated is not installed: pip install -e .")
  return os.path.join(list(spec.submodule_search_locations)[0], "data", "worker_binary")


def _parent_death_signal():
  """A preexec_fn that SIGKILLs the child when its parent dies (Linux prctl).

  libc's prctl is looked up here, in the parent: the child between fork and exec
  should only call it, not dlopen anything.
  """
  prctl = ctypes.CDLL(None, use_errno=True).prctl
  sig = int(signal.SIGKILL)

  def preexec():
    prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

  return preexec


def die_with_parent() -> None:
  """What `_parent_death_signal` does for a worker, done now for this (helper) process."""
  try:
    _parent_death_signal()()
  except AttributeError:  # no prctl (not Linux): the parent's clean-up must do
    pass


def _worker_env(expose: bool, parent=None):
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the worker's C++ start-up pages
  env[PARENT_ENV] = str(os.getpid() if parent is None else parent)
  shim = None if expose else shim_path()
  if shim is None:
    if not expose:
      warnings.warn(
        f"{ALLOW_EXPOSED_ENV}=1 and no C compiler: TFF's worker_binary "
        "listens on EVERY interface with no authentication.",
        RuntimeWarning,
        stacklevel=3,
      )
    return env, None
  env["LD_PRELOAD"] = " ".join(p for p in (shim, env.get("LD_PRELOAD", "")) if p)
  return env, shim


def worker_env(expose: bool = False, parent: int = None) -> dict:
  """The environment of a worker: the verified shim preloaded unless `expose`."""
  return _worker_env(expose, parent)[0]


def spawn_worker(
  port: int, *, expose: bool = False, extra_args=(), stdout=None, stderr=None
) -> subprocess.Popen:
  """Starts `worker_binary --port=PORT` (loopback only unless `expose`).

  The worker gets a parent-death signal (from the shim, or a preexec prctl when
  exposed without it) and, through the shim, a watchdog on its parent's pid, so it
  never outlives the process that started it. Pass the result to `verify_confined`
  once the worker answers.
  """
  args = [worker_binary_path(), f"--port={int(port)}", *extra_args]
  env, shim = _worker_env(expose)
  # With the shim its constructor sets the parent-death signal after exec, which is
  # safe in a threaded parent; a preexec_fn (Python in the forked child) only without.
  proc = subprocess.Popen(
    args,
    env=env,
    preexec_fn=None if shim else _parent_death_signal(),
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL if stdout is None else stdout,
    stderr=subprocess.DEVNULL if stderr is None else stderr,
  )
  proc.loopback_shim, proc.exposed = shim, expose or shim is None
  return proc


def _is_loopback(ip: str) -> bool:
  address = ipaddress.ip_address(ip.split("%")[0])
  return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _listening(pid: int) -> list:
  import psutil

  try:
    conns = psutil.Process(pid).net_connections(kind="inet")
  except psutil.Error:  # gone (the caller sees its exit code)
    return []
  return [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]


def _maps_hold(pid: int, path: str) -> bool:
  try:
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
      return any(line.rstrip("\n").endswith(path) for line in f)
  except OSError:
    return False


def verify_confined(proc: subprocess.Popen, port: int, timeout: float = 120.0) -> list:
  """Checks a worker of `spawn_worker`: loaded its shim and listens on loopback only.

  Waits (up to `timeout` s) until it listens on `port` or exits. A worker that listens
  anywhere else, or runs without the shim it was given, is killed at once.

  Returns:
    The (ip, port) addresses it listens on (not checked for an exposed worker).

  Raises:
    WorkerSetupError: one line saying what was found and how to fix it.
  """
  deadline = time.time() + timeout
  listening = _listening(proc.pid)
  while not any(a.port == port for a in listening) and proc.poll() is None:
    if time.time() > deadline:
      break
    time.sleep(0.05)
    listening = _listening(proc.pid)
  if not any(a.port == port for a in listening):
    # worker_binary logs a failed bind (port in use) and exits 0: never report it started.
    code = proc.poll()
    if code is None:
      proc.kill()
      proc.wait()
    how = f"exited (code {code})" if code is not None else f"did not listen within {timeout:g} s"
    raise WorkerSetupError(
      f"TFF's worker_binary (pid {proc.pid}) {how} without listening on port {port}: is the "
      "port in use? Stop what holds it or pick another --port."
    )
  if getattr(proc, "exposed", False):
    return listening
  shim = proc.loopback_shim
  wide = [f"{a.ip}:{a.port}" for a in listening if not _is_loopback(a.ip)]
  problem = f"listens on {', '.join(wide)}" if wide else None
  if problem is None and not _maps_hold(proc.pid, shim):
    problem = "runs without its loopback shim"
  if problem:
    proc.kill()
    proc.wait()
    raise WorkerSetupError(
      f"TFF's worker_binary (pid {proc.pid}) {problem}: not confined to loopback, so it "
      f"was stopped; remove {shim} (it is rebuilt on the next run) and {HOW_TO_FIX}."
    )
  return listening


def main(argv=None) -> int:
  """`python -m tf_dlg.execution.worker --port=8000 [--expose]`: a remote worker."""
  parser = argparse.ArgumentParser(
    prog="python -m tf_dlg.execution.worker",
    description="TFF worker_binary for --workers=host:port (no authentication).",
  )
  parser.add_argument("--port", type=int, default=8000, help="Port (1-65535).")
  parser.add_argument(
    "--expose", action="store_true", help="Listen on every interface instead of loopback only."
  )
  args = parser.parse_args(argv)
  if not 0 < args.port < 65536:
    parser.error(f"--port={args.port} must be an integer in [1, 65535].")
  try:
    proc = spawn_worker(args.port, expose=args.expose, stdout=sys.stdout, stderr=sys.stderr)
    listening = verify_confined(proc, args.port)
  except WorkerSetupError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  where = ", ".join(f"{a.ip}:{a.port}" for a in listening) or f"port {args.port}"
  where = (
    f"EVERY interface (unauthenticated!): {where}"
    if proc.exposed
    else f"loopback only (checked: {where})"
  )
  print(
    f"TFF worker pid {proc.pid} listening on {where}; Ctrl-C stops it.",
    file=sys.stderr,
    flush=True,
  )
  signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    return proc.wait()
  except KeyboardInterrupt:
    # worker_binary may take long to shut its gRPC server down on SIGINT (or miss it
    # while starting): a bounded wait, then SIGKILL.
    proc.send_signal(signal.SIGINT)
    try:
      return proc.wait(3)
    except subprocess.TimeoutExpired:
      proc.kill()
      return proc.wait()


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


if __name__ == "__main__":
  sys.exit(main())
