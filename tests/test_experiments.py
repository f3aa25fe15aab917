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
    (dict(datasets=["imagenet"]), "Unknown dataset 'imagenet'"),
    (dict(defenses=["blur"]), "Unknown defence 'blur'"),
    (dict(attacks=["gan"]), "Unknown attack 'gan'"),
    (dict(num_images=0), "num_images=0"),
    (dict(leak_ssim=1.5), "leak_ssim=1.5"),
])
def test_threshold_search_bad_arguments(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    threshold_search.ThresholdSearch(str(tmp_path), **dict(TINY, **kwargs))


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
