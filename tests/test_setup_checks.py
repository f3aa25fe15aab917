"""The Python checks that `bazel_free_scripts/setup.sh` runs after installing run here too.

setup.sh skips its install on a stamped `.venv`, so a renamed library name in one of
its `python -c` checks breaks only a fresh clone (it did once: `data.wheel_file` moved
to `tf_dlg.data.wheels`). Each check is run with this interpreter, as setup.sh runs it.
"""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKS = re.findall(
  r"\"\$VENV/bin/python\" -c '([^']+)'", (ROOT / "bazel_free_scripts" / "setup.sh").read_text()
)


def test_setup_sh_has_its_checks():
  assert len(CHECKS) >= 2 and any("wheel" in c for c in CHECKS)


@pytest.mark.parametrize("check", CHECKS, ids=[f"check{i}" for i in range(len(CHECKS))])
def test_each_setup_check_passes_on_this_tree(check):
  done = subprocess.run(
    [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert "[setup]" in done.stdout
