r"""The loopback shim that confines TFF's worker_binary: built, cached and checked.

`loopback_shim.c` is preloaded into every worker tf-dlg starts (see
`tf_dlg.execution.worker`): its `bind()` turns an any-address into loopback, and it kills
the worker when the process that started it dies. It is compiled once with the system C
compiler into `~/.cache/tf_dlg/loopback_shim-<source hash>.so` (`$XDG_CACHE_HOME`
respected; a private `$TMPDIR/tf_dlg-UID` if the cache cannot be created). The directory
and file must be the user's own and writable by no one else, and the file an ELF shared
object exporting `bind` (so an empty or foreign build is never used); otherwise the run
stops with one line saying why.

No C compiler: a one-line error says to install one (e.g. `apt-get install gcc`); setting
`TF_DLG_ALLOW_EXPOSED_WORKER=1` runs the worker unconfined instead, with a warning.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import subprocess
import sys
import tempfile
import threading

ALLOW_EXPOSED_ENV = "TF_DLG_ALLOW_EXPOSED_WORKER"
HOW_TO_FIX = "install a working C compiler (e.g. apt-get install gcc) and rerun"
_SHIM_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loopback_shim.c")
_SHIM_LOCK = threading.Lock()


class WorkerSetupError(RuntimeError):
  """The worker cannot be confined to loopback (no usable shim) and exposure was not allowed."""


def cache_dir() -> str:
  """First place for the shim: `$XDG_CACHE_HOME/tf_dlg` (default `~/.cache/tf_dlg`)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "tf_dlg")


def fallback_dir() -> str:
  """Second place, when the cache cannot be created: `$TMPDIR/tf_dlg-UID`."""
  return os.path.join(tempfile.gettempdir(), f"tf_dlg-{owner_uid()}")


def owner_uid() -> int:
  """The uid that must own the shim and its directory: this process's effective uid."""
  return os.geteuid()


def find_compiler():
  """Path of `$CC`, `cc`, `gcc` or `clang` on PATH (the first found), or None."""
  for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
    if name:
      for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        path = os.path.join(d, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
          return path
  return None


def _check_private(path: str, what: str) -> os.stat_result:
  """Raises WorkerSetupError unless `path` is no symlink, is ours, and no one else may write it.

  Anyone who can write the shim, or the directory holding it, chooses the code the worker
  runs and whether it is confined at all.
  """
  st = os.lstat(path)
  problem = None
  if stat.S_ISLNK(st.st_mode):
    problem = "is a symbolic link"
  elif st.st_uid != owner_uid():
    problem = f"belongs to uid {st.st_uid}, not to you (uid {owner_uid()})"
  elif st.st_mode & 0o022:
    problem = f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
  if problem:
    raise WorkerSetupError(
      f"refusing the worker's loopback shim {what} {path}: it {problem}, so another user "
      f"could plant the code the worker runs; remove it (rm -r '{path}') or set "
      "XDG_CACHE_HOME to a directory only you can write."
    )
  return st


def _private_dir(path: str) -> str:
  """Creates `path` with mode 0700, or checks an existing one (`_check_private`) and tightens it.

  Raises:
    OSError: `path` cannot be created (the caller tries the next place).
  """
  os.makedirs(path, mode=0o700, exist_ok=True)
  st = _check_private(path, "directory")
  if not stat.S_ISDIR(st.st_mode):
    raise NotADirectoryError(20, "not a directory", path)
  if stat.S_IMODE(st.st_mode) != 0o700:
    try:
      os.chmod(path, 0o700)
    except OSError:
      pass  # read-only media: nobody else can write it either (checked above)
  return path


def elf_exports(path: str, symbol: bytes):
  """None if `path` is an ELF shared object of this machine that defines `symbol`, else why not.

  Read from the file's dynamic symbol table, without loading it into this process.
  """
  with open(path, "rb") as f:
    data = f.read()
  # This process's own binary (not a launcher script) gives the machine's ELF header.
  with open("/proc/self/exe" if os.path.exists("/proc/self/exe") else sys.executable, "rb") as f:
    own = f.read(20)
  if len(data) < 64 or data[:4] != b"\x7fELF":
    return "not an ELF file" if data else "an empty file"
  if data[4:6] != own[4:6]:
    return "an ELF file of another word size or byte order"
  end = "<" if data[5] == 1 else ">"
  is64 = data[4] == 2
  e_type, e_machine = struct.unpack_from(end + "HH", data, 16)
  if e_type != 3 or e_machine != struct.unpack_from(end + "H", own, 18)[0]:
    return "not a shared object for this machine"
  shoff, shentsize, shnum = (
    struct.unpack_from(end + "Q10xHH", data, 40)
    if is64
    else struct.unpack_from(end + "I10xHH", data, 32)
  )
  header = end + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")
  sections = [struct.unpack_from(header, data, shoff + i * shentsize) for i in range(shnum)]
  sym = end + ("IBBHQQ" if is64 else "IIIBBH")
  for s in sections:
    if s[1] != 11:  # SHT_DYNSYM
      continue
    strtab = sections[s[6]]
    names_at = strtab[4]
    for off in range(s[4], s[4] + s[5], s[9]):
      fields = struct.unpack_from(sym, data, off)
      name_off, shndx = fields[0], fields[3] if is64 else fields[5]
      name = data[names_at + name_off : data.index(b"\0", names_at + name_off)]
      if name == symbol and shndx != 0:
        return None
  return f"it does not export {symbol.decode()}()"


def shim_problem(path: str):
  """None if the file at `path` is a usable shim, else why not (a missing file says so)."""
  if not os.path.lexists(path):
    return "missing"
  _check_private(path, "file")
  try:
    return elf_exports(path, b"bind")
  except (struct.error, IndexError, ValueError):
    return "a damaged ELF file"


def _compile(source: str, target: str, compiler: str) -> None:
  """Compiles `source` to the shared object `target`, checked before it is renamed into place."""
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
    err = proc.stderr.strip().splitlines()
    problem = (err[-1] if err else f"exit code {proc.returncode}") if proc.returncode else None
    if problem is None:
      os.chmod(tmp, 0o700)  # the linker's mode follows the umask (0777 under umask 0)
      problem = shim_problem(tmp)
    if problem:
      raise WorkerSetupError(
        f"{compiler} built no usable loopback shim for TFF's worker_binary ({problem}), so "
        f"the worker would listen on every interface; {HOW_TO_FIX} (or set CC to one)."
      )
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _no_compiler():
  if os.environ.get(ALLOW_EXPOSED_ENV) == "1":
    return None
  raise WorkerSetupError(
    "tf-dlg needs a C compiler (cc) to confine TFF's worker_binary to loopback: "
    f"install gcc (e.g. apt-get install gcc), or set {ALLOW_EXPOSED_ENV}=1 to run "
    "it listening on every interface (unauthenticated; trusted networks only)."
  )


def shim_name() -> str:
  """The shim's file name: its source hash, so an edited source is rebuilt."""
  with open(_SHIM_SOURCE, "rb") as f:
    return f"loopback_shim-{hashlib.sha256(f.read()).hexdigest()[:16]}.so"


def shim_path():
  """The verified loopback shim (built on first use), or None if exposure is allowed.

  It lives in a private directory (yours, mode 0700): the cache, or `$TMPDIR/tf_dlg-UID`
  when the cache cannot be created. A cached file is used only if it is yours, writable
  by no one else, and an ELF shared object of this machine exporting `bind`; one that
  fails the content check is rebuilt, one that fails the ownership check is refused.

  Raises:
    WorkerSetupError: one line saying why the worker cannot be confined and how to fix it.
  """
  name = shim_name()
  tried = []
  with _SHIM_LOCK:
    for directory in (cache_dir(), fallback_dir()):
      target = os.path.join(directory, name)
      try:
        _private_dir(directory)
        if shim_problem(target) is None:
          return target
        compiler = find_compiler()
        if compiler is None:
          return _no_compiler()
        _compile(_SHIM_SOURCE, target, compiler)
        return target
      except OSError as e:  # cannot create or write there: the next place
        tried.append(f"{directory}: {e.strerror or e}")
  raise WorkerSetupError(
    f"no private directory to build the worker's loopback shim in ({'; '.join(tried)}); "
    "set XDG_CACHE_HOME to a writable directory of yours."
  )
