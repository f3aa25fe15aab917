"""Files: atomic writes, JSON of NumPy values, and "npz + JSON header" archives.

One place for the file formats of observed updates, checkpoints and results, so each is
written atomically (a kill leaves the old file or the new one, never half of one) and
read without pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Any, Dict, Optional, Tuple

import numpy as np


def jsonable(value):
  """`json.dumps(default=...)` hook for NumPy scalars and arrays; anything else raises."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"cannot store a {type(value).__name__} as JSON.")


def dumps(obj, **kwargs) -> str:
  return json.dumps(obj, default=jsonable, **kwargs)


def _umask() -> int:
  """The process umask, read without changing it where Linux shows it (thread-safe)."""
  try:
    with open("/proc/self/status", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _tmp_beside(path: str, suffix: str) -> str:
  """A new empty file beside `path`, with the mode a plain `open(path, "w")` would give."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=suffix, dir=directory)
  try:
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename
  finally:
    os.close(fd)
  return tmp


def _write_synced(path: str, text: str, mode: str = "w") -> None:
  """Writes `text` to `path` (opened with `mode`) and fsyncs it before returning."""
  with open(path, mode, newline="") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> str:
  """Writes `text` to a temporary file beside `path`, fsyncs it and renames it over."""
  tmp = _tmp_beside(path, ".tmp")
  try:
    _write_synced(tmp, text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def create_exclusive_text(path: str, text: str) -> bool:
  """Creates `path` holding `text` unless it exists; True if this call created it.

  Atomic and exclusive: the complete file is hard-linked into place, which fails if
  `path` exists, so of two processes creating it at once exactly one wins, and a kill
  never leaves a partial file.
  """
  tmp = _tmp_beside(path, ".tmp")
  try:
    _write_synced(tmp, text)
    try:
      os.link(tmp, path)
    except FileExistsError:
      return False
    except OSError:  # a file system without hard links: an exclusive open instead
      try:
        _write_synced(path, text, "x")
      except FileExistsError:
        return False
    return True
  finally:
    os.remove(tmp)


def loads(text: str, what: str):
  """`json.loads`, with input nested too deeply for the parser refused as a ValueError."""
  try:
    return json.loads(text)
  except RecursionError:
    raise ValueError(f"{what}: JSON nested too deeply to read; not a tf-dlg file.") from None


def write_json(path: str, obj, indent: int = 2) -> str:
  """Atomically writes `obj` as JSON (NumPy values as numbers / lists, see `jsonable`)."""
  return atomic_write_text(path, dumps(obj, indent=indent) + "\n")


def save_npz(
  path: str, header: Dict[str, Any], arrays: Dict[str, np.ndarray], compressed: bool = True
) -> str:
  """Atomically writes arrays plus a JSON `header` (a string array) to an .npz file."""
  if "header" in arrays:
    raise ValueError("'header' is reserved for the JSON header.")
  tmp = _tmp_beside(path, ".npz")
  try:
    save = np.savez_compressed if compressed else np.savez
    save(tmp, header=np.asarray(dumps(header)), **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def load_npz(
  path: str, expected_format: Optional[str] = None
) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """(header, arrays) of a file written by `save_npz`, never unpickling anything.

  Raises:
    ValueError: naming the file if it is missing, damaged, or of another format.
  """
  try:
    with np.load(path, allow_pickle=False) as z:
      header = loads(str(z["header"]), repr(path))
      arrays = {k: z[k] for k in z.files if k != "header"}
  except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"{path!r} is not a readable tf-dlg file ({type(e).__name__}: {e}).") from e
  if expected_format is not None and header.get("format") != expected_format:
    raise ValueError(f"{path!r} has format={header.get('format')!r}, expected {expected_format!r}.")
  return header, arrays


LOCK_NAME = ".tf_dlg.lock"
_HELD: Dict[str, int] = {}  # directory -> open descriptor holding its lock


class DirectoryInUse(ValueError):
  """Another live process runs in this output directory."""


def lock_directory(path: str) -> str:
  """Takes `path`'s run lock for the life of this process, or raises `DirectoryInUse`.

  Two runs writing one output folder would append duplicate points and doubled curves.
  The lock is an `flock` on `path/.tf_dlg.lock` holding the owner's pid: the kernel drops
  it when its process ends however it ends, so a lock left by a dead run is taken over,
  never refused. Child processes started by `subprocess` do not inherit it. Returns the
  lock file's path; locking a directory this process holds already is a no-op.
  """
  import fcntl

  path = os.path.abspath(path)
  if path in _HELD:
    return os.path.join(path, LOCK_NAME)
  os.makedirs(path, exist_ok=True)
  lock = os.path.join(path, LOCK_NAME)
  fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    os.close(fd)
    raise DirectoryInUse(
      f"output_dir {path!r} is in use by another run (pid {owner}); wait for it to end "
      "or choose another --output_dir."
    ) from None
  os.ftruncate(fd, 0)
  os.write(fd, f"{os.getpid()}\n".encode())
  _HELD[path] = fd
  return lock
