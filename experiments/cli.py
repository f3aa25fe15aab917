"""The command-line layer every driver shares.

A driver does:

    from experiments import cli          # first: quiet, correctly ordered TensorFlow import
    from absl import flags
    cli.define_output_dir("outputs/x")
    cli.define_enum_list("datasets", ["digits"], data.DATASETS, "Datasets.")
    ...
    def main(argv): ...
    if __name__ == "__main__":
      cli.run(main)

and gets, for free: flags whose bounds and allowed values are declared on the flag,
one-line errors with exit code 2 for a bad flag (at parse time) or a `ValueError` raised
by `main` before it calls `cli.work_begins()` (after its checks; a `UsageError` is one
line at any time), SIGTERM handled like Ctrl-C (clean-up code runs), and no TensorFlow
start-up noise. A `ValueError` raised once the work has begun is a bug, not bad input:
it keeps its traceback. A worker that stops answering is one line, exit code 1.
"""

from __future__ import annotations

import atexit
import errno
import os
import signal
import sys
import threading
from typing import Callable, Iterable, Sequence

# TensorFlow reads its C++ log level once, at import; entry points (not the library, and not
# users' shells) silence its INFO/WARNING pages.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Known start-up noise of the TF 2.14 CPU wheel (a stdlib-only module: no TF import yet).
from tf_dlg.execution import shim as _shim  # noqa: E402
from tf_dlg.execution import worker as _worker  # noqa: E402

_NOISE = _worker.TF_STARTUP_NOISE


def _import_tensorflow_quietly():
  """Imports TensorFlow with its C++ stderr filtered through `_NOISE`."""
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  import tempfile

  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as buf:
    os.dup2(buf.fileno(), 2)
    try:
      import tensorflow as tf
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      buf.seek(0)
      kept = [
        line
        for line in buf.read().decode(errors="replace").splitlines(True)
        if not any(n in line for n in _NOISE)
      ]
      sys.stderr.write("".join(kept))
  return tf


# TensorFlow must be imported before absl's `app.run` initialises (logging handler, flag
# parsing, faulthandler): imported after it, Keras builds functional layers eagerly and
# `Flatten` fails on the unknown batch dimension. Measured on TF 2.14.1 / Keras 2.14; the
# exact interaction inside Keras was not pinned down, so the import order is kept here,
# once, for every driver.
tf = _import_tensorflow_quietly()

from absl import app, flags, logging  # noqa: E402
from tensorflow.python.util import deprecation as _deprecation  # noqa: E402

FLAGS = flags.FLAGS


class UsageError(ValueError):
  """A bad argument found by a driver before it starts work."""


# Whether the running driver has finished its checks (`work_begins`).
_WORK_BEGUN = threading.Event()


def work_begins() -> None:
  """Every flag is checked: from here a `ValueError` is a bug and keeps its traceback.

  Also takes the run lock of `--output_dir` (`tf_dlg.io.lock_directory`): a folder that
  another live run writes is one line, exit 2; a lock left by a dead run is taken over.
  """
  if "output_dir" in FLAGS and FLAGS.output_dir:
    from tf_dlg import io as io_lib

    try:
      io_lib.lock_directory(FLAGS.output_dir)
    except io_lib.DirectoryInUse as e:
      fail(str(e))
  _WORK_BEGUN.set()


def define_enum_list(
  name: str, default: Sequence[str], choices: Iterable[str], help_text: str
) -> None:
  """A comma-separated list flag whose every element must be one of `choices`."""
  choices = list(choices)
  flags.DEFINE_list(name, list(default), f"{help_text} Any of: {', '.join(choices)}.")

  def check(values):
    bad = [v for v in values or [] if v not in choices]
    if bad:
      # absl prefixes "flag --name=[...]: ", so the message names only the bad values.
      raise flags.ValidationError(f"{', '.join(bad)} not one of {', '.join(choices)}")
    return True

  flags.register_validator(name, check)


def define_output_dir(default: str) -> None:
  flags.DEFINE_string(
    "output_dir",
    default,
    "Output directory (resumed if it holds a run "
    "of the same configuration; another configuration is refused).",
  )


def define_seed() -> None:
  flags.DEFINE_integer("seed", 0, "Seed of everything random in the run.", lower_bound=0)


def define_data_dir() -> None:
  flags.DEFINE_string("data_dir", None, "tfds data directory (tfds datasets only; must exist).")


def require_confined_worker() -> None:
  """For drivers that train: TFF's local worker can be confined to loopback, or exit 2 now.

  Builds (once) and verifies the worker's loopback shim, so a missing or broken C compiler,
  or an untrusted shim directory, is one line before any data is read, not an error at the
  first training round minutes later. `TF_DLG_ALLOW_EXPOSED_WORKER=1` waives it.
  """
  try:
    _shim.shim_path()
  except _shim.WorkerSetupError as e:
    raise UsageError(str(e)) from None


def fail(message: str, code: int = 2) -> None:
  """Prints one line `error: message` to stderr and exits with `code`."""
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  raise SystemExit(code)


def _parse(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


_TERMINATING = threading.Event()


def _terminate(signum, frame):
  # Raised in the main thread, so `finally` blocks and context managers (closing summary
  # writers, saving results) run as on Ctrl-C.
  del frame
  raise KeyboardInterrupt(f"signal {signum}")


def _stop_workers_on_sigterm() -> None:
  """Stops local TFF workers as soon as SIGTERM arrives, from a helper thread.

  Python runs a signal handler only when the main thread returns to bytecode; during a
  TFF round the main thread waits inside a C++ gRPC call, possibly for many seconds. The
  wakeup fd is written by the C-level handler at once, so this thread sees the signal
  immediately and stops the workers (they keep no state: checkpoints live here).
  """
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

  def watch():
    while True:
      received = os.read(read_fd, 64)
      if signal.SIGTERM in received:
        _TERMINATING.set()
        runtime = sys.modules.get("tf_dlg.execution.runtime")
        if runtime is not None:
          runtime.stop_tff_workers(timeout=1.0)

  threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()


def _interrupted() -> None:
  """Exit 130 at once: clean-up hooks run, the interpreter's teardown does not.

  By now every `finally` block has run and the atexit hooks stop the workers; what is
  left is the interpreter's final garbage collection of TensorFlow's object graph, which
  takes seconds (measured: 4-7 s after a TFF round) and saves nothing.
  """
  sys.stderr.write("interrupted; finished work is kept, rerun the same command to resume\n")
  sys.stdout.flush()
  sys.stderr.flush()
  atexit._run_exitfuncs()
  os._exit(130)


def _one_line(e: BaseException) -> None:
  """Exits with one line for bad input, set-up problems and lost workers; else returns."""
  message = (str(e).strip().splitlines() or [type(e).__name__])[0]
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
    where = f" writing {e.filename}" if e.filename else ""
    fail(
      f"no space left on the device{where} ({e.strerror}); free some and rerun the same "
      "command: finished work is kept and resumed.",
      code=1,
    )
  if isinstance(e, _worker.WorkerUnavailable):
    fail(message, code=1 if _WORK_BEGUN.is_set() else 2)
  usage = isinstance(e, ValueError) and not _WORK_BEGUN.is_set()
  if usage or isinstance(e, (UsageError, _shim.WorkerSetupError)):
    fail(message)


def run(main: Callable[[list], object]) -> None:
  """`app.run(main)` with one-line errors (exit 2) and SIGTERM handled like SIGINT."""

  def guarded(argv):
    logging.set_verbosity(logging.WARNING)
    # TensorFlow's logger also propagates to absl's root handler: each warning would
    # print twice. And its deprecation notices name TF / Keras internals a user of
    # these drivers cannot act on.
    tf.get_logger().propagate = False
    _deprecation.silence().__enter__()
    signal.signal(signal.SIGTERM, _terminate)
    _stop_workers_on_sigterm()
    _WORK_BEGUN.clear()
    try:
      return main(argv)
    except KeyboardInterrupt:
      _interrupted()
    except Exception as e:
      # Killing the workers on SIGTERM can fail the round in flight before the
      # KeyboardInterrupt arrives: that error is the interruption, not a bug.
      if _TERMINATING.is_set():
        _interrupted()
      _one_line(e)
      raise

  app.run(guarded, flags_parser=_parse)
