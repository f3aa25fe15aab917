"""The one import of TensorFlow Federated that tf-dlg's packages share.

It sits below both `tf_dlg.defenses` and `tf_dlg.federated` so that neither package
imports the other to reach TFF (`tf_dlg.federated.runtime` re-exports `import_tff`).

TFF 0.87's default execution context starts a C++ `worker_binary` child on the first
computation call and tries to stop it in a `__del__` that fails during interpreter
shutdown (module globals are already gone). The orphan keeps the parent's stdout open,
so a script piped into `tee` -- or CI -- hangs on it. `import_tff()` registers `atexit`
hooks that stop such children while the interpreter is intact.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import time

_HOOKED = False


def import_tff():
  """Imports and returns `tensorflow_federated`, with the worker clean-up hook installed."""
  global _HOOKED
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow_federated as tff  # about 6 s: only on first use

  if not _HOOKED:
    atexit.register(stop_tff_workers)
    # atexit runs hooks last-in first-out: release the context first, then sweep.
    atexit.register(_release_default_context)
    _HOOKED = True
  return tff


def _worker_children():
  """PIDs of this process's children whose executable is TFF's worker_binary."""
  me = os.getpid()
  pids = []
  for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", "rb") as f:
        stat = f.read().decode(errors="replace")
      if int(stat.rsplit(")", 1)[1].split()[1]) != me:
        continue
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        if b"worker_binary" in f.read():
          pids.append(int(entry))
    except (OSError, ValueError, IndexError):
      continue
  return pids


def stop_tff_workers(timeout: float = 5.0) -> int:
  """Stops this process's TFF worker_binary children; returns how many were found."""
  pids = _worker_children()
  for sig in (signal.SIGINT, signal.SIGKILL):
    for pid in pids:
      try:
        os.kill(pid, sig)
      except ProcessLookupError:
        pass
    deadline = time.time() + timeout
    while time.time() < deadline:
      alive = []
      for pid in pids:
        try:
          done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
          done = pid
        if not done:
          alive.append(pid)
      if not alive:
        return len(pids)
      time.sleep(0.05)
  return len(pids)


def _release_default_context():
  """Drops TFF's default context while the interpreter is intact.

  Its service manager then stops the worker itself instead of failing in `__del__` at
  shutdown with "'NoneType' object has no attribute 'Popen'".
  """
  if "tensorflow_federated" not in sys.modules:
    return
  from tensorflow_federated.python.core.impl.context_stack import (
    context_stack_impl,
    runtime_error_context,
  )

  previous_hook = sys.unraisablehook

  def quiet_hook(unraisable):
    # The service manager's __del__ SIGINTs its worker; if `stop_tff_workers` already
    # reaped it, that is ProcessLookupError: fine.
    if not isinstance(unraisable.exc_value, ProcessLookupError):
      previous_hook(unraisable)

  sys.unraisablehook = quiet_hook
  try:
    # Bounded SIGINT-then-SIGKILL first: the service manager's own __del__ SIGINTs and
    # then waits without a timeout, which hangs the exit on a worker that ignores SIGINT.
    stop_tff_workers()
    context_stack_impl.context_stack.set_default_context(
      runtime_error_context.RuntimeErrorContext()
    )
    gc.collect()
  finally:
    sys.unraisablehook = previous_hook
