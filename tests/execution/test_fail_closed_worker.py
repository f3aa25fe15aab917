"""The worker is confined or does not start: a broken build, a planted shim, no private place.

Each case must end in one line naming the problem and the fix, and no worker_binary may
be left listening: the launcher (`python -m tf_dlg.execution.worker`) is the end-to-end
check, since it starts a worker exactly as the drivers' local context does.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import portpicker
import pytest

from tf_dlg.execution import runtime, shim

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Exports bind() like the real shim, but binds where it is told: confines nothing.
_PASSTHROUGH = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/socket.h>
typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  return ((bind_fn)dlsym(RTLD_NEXT, "bind"))(fd, addr, len);
}
"""


@pytest.fixture
def places(monkeypatch, tmp_path):
  """A fresh cache and temporary directory; returns (cache_dir, fallback_dir) of the shim."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  os.makedirs(tmp_path / "tmp")
  monkeypatch.delenv(shim.ALLOW_EXPOSED_ENV, raising=False)
  monkeypatch.delenv("CC", raising=False)
  return shim.cache_dir(), shim.fallback_dir()


def _unwritable_cache(monkeypatch, tmp_path):
  # A regular file where the cache directory's parent should be: unwritable even for root.
  blocker = tmp_path / "not-a-dir"
  blocker.write_text("")
  monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))


def _refused(match):
  with pytest.raises(shim.WorkerSetupError, match=match) as info:
    shim.shim_path()
  assert "\n" not in str(info.value)
  return str(info.value)


def _launcher(env_overrides):
  """Runs the worker launcher; returns (exit code, stderr, whether a worker_binary ran)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env_overrides)
  env.pop(shim.ALLOW_EXPOSED_ENV, None)
  port = portpicker.pick_unused_port()
  proc = subprocess.run(
    [sys.executable, "-m", "tf_dlg.execution.worker", f"--port={port}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  return proc.returncode, proc.stderr, "TFF worker pid" in proc.stderr


def _real_shim(directory):
  """A correctly built shim at `directory`/<shim name> (what a planter would copy)."""
  src = shim.shim_path()
  os.makedirs(directory, exist_ok=True)
  dst = os.path.join(directory, shim.shim_name())
  shutil.copy(src, dst)
  return dst


# --------------------------------------------------------------------------- compiler


def test_a_compiler_that_builds_nothing_is_refused_and_nothing_is_cached(places, monkeypatch):
  cache, _ = places
  monkeypatch.setenv("CC", "/bin/true")  # exits 0, writes nothing
  message = _refused(r"/bin/true built no usable loopback shim .*empty file.*install a working C")
  assert "every interface" in message
  assert os.listdir(cache) == []  # no empty .so left for the next run to trust


def test_a_cached_empty_shim_is_rebuilt_not_trusted(places):
  cache, _ = places
  os.makedirs(cache, mode=0o700)
  empty = os.path.join(cache, shim.shim_name())
  open(empty, "w").close()  # what a broken compiler used to leave behind
  assert shim.shim_path() == empty
  assert os.path.getsize(empty) > 0 and shim.elf_exports(empty, b"bind") is None


def test_launcher_with_a_compiler_that_builds_nothing_exits_2_in_one_line(tmp_path):
  rc, err, started = _launcher({"CC": "/bin/true", "XDG_CACHE_HOME": str(tmp_path)})
  assert rc == 2 and not started, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: /bin/true built no usable"), err


# --------------------------------------------------------------------------- planted shim


def test_a_shim_planted_in_a_world_writable_fallback_dir_is_refused(places, monkeypatch, tmp_path):
  _, fallback = places
  planted = _real_shim(fallback)
  os.chmod(fallback, 0o777)
  _unwritable_cache(monkeypatch, tmp_path)
  _refused(r"directory .*tf_dlg-\d+: it is writable by other users \(mode 0777\).*remove it")
  assert os.stat(planted).st_size > 0  # refused, not silently replaced


def test_a_fallback_dir_of_another_user_is_refused(places, monkeypatch, tmp_path):
  _, fallback = places
  _real_shim(fallback)
  _unwritable_cache(monkeypatch, tmp_path)
  monkeypatch.setattr(shim, "owner_uid", lambda: os.geteuid() + 1)  # the dir is not "ours"
  _refused(r"tf_dlg-\d+: it belongs to uid \d+, not to you")


def test_a_writable_by_others_shim_file_is_refused(places, monkeypatch, tmp_path):
  _, fallback = places
  planted = _real_shim(fallback)
  os.chmod(fallback, 0o700)
  os.chmod(planted, 0o666)
  _unwritable_cache(monkeypatch, tmp_path)
  _refused(r"loopback shim file .*: it is writable by other users \(mode 0666\)")


def test_a_symlinked_fallback_dir_is_refused(places, monkeypatch, tmp_path):
  _, fallback = places
  elsewhere = tmp_path / "elsewhere"
  _real_shim(str(elsewhere))
  os.chmod(elsewhere, 0o700)
  os.symlink(elsewhere, fallback)
  _unwritable_cache(monkeypatch, tmp_path)
  _refused(r"tf_dlg-\d+: it is a symbolic link")


def test_launcher_refuses_a_planted_fallback_in_one_line(tmp_path):
  cache_file = tmp_path / "cache-is-a-file"
  cache_file.write_text("")
  tmp = tmp_path / "tmp"
  fallback = tmp / f"tf_dlg-{os.geteuid()}"
  _real_shim(str(fallback))
  os.chmod(fallback, 0o777)
  rc, err, started = _launcher({"XDG_CACHE_HOME": str(cache_file), "TMPDIR": str(tmp)})
  assert rc == 2 and not started, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "writable by other users" in lines[0], err


# --------------------------------------------------------------------------- unwritable cache


def test_an_unwritable_cache_builds_in_a_private_fallback(places, monkeypatch, tmp_path):
  _, fallback = places
  _unwritable_cache(monkeypatch, tmp_path)
  path = shim.shim_path()
  assert os.path.dirname(path) == fallback
  st = os.stat(fallback)
  assert st.st_uid == os.geteuid() and (st.st_mode & 0o777) == 0o700
  assert shim.elf_exports(path, b"bind") is None


def test_an_unwritable_cache_and_no_private_fallback_is_refused(places, monkeypatch, tmp_path):
  _unwritable_cache(monkeypatch, tmp_path)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "not-a-dir"))  # unusable too
  message = _refused(r"no private directory to build the worker's loopback shim in")
  assert "XDG_CACHE_HOME" in message and message.count("not-a-dir") == 2


def test_launcher_with_an_unwritable_cache_and_tmp_exits_2_in_one_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  # tempfile ignores an unusable TMPDIR (it falls back to /tmp): block the fallback
  # directory itself with a regular file instead.
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  (tmp / f"tf_dlg-{os.geteuid()}").write_text("")
  rc, err, started = _launcher({"XDG_CACHE_HOME": str(blocker), "TMPDIR": str(tmp)})
  assert rc == 2 and not started, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "no private directory" in lines[0], err


# --------------------------------------------------------------------------- after start


def test_a_shim_that_does_not_confine_is_caught_after_start(places):
  """Passes the artefact check (ours, private, exports bind) but binds to every interface."""
  cache, _ = places
  os.makedirs(cache, mode=0o700)
  src = os.path.join(cache, "passthrough.c")
  with open(src, "w") as f:
    f.write(_PASSTHROUGH)
  target = os.path.join(cache, shim.shim_name())
  subprocess.run(["cc", "-shared", "-fPIC", "-o", target, src, "-ldl"], check=True)
  with pytest.raises(shim.WorkerSetupError, match=r"listens on .*not confined to loopback") as e:
    runtime.start_local_worker()
  assert "\n" not in str(e.value)
  pid = int(str(e.value).split("(pid ")[1].split(")")[0])
  assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), "the exposed worker still runs"


def _zombie(pid):
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_shim_built_under_umask_0_is_private_and_used(places):
  old = os.umask(0)
  try:
    path = shim.shim_path()
  finally:
    os.umask(old)
  assert os.stat(path).st_mode & 0o077 == 0 and shim.shim_problem(path) is None
