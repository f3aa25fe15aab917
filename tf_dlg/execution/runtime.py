"""Importing TFF with a confined local worker that never outlives its run.

TFF 0.87 runs every computation in a C++ `worker_binary` child reached over gRPC (the
pip build has no in-process executor). Its own default context starts that child on
`[::]` (every interface, no authentication) and stops it in a `__del__` that fails at
interpreter shutdown. `import_tff()` therefore replaces the default context with
`local_context.create_local_context`: the worker is started by `tf_dlg.execution.worker`
(loopback only, killed when this process dies, even by SIGKILL), and `atexit` hooks stop
it.

Execution targets (`create_execution_context`, `execution_target`): "local" means one
worker child; "remote" means workers you start yourself on other machines:

    # on each worker machine: loopback only by default -- reach it through an SSH tunnel
    # or TLS proxy, or add --expose on a network where every host is trusted
    python -m tf_dlg.execution.worker --port=8000
    # on the driver
    python -m experiments.federated --workers=host1:8000,host2:8000 ...

One address runs every computation there; several split each round's clients into one
subround per worker (TFF's `MergeableCompExecutionContext`) and merge the partial
aggregates at the driver.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import time
from typing import Optional

from tf_dlg.execution import local_context

_HOOKED = False


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
      ppid = int(stat.rsplit(")", 1)[1].split()[1])
      if ppid != me:
        continue
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        if b"worker_binary" in f.read():
          pids.append(int(entry))
    except (OSError, ValueError, IndexError):
      continue
  return pids


def _release_default_context():
  """Drops TFF's default context while the interpreter is intact.

  Its service manager then stops the worker itself (SIGINT + wait) instead of failing
  in `__del__` at shutdown with "'NoneType' object has no attribute 'Popen'".
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
    # reaped it (e.g. a test session's final sweep), that is ProcessLookupError: fine.
    if not isinstance(unraisable.exc_value, ProcessLookupError):
      previous_hook(unraisable)

  sys.unraisablehook = quiet_hook
  try:
    # Stop the workers first, with a bounded SIGINT-then-SIGKILL: the service manager's
    # own __del__ SIGINTs and then waits without a timeout, which hangs the exit when a
    # busy worker ignores SIGINT (seen under load in CI-like runs).
    stop_tff_workers()
    context_stack_impl.context_stack.set_default_context(
      runtime_error_context.RuntimeErrorContext()
    )
    gc.collect()
  finally:
    sys.unraisablehook = previous_hook


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


def import_tff():
  """Imports and returns `tensorflow_federated`, with a confined local worker.

  On first use it replaces TFF's default context (whose worker would listen on every
  interface) by `local_context.create_local_context`, and installs the worker clean-up
  hooks.
  """
  global _HOOKED
  import tensorflow_federated as tff

  if not _HOOKED:
    _HOOKED = True
    tff.framework.set_default_context(local_context.create_local_context(tff))
    atexit.register(stop_tff_workers)
    # atexit runs hooks last-in first-out: release the context first, then sweep.
    atexit.register(_release_default_context)
  return tff


def install_context():
  """Installs the loopback-only local context (once) and returns `tensorflow_federated`.

  Drivers call it when a run starts; importing a `tf_dlg` module never does, so a TFF
  program that imports `tf_dlg` keeps the context it set until it calls this.
  """
  return import_tff()


# --------------------------------------------------------------------------- execution targets


def parse_workers(workers) -> list:
  """Normalises `host:port[,host:port...]` (a string or a list) to a list of addresses."""
  if workers is None:
    return []
  if isinstance(workers, str):
    workers = [w for w in workers.split(",") if w.strip()]
  out = []
  for address in workers:
    address = str(address).strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"Worker address {address!r} must be host:port with a port in [1, 65535].")
    out.append(address)
  return out


def _unreachable(address: str, why: str) -> str:
  port = address.rpartition(":")[2]
  from tf_dlg.execution import worker

  return (
    f"no TFF worker answers at {address} ({why}); start one on that machine with "
    f"`{worker.WORKER_COMMAND.format(port=port)}` (loopback only: reach it through an SSH "
    "tunnel, or add --expose on a trusted network; the protocol has no authentication)."
  )


def check_workers(workers, timeout: float = 5.0) -> list:
  """The worker addresses, each checked to accept a TCP connection within `timeout` s.

  A driver calls it with the flags, before any data loads: an address nobody listens on
  is one line at once, not a gRPC wait and a traceback after the work began.
  """
  import socket

  from tf_dlg.execution import worker

  addresses = parse_workers(workers)
  for address in addresses:
    host, _, port = address.rpartition(":")
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
      raise worker.WorkerUnavailable(_unreachable(address, e.strerror or str(e))) from None
  return addresses


# Seconds one call to a remote worker may take (a round's computation is one call) before
# the run fails with one line; drivers set it from --worker_timeout.
CALL_TIMEOUT = 600.0


def _deadline(address: str, seconds: float):
  """A gRPC client interceptor: every call to a worker gets a deadline of `seconds`, and
  one that outlives it is `WorkerUnavailable` (a stopped or dead worker never answers)."""
  import grpc

  from tf_dlg.execution import worker

  class Deadline(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(self, continuation, details, request):
      # wait_for_ready: a worker that is gone waits out the deadline (then one line)
      # instead of failing UNAVAILABLE, which TFF retries forever.
      if details.timeout is None:
        details = details._replace(timeout=seconds, wait_for_ready=True)
      outcome = continuation(details, request)
      try:
        outcome.result()
      except grpc.RpcError as e:
        if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
          raise worker.WorkerUnavailable(
            f"the TFF worker at {address} did not answer within {seconds:g} s "
            "(stopped, hung or dead); restart it and rerun the command to resume."
          ) from None
      return outcome

  return Deadline()


def _remote_executor_factory(address: str, timeout: float, call_timeout: Optional[float] = None):
  """A TFF executor factory whose executors run on the worker at `address`."""
  import grpc

  from tf_dlg.execution import worker

  tff = import_tff()
  channel = grpc.insecure_channel(address, local_context.GRPC_OPTIONS)
  call_timeout = CALL_TIMEOUT if call_timeout is None else call_timeout
  channel = grpc.intercept_channel(channel, _deadline(address, call_timeout))
  stub = tff.framework.RemoteExecutorGrpcStub(channel)
  deadline = time.time() + timeout
  while not stub.is_ready:
    if time.time() > deadline:
      raise worker.WorkerUnavailable(_unreachable(address, f"not ready after {timeout:.0f} s"))
    time.sleep(0.1)
  return local_context.executor_factory(tff, lambda: stub)


def create_execution_context(workers=None, timeout: float = 30.0):
  """A TFF execution context for local simulation or for remote workers.

  Args:
    workers: None or empty for TFF's default local context (it starts one
      worker_binary child, stopped at exit by `import_tff`'s hook). One address
      `host:port`: every computation runs on that worker. Several: a
      `MergeableCompExecutionContext` splits the clients of each round into one
      subround per worker and merges the partial aggregates (this needs the
      aggregators to be mergeable, as `tff.federated_aggregate`-based ones are).
    timeout: Seconds to wait for each worker to answer.

  Returns:
    A `tff` sync context (set it with `tff.framework.set_default_context`).

  Workers are TFF's own C++ executor service, started on each machine with
  `python -m tf_dlg.execution.worker --port=8000` (loopback only unless `--expose`; the
  protocol has no authentication, see `tf_dlg.execution.worker`).
  """
  tff = import_tff()
  addresses = parse_workers(workers)
  if not addresses:
    return local_context.create_local_context(tff)
  kwargs = local_context.context_kwargs()
  if len(addresses) == 1:
    return tff.framework.SyncExecutionContext(
      executor_fn=_remote_executor_factory(addresses[0], timeout), **kwargs
    )
  async_contexts = [
    tff.framework.AsyncExecutionContext(executor_fn=_remote_executor_factory(a, timeout), **kwargs)
    for a in addresses
  ]
  return tff.backends.native.create_mergeable_comp_execution_context(async_contexts)


class execution_target:  # lowercase: used like a function, `with execution_target(...)`
  """Context manager: run TFF computations on `workers` (see `create_execution_context`).

  On exit the previous default context is restored and, for remote workers, the
  channels are dropped; local worker_binary children are left to `import_tff`'s hook.
  """

  def __init__(self, workers=None, timeout: float = 30.0):
    self._workers = parse_workers(workers)
    self._timeout = timeout
    self._previous = None

  def __enter__(self):
    tff = import_tff()
    if not self._workers:
      return None
    self._previous = tff.framework.get_context_stack().current
    tff.framework.set_default_context(create_execution_context(self._workers, self._timeout))
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      tff = import_tff()
      tff.framework.set_default_context(self._previous)
      gc.collect()
    return False


def start_local_worker(port: int = 0, expose: bool = False):
  """Starts a worker_binary on this machine; returns (Popen, "127.0.0.1:port").

  For tests and single-machine demos of the remote path. Loopback only unless `expose`
  (checked once it listens); it dies with this process. The caller should stop it (`stop_worker`).
  """
  import portpicker

  from tf_dlg.execution import worker

  port = port or portpicker.pick_unused_port()
  proc = worker.spawn_worker(port, expose=expose)
  worker.verify_confined(proc, port)
  return proc, f"127.0.0.1:{port}"


def stop_worker(proc, timeout: float = 10.0) -> None:
  """Stops a worker started by `start_local_worker` (SIGINT, then SIGKILL)."""
  if proc.poll() is not None:
    return
  proc.send_signal(signal.SIGINT)
  try:
    proc.wait(timeout)
  except Exception:
    proc.kill()
    proc.wait(timeout)
