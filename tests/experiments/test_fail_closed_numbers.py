"""Numbers fail closed: values past float32 refused by every defence and driver before work,
`--leak_threshold` bounded, the Dirichlet `alpha` bounded where NumPy's sampler still returns.
"""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tf_dlg import data, validation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Defences whose parameter has no finite upper bound of its own: float32 is the bound.
UNBOUNDED = ("clipping", "noising", "noising_ratio", "dp")
PAST_FLOAT32 = ("1e39", "1e308")

# Runs a driver's own main() once per argv (flags reset in between) and prints, per argv,
# the ValueError it raised as the command line's one line shows it (field paths and
# argument names as flags: experiments.cli.flag_names), or "ran".
_DRIVER = """
import json, os, sys
from experiments import cli  # TensorFlow first, as every driver does
from absl import flags
import importlib
mod = importlib.import_module("experiments." + sys.argv[1])
if hasattr(mod, "define_flags"):
  mod.define_flags()
out = []
for argv in json.loads(sys.argv[2]):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["prog", *argv])
  try:
    mod.main(["prog"])
    out.append("ran")
  except ValueError as e:
    out.append(cli.flag_names(str(e)))
print("RESULT " + json.dumps(out))
"""


def test_check_number_validates_in_float32_by_default():
  inf = math.inf
  with pytest.raises(ValueError, match=r"norm=1e\+39 overflows float32.* \(0, 3.4028235e\+38\]"):
    validation.check_number("norm", 1e39, 0, inf, low_open=True, high_open=True)
  with pytest.raises(ValueError, match=r"norm=1e-50 is 0.0 in float32; .* \(0, inf\]"):
    validation.check_number("norm", 1e-50, 0, inf, low_open=True)
  with pytest.raises(ValueError, match=r"rate=0.999999999 is 1.0 in float32; .*\[0, 1\)"):
    validation.check_number("rate", 0.999999999, 0, 1, high_open=True)
  largest = float(np.finfo(np.float32).max)
  assert validation.check_number("norm", largest, 0, inf, low_open=True) == largest
  assert validation.check_number("x", 1e39, 0, inf, dtype="float64") == 1e39
  assert validation.check_number("x", inf, 0, inf) == inf  # a closed infinite bound holds


@pytest.mark.parametrize("name", UNBOUNDED)
@pytest.mark.parametrize("value", PAST_FLOAT32)
def test_every_unbounded_defence_refuses_a_parameter_past_float32(name, value):
  from tf_dlg import defenses

  with pytest.raises(ValueError, match=rf"={value[:2]}.*overflows float32"):
    defenses.get_defense(name, float(value))


def _drivers(tmp_path):
  """{driver: [argv, ...]}: each unbounded defence at a value past float32, per driver."""
  out = str(tmp_path / "out")
  cases = {
    "attack": [
      ["--dataset=digits", f"--defense={d}", "--defense_param=1e39", f"--output_dir={out}"]
      for d in UNBOUNDED
    ]
    + [
      ["--dataset=digits", f"--leak_threshold={v}", f"--output_dir={out}"]
      for v in ("nan", "2", "-5", "inf")
    ]
    + [["--dataset=digits", "--batch=100000", f"--output_dir={out}"]],
    "federated": [
      ["--dataset=digits", f"--defense={d}", "--defense_param=1e39", f"--output_dir={out}"]
      for d in UNBOUNDED
    ]
    + [["--dataset=digits", "--partition=dirichlet", "--alpha=1e-30", f"--output_dir={out}"]],
    "convergence": [
      ["--dataset=digits", f"--defense_params={d}:1e39", f"--output_dir={out}"] for d in UNBOUNDED
    ],
  }
  return out, cases


def test_drivers_refuse_values_past_float32_and_bad_bounds_before_work(tmp_path, digits):
  out, cases = _drivers(tmp_path)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  procs = {
    name: subprocess.Popen(
      [sys.executable, "-c", _DRIVER, name, json.dumps(argvs)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name, argvs in cases.items()
  }
  got = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stderr[-3000:]
    got[name] = json.loads(lines[0][len("RESULT ") :])
  assert all("overflows float32" in m for m in got["attack"][:4]), got["attack"]
  assert all("overflows float32" in m for m in got["federated"][:4]), got["federated"]
  assert all("overflows float32" in m for m in got["convergence"]), got["convergence"]
  for value, message in zip(("nan", "2", "-5", "inf"), got["attack"][4:8]):
    assert message.startswith(f"--leak_threshold={float(value)} must be a number in [0.0, 1.0]")
  n = len(digits.x_train)
  assert got["attack"][8].startswith(f"--batch=100000 must be an integer in [1, {n}]")
  assert got["federated"][4].startswith("alpha=1e-30 must be a number in [0.001, inf)")
  # Refused before any work: nothing in the output folder but the run lock (a driver takes
  # it once its flags are checked; tf_dlg.io.LOCK_NAME).
  assert not os.path.isdir(out) or set(os.listdir(out)) <= {".tf_dlg.lock"}


@pytest.mark.parametrize("driver", ["threshold_search", "reproduce"])
def test_search_drivers_take_no_defence_parameter_from_the_command_line(driver):
  # Their parameters come from the defences' declared search ranges (finite, in float32).
  proc = subprocess.run(
    [sys.executable, "-m", f"experiments.{driver}", "--defense_param=1e39"],
    cwd=REPO,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: Unknown command line flag")


def test_dirichlet_alpha_bound_is_where_numpy_is_fast():
  labels = np.repeat(np.arange(10), 50)
  with pytest.raises(ValueError, match=r"alpha=0.0009 must be a number in \[0.001, inf\)"):
    data.partition(labels, 5, "dirichlet", alpha=0.0009)
  t = time.perf_counter()
  parts = data.partition(labels, 5, "dirichlet", alpha=1e-3, seed=0)
  assert time.perf_counter() - t < 300  # generous: a hang is what this guards against
  assert sorted(np.concatenate(parts).tolist()) == list(range(500))
