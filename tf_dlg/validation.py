"""Argument checks shared by the library and the command-line drivers.

Every check raises `ValueError` with one line naming the argument, the bad value and what
is allowed, so drivers can turn it into a one-line error (exit code 2) before any
expensive work starts.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Optional

import numpy as np


def check_number(
  name: str,
  value,
  low: float,
  high: float,
  low_open: bool = False,
  high_open: bool = False,
  dtype: Optional[str] = "float32",
) -> float:
  """Returns float(value) or raises ValueError naming it and the allowed range.

  The range is checked on the value as `dtype` holds it (TensorFlow computes in float32 by
  default): a value that is finite in Python but overflows to inf there, or a positive one
  that rounds to 0, would otherwise pass here and silently change the computation.
  `dtype=None` checks the Python float only.
  """
  lo, hi = "(" if low_open else "[", ")" if high_open else "]"
  rng = f"{lo}{low}, {high}{hi}"
  if isinstance(value, (bool, np.bool_)) or (  # np.True_ is no number either
    not isinstance(value, (int, float)) and not hasattr(value, "__float__")
  ):
    raise ValueError(f"{name}={value!r} must be a number in {rng}.")
  try:
    v = float(value)
  except OverflowError:  # an int beyond every float
    raise ValueError(f"{name}={value!r} must be a number in {rng}.") from None
  if not _in_range(v, low, high, low_open, high_open):
    raise ValueError(f"{name}={value!r} must be a number in {rng}.")
  if dtype is not None:
    with np.errstate(over="ignore", under="ignore"):
      held = float(np.asarray(v, dtype=dtype))
    if math.isinf(held) and not math.isinf(v):
      raise ValueError(
        f"{name}={value!r} overflows {dtype}, the precision it is computed in: it must be "
        f"a number in {lo}{low}, {float(np.finfo(dtype).max):.8g}]."
      )
    if not _in_range(held, low, high, low_open, high_open):
      raise ValueError(f"{name}={value!r} is {held!r} in {dtype}; it must be a number in {rng}.")
  return v


def _in_range(v: float, low, high, low_open: bool, high_open: bool) -> bool:
  return (
    not math.isnan(v)
    and (v > low if low_open else v >= low)
    and (v < high if high_open else v <= high)
  )


def check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
  """Returns int(value) or raises ValueError; `high=None` means unbounded."""
  rng = f"[{low}, {'inf' if high is None else high}]"
  if isinstance(value, (bool, np.bool_)) or not hasattr(value, "__index__"):
    raise ValueError(f"{name}={value!r} must be an integer in {rng}.")
  v = int(value)
  if v < low or (high is not None and v > high):
    raise ValueError(f"{name}={value!r} must be an integer in {rng}.")
  return v


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
  """Returns value if it is one of `allowed`, else ValueError listing them."""
  allowed = list(allowed)
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}.")
  return value


def check_choices(name: str, values: Iterable[Any], allowed: Iterable[Any]) -> list:
  """Every value of a list flag must be allowed (no silent drop of a misspelt one)."""
  allowed = list(allowed)
  values = list(values)
  bad = [v for v in values if v not in allowed]
  if bad:
    raise ValueError(
      f"{name}: {', '.join(map(repr, bad))} not one of {', '.join(map(str, allowed))}."
    )
  return values


def check_output_dir(name: str, path: str) -> str:
  """Creates `path` if needed and checks it is a writable directory, before any work."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{name}={path!r} exists and is not a directory.")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"{name}={path!r} cannot be created: {e.strerror}.") from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f"{name}={path!r} is not writable.")
  return path
