"""A federated run's files: `history.csv` and `checkpoint.npz`, written atomically.

The history holds one row of `HISTORY_FIELDS` per round; the checkpoint holds the flat
server arrays after a round, the history so far and the configuration's fingerprint.
Both engines (TFF, Flower) write this shape; a file that is damaged, of another format
or of another configuration raises `CheckpointError` naming the file (and line and
column) instead of silently mixing runs.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Dict, List

import numpy as np

from tf_dlg import io as io_lib
from tf_dlg.federated.config import SECTION, FederatedConfig

HISTORY_FIELDS = (
  "round",
  "train_loss",
  "train_accuracy",
  "test_loss",
  "test_accuracy",
  "seconds",
  "zero_fraction",
  "clipped_fraction",
)
# Defence statistics: empty where the run has no defence, or one that does not clip.
OPTIONAL_FIELDS = ("zero_fraction", "clipped_fraction")
CHECKPOINT_FORMAT = "tf_dlg.federated.checkpoint/v1"
CHECKPOINT_NAME = "checkpoint.npz"
HISTORY_NAME = "history.csv"
TENSORBOARD_DIR = "tensorboard"


class CheckpointError(ValueError):
  """A checkpoint or history file in `output_dir` is corrupt or from another run."""


def _flatten_state(state) -> List[np.ndarray]:
  import tensorflow as tf

  return [np.asarray(x) for x in tf.nest.flatten(state)]


def write_checkpoint(
  path: str, leaves, round_num: int, history, fingerprint: str, kind: str = CHECKPOINT_FORMAT
) -> None:
  """Atomically writes flat server arrays after `round_num` and the history so far.

  Every engine's checkpoint has this shape; `kind` (its format name) keeps one engine's
  checkpoints from being read as another's.
  """
  header = dict(
    format=kind,
    round=round_num,
    fingerprint=fingerprint,
    num_leaves=len(leaves),
    history=history,
  )
  # Uncompressed: model weights barely compress and this runs every round.
  io_lib.save_npz(path, header, {f"leaf_{i}": v for i, v in enumerate(leaves)}, compressed=False)


def read_checkpoint(path: str, fingerprint: str, kind: str = CHECKPOINT_FORMAT):
  """(flat arrays, round, history) of a `write_checkpoint` file of format `kind`.

  CheckpointError if it is corrupt, of another format or another configuration's.
  """
  try:
    header, arrays = io_lib.load_npz(path, expected_format=kind)
    leaves = [arrays[f"leaf_{i}"] for i in range(int(header["num_leaves"]))]
    history = [_history_row(path, i + 1, row) for i, row in enumerate(header["history"])]
  except CheckpointError:
    raise
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
      f"{path!r} is not a readable tf-dlg federated checkpoint ({type(e).__name__}: {e})."
    ) from e
  if header.get("fingerprint") != fingerprint:
    raise CheckpointError(
      f"{path!r} was written by a different configuration (fingerprint "
      f"{header.get('fingerprint')}, this run {fingerprint}); use another --output_dir "
      "or the original flags."
    )
  return leaves, int(header["round"]), history


def save_checkpoint(path: str, state, round_num: int, history, fingerprint: str) -> None:
  """Atomically writes the server state after `round_num` and the history so far."""
  write_checkpoint(path, _flatten_state(state), round_num, history, fingerprint)


def load_checkpoint(path: str, template_state, fingerprint: str):
  """(state, round, history) from `path`; CheckpointError if corrupt or foreign."""
  import tensorflow as tf

  leaves, round_num, history = read_checkpoint(path, fingerprint)
  template = tf.nest.flatten(template_state)
  if len(template) != len(leaves) or any(
    np.shape(a) != np.shape(b) for a, b in zip(template, leaves)
  ):
    raise CheckpointError(f"{path!r} holds a server state of a different structure.")
  leaves = [np.asarray(b, dtype=np.asarray(a).dtype) for a, b in zip(template, leaves)]
  state = tf.nest.pack_sequence_as(template_state, leaves)
  return state, round_num, history


def _as_number(key: str, value):
  """float (int for `round`) of a history value, or None if it is not one."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  if key != "round":
    return number
  return int(number) if number >= 1 and number == int(number) else None


def _history_row(path: str, line: int, row) -> Dict[str, float]:
  """One history row as numbers; CheckpointError naming the file, line and column."""
  out = {}
  for key in HISTORY_FIELDS:
    value = row.get(key) if isinstance(row, dict) else None
    if key in OPTIONAL_FIELDS and value in ("", None):
      out[key] = None
      continue
    out[key] = _as_number(key, value)
    if out[key] is None:
      kind = "round number" if key == "round" else "number"
      raise CheckpointError(
        f"{path!r} line {line}, column {key!r}: {value!r} is not a {kind}; the run's "
        "files are damaged: move them away or use another --output_dir."
      )
  return out


def _check_history_file(path: str) -> None:
  with open(path, newline="") as f:
    header = next(csv.reader(f), None)
  if header != list(HISTORY_FIELDS):
    raise CheckpointError(
      f"{path!r} is not a tf-dlg history (header {header!r}, expected "
      f"{list(HISTORY_FIELDS)}); use another --output_dir."
    )


def write_history(path: str, history) -> None:
  """Rewrites the whole history atomically (a kill leaves the old or the new file)."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
  w.writeheader()
  w.writerows(history)
  io_lib.atomic_write_text(path, buf.getvalue())


def read_history(path: str) -> List[Dict[str, float]]:
  """The rows of a history.csv; CheckpointError naming the line and column if damaged."""
  _check_history_file(path)
  with open(path, newline="") as f:
    # Line numbers as an editor shows them: the header is line 1.
    return [_history_row(path, i + 2, row) for i, row in enumerate(csv.DictReader(f))]


def check_resume(config: FederatedConfig, hist_path: str, ckpt_path: str) -> None:
  """Refuses a run folder this config cannot resume (before any training)."""
  # Read the history whole before anything is rewritten: a damaged file is refused,
  # never overwritten.
  done = len(read_history(hist_path)) if os.path.exists(hist_path) else 0
  if done and not os.path.exists(ckpt_path):
    raise CheckpointError(
      f"{hist_path!r} has rounds but there is no {CHECKPOINT_NAME} "
      "to resume from; move it away or use another --output_dir."
    )
  # A resumed run never reports rounds past the ones asked for: it cannot undo them.
  if done > config.rounds:
    raise CheckpointError(
      f"{hist_path!r} already holds {done} rounds, more than {SECTION}.rounds="
      f"{config.rounds}; use {SECTION}.rounds in [{done}, inf] to resume it, or another "
      "--output_dir."
    )
