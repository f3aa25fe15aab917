"""The convergence run store: one folder per (cell, seed), claimed by its cell.json.

A run folder is reused only by the configuration that wrote its `cell.json` (a
`FederatedConfig` and the data's source); another one, or a folder with a run but no
cell.json, is refused with a `CellError` naming the file and the differing keys.
While a process trains a run it holds the folder's lock (`hold`), so that two processes
can share one grid without training a run twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from typing import Any, Dict, Iterator

from tf_dlg import io as io_lib

CELL_NAME = "cell.json"
CELL_FORMAT = "tf_dlg.convergence.cell/v2"
LOCK_NAME = ".training.lock"


class CellError(ValueError):
  """A run folder holds a run of another configuration (or of an unknown one)."""


def cell_fingerprint(config, dataset_source: str) -> Dict[str, Any]:
  """Everything that fixes a run's numbers: its FederatedConfig and the data's source."""
  fields = dataclasses.asdict(config)
  for k in ("data_dir", "capture_round", "capture_client"):  # do not change the numbers
    fields.pop(k, None)
  fields["dataset_source"] = dataset_source
  return json.loads(io_lib.dumps(fields, sort_keys=True))


def check_cell(run_dir: str, fingerprint: Dict[str, Any]) -> bool:
  """Whether `run_dir` holds (part of) this run; CellError if it holds another one."""
  from tf_dlg.federated import simulation

  path = os.path.join(run_dir, CELL_NAME)
  if not os.path.exists(path):
    found = [
      n
      for n in (simulation.HISTORY_NAME, simulation.CHECKPOINT_NAME)
      if os.path.exists(os.path.join(run_dir, n))
    ]
    if found:
      raise CellError(
        f"{os.path.join(run_dir, found[0])}: a run without {CELL_NAME}, so "
        "its configuration is unknown; it is not reused. Move it away or "
        "use another --output_dir."
      )
    return False
  try:
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
    if stored.get("format") != CELL_FORMAT:
      raise ValueError(f"format={stored.get('format')!r}, expected {CELL_FORMAT!r}")
    config = dict(stored["config"])
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CellError(
      f"{path}: not a readable convergence cell file ({e}); move it away or "
      "use another --output_dir."
    ) from e
  diff = sorted(k for k in set(config) | set(fingerprint) if config.get(k) != fingerprint.get(k))
  if diff:
    raise CellError(
      f"{path}: this run folder holds another configuration (differs in: "
      + ", ".join(f"{k} {config.get(k)!r} there, {fingerprint.get(k)!r} now" for k in diff)
      + "); use another --output_dir, or the flags of that run."
    )
  return True


def claim_cell(run_dir: str, fingerprint: Dict[str, Any]) -> None:
  """Marks `run_dir` as this configuration's (after `check_cell` passed)."""
  path = os.path.join(run_dir, CELL_NAME)
  if not os.path.exists(path):
    text = io_lib.dumps({"format": CELL_FORMAT, "config": fingerprint}, indent=1, sort_keys=True)
    io_lib.atomic_write_text(path, text + "\n")


@contextlib.contextmanager
def hold(run_dir: str, wait: bool) -> Iterator[bool]:
  """Holds `run_dir` while the body trains it; yields whether it is held.

  `wait=False` yields False at once when another process holds it. An OS file lock
  (flock), not a marker file: it ends with the process that holds it, so a killed run
  leaves nothing to clean up before a resume.
  """
  os.makedirs(run_dir, exist_ok=True)
  fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
      held = True
    except BlockingIOError:
      held = False
    yield held
  finally:
    os.close(fd)  # releases the lock
