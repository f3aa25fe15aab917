"""Argument checks shared by the library and the command-line drivers.

Every check raises `ValueError` with one line naming the argument, the bad value and what
is allowed, so drivers can turn it into a one-line error (exit code 2) before any
expensive work starts.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Optional


def check_number(
  name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> float:
  """Returns float(value) or raises ValueError naming it and the allowed range."""
  lo, hi = "(" if low_open else "[", ")" if high_open else "]"
  rng = f"{lo}{low}, {high}{hi}"
  if isinstance(value, bool) or (
    not isinstance(value, (int, float)) and not hasattr(value, "__float__")
  ):
    raise ValueError(f"{name}={value!r} must be a number in {rng}.")
  v = float(value)
  ok = (
    not math.isnan(v)
    and (v > low if low_open else v >= low)
    and (v < high if high_open else v <= high)
  )
  if not ok:
    raise ValueError(f"{name}={value!r} must be a number in {rng}.")
  return v


def check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
  """Returns int(value) or raises ValueError; `high=None` means unbounded."""
  rng = f"[{low}, {'inf' if high is None else high}]"
  if isinstance(value, bool) or not hasattr(value, "__index__"):
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
