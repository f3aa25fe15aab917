"""bazel_free_scripts/reproduce.sh: the environment it picks and the flags it passes on.

Run in a copy of the script beside stand-in set-up scripts and interpreters that only
print what they were given, so nothing is installed or trained.
"""

import os
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stub(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("#!/usr/bin/env bash\n" + text + "\n")
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_root(tmp_path):
  scripts = tmp_path / "bazel_free_scripts"
  scripts.mkdir()
  shutil.copy(os.path.join(ROOT, "bazel_free_scripts", "reproduce.sh"), scripts)
  for name in ("setup.sh", "setup_core.sh"):
    _stub(str(scripts / name), f'echo "setup {name}"')
  for venv in (".venv", ".venv-k3"):
    _stub(str(tmp_path / venv / "bin" / "python"), f'echo "python {venv} $*"')
  return tmp_path


def _run(root, *args):
  out = subprocess.run(
    ["bash", str(root / "bazel_free_scripts" / "reproduce.sh"), *args],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


@pytest.mark.parametrize(
  "args, setup, venv, rest",
  [
    (["frontier", "out/f"], "setup.sh", ".venv", ["--output_dir=out/f"]),
    (
      ["frontier", "out/f", "--engine=flower", "--dp_multipliers="],
      "setup_core.sh",
      ".venv-k3",
      ["--output_dir=out/f", "--engine=flower", "--dp_multipliers="],
    ),
    (["frontier", "out/f", "--engine", "flower"], "setup_core.sh", ".venv-k3", ["flower"]),
    (["frontier", "out/f", "--engine=tff"], "setup.sh", ".venv", ["--engine=tff"]),
  ],
)
def test_the_engine_picks_the_environment(fake_root, args, setup, venv, rest):
  lines = _run(fake_root, *args)
  assert lines[0] == f"setup {setup}"
  assert lines[1].startswith(f"python {venv} -m experiments.reproduce --preset=frontier ")
  assert all(r in lines[1].split() for r in rest)


def test_a_flag_right_after_the_preset_is_not_taken_for_the_output_dir(fake_root):
  lines = _run(fake_root, "frontier", "--engine=flower")
  assert lines[0] == "setup setup_core.sh"
  words = lines[1].split()
  assert f"--output_dir={fake_root}/outputs/frontier" in words and "--engine=flower" in words
