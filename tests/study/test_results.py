"""Tests of the resumable results log."""

import builtins
import json
import os

import numpy as np
import pytest

from tf_dlg.study import results


def test_results_log_resumes_and_skips(tmp_path):
  path = str(tmp_path / "r.jsonl")
  log = results.ResultsLog(path, "exp", {"seed": 1})
  log.add("a", {"v": 1})
  log.add("b", {"v": 2})
  again = results.ResultsLog(path, "exp", {"seed": 1})
  assert "a" in again and "b" in again and "c" not in again
  assert again.get("b")["v"] == 2 and len(again) == 2


def test_results_log_drops_partial_last_line_from_a_kill(tmp_path):
  path = tmp_path / "r.jsonl"
  log = results.ResultsLog(str(path), "exp", {"seed": 1})
  log.add("a", {"v": 1})
  with open(path, "a") as f:
    f.write('{"key": "b", "v"')  # killed mid-write
  again = results.ResultsLog(str(path), "exp", {"seed": 1})
  assert len(again) == 1 and "b" not in again
  again.add("b", {"v": 2})
  assert [json.loads(line)["key"] for line in path.read_text().splitlines()[1:]] == ["a", "b"]


def test_results_log_refuses_foreign_corrupt_or_other_config(tmp_path):
  path = tmp_path / "r.jsonl"
  results.ResultsLog(str(path), "exp", {"seed": 1}).add("a", {"v": 1})
  with pytest.raises(results.ResultsFileError, match="differs in: seed"):
    results.ResultsLog(str(path), "exp", {"seed": 2})
  with pytest.raises(results.ResultsFileError, match="experiment 'exp', not 'other'"):
    results.ResultsLog(str(path), "other", {"seed": 1})
  lines = path.read_text().splitlines()
  path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
  with pytest.raises(results.ResultsFileError, match=r"r.jsonl:2: corrupt record"):
    results.ResultsLog(str(path), "exp", {"seed": 1})
  foreign = tmp_path / "f.jsonl"
  foreign.write_text("a,b,c\n1,2,3\n")
  with pytest.raises(results.ResultsFileError, match="not a tf-dlg results file"):
    results.ResultsLog(str(foreign), "exp", {})
  # Nothing was overwritten by the refusals.
  assert "not json" in path.read_text()


def test_results_log_survives_a_kill_while_dropping_a_partial_line(tmp_path, monkeypatch):
  """The partial-line rewrite is atomic: a kill during it keeps every finished record."""
  path = tmp_path / "r.jsonl"
  log = results.ResultsLog(str(path), "exp", {"seed": 1})
  log.add("a", {"v": 1})
  with open(path, "a") as f:
    f.write('{"key": "b", "v"')  # killed mid-write
  real_open = builtins.open

  def killed_while_writing(file, mode="r", *args, **kwargs):
    if "w" in mode and os.path.dirname(os.path.abspath(file)) == str(tmp_path):
      real_open(file, mode, *args, **kwargs).close()  # opened (truncated), then killed
      raise KeyboardInterrupt("killed during the rewrite")
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", killed_while_writing)
  with pytest.raises(KeyboardInterrupt):
    results.ResultsLog(str(path), "exp", {"seed": 1})
  monkeypatch.setattr(builtins, "open", real_open)
  again = results.ResultsLog(str(path), "exp", {"seed": 1})
  assert len(again) == 1 and again.get("a")["v"] == 1
  assert sorted(os.listdir(tmp_path)) == ["r.jsonl"]  # no temporary file left behind


def test_results_log_stores_numpy_values_and_refuses_non_json(tmp_path):
  path = str(tmp_path / "r.jsonl")
  log = results.ResultsLog(path, "exp", {"seed": np.int64(1)})
  rec = log.add("a", {"v": np.float32(0.5), "arr": np.arange(3)})
  assert rec["v"] == 0.5 and rec["arr"] == [0, 1, 2]
  with pytest.raises(TypeError, match="cannot store a object"):
    log.add("b", {"v": object()})
  again = results.ResultsLog(path, "exp", {"seed": 1})
  assert len(again) == 1 and "b" not in again
