"""The local TFF execution context: one loopback-only worker_binary child per context.

`LocalWorker` plays TFF's local `ServiceManager`, but its worker is started by
`tf_dlg.execution.worker` (loopback only, killed when this process dies); the contexts
are TFF's native C++ ones (`context_kwargs`, `executor_factory`), shared with the remote
targets of `tf_dlg.execution.runtime`. Callers pass the `tff` module that
`runtime.import_tff()` returned, so the clean-up hooks are installed before any worker
starts.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Optional

GRPC_OPTIONS = [
  ("grpc.max_message_length", 2 * 1000 * 1000 * 1000),
  ("grpc.max_receive_message_length", 2 * 1000 * 1000 * 1000),
  ("grpc.max_send_message_length", 2 * 1000 * 1000 * 1000),
]


def context_kwargs() -> dict:
  """The compiler and argument transforms of TFF's native C++ contexts (sync and async)."""
  from tensorflow_federated.python.core.backends.native import compiler
  from tensorflow_federated.python.core.environments.tensorflow_frontend import (
    tensorflow_computation,
  )

  return dict(
    compiler_fn=compiler.desugar_and_transform_to_native,
    transform_args=tensorflow_computation.transform_args,
    transform_result=tensorflow_computation.transform_result,
  )


def executor_factory(tff, get_stub: Callable):
  """TFF's executor factory whose executors run on the worker that `get_stub()` reaches."""

  def stack_fn(cardinalities):
    # As TFF's local factory: computations without CLIENTS arguments run with 0 clients.
    if cardinalities.get(tff.CLIENTS) is None:
      cardinalities[tff.CLIENTS] = 0
    executor = tff.framework.RemoteExecutor(get_stub())
    executor.set_cardinalities(cardinalities)
    return executor

  return tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


class LocalWorker:
  """TFF's local `ServiceManager`, but the worker is confined (see `worker.py`).

  One worker_binary child on 127.0.0.1, started on the first computation call and
  restarted if it stops answering.
  """

  def __init__(self, tff, max_concurrent_computation_calls: int = -1):
    self._tff = tff
    self._args = (f"--max_concurrent_computation_calls={max_concurrent_computation_calls}",)
    self._process = None
    self._stub = None

  def get_stub(self):
    """A ready stub to the worker, starting (or restarting) the worker if needed."""
    import grpc
    import portpicker

    from tf_dlg.execution import shim, worker

    tff = self._tff
    if self._stub is not None and self._process.poll() is None and self._stub.is_ready:
      return self._stub
    self.stop()
    port = portpicker.pick_unused_port()
    stderr = worker.filtered_stderr()
    try:
      self._process = worker.spawn_worker(port, extra_args=self._args, stderr=stderr)
    finally:
      os.close(stderr)  # the child holds its own copy; EOF ends the pump with the child
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", GRPC_OPTIONS)
    self._stub = tff.framework.RemoteExecutorGrpcStub(channel)
    deadline = time.time() + 120
    while not self._stub.is_ready:
      if self._process.poll() is not None or time.time() > deadline:
        raise ConnectionError(
          f"The local TFF worker (pid {self._process.pid}) did not "
          f"start (exit code {self._process.poll()})."
        )
      time.sleep(0.1)
    try:
      worker.verify_confined(self._process, port)
    except shim.WorkerSetupError:
      self._process = self._stub = None
      raise
    return self._stub

  def stop(self, timeout: float = 5.0) -> None:
    """SIGINT, then SIGKILL after `timeout` s: never an unbounded wait."""
    proc, self._process, self._stub = self._process, None, None
    if proc is None or proc.poll() is not None:
      return
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, timeout)):
      try:
        proc.send_signal(sig)
        proc.wait(wait)
        return
      except ProcessLookupError:
        return
      except Exception:  # TimeoutExpired
        continue

  def __del__(self):
    try:
      self.stop()
    except Exception:  # interpreter shutdown
      pass


def default_concurrency() -> int:
  """Client computations the local worker runs at once: twice the usable CPU cores.

  TFF's default runs every client of a round at once; on a small CPU their threads
  only contend. Two per core keeps the cores busy while one client waits on another.
  """
  usable = (
    os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
  )
  return 2 * len(usable)


def create_local_context(tff, max_concurrent_computation_calls: Optional[int] = None):
  """TFF's sync local C++ context with a loopback-only, parent-bound worker.

  `tff`: the module `runtime.import_tff()` returned. `max_concurrent_computation_calls`:
  None for `default_concurrency()`; non-positive for no limit (TFF's default). Results
  do not depend on it.
  """
  if max_concurrent_computation_calls is None:
    max_concurrent_computation_calls = default_concurrency()
  service = LocalWorker(tff, max_concurrent_computation_calls)
  return tff.framework.SyncExecutionContext(
    executor_fn=executor_factory(tff, service.get_stub), **context_kwargs()
  )
