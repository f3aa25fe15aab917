"""Files fail closed: one winner when two runs create a results file, nested JSON refused
in one line, atomically written files with the mode the umask gives, not mkstemp's 0600.
"""

import json
import multiprocessing
import os

import numpy as np
import pytest

from tf_dlg import io as io_lib
from tf_dlg.study import results

TRIALS = 20


def _creator(index, paths, barrier, outcomes):
  """One of two runs: at each path, create the log with config {"run": index} at once."""
  for path in paths:
    barrier.wait()
    try:
      log = results.ResultsLog(path, "exp", {"run": index})
      log.add(f"cell-of-{index}", {"run": index})
      outcomes.put((path, index, "created"))
    except results.ResultsFileError as e:
      outcomes.put((path, index, "refused" if "different configuration" in str(e) else str(e)))


def test_two_configurations_creating_one_results_file_at_once_one_wins(tmp_path):
  paths = [str(tmp_path / f"trial{i}.jsonl") for i in range(TRIALS)]
  ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold TF threads
  barrier, outcomes = ctx.Barrier(2), ctx.Queue()
  procs = [ctx.Process(target=_creator, args=(i, paths, barrier, outcomes)) for i in (0, 1)]
  for p in procs:
    p.start()
  got = [outcomes.get(timeout=120) for _ in range(2 * TRIALS)]
  for p in procs:
    p.join(60)
  for path in paths:
    by_run = {index: what for p, index, what in got if p == path}
    assert sorted(by_run.values()) == ["created", "refused"], (path, by_run)
    (winner,) = [i for i, what in by_run.items() if what == "created"]
    lines = [json.loads(line) for line in open(path).read().splitlines()]
    assert lines[0]["config"] == {"run": winner}
    assert [r["key"] for r in lines[1:]] == [f"cell-of-{winner}"]  # no record of the loser


def _nested(depth):
  return "[" * depth + "]" * depth


def test_deeply_nested_results_lines_are_refused_in_one_line(tmp_path):
  path = tmp_path / "r.jsonl"
  results.ResultsLog(str(path), "exp", {"seed": 1}).add("a", {"v": 1})
  with open(path, "a") as f:
    f.write(_nested(100_000) + "\n")
  with pytest.raises(results.ResultsFileError, match=r"r.jsonl:3: corrupt record .*nested") as e:
    results.ResultsLog(str(path), "exp", {"seed": 1})
  assert "\n" not in str(e.value)
  header = tmp_path / "h.jsonl"
  header.write_text(_nested(100_000) + "\n")
  with pytest.raises(results.ResultsFileError, match="header is not JSON .*nested"):
    results.ResultsLog(str(header), "exp", {"seed": 1})


def test_deeply_nested_npz_header_is_refused_in_one_line(tmp_path):
  path = str(tmp_path / "x.npz")
  np.savez(path, header=np.asarray(_nested(100_000)), a=np.zeros(2))
  with pytest.raises(ValueError, match=r"is not a readable tf-dlg file .*nested") as e:
    io_lib.load_npz(path)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomically_written_files_follow_the_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    written = [
      io_lib.atomic_write_text(str(tmp_path / "t.txt"), "x"),
      io_lib.write_json(str(tmp_path / "j.json"), {"a": 1}),
      io_lib.save_npz(str(tmp_path / "n.npz"), {"format": "f"}, {"a": np.zeros(2)}),
    ]
    log = results.ResultsLog(str(tmp_path / "r.jsonl"), "exp", {"seed": 1})
    written.append(log.path)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this umask
  finally:
    os.umask(old)
  expected = 0o666 & ~umask
  assert (plain.stat().st_mode & 0o777) == expected
  assert {p: os.stat(p).st_mode & 0o777 for p in written} == {p: expected for p in written}
