"""Convergence: seeds per cell, fingerprints, intervals, relative units, adaptive labels."""

import csv
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from threshold_rows import BASE_ROW, write_thresholds_csv

from tf_dlg.analysis import intervals
from tf_dlg.study import (
  convergence,
  convergence_report,
  convergence_stats,
  defense_params,
  run_store,
)


def _write_history(run_dir, accuracies):
  """A history.csv of one round per test accuracy (made-up losses and seconds)."""
  from tf_dlg.federated import simulation

  with open(os.path.join(run_dir, simulation.HISTORY_NAME), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=simulation.HISTORY_FIELDS)
    w.writeheader()
    for r, acc in enumerate(accuracies, 1):
      w.writerow(
        dict(
          round=r, train_loss=1.0, train_accuracy=0.5, seconds=0.1, test_loss=1.0, test_accuracy=acc
        )
      )


@pytest.fixture
def fake_simulation(monkeypatch):
  """Replaces TFF training by made-up rounds (accuracy depends on seed and parameter)."""
  from tf_dlg.federated import simulation

  runs = []

  def fake_run(config, out_dir, dataset=None, fedavg=None, progress=True):
    del dataset, fedavg, progress
    runs.append(
      (
        os.path.relpath(out_dir, os.path.dirname(os.path.dirname(out_dir))),
        config.seed,
        config.defense_param,
      )
    )
    os.makedirs(out_dir, exist_ok=True)
    param = config.defense_param or 0
    _write_history(
      out_dir, [0.1 * r + 0.01 * config.seed - param for r in range(1, config.rounds + 1)]
    )

  monkeypatch.setattr(simulation, "build_for_config", lambda config, dataset: object())
  monkeypatch.setattr(simulation, "run_simulation", fake_run)
  return runs


def _grid(out, masking=0.1, seeds=(0,), **kwargs):
  base = dict(
    aggregators=("mean",),
    partitions=("iid",),
    rounds=2,
    num_clients=3,
    local_epochs=1,
    progress=False,
    dataset="digits",
  )
  return convergence.Convergence(
    str(out), {"masking": (masking, "given")}, seeds=seeds, **dict(base, **kwargs)
  )


def test_each_seed_is_its_own_run_and_rows_carry_intervals(tmp_path, fake_simulation):
  rows = _grid(tmp_path, seeds=(0, 1, 2), masking=0.05).run()
  assert len(fake_simulation) == 6  # (none, masking) x 3 seeds
  assert sorted(r for r, _, _ in fake_simulation)[:3] == [
    "mean_iid_masking/seed0",
    "mean_iid_masking/seed1",
    "mean_iid_masking/seed2",
  ]
  none, masking = rows
  # Last rounds' mean: (0.1 + 0.2) / 2 + 0.01 seed, minus the parameter.
  finals = [0.15 + 0.01 * s for s in range(3)]
  iv = intervals.mean_interval(finals)
  assert none["final_test_accuracy"] == pytest.approx(iv.estimate)
  assert (none["final_low"], none["final_high"]) == pytest.approx((iv.low, iv.high))
  assert none["seeds"] == "0 1 2" and masking["per_seed"].split()[0] == "0.1000"
  # Paired over seeds: every seed costs exactly 0.05, so the interval collapses on it.
  assert masking["cost"] == pytest.approx(0.05)
  assert (masking["cost_low"], masking["cost_high"]) == pytest.approx((0.05, 0.05))
  table = (tmp_path / "convergence.md").read_text()
  assert "seeds 0, 1, 2 (n=3)" in table and "+5.0 [+5.0, +5.0]" in table
  assert (tmp_path / "figures" / "convergence.png").stat().st_size > 1000


def test_a_folder_of_another_seed_is_not_reused(tmp_path, fake_simulation):
  _grid(tmp_path, seeds=(0,)).run()
  # A seed-0 run copied where seed 1 belongs is refused, not taken as seed 1's result.
  shutil.copytree(
    tmp_path / "runs" / "mean_iid_none" / "seed0", tmp_path / "runs" / "mean_iid_none" / "seed1"
  )
  with pytest.raises(
    run_store.CellError,
    match="mean_iid_none/seed1/cell.json: .*another configuration.*seed 0 there, 1 now",
  ):
    _grid(tmp_path, seeds=(0, 1)).run()
  assert len(fake_simulation) == 2


def test_refuses_runs_of_another_configuration(tmp_path, fake_simulation):
  first = _grid(tmp_path).run()
  history = (tmp_path / "runs" / "mean_iid_masking" / "seed0" / "history.csv").read_text()
  for kwargs, cell, diff in [
    (dict(masking=0.9), "mean_iid_masking", "defense_param 0.1 there, 0.9 now"),
    (dict(num_clients=4), "mean_iid_none", "num_clients 3 there, 4 now"),
    (dict(rounds=1), "mean_iid_none", "rounds 2 there, 1 now"),
    (dict(local_epochs=2), "mean_iid_none", "local_epochs 1 there, 2 now"),
  ]:
    with pytest.raises(
      run_store.CellError, match=f"runs/{cell}/seed0/cell.json: .*another configuration.*{diff}"
    ):
      _grid(tmp_path, **kwargs).run()
  assert len(fake_simulation) == 2
  assert (tmp_path / "runs" / "mean_iid_masking" / "seed0" / "history.csv").read_text() == history
  assert _grid(tmp_path).run() == first and len(fake_simulation) == 2


def test_resumes_an_unfinished_run_and_refuses_one_without_fingerprint(tmp_path, fake_simulation):
  _grid(tmp_path).run()
  hist = tmp_path / "runs" / "mean_iid_masking" / "seed0" / "history.csv"
  hist.write_text("\n".join(hist.read_text().splitlines()[:2]) + "\n")  # killed in round 2
  rows = _grid(tmp_path).run()
  assert fake_simulation[-1] == ("mean_iid_masking/seed0", 0, 0.1)
  assert len(fake_simulation) == 3 and all(r["rounds"] == 2 for r in rows)
  os.remove(tmp_path / "runs" / "mean_iid_none" / "seed0" / "cell.json")
  with pytest.raises(run_store.CellError, match="a run without cell.json"):
    _grid(tmp_path).run()


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(aggregators=("mean", "mode")), "aggregators: 'mode' not one of"),
    (dict(partitions=()), "partitions is empty"),
    (dict(seeds=(0, 0)), r"seeds=\[0, 0\] must be distinct"),
    (dict(seeds=()), "must be distinct and at least one"),
    (dict(rounds=0), r"rounds=0 must be an integer"),
    (dict(masking=1.5), "1.5"),
    (dict(seed=3), r"unknown simulation settings \['seed'\]"),
  ],
)
def test_bad_arguments(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _grid(tmp_path / "c", **kwargs)


def test_plain_and_adaptive_thresholds_become_labelled_settings(tmp_path):
  path = write_thresholds_csv(
    tmp_path / "t.csv",
    [
      {},
      dict(kind="adaptive", attack="masked_ig", threshold="0.9"),
      dict(
        defense="clipping_ratio",
        threshold="0.01",
        stronger="lower",
        search_low="0.0001",
        search_high="1.0",
      ),
    ],
  )
  plain = defense_params.defense_params_from_thresholds(path, "mnist", "idlg")
  assert plain == {
    "masking": (0.3, "plain threshold (found)"),
    "clipping_ratio": (0.01, "plain threshold (found)"),
  }
  adaptive = defense_params.defense_params_from_thresholds(path, "mnist", kind="adaptive")
  assert adaptive == {"masking@adaptive": (0.9, "adaptive threshold vs masked_ig (found)")}
  with pytest.raises(ValueError, match="no plain thresholds for dataset='lfw_faces'"):
    defense_params.defense_params_from_thresholds(path, "lfw_faces")


def test_adaptive_setting_is_the_stronger_of_the_two_leak_criteria(tmp_path):
  """An image is protected only when neither criterion calls it leaked."""
  both = dict(kind="adaptive", attack="masked_ig", threshold="0.5", id_status="found")
  path = write_thresholds_csv(
    tmp_path / "t.csv",
    [
      dict(both, id_threshold="0.9"),
      dict(both, defense="pruning", id_threshold="0.2"),
      dict(both, defense="noising_ratio", id_status="not_reached", id_threshold=""),
      dict(
        both,
        defense="clipping_ratio",
        attack="ig",
        stronger="lower",
        id_threshold="0.01",
        search_low="0.0001",
        search_high="1.0",
      ),
    ],
  )
  got = defense_params.defense_params_from_thresholds(path, "mnist", kind="adaptive")
  under_both = "adaptive threshold vs {} under both leak criteria (found)"
  assert got["masking@adaptive"] == (0.9, under_both.format("masked_ig"))
  assert got["pruning@adaptive"] == (0.5, under_both.format("masked_ig"))
  assert got["clipping_ratio@adaptive"] == (0.01, under_both.format("ig"))
  # Identification never stopped: the strongest setting searched, said so.
  high = float(BASE_ROW["search_high"])
  assert got["noising_ratio@adaptive"] == (
    high,
    "strongest searched vs masked_ig (threshold not reached)",
  )


def test_reached_only_leaves_out_a_defence_one_of_its_attackers_still_breaks(tmp_path):
  """No searched setting protects: nothing to cost, so nothing to train (quick preset)."""
  both = dict(kind="adaptive", attack="ig", threshold="0.5", id_status="found", id_threshold="2")
  path = write_thresholds_csv(
    tmp_path / "t.csv",
    [
      dict(both, defense="noising_ratio"),
      dict(both, defense="noising_ratio", attack="idlg", threshold="3", id_threshold="1"),
      dict(both, defense="masking", attack="masked_ig", id_status="not_reached"),
      # Stopped by ig, not by idlg: one attacker that still leaks is enough.
      dict(both, defense="pruning"),
      dict(both, defense="pruning", attack="idlg", status="not_reached"),
    ],
  )
  every = defense_params.defense_params_from_thresholds(path, "mnist", kind="adaptive")
  assert sorted(every) == ["masking@adaptive", "noising_ratio@adaptive", "pruning@adaptive"]
  got = defense_params.defense_params_from_thresholds(
    path, "mnist", kind="adaptive", reached_only=True
  )
  assert list(got) == ["noising_ratio@adaptive"]
  assert got["noising_ratio@adaptive"][0] == 3.0  # the stronger setting of both attackers
  only_masking = write_thresholds_csv(tmp_path / "m.csv", [dict(both, id_status="not_reached")])
  assert (
    defense_params.defense_params_from_thresholds(
      only_masking, "mnist", kind="adaptive", reached_only=True
    )
    == {}
  )


def test_adaptive_label_trains_the_named_defence_beside_the_plain_one(tmp_path, fake_simulation):
  conv = convergence.Convergence(
    str(tmp_path),
    {"masking": (0.1, "plain"), "masking@adaptive": (0.3, "adaptive")},
    aggregators=("mean",),
    partitions=("iid",),
    seeds=(0, 1),
    rounds=2,
    num_clients=3,
    progress=False,
    dataset="digits",
  )
  assert conv.configs[("mean", "iid", "masking@adaptive", 1)].defense == "masking"
  rows = conv.run()
  adaptive = next(r for r in rows if r["label"] == "masking@adaptive")
  assert adaptive["defense"] == "masking" and adaptive["cost"] == pytest.approx(0.3)


def test_clipped_fraction_is_the_mean_of_the_history_rounds_that_measured_it():
  rows = [dict(round=r, clipped_fraction=c) for r, c in ((1, 0.0), (2, 0.5), (3, 1.0))]
  assert convergence_stats.clipped_fraction(rows) == pytest.approx(0.5)
  # A defence that does not clip leaves the column empty: nothing to report.
  assert convergence_stats.clipped_fraction([dict(round=1, clipped_fraction=None)]) is None
  assert convergence_stats.clipped_fraction([]) is None


def test_subset_is_seeded_and_named_in_the_source():
  from tf_dlg import data

  ds = data.load_dataset("digits")
  a = convergence.subset(ds, 50, 20, seed=0)
  b = convergence.subset(ds, 50, 20, seed=0)
  assert a.x_train.shape[0] == 50 and a.x_test.shape[0] == 20
  np.testing.assert_array_equal(a.y_train, b.y_train)
  assert "seeded subset (seed 0) of 50 train / 20 test images" in a.source


def test_tiny_real_convergence_end_to_end(tmp_path):
  """Real TFF training: 1 round, 2 clients, a 40-image MNIST subset, 2 seeds."""
  conv = convergence.Convergence(
    str(tmp_path),
    {"clipping_ratio": (0.5, "given")},
    aggregators=("mean",),
    partitions=("iid",),
    seeds=(0, 1),
    subsets=(40, 20),
    progress=False,
    dataset="mnist",
    rounds=1,
    num_clients=2,
    local_epochs=1,
  )
  rows = conv.run()
  assert [r["label"] for r in rows] == ["none", "clipping_ratio"]
  for r in rows:
    assert 0.0 <= r["final_test_accuracy"] <= 1.0 and r["seeds"] == "0 1"
    assert r["final_low"] <= r["final_test_accuracy"] <= r["final_high"]
  # Own-norm rescaling by 0.5 changes every client's update, as the history recorded.
  assert rows[1]["clipped_fraction"] == 1.0 and rows[0]["clipped_fraction"] is None
  from tf_dlg.federated import simulation

  history = simulation.read_history(
    str(tmp_path / "runs" / "mean_iid_clipping_ratio" / "seed0" / simulation.HISTORY_NAME)
  )
  assert [h["clipped_fraction"] for h in history] == [1.0]
  assert 0.0 <= history[0]["zero_fraction"] < 0.5
  assert "MNIST" in conv.dataset_source and "40 train / 20 test" in conv.dataset_source
  for s in (0, 1):
    assert (tmp_path / "runs" / "mean_iid_clipping_ratio" / f"seed{s}" / "cell.json").exists()


def test_adaptive_threshold_of_several_attackers_is_the_strongest_setting(tmp_path):
  path = write_thresholds_csv(
    tmp_path / "t.csv",
    [
      dict(kind="adaptive", defense="noising_ratio", attack="ig", threshold="0.5"),
      dict(kind="adaptive", defense="noising_ratio", attack="idlg", threshold="2.0"),
      dict(kind="adaptive", defense="noising_ratio", attack="masked_ig", threshold="1.0"),
    ],
  )
  adaptive = defense_params.defense_params_from_thresholds(path, "mnist", kind="adaptive")
  assert adaptive == {"noising_ratio@adaptive": (2.0, "adaptive threshold vs idlg (found)")}


def _history(accuracies):
  return [{"test_accuracy": a} for a in accuracies]


def test_rounds_to_target_pairs_seeds_and_censors_a_run_that_never_reaches_it():
  rows = [
    dict(aggregator="mean", partition="iid", label="none", final_test_accuracy=0.8),
    dict(aggregator="mean", partition="iid", label="masking", final_test_accuracy=0.8),
    dict(aggregator="mean", partition="iid", label="pruning", final_test_accuracy=0.5),
  ]
  histories = {
    ("mean", "iid", "none"): [_history([0.5, 0.76, 0.8]), _history([0.7, 0.8, 0.8])],
    ("mean", "iid", "masking"): [_history([0.5, 0.6, 0.77]), _history([0.6, 0.79, 0.8])],
    ("mean", "iid", "pruning"): [_history([0.5, 0.5, 0.5]), _history([0.7, 0.76, 0.8])],
  }
  convergence_stats.add_rounds_to_target(rows, histories, 0.95)
  none, masking, pruning = rows
  # Target 0.95 x 0.8 = 0.76: reached at rounds 2 and 2 undefended, 3 and 2 masked.
  assert none["target_accuracy"] == pytest.approx(0.76) and none["per_seed_rounds"] == "2 2"
  assert masking["per_seed_rounds"] == "3 2" and masking["rounds_to_target"] == 2.5
  iv = intervals.paired_difference([3, 2], [2, 2])
  assert (masking["round_cost"], masking["round_cost_low"]) == pytest.approx((0.5, iv.low))
  assert none["round_cost"] == 0.0
  # Seed 0 of pruning never reaches 0.76: no mean, no interval, the table says so.
  assert pruning["per_seed_rounds"] == "- 2" and "rounds_to_target" not in pruning
  assert "round_cost" not in pruning
  assert convergence_report.format_rounds(pruning) == "not reached in 1/2 seeds"
  assert convergence_report.format_rounds(masking).startswith("2.5 [")
  assert convergence_stats.rounds_to(_history([0.1, 0.2]), 0.2) == 2
  with pytest.raises(ValueError, match="target fraction"):
    convergence_stats.add_rounds_to_target(rows, histories, 1.5)


def test_a_label_confined_to_some_cells_trains_only_there(tmp_path, fake_simulation):
  conv = convergence.Convergence(
    str(tmp_path),
    {"masking": (0.1, "plain"), "masking@adaptive": (0.2, "strongest")},
    aggregators=("mean", "median"),
    partitions=("iid",),
    seeds=(0, 1),
    rounds=2,
    num_clients=3,
    progress=False,
    dataset="digits",
  ).confine({"masking@adaptive": [("mean", "iid")]})
  rows = conv.run()
  # none and masking in both cells, the adaptive setting only in (mean, iid): 2 x 2 x 2 + 2.
  assert len(fake_simulation) == 10
  assert sorted((r["aggregator"], r["label"]) for r in rows) == [
    ("mean", "masking"),
    ("mean", "masking@adaptive"),
    ("mean", "none"),
    ("median", "masking"),
    ("median", "none"),
  ]
  adaptive = next(r for r in rows if r["label"] == "masking@adaptive")
  assert adaptive["cost"] == pytest.approx(0.2)  # paired with (mean, iid)'s own baseline
  with pytest.raises(ValueError, match=r"cells_of\[masking\]: \('mean', 'dirichlet'\) not one of"):
    convergence.Convergence(
      str(tmp_path / "x"),
      {"masking": (0.1, "plain")},
      partitions=("iid",),
      dataset="digits",
    ).confine({"masking": [("mean", "dirichlet")]})


def test_a_run_another_process_holds_is_left_to_it_and_read_once_it_is_done(
  tmp_path, fake_simulation
):
  """Two trainers share a grid: neither trains a run the other holds; `run` waits for it."""
  conv = _grid(tmp_path, seeds=(0, 1))
  held_dir = conv.run_dir("mean", "iid", "masking", 1)
  conv.prepare()
  holding, release = threading.Event(), threading.Event()

  def other_trainer():  # a second open file: flock treats it as another holder
    with run_store.hold(held_dir, wait=True) as held:
      assert held
      holding.set()
      release.wait(30)
      run_store.claim_cell(held_dir, conv.fingerprints[("mean", "iid", "masking", 1)])
      _write_history(held_dir, [0.5, 0.5])

  other = threading.Thread(target=other_trainer)
  other.start()
  assert holding.wait(30)
  assert conv.train() == 3  # (none, masking) x 2 seeds, but the held one
  assert ("mean_iid_masking/seed1", 1, 0.1) not in fake_simulation
  with run_store.hold(held_dir, wait=False) as held:
    assert not held
  threading.Timer(0.5, release.set).start()
  rows = conv.run()  # waits for the other trainer, then reads its run
  other.join()
  assert len(fake_simulation) == 3
  masking = next(r for r in rows if r["label"] == "masking")
  assert masking["per_seed"].split() == ["0.0500", "0.5000"]


def test_a_hold_ends_with_its_process(tmp_path):
  """A killed trainer leaves no stale hold: the next process takes the run at once."""
  code = (
    "import sys, time; from tf_dlg.study import run_store\n"
    "with run_store.hold(sys.argv[1], wait=False) as held:\n"
    "  print(held, flush=True); time.sleep(120)\n"
  )
  child = subprocess.Popen(
    [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert child.stdout.readline().strip() == "True"
    with run_store.hold(str(tmp_path), wait=False) as held:
      assert not held
  finally:
    child.kill()
    child.wait()
  with run_store.hold(str(tmp_path), wait=False) as held:
    assert held


def test_the_progress_bar_counts_runs_finished_by_any_trainer(tmp_path, fake_simulation, capsys):
  """Runs another trainer finished count at once; the bar ends at every run."""
  _grid(tmp_path, seeds=(0,)).train()  # the other trainer: both runs of seed 0
  _grid(tmp_path, seeds=(0, 1), progress=True).run()
  err = capsys.readouterr().err
  # 2/4 before this process trains anything (never 1/4), then 3/4, 4/4.
  assert "2/4" in err and "1/4" not in err and "4/4" in err, err[-500:]
  assert len(fake_simulation) == 4  # seed 0 once, seed 1 once
