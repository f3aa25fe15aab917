"""Training beside the pipeline: the convergence runs whose settings are known.

The search's attacks run in the pipeline's process, a FedAvg round in a TFF worker; each
leaves part of the 2 cores idle (measured side by side: the search at 0.71 and training
at 0.54 of their speed alone, 1.25x the work per second; two trainers: 1.3x the runs per
second of one). So a child process trains: the undefended baseline at once (it needs no
threshold), each defence once its cell is searched (`TrainBeside.offer`, after every
cell), and, with TFF, on through the convergence stage, which trains the same grid from
its other end. Both go through the same `Convergence` run folders, each holding the run
it trains (`run_store.hold`); the stage reads the child's runs as finished ones (resume),
so every number is that of a run trained alone. A grid whose settings are all known at
the start (the frontier's, `experiments.convergence`'s) gets its child from `training`.

A child process, not a thread: Keras models built while another thread traces a TFF
computation in a `tf.Graph` context fail ("Layer or Model is in an invalid state"). It
is started with `python -m tf_dlg.study.beside` (not `multiprocessing`, whose spawn
re-runs the caller's unguarded `__main__` script) and talks through pipes: pickled
parameter sets in, one pickled result out.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import subprocess
import sys
import threading
from typing import Any, Callable, Dict, Optional, Tuple

Params = Dict[str, Tuple[float, str]]


class TrainBeside:
  """Runs `make(params).train(stop)` in a child process for each newest `params`.

  `make` must be picklable (e.g. a `functools.partial` of a module-level function); it
  returns a `tf_dlg.study.convergence.Convergence`. The child starts with `{}` (the
  baseline only). `finish()` lets the run in flight end and raises the child's error;
  `offer` raises it too, so a refused run folder stops the search after its cell.
  """

  def __init__(self, make: Callable[[Params], Any]):
    self._sent: Params = {}
    self._result: Optional[Tuple[str, Any]] = None
    self.trained = 0
    from tf_dlg.execution import worker

    stderr = worker.filtered_stderr()  # without TensorFlow's known start-up noise
    try:
      self._process = subprocess.Popen(
        [sys.executable, "-m", "tf_dlg.study.beside"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
      )
    finally:
      os.close(stderr)
    self._send(make)
    self._send({})

  def _send(self, message) -> None:
    try:
      pickle.dump(message, self._process.stdin)
      self._process.stdin.flush()
    except (BrokenPipeError, OSError):  # the child has ended: its result says why
      self._wait_result()

  def offer(self, params: Params) -> None:
    """The parameters known now (a label, once given, keeps its value)."""
    moved = [k for k in params if k in self._sent and params[k] != self._sent[k]]
    if moved:
      raise RuntimeError(f"convergence parameters {moved} changed during the search.")
    if self._process.poll() is not None:
      self._wait_result()
    if params != self._sent:
      self._sent = dict(params)
      self._send(self._sent)

  def stop(self, wait: bool = True) -> None:
    """Starts no further run; with `wait`, returns once the run in flight has ended,
    else kills the child at once (a resumed run redoes that run's unsaved rounds)."""
    if self._process.poll() is None:
      if wait:
        self._send(None)
      else:
        self._process.kill()
    self._process.wait()

  def finish(self) -> None:
    """`stop()`, then raises the child's error, if any."""
    self.stop()
    self._wait_result()

  def _wait_result(self) -> None:
    if self._result is None:
      out = self._process.stdout.read()
      self._process.wait()
      try:
        self._result = pickle.loads(out)
      except Exception:
        self._result = ("error", RuntimeError(_no_result(self._process.returncode)))
    kind, value = self._result
    if kind == "error":
      raise value
    self.trained = value


def _whole_grid(grid, params):
  del params  # a grid fixed in advance: every offer trains the same one
  return grid


@contextlib.contextmanager
def training(grid, enabled: bool = True):
  """While the block runs, a child process trains `grid`, a `Convergence` fixed in
  advance (the frontier's, a convergence driver's), from its front.

  The block ends with `grid.run()`, which trains from the end and reads the child's runs.
  Yields the `TrainBeside` (`trained` is set once the block has ended), or None when not
  `enabled` (Flower: Ray already keeps both cores busy).
  """
  if not enabled:
    yield None
    return
  child = TrainBeside(functools.partial(_whole_grid, grid))
  try:
    yield child
  except BaseException as e:
    child.stop(wait=not isinstance(e, KeyboardInterrupt))
    raise
  child.finish()


def _no_result(code: int) -> str:
  """Why the child left no result: killed by a signal (it printed nothing), or its exit code."""
  if code < 0:
    import signal

    try:
      name = signal.Signals(-code).name
    except ValueError:
      name = f"signal {-code}"
    return (
      f"the training beside the search was killed by {name} before it finished (no error "
      "of its own); rerun the same command to resume."
    )
  return (
    f"the training beside the search ended with exit code {code} and no result "
    "(whatever it printed is above)."
  )


def main() -> None:
  """The child: reads `make`, then parameter sets (None: stop); trains the newest."""
  import atexit

  from tf_dlg.execution import worker

  worker.die_with_parent()
  # Quiet as the drivers: the run's own messages only (no deprecation pages).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.getLogger("tensorflow").setLevel(logging.ERROR)
  inbox, result_out = sys.stdin.buffer, sys.stdout.buffer
  sys.stdout = sys.stderr  # the pipe carries only the result
  latest, changed, stopping = [None], threading.Condition(), threading.Event()

  def read():
    while True:
      try:
        message = pickle.load(inbox)
      except EOFError:  # the parent has gone
        message = None
      with changed:
        if message is None:
          stopping.set()
        else:
          latest[0] = message
        changed.notify()
      if message is None:
        return

  trained = 0
  try:
    make = pickle.load(inbox)
    threading.Thread(target=read, daemon=True).start()
    done_for = None
    while True:
      with changed:
        while not stopping.is_set() and latest[0] == done_for:
          changed.wait()
        if stopping.is_set():
          break
        params = latest[0]
      trained += make(params).train(stop=stopping.is_set)
      done_for = params
    result = ("ok", trained)
  except BaseException as e:  # re-raised in the parent by offer / finish
    result = ("error", e)
    try:
      pickle.dumps(e)
    except Exception:  # not picklable: its text is the message
      result = ("error", RuntimeError(f"{type(e).__name__}: {e}"))
  result_out.write(pickle.dumps(result))
  result_out.flush()
  # Clean-up hooks (the TFF worker), without the seconds TensorFlow's teardown takes.
  atexit._run_exitfuncs()
  os._exit(0)


if __name__ == "__main__":
  main()
