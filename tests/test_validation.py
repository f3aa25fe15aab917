"""tf_dlg.validation: one-line errors that name the argument, the value and the range."""

import math

import numpy as np
import pytest

from tf_dlg import validation


def test_check_number_bounds_and_openness():
  assert validation.check_number("rate", 0.5, 0, 1) == 0.5
  assert validation.check_number("rate", np.float32(0.25), 0, 1) == 0.25
  with pytest.raises(ValueError, match=r"rate=1 must be a number in \[0, 1\)"):
    validation.check_number("rate", 1, 0, 1, high_open=True)
  with pytest.raises(ValueError, match=r"norm=0 must be a number in \(0, inf\]"):
    validation.check_number("norm", 0, 0, math.inf, low_open=True)


@pytest.mark.parametrize("bad", [float("nan"), "0.5", None, True])
def test_check_number_refuses_non_numbers_and_nan(bad):
  with pytest.raises(ValueError, match="rate="):
    validation.check_number("rate", bad, 0, 1)


def test_check_int_ranges_including_zero_high():
  assert validation.check_int("k", 3, 1) == 3
  assert validation.check_int("k", np.int64(0), 0, 0) == 0
  with pytest.raises(ValueError, match=r"k=1 must be an integer in \[0, 0\]"):
    validation.check_int("k", 1, 0, 0)
  with pytest.raises(ValueError, match=r"k=0 must be an integer in \[1, inf\]"):
    validation.check_int("k", 0, 1)
  with pytest.raises(ValueError, match="k=2.5"):
    validation.check_int("k", 2.5, 0)
  with pytest.raises(ValueError, match="k=True"):
    validation.check_int("k", True, 0)


def test_choices_name_every_bad_value():
  assert validation.check_choice("agg", "mean", ["mean", "median"]) == "mean"
  with pytest.raises(ValueError, match="agg='maen' is not one of mean, median"):
    validation.check_choice("agg", "maen", ["mean", "median"])
  with pytest.raises(ValueError, match="'maskng'"):
    validation.check_choices("defenses", ["masking", "maskng"], ["masking", "pruning"])


def test_output_dir_refuses_a_file_and_creates_a_directory(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(ValueError, match="exists and is not a directory"):
    validation.check_output_dir("output_dir", str(f))
  d = tmp_path / "a" / "b"
  assert validation.check_output_dir("output_dir", str(d)) == str(d)
  assert d.is_dir()
