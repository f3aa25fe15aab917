"""Miniature end-to-end runs of the experiments: structure, consistency, resume."""

import csv
import os

import pytest

from experiments import convergence, reproduce, results, threshold_search
from tf_dlg import defenses
from tf_dlg.analysis import threshold as threshold_lib

TINY = dict(datasets=["digits"], attacks=["idlg"], defenses=["masking", "clipping"],
            num_images=2, iterations=400, bisection_steps=2, seed=0, progress=False)


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _count_attacks(monkeypatch):
  from tf_dlg.attacks import runner
  calls = []
  real = runner.run_attacks

  def spy(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)
  monkeypatch.setattr(runner, "run_attacks", spy)
  return calls


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("thr_clean"))
  search = threshold_search.ThresholdSearch(out, **TINY)
  rows = search.run()
  return out, search, rows


def test_threshold_search_outputs_and_consistency(clean_run):
  out, search, rows = clean_run
  for name in ("points.jsonl", "thresholds.csv", "thresholds.md"):
    assert os.path.exists(os.path.join(out, name)), name
  table = _read_csv(os.path.join(out, "thresholds.csv"))
  assert [(r["dataset"], r["defense"]) for r in table] == [("digits", "masking"),
                                                           ("digits", "clipping")]
  md = open(os.path.join(out, "thresholds.md")).read()
  assert "masking" in md and "sklearn.datasets.load_digits" in md
  # Undefended iDLG leaks on these digits: the search measures something.
  base = search.log.get(threshold_search.point_key("digits", "idlg", "none", None))
  assert base["fraction_defended"] == 0.0 and base["median_adjusted_ssim"] > 0.9
  for r in rows:
    space = threshold_lib.SearchSpace(*defenses.PARAMETER_SEARCH[r["defense"]])
    points = [p for p in search.log if p["dataset"] == "digits" and p["defense"] == r["defense"]]
    assert len(points) == r["points_evaluated"]
    if r["status"] == "found":
      at = search.log.get(threshold_search.point_key("digits", "idlg", r["defense"], r["threshold"]))
      weaker = search.log.get(threshold_search.point_key("digits", "idlg", r["defense"],
                                                         r["weaker_param"]))
      assert at["defended"] and not weaker["defended"]  # defended at it, leaks just below
      assert space.is_stronger(r["threshold"], r["weaker_param"])
      # No evaluated point weaker than the threshold was defended.
      assert not any(p["defended"] for p in points
                     if space.is_stronger(r["threshold"], p["param"]))
    grid = os.path.join(out, "figures", f"grid_digits_idlg_{r['defense']}.png")
    assert os.path.getsize(grid) > 1000


def test_masking_at_strong_rate_defends_and_leaks_at_weak(clean_run):
  out, search, rows = clean_run
  masking = next(r for r in rows if r["defense"] == "masking")
  assert masking["status"] == "found"
  assert 1e-4 < masking["threshold"] <= 0.99
  assert masking["fraction_defended_weaker"] < 1.0 <= masking["fraction_defended"]


def test_resume_after_kill_redoes_nothing_and_matches(clean_run, tmp_path, monkeypatch):
  out_clean, _, _ = clean_run
  out = str(tmp_path / "thr")
  calls = _count_attacks(monkeypatch)
  search = threshold_search.ThresholdSearch(out, **TINY)
  real_evaluate = search.evaluate
  budget = {"left": 3}

  def dying_evaluate(*args, **kwargs):
    if budget["left"] == 0:
      raise KeyboardInterrupt("killed midway")
    budget["left"] -= 1
    return real_evaluate(*args, **kwargs)
  search.evaluate = dying_evaluate
  with pytest.raises(KeyboardInterrupt):
    search.run()
  finished = len(calls)
  assert finished == 3
  total_points = sum(1 for _ in results.ResultsLog(
      os.path.join(out_clean, "points.jsonl"), "threshold_search", search.config))
  calls.clear()
  resumed = threshold_search.ThresholdSearch(out, **TINY)
  resumed.run()
  assert len(calls) == total_points - finished  # finished cells were not redone
  assert _read_csv(os.path.join(out, "thresholds.csv")) == _read_csv(
      os.path.join(out_clean, "thresholds.csv"))


def test_foreign_or_other_config_results_are_refused(tmp_path):
  out = tmp_path / "thr"
  out.mkdir()
  (out / "points.jsonl").write_text("this is not ours\n")
  with pytest.raises(results.ResultsFileError, match="not a tf-dlg results file"):
    threshold_search.ThresholdSearch(str(out), **TINY)
  other = tmp_path / "thr2"
  threshold_search.ThresholdSearch(str(other), **TINY)
  with pytest.raises(results.ResultsFileError, match="differs in: num_images"):
    threshold_search.ThresholdSearch(str(other), **dict(TINY, num_images=3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(datasets=["imagenet"]), "datasets: 'imagenet' not one of digits"),
    (dict(datasets=[]), "datasets is empty"),
    (dict(defenses=["blur"]), "defenses: 'blur' not one of masking"),
    (dict(attacks=["gan"]), "attacks: 'gan' not one of"),
    (dict(num_images=0), r"num_images=0 must be an integer in \[1, inf\]"),
    (dict(leak_ssim=1.5), r"leak_ssim=1.5 must be a number in \(0, 1\]"),
    (dict(leak_ssim=float("nan")), "leak_ssim=nan"),
    (dict(bisection_steps=-1), "bisection_steps=-1"),
    (dict(seed=-3), "seed=-3"),
    (dict(iterations=0), "iterations=0"),
    (dict(defended_fraction=0.0), "defended_fraction=0.0"),
])
def test_threshold_search_bad_arguments(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    threshold_search.ThresholdSearch(str(tmp_path / "out"), **dict(TINY, **kwargs))
  assert not os.path.exists(tmp_path / "out" / "points.jsonl")  # refused before any file


@pytest.mark.slow  # end-to-end: real attacks / TFF training, a minute or two
def test_rescore_with_adaptive_attacker_and_fedavg_delta(clean_run):
  _, search, rows = clean_run
  out = search.rescore([r for r in rows if r["defense"] == "masking"], attacks=["masked_ig"])
  assert {(o["attack"], o["update"]) for o in out} == {("masked_ig", "gradient"),
                                                        ("idlg", "fedavg_delta")}
  for o in out:
    assert o["verdict"] in ("holds", "broken", "untested (attack fails undefended)")
    assert 0.0 <= o["fraction_defended"] <= 1.0
  delta = next(o for o in out if o["update"] == "fedavg_delta")
  # The multi-step delta attack recovers undefended images: the verdict means something.
  assert delta["undefended_leak_fraction"] == 1.0
  assert os.path.exists(os.path.join(search.output_dir, "robustness.md"))


@pytest.mark.slow  # end-to-end: real attacks / TFF training, a minute or two
def test_convergence_miniature(clean_run, tmp_path):
  out_thr, _, _ = clean_run
  params = convergence.defense_params_from_thresholds(
      os.path.join(out_thr, "thresholds.csv"), "digits")
  assert set(params) == {"masking", "clipping"}
  conv = convergence.Convergence(str(tmp_path / "conv"), {"masking": params["masking"]},
                                 aggregators=("mean", "median"), partitions=("iid",),
                                 rounds=2, progress=False)
  rows = conv.run()
  assert {(r["aggregator"], r["defense"]) for r in rows} == {
      ("mean", "none"), ("mean", "masking"), ("median", "none"), ("median", "masking")}
  for r in rows:
    assert r["rounds"] == 2 and 0.0 <= r["final_test_accuracy"] <= 1.0
    if r["defense"] == "none":
      assert r["drop_vs_none"] == 0.0
  assert os.path.getsize(tmp_path / "conv" / "figures" / "convergence.png") > 1000
  with pytest.raises(ValueError, match="NAME:VALUE"):
    convergence.parse_defense_params(["masking=0.5"])
  with pytest.raises(ValueError, match="no thresholds for dataset='photos'"):
    convergence.defense_params_from_thresholds(os.path.join(out_thr, "thresholds.csv"),
                                               "photos")


@pytest.mark.slow  # end-to-end: real attacks / TFF training, a minute or two
def test_reproduce_miniature_writes_report_and_claims(tmp_path):
  settings = dict(reproduce.PRESETS["quick"], datasets=["digits"], defenses=["masking"],
                  adaptive_attacks=["ig"], num_images=1, iterations=400, bisection_steps=1,
                  convergence_defenses=["masking"], rounds=2, partitions=["iid"],
                  seed=0, data_dir=None, leak_ssim=None, preset="test")
  paths = reproduce.run(str(tmp_path), settings, progress=False)
  report = open(paths["report"]).read()
  for needle in ("Settings", "Versions", "Wall time", "thresholds", "convergence",
                 "claims", "sklearn.datasets.load_digits", "tensorflow-federated"):
    assert needle in report, needle
  claims = open(paths["claims"]).read()
  assert "masking" in claims and ("agrees" in claims or "disagrees" in claims)
  assert os.path.exists(tmp_path / "figures" / "convergence.png")
  assert os.path.exists(tmp_path / "figures" / "grid_digits_idlg_masking.png")


# ----------------------------------------------------------------- fast checks (no TFF)


@pytest.fixture
def fake_simulation(monkeypatch):
  """Replaces TFF training by a history of made-up rounds; records every run."""
  import csv as csv_lib

  from tf_dlg.federated import simulation
  runs = []

  def fake_run(config, out_dir, dataset=None, fedavg=None, progress=True):
    del dataset, fedavg, progress
    runs.append((os.path.basename(out_dir), config.seed, config.defense_param))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, simulation.HISTORY_NAME), "w", newline="") as f:
      w = csv_lib.DictWriter(f, fieldnames=simulation.HISTORY_FIELDS)
      w.writeheader()
      for r in range(1, config.rounds + 1):
        w.writerow(dict(round=r, train_loss=1.0, train_accuracy=0.5, seconds=0.1,
                        test_loss=1.0, test_accuracy=0.1 * r + (config.defense_param or 0)))
  monkeypatch.setattr(simulation, "build_for_config", lambda config, dataset: object())
  monkeypatch.setattr(simulation, "run_simulation", fake_run)
  return runs


def _grid(out, masking=0.1, **kwargs):
  base = dict(aggregators=("mean",), partitions=("iid",), rounds=2, num_clients=3, seed=0,
              progress=False)
  return convergence.Convergence(str(out), {"masking": (masking, "given")},
                                 **dict(base, **kwargs))


def test_convergence_refuses_runs_of_another_configuration(tmp_path, fake_simulation):
  out = tmp_path / "conv"
  first = _grid(out).run()
  assert len(fake_simulation) == 2
  history = (out / "runs" / "mean_iid_masking" / "history.csv").read_text()
  for kwargs, cell, diff in [
      (dict(masking=0.9, seed=1), "mean_iid_none", "seed 0 there, 1 now"),
      (dict(masking=0.9), "mean_iid_masking", "defense_param 0.1 there, 0.9 now"),
      (dict(num_clients=4), "mean_iid_none", "num_clients 3 there, 4 now"),
      (dict(rounds=1), "mean_iid_none", "rounds 2 there, 1 now"),
      (dict(alpha=0.3), "mean_iid_none", "alpha 0.5 there, 0.3 now"),
      (dict(local_epochs=2), "mean_iid_none", "local_epochs 1 there, 2 now")]:
    with pytest.raises(convergence.CellError,
                       match=f"runs/{cell}/cell.json: .*another configuration.*{diff}"):
      _grid(out, **kwargs).run()
  # Nothing ran, nothing was overwritten; the same flags resume without training.
  assert len(fake_simulation) == 2
  assert (out / "runs" / "mean_iid_masking" / "history.csv").read_text() == history
  assert _grid(out).run() == first and len(fake_simulation) == 2


def test_convergence_refuses_a_run_folder_without_fingerprint(tmp_path, fake_simulation):
  out = tmp_path / "conv"
  _grid(out).run()
  os.remove(out / "runs" / "mean_iid_none" / "cell.json")  # e.g. made by an older version
  with pytest.raises(convergence.CellError, match="mean_iid_none/history.csv: a run without "
                                                  "cell.json"):
    _grid(out).run()
  (out / "runs" / "mean_iid_masking" / "cell.json").write_text("{not json")
  with pytest.raises(convergence.CellError, match="not a readable convergence cell file"):
    convergence.check_cell(str(out / "runs" / "mean_iid_masking"), {})


def test_convergence_resumes_an_unfinished_run_of_the_same_configuration(
    tmp_path, fake_simulation):
  out = tmp_path / "conv"
  _grid(out).run()
  hist = out / "runs" / "mean_iid_masking" / "history.csv"
  hist.write_text("\n".join(hist.read_text().splitlines()[:2]) + "\n")  # killed in round 2
  rows = _grid(out).run()
  assert fake_simulation[-1] == ("mean_iid_masking", 0, 0.1) and len(fake_simulation) == 3
  assert all(r["rounds"] == 2 for r in rows)


@pytest.mark.parametrize("kwargs, match", [
    (dict(aggregators=("mean", "mode")), "aggregators: 'mode' not one of"),
    (dict(partitions=()), "partitions is empty"),
    (dict(rounds=0), r"rounds=0 must be an integer"),
    (dict(alpha=-1.0), "alpha=-1.0"),
    (dict(masking=1.5), "1.5"),
    (dict(epochs=2), r"unknown simulation settings \['epochs'\]"),
])
def test_convergence_bad_arguments(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _grid(tmp_path / "c", **kwargs)


def _thresholds_csv(path, **overrides):
  row = {k: "" for k in threshold_search.THRESHOLD_FIELDS}
  row.update(dataset="digits", dataset_source="x", attack="idlg", defense="masking",
             status="found", threshold="0.3", weaker_param="0.1", search_low="0.0001",
             search_high="0.99", search_scale="log", stronger="higher",
             attack_works_undefended="True")
  row.update(overrides)
  threshold_search.write_csv(str(path), threshold_search.THRESHOLD_FIELDS, [row])
  return str(path)


@pytest.mark.parametrize("overrides, match", [
    (dict(threshold="abc"), r"thr.csv, line 2, column 'threshold': 'abc' is not a number"),
    (dict(threshold=""), r"thr.csv, line 2, column 'threshold': empty, but status 'found'"),
    (dict(threshold="nan"), "column 'threshold': 'nan' is not a finite number"),
    (dict(status="done"), "column 'status': 'done' is not one of found"),
    (dict(status="not_reached", search_high=""), "column 'search_high': empty"),
])
def test_damaged_thresholds_csv_names_file_line_and_column(tmp_path, overrides, match):
  path = _thresholds_csv(tmp_path / "thr.csv", **overrides)
  with pytest.raises(ValueError, match=match):
    convergence.defense_params_from_thresholds(path, "digits")


def test_thresholds_csv_round_trip_and_untested_provenance(tmp_path):
  ok = _thresholds_csv(tmp_path / "ok.csv")
  assert convergence.defense_params_from_thresholds(ok, "digits") == {
      "masking": (0.3, "threshold (found)")}
  untested = _thresholds_csv(tmp_path / "u.csv", status="at_weakest",
                             attack_works_undefended="False")
  value, source = convergence.defense_params_from_thresholds(untested, "digits")["masking"]
  assert value == 0.3 and "attack fails undefended" in source


def _threshold_row(dataset, status, works, threshold=0.3):
  return dict(dataset=dataset, attack="idlg", defense="masking", status=status,
              threshold=threshold, attack_works_undefended=works)


@pytest.mark.parametrize("cells, verdict", [
    ([("digits", "at_weakest", False)], "| untested (attack fails undefended) |"),
    ([("digits", "found", True), ("photos", "at_weakest", False)],
     "| inconclusive (attack fails undefended on photos) |"),
    ([("digits", "found", True), ("photos", "at_weakest", True)], "| agrees |"),
    ([("digits", "not_reached", True), ("photos", "at_weakest", False)], "| disagrees |"),
])
def test_claims_never_agree_when_the_attack_fails_undefended(tmp_path, cells, verdict):
  rows = [_threshold_row(d, s, w, None if s == "not_reached" else 0.3) for d, s, w in cells]
  untested = threshold_search.UNTESTED
  robustness = [dict(dataset="digits", defense="masking", attack="ig", update="gradient",
                     verdict=untested)]
  conv = [dict(aggregator="mean", partition="iid", defense=d, drop_vs_none=0.0,
               param_source=f"weakest searched ({untested})") for d in ("none", "masking")]
  text = open(reproduce.write_claims(str(tmp_path), rows, robustness, conv)).read()
  lines = text.splitlines()
  threshold_line = next(x for x in lines if x.startswith("| A threshold of masking"))
  assert threshold_line.endswith(verdict)
  assert next(x for x in lines if "(ours) masking" in x).endswith(f"| {untested} |")
  cost = next(x for x in lines if "costs almost no accuracy" in x)
  assert cost.endswith("| inconclusive (threshold untested: the attack fails undefended) |")


def test_threshold_rows_record_whether_the_attack_works_undefended(tmp_path, monkeypatch):
  search = threshold_search.ThresholdSearch(str(tmp_path), **dict(TINY, defenses=["masking"]))
  # An attack that recovers nothing: every point, undefended included, is "defended".
  monkeypatch.setattr(search, "evaluate", lambda *a, **k: dict(
      defended=True, fraction_defended=1.0, median_ssim=0.1, median_adjusted_ssim=0.5))
  monkeypatch.setattr(search, "write_grids", lambda rows: [])
  rows = search.run()
  assert rows[0]["status"] == "at_weakest" and rows[0]["attack_works_undefended"] is False
  assert rows[0]["undefended_adjusted_ssim"] == 0.5
  assert "untested (attack fails undefended)" in open(tmp_path / "thresholds.md").read()
  back = threshold_search.read_thresholds(str(tmp_path / "thresholds.csv"))
  assert threshold_search.attack_untested(back[0])


def test_unmeasurable_reconstruction_never_counts_as_defended(tmp_path, monkeypatch):
  import types

  import numpy as np

  from tf_dlg.attacks import runner
  search = threshold_search.ThresholdSearch(
      str(tmp_path), **dict(TINY, defenses=["masking"], num_images=1))

  def nan_attack(model, observed, **kwargs):
    del model, kwargs
    return [types.SimpleNamespace(
        observed=o, images=np.full_like(o.true_images, np.nan), labels=o.true_labels,
        status="failed", distance=float("nan"), iterations=1, seconds=0.0, attack="idlg")
            for o in observed]
  monkeypatch.setattr(runner, "run_attacks", nan_attack)
  with pytest.warns(RuntimeWarning) as caught:
    point = search.evaluate("digits", "idlg", "masking", 0.5)
  assert any("non-finite reconstructions" in str(w.message) for w in caught)
  assert point["defended"] is False and point["fraction_defended"] == 0.0
  assert point["images"][0]["leaked"] and point["unmeasured_images"] == [
      point["images"][0]["index"]]
  again = threshold_search.ThresholdSearch(
      str(tmp_path), **dict(TINY, defenses=["masking"], num_images=1))
  assert again.evaluate("digits", "idlg", "masking", 0.5)["defended"] is False  # from disk


@pytest.mark.parametrize("overrides, match", [
    (dict(partitions=["bogus"]), "partitions: 'bogus' not one of"),
    (dict(convergence_defenses=["maskng"]), "convergence_defenses: 'maskng' not one of"),
    (dict(convergence_defenses=["clipping"]), "convergence_defenses: 'clipping' not one of masking"),
    (dict(adaptive_attacks=["gan"]), "adaptive_attacks: 'gan' not one of"),
    (dict(convergence_dataset="photos"), "convergence_dataset='photos' is not one of digits"),
    (dict(num_clients=0), "num_clients=0"),
    (dict(rounds=-1), "rounds=-1"),
])
def test_reproduce_checks_every_setting_before_any_work(tmp_path, monkeypatch, overrides,
                                                        match):
  def no_work(*args, **kwargs):
    raise AssertionError("work started before the settings were checked")
  monkeypatch.setattr(threshold_search.ThresholdSearch, "run", no_work)
  monkeypatch.setattr(threshold_search.ThresholdSearch, "evaluate", no_work)
  settings = dict(reproduce.PRESETS["quick"], datasets=["digits"], defenses=["masking"],
                  convergence_defenses=["masking"], seed=0, data_dir=None, leak_ssim=None,
                  preset="test")
  settings.update(overrides)
  with pytest.raises(ValueError, match=match):
    reproduce.run(str(tmp_path), settings, progress=False)
  assert not os.path.exists(tmp_path / "thresholds" / "points.jsonl")


def _cli(module, *args, timeout=120):
  import subprocess
  import sys
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args],
                        capture_output=True, text=True, timeout=timeout,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_drivers_give_one_line_errors_with_exit_code_2(tmp_path):
  bad_csv = _thresholds_csv(tmp_path / "thr.csv", threshold="abc")
  for module, args, needle in [
      ("reproduce", ["--partitions=bogus"], "partitions: 'bogus' not one of"),
      ("convergence", [f"--thresholds={bad_csv}"], "thr.csv, line 2, column 'threshold'"),
      ("threshold_search", ["--defenses=maskng"], "defenses: 'maskng' not one of")]:
    proc = _cli(module, *args, f"--output_dir={tmp_path / module}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.slow
def test_convergence_cli_refuses_another_configuration_end_to_end(tmp_path):
  """Issue 13's exact commands, with real TFF training (about 40 s)."""
  common = ["--aggregators=mean", "--partitions=iid", "--rounds=2", "--num_clients=3",
            f"--output_dir={tmp_path}"]
  first = _cli("convergence", *common, "--defense_params=masking:0.1", "--seed=0", timeout=600)
  assert first.returncode == 0, first.stderr[-2000:]
  table = (tmp_path / "convergence.csv").read_text()
  second = _cli("convergence", *common, "--defense_params=masking:0.9", "--seed=1")
  assert second.returncode == 2
  assert "mean_iid_none/cell.json: this run folder holds another configuration" in second.stderr
  assert "seed 0 there, 1 now" in second.stderr
  assert (tmp_path / "convergence.csv").read_text() == table


def test_reproduce_convergence_stage_refuses_runs_of_other_flags(tmp_path, monkeypatch,
                                                                 fake_simulation):
  def fake_search(search):
    path = _thresholds_csv(os.path.join(search.output_dir, "thresholds.csv"))
    return threshold_search.read_thresholds(path)
  monkeypatch.setattr(threshold_search.ThresholdSearch, "run", fake_search)
  monkeypatch.setattr(threshold_search.ThresholdSearch, "rescore", lambda self, rows, **k: [])
  settings = dict(reproduce.PRESETS["quick"], datasets=["digits"], defenses=["masking"],
                  convergence_defenses=["masking"], partitions=["iid"], rounds=2,
                  num_clients=3, seed=0, data_dir=None, leak_ssim=None, preset="test")
  reproduce.run(str(tmp_path), settings, progress=False)
  assert len(fake_simulation) == 4  # (mean, median) x (none, masking)
  with pytest.raises(convergence.CellError, match="num_clients 3 there, 4 now"):
    reproduce.run(str(tmp_path), dict(settings, num_clients=4), progress=False)
  assert len(fake_simulation) == 4
