"""Probe defects of the drivers' flags: duplicates kept silently, a flag ignored, a help
text that disagrees with its check."""

import os
import subprocess
import sys

import pytest

from tf_dlg.study import convergence as convergence_lib
from tf_dlg.study import defense_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_defence_named_twice_in_defense_params_is_refused():
  with pytest.raises(ValueError, match=r"names 'masking' twice \(0\.1 and 0\.2\)"):
    defense_params.parse_defense_params(["masking:0.1", "masking:0.2"])
  assert defense_params.parse_defense_params(["masking:0.1", "clipping:2"]) == {
    "masking": (0.1, "given"),
    "clipping": (2.0, "given"),
  }


class _Flags:
  """The two flags as absl holds them: a value, and whether it was given."""

  def __init__(self, train, test, given):
    self.train_examples, self.test_examples = train, test
    self._given = given

  def __getitem__(self, name):
    return type("Flag", (), {"present": self._given and name == "test_examples"})()


def test_test_examples_alone_is_honoured(digits):
  from experiments.convergence import subsets_from_flags

  assert subsets_from_flags(_Flags(None, 20, given=True)) == (None, 20)
  assert subsets_from_flags(_Flags(None, 1000, given=False)) is None  # the default alone
  assert subsets_from_flags(_Flags(40, 1000, given=False)) == (40, 1000)
  small = convergence_lib.subset(digits, *subsets_from_flags(_Flags(None, 20, True)), seed=0)
  assert len(small.x_test) == 20 and len(small.x_train) == len(digits.x_train)
  # The 20 are test images of the dataset.
  flat = {a.tobytes() for a in digits.x_test}
  assert all(a.tobytes() in flat for a in small.x_test)


def test_defended_fraction_help_and_check_agree():
  def run(*args):
    return subprocess.run(
      [sys.executable, "-m", "experiments.threshold_search", *args],
      capture_output=True,
      text=True,
      cwd=ROOT,
      timeout=180,
    )

  refused = run("--defended_fraction=0", "--output_dir=/nonexistent/x")
  assert refused.returncode == 2
  # The study section's own check (Preset's field), named by its flag: one line.
  lines = refused.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
    "error: --defended_fraction=0.0 must be a number in (0, 1]"
  ), lines
  text = run("--helpfull").stdout
  help_line = text[text.index("  --defended_fraction:") :].split("(default")[0]
  assert "(0, 1]" in help_line and "[0.0, 1.0]" not in help_line, help_line
