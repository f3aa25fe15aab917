"""Threshold search end to end: structure, consistency, resume (convergence and reproduce:
tests/study/test_convergence.py, tests/experiments/test_reproduce.py)."""

import csv
import os

import numpy as np
import pytest
from threshold_rows import write_thresholds_csv

from tf_dlg.study import defense_params, results, threshold_search

TINY = dict(
  datasets=["digits"],
  attacks=["idlg"],
  defenses=["masking", "clipping"],
  num_images=2,
  iterations=400,
  seed=0,
  progress=False,
)


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
  assert [(r["dataset"], r["kind"], r["defense"]) for r in table] == [
    ("digits", "plain", "masking"),
    ("digits", "plain", "clipping"),
  ]
  md = open(os.path.join(out, "thresholds.md")).read()
  assert "masking" in md and "sklearn.datasets.load_digits" in md
  # Undefended iDLG leaks on these digits: the search measures something.
  base = search.evaluate("digits", "idlg", "none", None)
  assert base["fraction_defended"] == 0.0 and base["median_adjusted_ssim"] > 0.9
  # Both defences stop iDLG at the strong end of their range (masking 0.99, clipping at its
  # smallest norm) and both images leak undefended (above): both thresholds are found.
  assert [r["status"] for r in rows] == ["found", "found"]
  for r in rows:
    assert r["low"] <= r["threshold"] <= r["high"]
    grid = os.path.join(out, "figures", f"grid_digits_idlg_{r['defense']}.png")
    _check_image_grid(grid)


def _check_image_grid(path):
  """A 3 x 3 grid of grey digit images on a white page, not a blank or flat canvas."""
  from matplotlib import image

  pixels = image.imread(path)[..., :3].mean(axis=-1)  # PNG read as floats in [0, 1]
  white, dark = np.mean(pixels > 0.95), np.mean(pixels < 0.1)
  # Page margins and titles are white, the nine black-background digit panels dark: each
  # covers between a tenth and nine tenths of the figure (about 0.3 / 0.6 measured).
  assert 0.1 < white < 0.9 and 0.1 < dark < 0.9, (path, white, dark)
  # Digit strokes give many grey levels (about 100 measured); flat panels two or three.
  assert len(np.unique(np.round(pixels, 2))) > 20, path


def test_masking_at_strong_rate_defends_and_leaks_at_weak(clean_run):
  out, search, rows = clean_run
  masking = next(r for r in rows if r["defense"] == "masking")
  assert masking["status"] == "found"
  assert 1e-4 < masking["threshold"] <= 0.99
  # Every image is defended at the dataset threshold, and leaks at the weakest setting.
  assert (
    search.evaluate("digits", "idlg", "masking", masking["threshold"])["fraction_defended"] == 1.0
  )
  assert search.evaluate("digits", "idlg", "masking", 1e-4)["fraction_defended"] < 1.0


# Real attacks; the resume logic itself: test_threshold_search.py (fast, fake attacks).
@pytest.mark.slow
def test_resume_after_kill_redoes_nothing_and_matches(clean_run, tmp_path, monkeypatch):
  from tf_dlg.attacks import runner

  out_clean, clean, _ = clean_run
  out = str(tmp_path / "thr")
  real = runner.run_attacks
  calls = []

  def dying(*args, **kwargs):
    if len(calls) == 3:
      raise KeyboardInterrupt("killed midway")
    calls.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(runner, "run_attacks", dying)
  with pytest.raises(KeyboardInterrupt):
    threshold_search.ThresholdSearch(out, **TINY).run()
  assert len(calls) == 3
  calls.clear()
  monkeypatch.setattr(runner, "run_attacks", lambda *a, **k: calls.append(1) or real(*a, **k))
  threshold_search.ThresholdSearch(out, **TINY).run()
  # The finished calls were not redone (the clean run's calls also re-score nothing).
  assert 0 < len(calls) <= len(clean.attack_calls) - 3

  def table(path):
    return [
      {k: v for k, v in r.items() if k != "seconds"}
      for r in _read_csv(os.path.join(path, "thresholds.csv"))
    ]

  assert table(out) == table(out_clean)


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


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(datasets=["imagenet"]), "datasets: 'imagenet' not one of digits"),
    (dict(datasets=[]), "datasets is empty"),
    (dict(defenses=["blur"]), "defenses: 'blur' not one of masking"),
    (dict(attacks=["gan"]), "attacks: 'gan' not one of"),
    (dict(num_images=0), r"num_images=0 must be an integer in \[1, inf\]"),
    (dict(leak_ssim=1.5), r"leak_ssim=1.5 must be a number in \(0, 1\]"),
    (dict(leak_ssim=float("nan")), "leak_ssim=nan"),
    (dict(bisection_steps=2), r"unknown settings \['bisection_steps'\]"),
    (dict(seed=-3), "seed=-3"),
    (dict(iterations=0), "iterations=0"),
    (dict(defended_fraction=0.0), "defended_fraction=0.0"),
  ],
)
def test_threshold_search_bad_arguments(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    threshold_search.ThresholdSearch(str(tmp_path / "out"), **dict(TINY, **kwargs))
  assert not os.path.exists(tmp_path / "out" / "points.jsonl")  # refused before any file


@pytest.mark.slow  # end-to-end: real attacks / TFF training, a minute or two
def test_rescore_with_adaptive_attacker_and_fedavg_delta(clean_run):
  _, search, rows = clean_run
  out = search.rescore([r for r in rows if r["defense"] == "masking"], attacks=["masked_ig"])
  assert {(o["attack"], o["update"]) for o in out} == {
    ("masked_ig", "gradient"),
    ("idlg", "fedavg_delta"),
  }
  for o in out:
    assert o["verdict"] in ("holds", "broken", "untested (attack fails undefended)")
    assert 0.0 <= o["fraction_defended"] <= 1.0
  delta = next(o for o in out if o["update"] == "fedavg_delta")
  # The multi-step delta attack recovers undefended images: the verdict means something.
  assert delta["undefended_leak_fraction"] == 1.0
  assert os.path.exists(os.path.join(search.output_dir, "robustness.md"))


# ----------------------------------------------------------------- fast checks (no TFF)


def _thresholds_csv(path, **overrides):
  """One found row on `digits` with its weaker step, overridden by `overrides`."""
  return write_thresholds_csv(path, [overrides], dataset="digits", kind="", weaker_param="0.1")


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(threshold="abc"), r"thr.csv, line 2, column 'threshold': 'abc' is not a number"),
    (dict(threshold=""), r"thr.csv, line 2, column 'threshold': empty, but status 'found'"),
    (dict(threshold="nan"), "column 'threshold': 'nan' is not a finite number"),
    (dict(status="done"), "column 'status': 'done' is not one of found"),
    (dict(status="not_reached", search_high=""), "column 'search_high': empty"),
  ],
)
def test_damaged_thresholds_csv_names_file_line_and_column(tmp_path, overrides, match):
  path = _thresholds_csv(tmp_path / "thr.csv", **overrides)
  with pytest.raises(ValueError, match=match):
    defense_params.defense_params_from_thresholds(path, "digits")


def test_thresholds_csv_round_trip_and_untested_provenance(tmp_path):
  ok = _thresholds_csv(tmp_path / "ok.csv")
  assert defense_params.defense_params_from_thresholds(ok, "digits") == {
    "masking": (0.3, "plain threshold (found)")
  }
  untested = _thresholds_csv(
    tmp_path / "u.csv", status="at_weakest", attack_works_undefended="False"
  )
  value, source = defense_params.defense_params_from_thresholds(untested, "digits")["masking"]
  assert value == 0.3 and "attack fails undefended" in source


def test_unmeasurable_reconstruction_never_counts_as_defended(tmp_path, monkeypatch):
  import types

  import numpy as np

  from tf_dlg.attacks import runner

  search = threshold_search.ThresholdSearch(
    str(tmp_path), **dict(TINY, defenses=["masking"], num_images=1)
  )

  def nan_attack(model, observed, config=None, **kwargs):
    del model, config, kwargs
    return [
      types.SimpleNamespace(
        observed=o,
        images=np.full_like(o.true_images, np.nan),
        labels=o.true_labels,
        status="failed",
        distance=float("nan"),
        iterations=1,
        seconds=0.0,
        attack="idlg",
        restart=0,
      )
      for o in observed
    ]

  monkeypatch.setattr(runner, "run_attacks", nan_attack)
  with pytest.warns(RuntimeWarning) as caught:
    point = search.evaluate("digits", "idlg", "masking", 0.5)
  assert any("non-finite reconstruction" in str(w.message) for w in caught)
  assert point["defended"] is False and point["fraction_defended"] == 0.0
  assert point["images"][0]["leaked"]
  again = threshold_search.ThresholdSearch(
    str(tmp_path), **dict(TINY, defenses=["masking"], num_images=1)
  )
  assert again.evaluate("digits", "idlg", "masking", 0.5)["defended"] is False  # from disk
