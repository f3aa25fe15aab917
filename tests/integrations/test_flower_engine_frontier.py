"""The privacy-utility frontier on Flower's engine (no TFF): TF 2.21 attacks, Flower training.

One tiny frontier -- masking at 0.9, 2 digits attacked (5 iterations), 2 clients, 1
round, seeds 0 and 1 -- run for real on a local Ray (tens of seconds), its cost checked
against the run histories by hand (paired by seed), and its rows' columns against a
TFF-engine frontier of the same settings (training made up: TFF is absent here; the
columns are what is compared).
"""

import csv
import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest

from tf_dlg.federated import simulation as sim
from tf_dlg.integrations import flower_engine
from tf_dlg.study import convergence_report, frontier, frontier_points, pipeline, presets, run_store

# A frontier reads a preset: the trained defences on the training dataset.
TINY = presets.Preset(
  convergence_dataset="digits",
  convergence_defenses=("masking",),
  frontier_grids={"masking": (0.9,)},
  dp_multipliers=(),
  frontier_images=2,
  iterations=5,
  restarts=1,
  seeds=2,  # 0 and 1
  rounds=1,
  num_clients=2,
  train_examples=60,
  test_examples=40,
)


@pytest.fixture(scope="module")
def flower_frontier(tmp_path_factory):
  out = tmp_path_factory.mktemp("flower_frontier")
  points = frontier.run_frontier(str(out), TINY.override(engine="flower"), progress=False)
  yield out, points
  flower_engine.shutdown()


def _header(path):
  with open(path, newline="") as f:
    return next(csv.reader(f))


def test_frontier_trains_with_flower_end_to_end(flower_frontier):
  out, points = flower_frontier
  (p,) = points
  assert (p.label, p.engine, p.num_images) == ("masking@0.9", "flower", 2)
  assert p.identified == round(p.top1 * 2) and p.undefended_identified in (0, 1, 2)
  # The cost by hand: undefended minus defended final accuracy, paired by seed.
  finals = {}
  for label in ("none", "masking@0.9"):
    for seed in (0, 1):
      run = out / "convergence" / "runs" / f"mean_iid_{label}" / f"seed{seed}"
      (row,) = sim.read_history(str(run / sim.HISTORY_NAME))
      finals[label, seed] = row["test_accuracy"]
      assert json.loads((run / "cell.json").read_text())["config"]["engine"] == "flower"
  costs = [finals["none", s] - finals["masking@0.9", s] for s in (0, 1)]
  assert p.cost == pytest.approx(np.mean(costs), abs=1e-4)
  assert p.baseline_accuracy == pytest.approx(
    np.mean([finals["none", s] for s in (0, 1)]), abs=1e-4
  )
  # Every output names the engine.
  assert frontier_points.read_frontier(str(out / "frontier.csv")) == points
  assert "engine `flower`" in (out / "frontier.md").read_text()
  rows = convergence_report.read_convergence(str(out / "convergence" / "convergence.csv"))
  assert {r["engine"] for r in rows} == {"flower"}
  # A TFF frontier cannot take over the Flower runs' folders.
  with pytest.raises(run_store.CellError):
    frontier.Frontier(str(out), TINY).convergence.prepare()


def test_flower_and_tff_frontier_rows_have_the_same_columns(
  flower_frontier, tmp_path, monkeypatch, no_child_trainer
):
  def made_up_tff_run(config, out_dir, dataset=None, fedavg=None, progress=True):
    os.makedirs(out_dir, exist_ok=True)
    row = dict(round=1, train_loss=1, train_accuracy=0.5, test_loss=1, test_accuracy=0.5)
    sim.write_history(os.path.join(out_dir, sim.HISTORY_NAME), [dict(row, seconds=0.1)])

  monkeypatch.setattr(sim, "build_for_config", lambda config, dataset: None)
  monkeypatch.setattr(sim, "run_simulation", made_up_tff_run)
  tff_points = frontier.run_frontier(str(tmp_path), TINY.override(engine="tff"), progress=False)
  out, flower_points = flower_frontier
  assert _header(out / "frontier.csv") == _header(tmp_path / "frontier.csv")
  assert list(frontier_points.FRONTIER_FIELDS) == _header(tmp_path / "frontier.csv")
  assert [p.engine for p in tff_points] == ["tff"] and [p.engine for p in flower_points] == [
    "flower"
  ]
  # The same attacks (same seeds and images): the same identification either way.
  fields = ("identified", "top1", "undefended_identified", "top1_gallery", "median_rank")
  assert [getattr(tff_points[0], f) for f in fields] == [
    getattr(flower_points[0], f) for f in fields
  ]
  table = (out / "frontier.md").read_text().splitlines()
  other = (tmp_path / "frontier.md").read_text().splitlines()
  assert [line for line in table if line.startswith("| defence")] == [
    line for line in other if line.startswith("| defence")
  ]


def test_a_frontier_csv_without_engine_column_reads_as_tff(flower_frontier, tmp_path):
  out, points = flower_frontier
  with open(out / "frontier.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  old = tmp_path / "old.csv"
  fields = [k for k in frontier_points.FRONTIER_FIELDS if k != "engine"]
  with open(old, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  assert frontier_points.read_frontier(str(old)) == [dataclasses.replace(points[0], engine="tff")]


def test_dp_points_without_their_modules_are_refused_before_any_work(monkeypatch, tmp_path):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: None if name == "dp_accounting" else real(name, *a),
  )
  with pytest.raises(ValueError, match=r"dp_multipliers=\[0.5\]: DP points need .*dp_accounting"):
    frontier.run_frontier(str(tmp_path), TINY.override(dp_multipliers=(0.5,)), progress=False)
  assert not os.listdir(tmp_path)
  with pytest.raises(ValueError, match="engine"):
    frontier.check(TINY.override(engine="flower-central-dp"))


def test_the_reproduce_presets_pass_the_engine_to_every_training_stage(tmp_path):
  settings = presets.with_overrides("frontier", {"engine": "flower", "dp_multipliers": []})
  frontier.check(settings)
  assert (settings.engine, frontier.dp_multipliers(settings)) == ("flower", ())
  conv = pipeline._convergence(str(tmp_path), settings, {}, progress=False)
  assert conv.engine == "flower"
  default = presets.with_overrides("frontier", {"dp_multipliers": [0.5, 2.0]})
  assert (default.engine, default.dp_multipliers) == ("tff", (0.5, 2.0))
  assert pipeline._convergence(str(tmp_path), default, {}, progress=False).engine == "tff"
