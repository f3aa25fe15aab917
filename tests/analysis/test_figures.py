"""Markdown tables: a cell's `|` or newline never splits a column or ends a row."""

import re

from tf_dlg.analysis import figures
from tf_dlg.study import claims


def _columns(line):
  # GFM splits a row at every `|` not escaped by a backslash (less the outer two).
  return len(re.split(r"(?<!\\)\|", line)) - 2


def test_pipes_and_newlines_in_cells_keep_the_columns(tmp_path):
  table = figures.markdown_table(["name", "a|b"], [["x|y", 0.12345], ["two\nlines", None]])
  lines = table.splitlines()
  assert len(lines) == 4  # header, rule, two rows: the newline did not start a row
  assert {_columns(line) for line in lines} == {2}
  assert lines[2] == "| x\\|y | 0.123 |" and lines[3] == "| two lines |  |"
  # claims.md rows appended later are escaped alike.
  (tmp_path / "claims.md").write_text(figures.markdown_table(["claim", "verdict"], []))
  claims.append_claims(str(tmp_path), [["p | q", "holds\nmostly"]])
  lines = (tmp_path / "claims.md").read_text().splitlines()
  assert lines[-1] == "| p \\| q | holds mostly |"
  assert {_columns(line) for line in lines} == {2}
