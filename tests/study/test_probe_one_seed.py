"""One seed, one image, one round, one client: every valid size finishes and says what it lacks.

A t interval over one seed is undefined (`intervals.mean_interval` gives infinite bounds);
the figure code once plotted those bounds and failed after all the training. One seed now
gives point estimates, with "n=1: no interval" wherever an interval would stand.
"""

import math
import os
import shutil

import pytest

from tf_dlg.analysis import figures
from tf_dlg.study import claims, convergence_report, records, summary

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
NO = "n=1: no interval"


def _one_seed(rows):
  """The real run's convergence rows as one seed leaves them: infinite t intervals."""
  out = []
  for r in rows:
    r = dict(r, seeds="0")
    for k in ("final", "cost", "rounds", "round_cost"):
      if r.get(f"{k}_low") is not None:
        r[f"{k}_low"], r[f"{k}_high"] = -math.inf, math.inf
    out.append(r)
  return out


@pytest.fixture
def one_seed(tmp_path):
  for name in ("thresholds", "convergence"):
    shutil.copy(f"{DATA}/summary_quick_{name}.csv", tmp_path / f"{name}.csv")
  thresholds = records.read_thresholds(str(tmp_path / "thresholds.csv"))
  conv = convergence_report.read_convergence(str(tmp_path / "convergence.csv"))
  return tmp_path, thresholds, _one_seed(conv)


def test_interval_text_is_a_point_estimate_where_the_interval_is_infinite():
  assert figures.with_interval(0.5, 0.25, 0.75) == "0.500 [0.250, 0.750]"
  assert figures.with_interval(0.5, -math.inf, math.inf) == f"0.500 ({NO})"
  assert figures.with_interval(1.0, float("nan"), 2.0, "{:+.1f}", " pp") == f"+1.0 pp ({NO})"
  assert not figures.has_interval(None, 1.0) and figures.has_interval(0, 0)


def test_first_screen_with_one_seed_writes_its_figure_and_names_the_missing_interval(one_seed):
  tmp_path, thresholds, conv = one_seed
  png = tmp_path / "figures" / "first_screen.png"
  md = summary.first_screen(thresholds, conv, str(png), report_dir=str(tmp_path))
  assert png.stat().st_size > 0
  assert "inf" not in md, md
  table = [x for x in md.splitlines() if x.startswith("| ")]
  assert NO in table[0]  # the baseline in the header
  costs = [x for x in table[1:] if " pp " in x]
  assert costs and all(NO in x for x in costs), costs
  # No verdict claims a cost it cannot bound: each cost clause is a point estimate.
  verdicts = [x for x in md.splitlines() if x.startswith("- **") and " pp " in x]
  assert verdicts and all("cost inconclusive: point estimate" in x for x in verdicts), verdicts


def test_convergence_table_and_claims_with_one_seed(one_seed):
  _, _, conv = one_seed
  row = dict(target_accuracy=0.9, clipped_fraction=None)  # fields newer than the CSV
  row.update(next(r for r in conv if r["label"] != "none"))
  cells = convergence_report.table_row(row)
  assert cells[5] == f"{row['final_test_accuracy']:.3f} ({NO})"
  assert cells[6] == f"{100 * row['cost']:+.1f} ({NO})"
  claim = claims.cost_claim("costs almost nothing", [row], 0.02, "at_most")
  assert "inf" not in " ".join(claim)
  assert f"{100 * row['cost']:+.1f} pp ({NO})" in claim[1]
  assert claim[3] == f"inconclusive (point estimates only: {NO})"


def test_convergence_figure_draws_no_band_for_one_seed(tmp_path):
  """One seed: the curve, and no 0-to-1 band standing in for an undefined interval."""
  from matplotlib import figure

  drawn = []
  real = figure.Figure.savefig

  def spy(fig, *a, **k):
    drawn.extend(len(ax.collections) for ax in fig.axes)
    return real(fig, *a, **k)

  curves = {("mean", "iid"): {"none": [(1, 0.5, -math.inf, math.inf), (2, 0.6, 0.55, 0.65)]}}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(figure.Figure, "savefig", spy)
    figures.accuracy_panel(curves, str(tmp_path / "a.png"))
    figures.accuracy_panel(
      {("mean", "iid"): {"none": [(1, 0.5, -math.inf, math.inf)]}}, str(tmp_path / "b.png")
    )
  assert drawn[0] == 1 and drawn[2] == 0  # a band only where one is finite
