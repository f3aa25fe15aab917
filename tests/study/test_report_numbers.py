"""Every number of a real miniature reproduce run's report, checked against its CSVs.

One small `paper`-preset run (offline MNIST, two defences, two images, two seeds, one
FedAvg round) writes thresholds.csv, convergence.csv, claims.md, report.md and report.html.
The tests parse the report's tables and compare each number they show with the CSV row it
must come from, within the rounding of its printed digits; verdicts are recomputed from the
CSV numbers; figures are checked by what they draw (the matplotlib figures as saved, and
the PNGs embedded in the HTML), not by file size.
"""

import base64
import csv
import html
import io
import json
import re
import time

import matplotlib
import numpy as np
import pytest

from tf_dlg.study import claims, pipeline, presets

matplotlib.use("Agg")

# A printed "%.3g" value is within half a unit of its third significant digit.
REL_3G = 5e-3
# Points printed with one decimal ("%+.1f"): within 0.05 pp; accuracies "%.3f": 5e-4.
PP_TOL = 0.05 + 1e-9
ACC_TOL = 5e-4 + 1e-9
NUM = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
MARGIN_PP = 100 * claims.ALMOST_NO_COST
COMMAND = "python -m experiments.reproduce --preset=paper"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The miniature run, with every figure's axes and lines recorded as it is saved."""
  from matplotlib import figure

  out = tmp_path_factory.mktemp("mini")
  settings = presets.PRESETS["paper"].override(
    datasets=["mnist"],
    defenses=["masking", "clipping_ratio"],
    convergence_defenses=["masking", "clipping_ratio"],
    convergence_dataset="mnist",
    num_images=2,
    iterations=60,
    restarts=1,
    log_resolution=1000.0,
    linear_resolution=0.5,
    adaptive=False,
    adaptive_attacks=[],
    rounds=1,
    num_clients=2,
    seeds=2,
    train_examples=40,
    test_examples=20,
    partitions=["iid"],
  )
  saved = {}
  real = figure.Figure.savefig

  def spy(fig, fname, *args, **kwargs):
    saved[str(fname).rsplit("/", 1)[-1]] = [
      {
        "title": ax.get_title(),
        "lines": [(ln.get_label(), np.asarray(ln.get_ydata(), float)) for ln in ax.get_lines()],
        "markers": [(ln.get_marker(), np.asarray(ln.get_ydata(), float)) for ln in ax.get_lines()],
      }
      for ax in fig.axes
    ]
    return real(fig, fname, *args, **kwargs)

  from tf_dlg.study import threshold_search

  real_cell, beside_runs = threshold_search.ThresholdSearch.search_cell, {}

  def first_cell_waits(self, *args, **kwargs):
    # The miniature search is shorter than the child's start (TensorFlow, a TFF build):
    # wait after the first cell until a run trained beside it has finished.
    cell = real_cell(self, *args, **kwargs)
    deadline = time.time() + 240
    while not beside_runs and time.time() < deadline:
      for path in out.glob("convergence/runs/*/seed*/history.csv"):
        if len(path.read_text().splitlines()) > settings.rounds:
          beside_runs[path] = path.stat().st_mtime_ns
      time.sleep(0.2)
    return cell

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(figure.Figure, "savefig", spy)
    mp.setattr(threshold_search.ThresholdSearch, "search_cell", first_cell_waits)
    paths = pipeline.run(str(out), settings, progress=False, command=COMMAND)
  return dict(out=out, paths=paths, saved=saved, settings=settings, beside_runs=beside_runs)


def test_runs_trained_beside_the_search_are_kept_and_counted(run):
  """A run the child trained during the search is not trained again, and the report says so."""
  assert run["beside_runs"], "no training run finished beside the search within 240 s"
  for path, mtime in run["beside_runs"].items():
    assert path.stat().st_mtime_ns == mtime, f"{path} was trained again after the search"
  md = (run["out"] / "report.md").read_text()
  m = re.search(
    r"convergence \((\d+) of its runs? trained beside, during the search or after it\)", md
  )
  assert m and int(m.group(1)) >= len(run["beside_runs"]), md


def test_wall_times_name_what_they_were_measured_on(run):
  """The run's CPU time fits the cores' capacity over its wall time, and is its share."""
  md = (run["out"] / "report.md").read_text()
  total = float(re.search(r"^- total: (\d+) s$", md, re.M).group(1))
  m = re.search(
    r"^- measured on: .+, (\d+) usable of (\d+) cores: this run used ([\d,]+) CPU-s of their "
    r"([\d,]+) \((\d+)%\), the machine as a whole (\d+)%",
    md,
    re.M,
  )
  assert m, md
  cores = int(m.group(2))
  own, capacity = (float(m.group(i).replace(",", "")) for i in (3, 4))
  assert capacity >= (total - 1) * cores  # the stages lie inside the measured span
  assert 1 <= own <= capacity
  assert abs(int(m.group(5)) - 100 * own / capacity) <= 1


def _csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _thresholds(run):
  return _csv(run["out"] / "thresholds" / "thresholds.csv")


def _convergence(run):
  return _csv(run["out"] / "convergence" / "convergence.csv")


def _tables(text):
  """{heading: [rows as {column: cell}]} of every markdown table, by the nearest heading."""
  tables, heading, lines = {}, None, text.splitlines()
  for i, line in enumerate(lines):
    if line.startswith("#"):
      heading = line.lstrip("#").strip()
    is_header = line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---")
    if is_header:
      cols = [c.strip() for c in line.strip("|").split("|")]
      rows = []
      for row in lines[i + 2 :]:
        if not row.startswith("|"):
          break
        rows.append(dict(zip(cols, [c.strip() for c in row.strip("|").split("|")])))
      tables[heading] = rows
  return tables


def _near(printed, value, rel=REL_3G):
  return float(printed) == pytest.approx(float(value), rel=rel, abs=1e-12)


def _check_threshold_text(text, row):
  """`value [low, high]` (optionally `(n=t/a)`) printed for a thresholds.csv row."""
  m = re.fullmatch(rf"({NUM}) \[({NUM}), ({NUM})\](?: \(n=(\d+)/(\d+)\))?", text)
  assert m, text
  assert row["status"] == "found", (text, row["status"])
  for printed, key in zip(m.groups()[:3], ("threshold", "low", "high")):
    assert _near(printed, row[key]), (text, key, row[key])
  if m.group(4) is not None:
    assert (int(m.group(4)), int(m.group(5))) == (int(row["num_tested"]), int(row["num_images"]))


def test_threshold_table_numbers_are_the_csvs(run):
  report = open(run["paths"]["report"]).read()
  tables = _tables(report)
  csv_rows = {(r["dataset"], r["defense"]): r for r in _thresholds(run) if r["kind"] == "plain"}
  table = tables["Plain threshold, attack `idlg`"]
  assert {r["defence"] for r in table} == {d for _, d in csv_rows}
  for r in table:
    for dataset in run["settings"].datasets:
      _check_threshold_text(r[dataset], csv_rows[(dataset, r["defence"])])


def test_per_image_spread_numbers_are_the_csvs(run):
  tables = _tables(open(run["paths"]["report"]).read())
  table = tables["Per-image spread"]
  csv_rows = {(r["dataset"], r["defense"]): r for r in _thresholds(run)}
  assert len(table) == len(csv_rows)
  for r in table:
    row = csv_rows[(r["dataset"], r["defence"])]
    assert (r["status"], r["unit"]) == (row["status"], row["unit"])
    _check_threshold_text(r["threshold [95 %]"], row)
    assert r["tested / images"] == f"{row['num_tested']} / {row['num_images']}"
    per_image = json.loads(row["per_image"])
    printed = [float(x) for x in r["per image: min / median / max"].split(" / ")]
    # Two images: the median is the mean of the two.
    want = [min(per_image), sum(per_image) / len(per_image), max(per_image)]
    assert len(per_image) == 2
    assert all(_near(p, w) for p, w in zip(printed, want)), (printed, want)
    for col, key in (
      ("absolute eq.", "absolute_equivalent"),
      ("relative eq.", "relative_equivalent"),
    ):
      assert (r[col] == "") == (row[key] == ""), (col, r[col], row[key])
      if row[key]:
        assert _near(r[col], row[key])
    assert int(r["points"]) == int(row["points_evaluated"])
  # clipping_ratio has an absolute equivalent (ratio x median norm); masking has none.
  assert csv_rows[("mnist", "clipping_ratio")]["absolute_equivalent"] != ""


def _verdict_at_most(low_pp, high_pp):
  """The claim 'cost <= margin': decided only when the interval excludes the margin."""
  if high_pp <= MARGIN_PP:
    return "agrees"
  if low_pp > MARGIN_PP:
    return "disagrees"
  return "inconclusive"


def test_claims_table_numbers_and_verdicts_are_the_csvs(run):
  report = open(run["paths"]["report"]).read()
  table = _tables(report)["The paper's claims, tested"]
  thresholds = _thresholds(run)
  conv = _convergence(run)
  seen_threshold = seen_cost = 0
  for r in table:
    claim, measured = r["claim"], r["our measurement"]
    m = re.match(r"A threshold of (\w+) stops the attack", claim)
    if m:
      cells = re.findall(
        rf"(\w+) \(([\w+]+)\): ({NUM} \[{NUM}, {NUM}\](?: \(n=\d+/\d+\))?)", measured
      )
      assert len(cells) == len(run["settings"].datasets), measured
      for dataset, attack, text in cells:
        (row,) = [
          t
          for t in thresholds
          if (t["dataset"], t["attack"], t["defense"]) == (dataset, attack, m.group(1))
        ]
        _check_threshold_text(text.strip(), row)
        seen_threshold += 1
      # Every dataset's threshold found: the claim holds.
      assert r["verdict"] == "agrees", r
      continue
    label = re.match(r"\w+ \((\w+)\) at its threshold", claim)
    costs = re.findall(
      rf"(\w+)/(\w+): ({NUM}) pp \[({NUM}), ({NUM})\] \(n=(\d+) seeds\) (\w+)", measured
    )
    assert costs, r
    verdicts = []
    for agg, part, cost, low, high, n, verdict in costs:
      rows = [
        c
        for c in conv
        if (c["aggregator"], c["partition"]) == (agg, part)
        and c["defense"] != "none"
        and (label is None or c["label"] == label.group(1))
        and all(
          abs(float(p) - 100 * float(c[k])) <= PP_TOL
          for p, k in ((cost, "cost"), (low, "cost_low"), (high, "cost_high"))
        )
      ]
      assert rows, (agg, part, cost, low, high)
      assert int(n) == len(rows[0]["seeds"].split())
      want = _verdict_at_most(100 * float(rows[0]["cost_low"]), 100 * float(rows[0]["cost_high"]))
      assert "cost <= 2 pp" in claim and verdict == want, (claim, verdict, want)
      verdicts.append(verdict)
      seen_cost += 1
    # "in every setting": agrees only if all agree, disagrees if any disagrees.
    overall = (
      "disagrees"
      if "disagrees" in verdicts
      else "agrees"
      if set(verdicts) == {"agrees"}
      else "inconclusive"
    )
    assert r["verdict"].split(" (")[0] == overall, (r["verdict"], verdicts)
    fractions = re.search(r"clipped fraction of client updates: ([\d., ]+)", measured)
    if "acts in training" in claim:
      want = [float(c["clipped_fraction"]) for c in conv if c["clipped_fraction"]]
      got = [float(x) for x in fractions.group(1).split(", ")]
      assert got == pytest.approx(want, abs=0.005 + 1e-9)
  # Two defences x one dataset thresholds; costs: 2 defences + clipping's own row, 2 aggregators.
  assert seen_threshold == 2 and seen_cost == 6


def test_convergence_table_numbers_are_the_csvs(run):
  tables = _tables(open(run["paths"]["report"]).read())
  table = tables["Convergence with defences at their thresholds"]
  conv = {(c["aggregator"], c["partition"], c["label"]): c for c in _convergence(run)}
  assert len(table) == len(conv) == 6  # mean, median x none + 2 defences
  for r in table:
    c = conv[(r["aggregator"], r["clients"], r["defence"])]
    acc = [float(x) for x in re.findall(NUM, r["final acc. [95 %]"])]
    want = [float(c[k]) for k in ("final_test_accuracy", "final_low", "final_high")]
    assert acc == pytest.approx(want, abs=ACC_TOL)
    # Rounds to target: the per-seed first rounds reaching the stated target.
    per_seed = c["per_seed_rounds"].split()
    assert float(r["target"]) == pytest.approx(float(c["target_accuracy"]), abs=5e-4)
    if "-" in per_seed:
      assert r["rounds to target [95 %]"].startswith("not reached in")
    else:
      got = [float(x) for x in re.findall(NUM, r["rounds to target [95 %]"])]
      assert got[0] == pytest.approx(np.mean([int(x) for x in per_seed]), abs=0.05)
      assert got == pytest.approx(
        [float(c[k]) for k in ("rounds_to_target", "rounds_low", "rounds_high")], abs=0.05
      )
    # Final accuracy after one round is the mean over seeds of each seed's value.
    seeds = [float(x) for x in c["per_seed"].split()]
    assert float(c["final_test_accuracy"]) == pytest.approx(np.mean(seeds), abs=1e-4)
    if c["defense"] == "none":
      assert r["cost pp [95 %]"] == "" and r["parameter"] == ""
      continue
    cost = [float(x) for x in re.findall(NUM, r["cost pp [95 %]"])]
    assert cost == pytest.approx(
      [100 * float(c[k]) for k in ("cost", "cost_low", "cost_high")], abs=PP_TOL
    )
    assert _near(r["parameter"], c["param"])
    assert (r["clipped"] == "") == (c["clipped_fraction"] == "")
    # The cost is paired by seed: none's per-seed accuracy minus the defence's.
    none = conv[(r["aggregator"], r["clients"], "none")]
    paired = np.mean([float(a) - float(b) for a, b in zip(none["per_seed"].split(), seeds)])
    assert float(c["cost"]) == pytest.approx(paired, abs=1e-4)


def _html_rows(text):
  rows = []
  for tr in re.findall(r"<tr>(.*?)</tr>", text, flags=re.S):
    cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr, flags=re.S)
    rows.append(tuple(html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in cells))
  return rows


def test_html_shows_the_same_tables_as_the_markdown(run):
  md = open(run["paths"]["report"]).read()
  page = open(run["paths"]["html"]).read()
  html_rows = set(_html_rows(page))
  for heading, table in _tables(md).items():
    for r in table:
      want = tuple(c.replace("`", "") for c in r.values())
      assert want in html_rows, (heading, want)


def _png_content(png):
  """(white share, number of distinct colours) of a PNG's RGB pixels."""
  from matplotlib import image

  pixels = image.imread(io.BytesIO(png) if isinstance(png, bytes) else png)[..., :3]
  grey = pixels.mean(axis=-1)
  colours = np.unique(np.round(pixels.reshape(-1, 3), 1), axis=0)
  return float(np.mean(grey > 0.95)), len(colours)


def test_figures_draw_the_csvs_series(run):
  saved, conv = run["saved"], _convergence(run)
  # Convergence: one panel per aggregator x partition, one curve per defence (and none);
  # each curve's last point is that cell's final accuracy (one round).
  panels = saved["convergence.png"]
  assert len(panels) == 2
  for panel in panels:
    agg = panel["title"].split()[0]
    curves = {label.split()[0]: y for label, y in panel["lines"] if not label.startswith("_")}
    cells = {c["label"]: c for c in conv if c["aggregator"] == agg}
    assert set(curves) == set(cells), (panel["title"], set(curves))
    for label, y in curves.items():
      assert y[-1] == pytest.approx(float(cells[label]["final_test_accuracy"]), abs=1e-4)
  # Strip plots: one per defence, a point at each image's threshold.
  for row in _thresholds(run):
    (ax,) = saved[f"thresholds_{row['defense']}.png"]
    assert row["defense"] in ax["title"]
    dots = np.concatenate([y for marker, y in ax["markers"] if marker == "o"])
    want = sorted(json.loads(row["per_image"]))
    np.testing.assert_allclose(sorted(dots), want, rtol=1e-6, err_msg=row["defense"])
  # Image grids: 3 x 4 panels (no defence, one step weaker, threshold x leaked/adjusted/
  # original/the attacker's pick).
  assert len(saved["grid_mnist_idlg_masking.png"]) == 12


def test_html_embeds_figures_with_content(run):
  page = open(run["paths"]["html"]).read()
  pngs = [base64.b64decode(s) for s in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
  # convergence (twice: its section and Figures), 2 grids, 2 strip plots.
  assert len(pngs) >= 5
  for png in pngs:
    white, colours = _png_content(png)
    # A plot on a white page: the page dominates but is not all there is, and lines,
    # markers or images add colours (a blank canvas has 1).
    assert 0.2 < white < 0.99 and colours > 5, (white, colours)


def test_report_names_its_provenance(run):
  report = open(run["paths"]["report"]).read()
  for needle in ("MNIST", "seeds 0, 1", "tensorflow-federated", "preset `paper`"):
    assert needle in report, needle
  # The command heads the report and every stage's provenance line.
  assert f"Command: ` {COMMAND} ` (preset `paper`)" in report
  sources = [line for line in report.splitlines() if line.startswith("*Source: `")]
  assert len(sources) == 3 and all(f"command: ` {COMMAND} `" in line for line in sources)
