"""The README against the code: defence names and flags come from the registries.

Names are read from the code at test time (`tf_dlg.defenses.DEFENSES`, each driver's absl
flags), so a new defence or flag that the README does not list fails here until the README
catches up, and a flag the README still shows after its removal fails too.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
# The modules a user runs with `python -m` and whose flags the README documents.
DRIVERS = (
  "experiments.attack",
  "experiments.threshold_search",
  "experiments.convergence",
  "experiments.federated",
  "experiments.reproduce",
  "experiments.audit",
  "tf_dlg.execution.worker",
  "benchmarks.attack_speed",
  "benchmarks.gallery_speed",
  "benchmarks.round_speed",
  "benchmarks.plain_fedavg",
  "benchmarks.lbfgs_products",
  "benchmarks.shared_training",
  "benchmarks.frontier_beside",
)
# Options of other tools the README shows (pytest -m, pip --no-deps, ruff format --check,
# tensorboard --logdir, test.sh --slow, pytest-xdist --dist), not of a Python driver.
SCRIPT_OPTIONS = {"m", "no-deps", "check", "logdir", "slow", "dist"}

_LIST_FLAGS = """
import contextlib, importlib, io, json, re, sys
import tensorflow  # noqa: F401  (its own absl flags are not a driver's)
from absl import app, flags, logging  # noqa: F401
baseline = set(flags.FLAGS)
out = {}
for name in sys.argv[1:]:
  module = importlib.import_module(name)
  if hasattr(module, "define_flags"):
    module.define_flags()
  new = sorted(set(flags.FLAGS) - baseline)
  if not new:  # an argparse command line: read its --help
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
      module.main(["--help"])
    new = sorted(set(re.findall(r"--(\\w+)", text.getvalue())) - {"help"})
  else:
    for flag in new:  # the next driver may define a flag of the same name
      delattr(flags.FLAGS, flag)
  out[name] = new
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def driver_flags():
  """{module: [flag names]} of every driver, defined in a fresh process."""
  proc = subprocess.run(
    [sys.executable, "-c", _LIST_FLAGS, *DRIVERS],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,  # imports TensorFlow once; generous for a loaded machine
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def readme():
  with open(README, encoding="utf-8") as f:
    return f.read()


def _defence_registry():
  from tf_dlg import defenses

  return set(defenses.DEFENSES) | {"none"}


def _training_only(readme):
  """Defences whose Defences-table row says they run only in TFF training."""
  section = readme.split("## Defences", 1)[1].split("\n## ", 1)[0]
  return set(re.findall(r"^\| `(\w+)` \|[^\n]*training only", section, flags=re.M))


def test_defense_choice_lists_name_every_registered_defence(readme):
  # The attack driver's list: every registered defence that one update can express.
  lists = re.findall(r"--defense=\{([^}]*)\}", readme)
  assert lists, "the README shows no --defense={...} list"
  for text in lists:
    assert set(text.split(",")) == _defence_registry() - _training_only(readme), text


def test_defences_table_has_one_row_per_registered_defence(readme):
  section = readme.split("## Defences", 1)[1].split("\n## ", 1)[0]
  rows = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
  assert sorted(rows) == sorted(_defence_registry() - {"none"})


def test_every_documented_flag_exists(readme, driver_flags):
  known = set().union(*driver_flags.values()) | SCRIPT_OPTIONS
  documented = set(re.findall(r"(?<![\w-])--(?:no)?([a-z][a-z0-9_-]*)", readme))
  # absl's boolean flags also read as --noNAME.
  missing = sorted(f for f in documented if f not in known and f"no{f}" not in known)
  assert not missing, f"README documents flags no driver defines: {missing}"


def test_each_drivers_command_uses_its_own_flags(readme, driver_flags):
  """A `python -m MODULE ...` line (with its `#` continuation lines) only uses MODULE's flags."""
  blocks = re.findall(r"python -m ([\w.]+)((?:[^\n]*\\\n)*[^\n]*(?:\n#[^\n]*)*)", readme)
  checked = 0
  for module, rest in blocks:
    if module not in driver_flags:
      continue
    used = set(re.findall(r"(?<![\w-])--(?:no)?([a-z][a-z0-9_]*)", rest))
    own = set(driver_flags[module])
    wrong = sorted(f for f in used if f not in own and f"no{f}" not in own)
    assert not wrong, f"{module}: {wrong}"
    checked += 1
  assert checked >= 5  # attack, threshold_search, convergence, federated, reproduce


def test_module_commands_name_the_venv_python(readme):
  """A newcomer copying a command gets the project's interpreter, not the system one."""
  commands = re.findall(r"^\s*(\S*python) -m ", readme, flags=re.M)
  assert commands and all(c == ".venv/bin/python" for c in commands), commands
