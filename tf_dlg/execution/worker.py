r"""TFF's C++ worker_binary, confined to loopback and tied to the life of its parent.

TFF 0.87's `worker_binary` serves its executor (which runs any TensorFlow graph it is
sent) on `[::]:PORT` with no authentication, and has no bind-address flag. Every worker
tf-dlg starts is therefore launched with `loopback_shim.c` preloaded (LD_PRELOAD, in the
worker only): its `bind()` turns an any-address into loopback, and it kills the worker
when the process that started it dies (also on SIGKILL, which no Python handler sees).
The shim is compiled once with the system C compiler into
`~/.cache/tf_dlg/loopback_shim-<source hash>.so` (`$XDG_CACHE_HOME` respected).

No C compiler: a one-line error says to install one (e.g. `apt-get install gcc`); setting
`TF_DLG_ALLOW_EXPOSED_WORKER=1` runs the worker unconfined instead, with a warning.

Remote workers (a driver's `--workers=host:port`) are started with this module:

    python -m tf_dlg.execution.worker --port=8000            # loopback only (default)
    python -m tf_dlg.execution.worker --port=8000 --expose   # every interface

Keep the default and reach the worker through an SSH tunnel, a TLS-terminating proxy or
a private network namespace; `--expose` is for networks where every host is trusted.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import warnings

ALLOW_EXPOSED_ENV = "TF_DLG_ALLOW_EXPOSED_WORKER"
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


_SHIM_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loopback_shim.c")
_PR_SET_PDEATHSIG = 1
_SHIM_LOCK = threading.Lock()


class WorkerSetupError(RuntimeError):
  """The loopback shim cannot be built (no C compiler) and exposure was not allowed."""


def worker_binary_path() -> str:
  """Path of TFF's `worker_binary`, found without importing TFF (fast)."""
  spec = importlib.util.find_spec("tensorflow_federated")
  if spec is None or not spec.submodule_search_locations:
    raise WorkerSetupError("tensorflow_federated is not installed: pip install -e .")
  return os.path.join(list(spec.submodule_search_locations)[0], "data", "worker_binary")


def _cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "tf_dlg")


def _compiler():
  for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
    if name:
      for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        path = os.path.join(d, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
          return path
  return None


def _compile(source: str, target: str, compiler: str) -> None:
  """Compiles `source` to the shared object `target` (atomically: tmp + rename)."""
  os.makedirs(os.path.dirname(target), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="loopback_shim.", suffix=".so", dir=os.path.dirname(target))
  os.close(fd)
  try:
    proc = subprocess.run(
      [compiler, "-shared", "-fPIC", "-O2", "-o", tmp, source, "-ldl", "-lpthread"],
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
    )
    if proc.returncode != 0:
      raise WorkerSetupError(
        f"{compiler} could not build the worker's loopback shim ({_SHIM_SOURCE}): "
        f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
      )
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def shim_path():
  """The compiled loopback shim (built on first use), or None if exposure is allowed.

  Raises:
    WorkerSetupError: No C compiler and `TF_DLG_ALLOW_EXPOSED_WORKER` is not set.
  """
  with open(_SHIM_SOURCE, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:16]
  target = os.path.join(_cache_dir(), f"loopback_shim-{digest}.so")
  with _SHIM_LOCK:
    if os.path.isfile(target):
      return target
    compiler = _compiler()
    if compiler is None:
      if os.environ.get(ALLOW_EXPOSED_ENV) == "1":
        return None
      raise WorkerSetupError(
        "tf-dlg needs a C compiler (cc) to confine TFF's worker_binary to loopback: "
        f"install gcc (e.g. apt-get install gcc), or set {ALLOW_EXPOSED_ENV}=1 to run "
        "it listening on every interface (unauthenticated; trusted networks only)."
      )
    try:
      _compile(_SHIM_SOURCE, target, compiler)
    except OSError:  # unwritable cache: a private temporary directory instead
      target = os.path.join(
        tempfile.gettempdir(), f"tf_dlg-{os.getuid()}", os.path.basename(target)
      )
      if not os.path.isfile(target):
        _compile(_SHIM_SOURCE, target, compiler)
  return target


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


def worker_env(expose: bool = False, parent: int = None) -> dict:
  """The environment of a worker: the shim preloaded unless `expose`."""
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
        stacklevel=2,
      )
    return env
  env["LD_PRELOAD"] = " ".join(p for p in (shim, env.get("LD_PRELOAD", "")) if p)
  return env


def spawn_worker(
  port: int, *, expose: bool = False, extra_args=(), stdout=None, stderr=None
) -> subprocess.Popen:
  """Starts `worker_binary --port=PORT` (loopback only unless `expose`).

  The worker gets a parent-death signal (from the shim, or a preexec prctl when
  exposed without it) and, through the shim, a watchdog on its parent's pid, so it
  never outlives the process that started it.
  """
  args = [worker_binary_path(), f"--port={int(port)}", *extra_args]
  env = worker_env(expose)
  # With the shim its constructor sets the parent-death signal after exec, which is
  # safe in a threaded parent; a preexec_fn (Python in the forked child) only without.
  preexec = None if "loopback_shim" in env.get("LD_PRELOAD", "") else _parent_death_signal()
  return subprocess.Popen(
    args,
    env=env,
    preexec_fn=preexec,
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL if stdout is None else stdout,
    stderr=subprocess.DEVNULL if stderr is None else stderr,
  )


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
  except WorkerSetupError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  where = "EVERY interface (unauthenticated!)" if args.expose else "loopback only"
  print(
    f"TFF worker pid {proc.pid} on port {args.port}, {where}; Ctrl-C stops it.",
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
