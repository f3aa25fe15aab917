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


def test_cost_pp_writes_points_with_the_interval_or_says_there_is_none():
  # Hand-computed: fractions to points, one decimal, signed.
  assert figures.cost_pp(0.011, 0.004, 0.018) == "+1.1 pp [+0.4, +1.8]"
  assert figures.cost_pp(-0.002, -0.013, 0.009, unit="") == "-0.2 [-1.3, +0.9]"
  inf = float("inf")
  assert figures.cost_pp(0.01, -inf, inf) == "+1.0 pp (n=1: no interval)"


def test_leak_grid_draws_each_column_in_order_and_a_missing_image_black(tmp_path, monkeypatch):
  import matplotlib.figure
  import numpy as np

  shown = []
  real = matplotlib.figure.Figure.savefig

  def savefig(fig, fname, *args, **kwargs):
    shown.extend(np.asarray(im.get_array()) for ax in fig.axes for im in ax.images)
    shown.append([ax.get_xlabel() for ax in fig.axes])
    return real(fig, fname, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
  a, b = np.full((4, 4, 1), 0.25, np.float32), np.full((4, 4, 1), 0.75, np.float32)
  rows = [dict(label="x", leaked=a, original=b, pick=None)]
  columns = (("leaked", "leaked"), ("original", "original"), ("pick", "pick"))
  path = figures.leak_grid(rows, str(tmp_path / "g" / "grid.png"), columns, lambda r, c: c)
  assert (tmp_path / "g" / "grid.png").is_file() and path.endswith("grid.png")
  np.testing.assert_allclose(shown[0], 0.25)
  np.testing.assert_allclose(shown[1], 0.75)
  np.testing.assert_allclose(shown[2], 0.0)  # no pick: black, the original's shape
  assert shown[3] == ["leaked", "original", "pick"]
