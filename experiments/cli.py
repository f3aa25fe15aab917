"""The command-line layer every driver shares.

A driver does:

    from experiments import cli          # first: quiet, correctly ordered TensorFlow import
    from absl import flags
    cli.define_output_dir("outputs/x")
    cli.define_enum_list("datasets", ["digits"], data.DATASETS, "Datasets.")
    cli.define_config_flags(FederatedConfig)   # a flag per field: its type, default, doc
    ...
    def main(argv): config = cli.config_from_flags(FederatedConfig); ...
    if __name__ == "__main__":
      cli.run(main)

and gets, for free: flags whose allowed values are declared on the flag (bounds: on a
hand-written flag, or the configuration's own check), one-line errors with exit code 2
for a bad flag (at parse time) or a `ValueError` raised by `main` before it calls
`cli.work_begins()` (after its checks; a `UsageError` is one line at any time) that names
the flags (the library names a configuration field by its path, `federated.batch_size`:
the line says `--batch_size`; `flag_names`), SIGTERM handled like Ctrl-C (clean-up code
runs), and no TensorFlow start-up noise. A `ValueError` raised once the work has begun is
a bug, not bad input: it keeps its traceback. A worker that stops answering is one line, exit code 1.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import inspect
import os
import re
import signal
import sys
import threading
import typing
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

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
  name: str,
  default: Optional[Sequence[str]],
  choices: Iterable[str],
  help_text: str,
  flag_values=FLAGS,
) -> None:
  """A comma-separated list flag whose every element must be one of `choices`."""
  choices = list(choices)
  default = None if default is None else list(default)
  flags.DEFINE_list(
    name, default, f"{help_text} Any of: {', '.join(choices)}.", flag_values=flag_values
  )

  def check(values):
    bad = [v for v in values or [] if v not in choices]
    if bad:
      # absl prefixes "flag --name=[...]: ", so the message names only the bad values.
      raise flags.ValidationError(f"{', '.join(bad)} not one of {', '.join(choices)}")
    return True

  flags.register_validator(name, check, flag_values=flag_values)


# Flags generated from a configuration dataclass (`define_config_flags`) --------------

# {(id(flag_values), class): (flag_values, {field: flag})} of the flags that
# `define_config_flags` defined (holding flag_values: its id is not reused).
_CONFIG_FLAGS: Dict[Tuple[int, type], Tuple[object, Dict[str, str]]] = {}
_ENTRY = re.compile(r"^(\s*)([a-z_]\w*(?:, [a-z_]\w*)*): (.*)$")


def attribute_help(cls) -> Dict[str, str]:
  """{field: text} of the `Attributes:` section of `cls`'s docstring.

  An entry is a line `name: text` (or `a, b: text`, the text of both); lines indented
  deeper continue it, any other line ends it.
  """
  lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
  start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
  helps, names, indent = {}, [], 0
  for line in lines[len(lines) if start is None else start + 1 :]:
    depth = len(line) - len(line.lstrip())
    if names and line.strip() and depth > indent:
      for name in names:
        helps[name] += " " + line.strip()
      continue
    entry = _ENTRY.match(line)
    names, indent = (entry.group(2).split(", "), len(entry.group(1))) if entry else ([], 0)
    for name in names:
      helps[name] = entry.group(3).strip()
  return helps


def _flag_type(hint):
  """(type, is a list) of a field's annotation: int, float, str or bool; Optional[X] and
  Union[X, ...] are X; Tuple[X, ...] a list of X (str if X is none of them)."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is typing.Union:
    return _flag_type(next(a for a in args if a is not type(None)))
  if origin in (tuple, list):
    element = args[0] if args and args[0] in (int, float, str) else str
    return element, True
  return (hint, False) if hint in (int, float, str, bool) else (None, False)


def _field_default(field):
  if field.default is not dataclasses.MISSING:
    return field.default
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  return None


_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool}


def _define_field(flag, kind, default, text, choices, flag_values) -> None:
  """One flag: `kind` is (type, is a list) of `_flag_type`."""
  element, many = kind
  if many and choices is not None:
    define_enum_list(flag, default, choices, text, flag_values=flag_values)
  elif many:
    default = None if default is None else [str(v) for v in default]
    flags.DEFINE_list(flag, default, text, flag_values=flag_values)
  elif choices is not None:
    flags.DEFINE_enum(flag, default, list(choices), text, flag_values=flag_values)
  else:
    _DEFINE.get(element, flags.DEFINE_string)(flag, default, text, flag_values=flag_values)


def define_config_flags(
  cls,
  fields: Optional[Iterable[str]] = None,
  *,
  names: Optional[Mapping[str, str]] = None,
  choices: Optional[Mapping[str, Iterable[str]]] = None,
  helps: Optional[Mapping[str, str]] = None,
  flag_values=FLAGS,
) -> None:
  """One absl flag per field of the dataclass `cls` (`fields`; default: every field of a
  flag's type), read back by `config_from_flags(cls)`.

  The flag's type is the field's (`_flag_type`; a Tuple is a list flag), its default the
  field's, its help the field's line of the `Attributes:` section (`helps` overrides);
  `choices` make an enum (list) flag; `names` name a flag other than its field. Errors
  that name the field's path (`attack.jit_compile`) name the flag (`--jit`) instead.
  """
  hints, docs = typing.get_type_hints(cls), attribute_help(cls)
  names, choices, helps = dict(names or {}), dict(choices or {}), dict(helps or {})
  wanted = None if fields is None else list(fields)
  known = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(wanted or ()) - set(known))
  if unknown:
    raise ValueError(f"{cls.__name__} has no fields {unknown}.")
  defined = _CONFIG_FLAGS.setdefault((id(flag_values), cls), (flag_values, {}))[1]
  for name, field in known.items():
    kind = _flag_type(hints[name])
    if (wanted is not None and name not in wanted) or (wanted is None and kind[0] is None):
      continue
    if kind[0] is None or not (helps.get(name) or docs.get(name)):
      raise ValueError(f"{cls.__name__}.{name}: no flag type or no help text.")
    flag = names.get(name, name)
    text = helps.get(name) or docs[name]
    _define_field(flag, kind, _field_default(field), text, choices.get(name), flag_values)
    defined[name] = flag
  section = getattr(sys.modules[cls.__module__], "SECTION", None)
  if section:
    register_flag_names({f"{section}.{k}": v for k, v in defined.items()})


def config_from_flags(cls, flag_values=FLAGS, **overrides):
  """The `cls` of the flags `define_config_flags(cls)` defined (checked as it is built);
  `overrides` replace fields."""
  hints, values = typing.get_type_hints(cls), {}
  for name, flag in _CONFIG_FLAGS[(id(flag_values), cls)][1].items():
    value = flag_values[flag].value
    if isinstance(value, list):
      value = tuple(_flag_type(hints[name])[0](v) for v in value)
    values[name] = value
  return cls(**{**values, **overrides})


# Errors name a configuration field by its path (`attack.iterations`, `federated.batch_size`)
# and a plain argument by its name; a driver's one-line error names its flag instead.
# {field path or registered argument name: flag name}
_FLAG_NAMES: Dict[str, str] = {}


def register_flag_names(mapping: Mapping[str, str]) -> None:
  """Errors naming a key (a field path `section.field`, or a plain argument `index`) name
  the flag of the value instead (`flag_names`). A field path not registered names `--field`."""
  _FLAG_NAMES.update(mapping)


# The configuration type of each section (its fields are the paths an error may name).
_SECTION_TYPES = {
  "attack": ("tf_dlg.attacks.runner", "AttackConfig"),
  "federated": ("tf_dlg.federated.config", "FederatedConfig"),
  "study": ("tf_dlg.study.presets", "Preset"),
}


def _section_fields(section: str):
  import importlib

  module, name = _SECTION_TYPES[section]
  try:
    return {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
  except (ImportError, AttributeError, TypeError):
    return set()


def flag_names(message: str) -> str:
  """`message` with field paths and registered argument names as the driver's flags:
  `federated.batch_size=0 ...` -> `--batch_size=0 ...`."""

  def path(m):
    known = m.group(0) in _FLAG_NAMES or m.group(2) in _section_fields(m.group(1))
    return f"--{_FLAG_NAMES.get(m.group(0), m.group(2))}" if known else m.group(0)

  message = re.sub(rf"(?<![\w.-])({'|'.join(_SECTION_TYPES)})\.([A-Za-z_]\w*)", path, message)
  plain = [re.escape(k) for k in _FLAG_NAMES if "." not in k]
  if plain:
    message = re.sub(
      rf"(?<![\w.-])({'|'.join(plain)})(?==)", lambda m: f"--{_FLAG_NAMES[m.group(1)]}", message
    )
  return message


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
    fail(flag_names(message))


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
