"""Append-only, resumable results files for long experiments.

Each experiment writes one JSON-lines file: a header line naming the format, the
experiment and the configuration that fixes its results, then one line per finished
cell, flushed and fsync'ed as soon as the cell ends. A rerun into the same output
directory reads the file back and skips finished cells, so a killed run loses at most
the cell it was in.

Safety rules: a file written by another experiment or another configuration, or one
with a damaged line in the middle, raises `ResultsFileError` naming the file and the
problem -- it is never silently overwritten, and of two runs creating one file at once
exactly one writes its header (the other reads it back, so a second configuration is
refused). The one tolerated damage is a partial
*last* line without its newline: that is what a kill during a write leaves behind, and
it is dropped by an atomic rewrite (a kill during that rewrite leaves the old file), and
the cell is redone. Records must be JSON (NumPy scalars and arrays are converted);
anything else raises `TypeError` instead of being stored as its `str()`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional

from tf_dlg import io as io_lib

FORMAT = "tf_dlg.results/v1"


class ResultsFileError(ValueError):
  """A results file is corrupt, foreign, or from a different configuration."""


class ResultsLog:
  """JSON-lines results of one experiment, keyed by a cell key.

  Args:
    path: File to create or resume.
    experiment: Experiment name stored in the header; a file of another experiment is
      refused.
    config: The settings that determine the results (seed, iterations, ...). Resuming
      with different settings is refused, since mixing them would corrupt the tables.
  """

  def __init__(self, path: str, experiment: str, config: Dict[str, Any]):
    self.path = path
    self.experiment = experiment
    self.config = json.loads(io_lib.dumps(config, sort_keys=True))
    self._records: List[Dict[str, Any]] = []
    self._by_key: Dict[str, Dict[str, Any]] = {}
    header = {"format": FORMAT, "experiment": experiment, "config": self.config}
    text = io_lib.dumps(header, sort_keys=True) + "\n"
    # Exclusive: of two runs creating the file at once, one writes the header and the
    # other reads it back (refused if its configuration differs). Atomic: a kill while
    # creating it never leaves a headerless file.
    if io_lib.create_exclusive_text(path, text):
      return
    if os.path.getsize(path) == 0:  # an empty file (touched by hand): nothing to keep
      io_lib.atomic_write_text(path, text)
    else:
      self._read()

  def _read(self):
    with open(self.path, "r", encoding="utf-8") as f:
      text = f.read()
    lines = text.split("\n")
    partial_tail = not text.endswith("\n")
    if partial_tail:
      lines, tail = lines[:-1], lines[-1]
    else:
      lines, tail = lines[:-1], ""
    if not lines:
      raise ResultsFileError(
        f"{self.path}: no complete header line; not a tf-dlg results "
        "file. Move it away or choose another --output_dir."
      )
    try:
      header = io_lib.loads(lines[0], f"{self.path}:1")
    except ValueError as e:
      raise ResultsFileError(
        f"{self.path}: header is not JSON ({e}); not a tf-dlg results "
        "file. Move it away or choose another --output_dir."
      ) from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
      raise ResultsFileError(
        f"{self.path}: format={header.get('format') if isinstance(header, dict) else header!r}, "
        f"expected {FORMAT!r}. Move it away or choose another --output_dir."
      )
    if header.get("experiment") != self.experiment:
      raise ResultsFileError(
        f"{self.path}: written by experiment {header.get('experiment')!r}, not {self.experiment!r}."
      )
    if header.get("config") != self.config:
      diff = sorted(
        k
        for k in set(header.get("config", {})) | set(self.config)
        if header.get("config", {}).get(k) != self.config.get(k)
      )
      raise ResultsFileError(
        f"{self.path}: was written with a different configuration (differs in: "
        f"{', '.join(diff)}). Resume with the same flags, or use a new --output_dir."
      )
    for lineno, line in enumerate(lines[1:], start=2):
      if not line.strip():
        continue
      try:
        rec = io_lib.loads(line, f"{self.path}:{lineno}")
        key = rec["key"]
      except (ValueError, KeyError, TypeError) as e:
        raise ResultsFileError(f"{self.path}:{lineno}: corrupt record ({e}): {line[:120]!r}") from e
      self._records.append(rec)
      self._by_key[key] = rec
    if partial_tail and tail:
      # A run killed mid-write: drop the fragment so the file ends on a full line. The
      # rewrite is atomic, since an in-place one killed midway would lose every record.
      io_lib.atomic_write_text(self.path, "\n".join(lines) + "\n")

  def _write_line(self, obj):
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(io_lib.dumps(obj, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def __contains__(self, key: str) -> bool:
    return key in self._by_key

  def get(self, key: str) -> Optional[Dict[str, Any]]:
    return self._by_key.get(key)

  def add(self, key: str, record: Dict[str, Any]) -> Dict[str, Any]:
    """Appends one finished cell (durably) and returns the stored record."""
    rec = dict(record)
    rec["key"] = key
    rec = json.loads(io_lib.dumps(rec))
    self._write_line(rec)
    self._records.append(rec)
    self._by_key[key] = rec
    return rec

  def __iter__(self) -> Iterator[Dict[str, Any]]:
    return iter(list(self._records))

  def __len__(self) -> int:
    return len(self._records)
