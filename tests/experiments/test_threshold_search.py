"""The threshold-search driver: per-image points, adaptive attackers, resume, the CSV.

Most tests replace the attack with a fake whose outcome is known (an image leaks while
the update's zero fraction is below its own threshold), so they check the driver's
bookkeeping in seconds; one tiny real run on MNIST keeps the whole path honest.
"""

import csv
import json

import numpy as np
import pytest

from tf_dlg import defenses
from tf_dlg.analysis import threshold as threshold_lib
from tf_dlg.study import defense_table, records, results, tables, threshold_search

FAKE = dict(
  datasets=["digits"],
  attacks=["idlg"],
  defenses=["masking"],
  num_images=3,
  iterations=10,
  restarts=3,
  seed=0,
  progress=False,
)
# Fake attackers: image k (of the sample, in order) leaks while the defence's strength
# (0 weakest .. 1 strongest end of its search range) is below TRUE[attack][k]; None:
# never leaks, not even undefended. masked_ig sees through far more masking.
TRUE = {
  "idlg": [0.3, 0.7, None],
  "masked_ig": [0.8, 0.95, None],
  "ig": [0.4, 0.6, None],
  "dlg": [None] * 3,
  # The fake gallery matcher never names an original: thresholds stay the reconstructions'.
  "gallery_match": [None] * 3,
}


def _strength(defense_config):
  if defense_config is None:
    return -1.0
  name = defense_config["name"]
  param = defense_config[defenses.DEFENSES[name].param_name]
  space = threshold_lib.SearchSpace(*defense_table.PARAMETER_SEARCH[name])
  return threshold_lib.strength_of(space, param)


def _reconstruction(o, k, attack):
  truth = TRUE[attack][k]
  if truth is not None and _strength(o.defense) < truth:
    return o.true_images
  return np.random.default_rng(k).random(o.true_images.shape)


@pytest.fixture
def fake_attack(install_fake_attack):
  return install_fake_attack(_reconstruction)


def _search(tmp_path, **kw):
  return threshold_search.ThresholdSearch(str(tmp_path), **dict(FAKE, **kw))


def test_per_image_thresholds_bracket_the_fake_truth(tmp_path, fake_attack):
  search = _search(tmp_path, adaptive=True)
  rows = search.run()
  plain = next(r for r in rows if r["kind"] == "plain")
  per_image = json.loads(plain["per_image"])
  statuses = json.loads(plain["per_image_status"])
  assert statuses == ["found", "found", "untested"]
  space = threshold_lib.SearchSpace(1e-4, 0.99, "log", "higher")
  for truth, value in zip(TRUE["idlg"][:2], per_image):
    # Defended at its threshold, within the resolution (factor 1.5) of the truth.
    assert threshold_lib.strength_of(space, value) >= truth - 1e-3
    assert value / space.param(truth) <= 1.5 * 1.01
  # Dataset threshold (fraction 1) = the largest per-image threshold, inside its interval.
  assert plain["threshold"] == max(per_image[:2])
  assert plain["low"] <= plain["threshold"] <= plain["high"]
  assert plain["num_tested"] == 2 and plain["rank"] == 2 and plain["restarts"] == 3
  assert space.low == plain["search_low"]
  # Every attack call holds each image at most once, restarts passed through.
  for c in fake_attack:
    assert len(set(c.seed)) == len(c.seed) and c.restarts == 3


def test_adaptive_search_runs_the_named_attacker(tmp_path, fake_attack):
  search = _search(
    tmp_path, attacks=[], defenses=["masking", "noising_ratio"], adaptive=True, num_images=2
  )
  rows = search.run()
  assert {(r["defense"], r["attack"], r["kind"]) for r in rows} == {
    ("masking", "masked_ig+gallery_match", "adaptive"),
    ("noising_ratio", "ig+idlg+gallery_match", "adaptive"),
  }
  ran = {(d, a) for _, a, d, _ in search.attack_calls}
  assert ran == {
    ("none", "masked_ig"),
    ("masking", "masked_ig"),
    ("none", "ig"),
    ("none", "idlg"),
    ("noising_ratio", "ig"),
    ("noising_ratio", "idlg"),
    ("none", "gallery_match"),
    ("masking", "gallery_match"),
    ("noising_ratio", "gallery_match"),
  }
  # The points say which attacker ran; a gallery match's point is a pick, not a
  # reconstruction.
  recs = [r for r in search.log if r["defense"] == "masking"]
  assert recs and {r["attack"] for r in recs} == {"masked_ig", "gallery_match"}
  assert {r["status"] for r in recs if r["attack"] == "gallery_match"} == {"matched"}
  # Every row carries the leak measures at its protective setting (written to the CSV).
  for r in rows:
    assert all(r[k] is not None for k in records.PROTECTIVE_FIELDS), r
    assert r["top1_gallery_at_protective"] == 0.0  # the fake matcher never names one
    assert r["auc_at_protective_low"] <= r["auc_at_protective"] <= r["auc_at_protective_high"]
  masking = next(r for r in rows if r["defense"] == "masking")
  space = threshold_lib.SearchSpace(*defense_table.PARAMETER_SEARCH["masking"])
  first = json.loads(masking["per_image"])[0]
  assert threshold_lib.strength_of(space, first) >= TRUE["masked_ig"][0] - 1e-3
  # noising_ratio: an absolute equivalent (median ratio x RMS), no relative one.
  noise = next(r for r in rows if r["defense"] == "noising_ratio")
  stats = search.update_stats("digits")
  # Both ig and idlg must be stopped: the stronger of their per-image thresholds.
  space = threshold_lib.SearchSpace(*defense_table.PARAMETER_SEARCH["noising_ratio"])
  for k, value in enumerate(json.loads(noise["per_image"])[:2]):
    assert threshold_lib.strength_of(space, value) >= max(TRUE["ig"][k], TRUE["idlg"][k]) - 1e-3
  # Found (the fake truths are finite), so the equivalent must be there: with two images
  # the median of ratio x RMS is the mean of the two.
  assert noise["status"] == "found" and noise["threshold"] > 0
  assert len(stats["rms"]) == 2
  want = noise["threshold"] * (stats["rms"][0] + stats["rms"][1]) / 2
  assert noise["absolute_equivalent"] == pytest.approx(want, rel=1e-9)
  assert noise["relative_equivalent"] is None


def test_resume_skips_finished_points_and_refuses_other_configs(tmp_path, fake_attack):
  first = _search(tmp_path).run()
  n = len(fake_attack)
  assert n > 2
  again = _search(tmp_path, log_resolution=1.5)
  drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
  assert drop(again.run()) == drop(first) and len(fake_attack) == n  # nothing attacked again
  finer = _search(tmp_path, log_resolution=1.2)  # resolutions reuse the points
  finer.run()
  done = {(r["defense"], r["param"], r["image"]) for r in finer.log}
  assert len(done) == len(list(finer.log))  # no point stored twice
  with pytest.raises(results.ResultsFileError, match="restarts"):
    _search(tmp_path, restarts=1)


def test_csv_reads_back_strictly_and_old_files_still_read(tmp_path, fake_attack):
  _search(tmp_path, defenses=["masking", "clipping"]).run()
  rows = records.read_thresholds(str(tmp_path / "thresholds.csv"))
  assert {r["kind"] for r in rows} == {"plain"}
  clip = next(r for r in rows if r["defense"] == "clipping")
  assert clip["unit"] == "norm" and isinstance(clip["per_image"], list)
  path = tmp_path / "bad.csv"
  with open(tmp_path / "thresholds.csv") as f:
    text = f.read()
  path.write_text(text.replace('"[', '"[oops', 1))
  with pytest.raises(ValueError, match=r"bad.csv, line 2, column 'per_image'"):
    records.read_thresholds(str(path))
  path.write_text(text.replace(",plain,", ",fancy,", 1))
  with pytest.raises(ValueError, match="column 'kind'"):
    records.read_thresholds(str(path))
  old = tmp_path / "old.csv"
  fields = [
    "dataset",
    "dataset_source",
    "attack",
    "defense",
    "status",
    "threshold",
    "fraction_defended",
    "search_low",
    "search_high",
    "search_scale",
    "stronger",
  ]
  with open(old, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(fields)
    w.writerow(
      ["digits", "x", "idlg", "masking", "found", "0.01", "1.0", "0.0001", "0.99", "log", "higher"]
    )
  back = records.read_thresholds(str(old))
  assert back[0]["kind"] == "plain" and back[0]["threshold"] == 0.01
  assert back[0]["low"] is None and "0.01" in tables.format_threshold(back[0])


def test_equivalents_and_unknown_settings(tmp_path, fake_attack):
  search = _search(tmp_path)
  stats = search.update_stats("digits")
  assert np.all(stats["norm"] > 0) and np.all(stats["rms"] > 0)
  # Three images: the median is the middle of the three sorted values.
  norms = sorted(stats["norm"])
  assert len(norms) == 3
  absolute, relative = search.equivalents("digits", "clipping", 2.0)
  assert absolute is None and relative == pytest.approx(2.0 / norms[1], rel=1e-9)
  absolute, _ = search.equivalents("digits", "clipping_ratio", 0.5)
  assert absolute == pytest.approx(0.5 * norms[1], rel=1e-9)
  assert search.equivalents("digits", "masking", 0.5) == (None, None)
  with pytest.raises(ValueError, match="unknown settings"):
    _search(tmp_path / "x", steps=3)
  with pytest.raises(ValueError, match="log_resolution=1.0"):
    _search(tmp_path / "y", log_resolution=1.0)
  with pytest.raises(ValueError, match="attacks is empty"):
    _search(tmp_path / "z", attacks=[])


def test_strongest_attacker_table_covers_every_searchable_defence():
  assert set(threshold_search.STRONGEST_ATTACKER) == set(defense_table.PARAMETER_SEARCH)
  assert threshold_search.STRONGEST_ATTACKER["masking"] == ("masked_ig", "gallery_match")
  assert threshold_search.STRONGEST_ATTACKER["clipping_ratio"] == ("ig", "gallery_match")
  assert threshold_search.STRONGEST_ATTACKER["noising"] == ("ig", "idlg", "gallery_match")
  # The attacker the identification criterion assumes holds the gallery: every defence
  # that can be searched is judged against it too.
  assert all("gallery_match" in a for a in threshold_search.STRONGEST_ATTACKER.values())


def test_tiny_real_search_on_mnist(tmp_path):
  """The real attack end to end: 1 image, 150 iterations, one defence, 3 steps."""
  search = threshold_search.ThresholdSearch(
    str(tmp_path),
    ["mnist"],
    ["idlg"],
    ["pruning"],
    num_images=1,
    iterations=150,
    restarts=1,
    linear_resolution=0.5,
    progress=False,
  )
  rows = search.run()
  (row,) = rows
  assert row["dataset_source"].startswith("MNIST") and row["kind"] == "plain"
  with open(tmp_path / "points.jsonl") as f:
    points = [json.loads(line) for line in f][1:]  # line 1: the run's configuration
  (undefended,) = [p for p in points if p["defense"] == "none"]
  # iDLG recovers an MNIST digit undefended within 150 iterations (adjusted SSIM ~0.99 on
  # this seeded image, far above the 0.8 leak bar), so the image is tested.
  assert undefended["leaked"] and undefended["adjusted_ssim"] >= 0.8
  # The threshold, derived from the points alone: the weakest defended rate, every weaker
  # evaluated rate leaked.
  defended = [p["param"] for p in points if p["defense"] == "pruning" and p["defended"]]
  leaked = [p["param"] for p in points if p["defense"] == "pruning" and not p["defended"]]
  assert defended and row["status"] == "found"
  assert row["threshold"] == min(defended) and all(x < min(defended) for x in leaked)
  assert json.loads(row["per_image"]) == [min(defended)]
  assert (tmp_path / "thresholds.md").exists()
  assert (tmp_path / "figures" / "thresholds_pruning.png").exists()
  back = records.read_thresholds(str(tmp_path / "thresholds.csv"))
  assert back[0]["per_image_status"][0] in threshold_lib.IMAGE_STATUSES


def _row(**kw):
  row = dict(
    dataset="d",
    attack="idlg",
    defense="masking",
    kind="plain",
    status="found",
    threshold=0.01,
    low=0.005,
    high=0.02,
    interval_open=False,
    num_images=8,
    num_tested=8,
    search_low=1e-4,
    search_high=0.99,
    stronger="higher",
    attack_works_undefended=True,
  )
  row.update(kw)
  return row


def test_format_threshold_interval_inconclusive_and_untested():
  fmt = tables.format_threshold
  assert fmt(_row()) == "0.01 [0.005, 0.02] (n=8/8)"
  # Spans the whole range (weakest to beyond the strongest): inconclusive.
  assert fmt(_row(low=1e-4, high=0.99, interval_open=True)).startswith("inconclusive: ")
  assert "> 0.99" in fmt(_row(low=1e-4, high=0.99, interval_open=True))
  # Most images untested: inconclusive; none tested: untested.
  assert fmt(_row(num_tested=3)).startswith("inconclusive: ")
  assert fmt(_row(attack_works_undefended=False)) == records.UNTESTED
  # Lower is stronger (clipping): the strong end is the low one.
  clip = _row(
    defense="clipping",
    threshold=1.0,
    low=1e-3,
    high=1e4,
    interval_open=True,
    search_low=1e-3,
    search_high=1e4,
    stronger="lower",
  )
  assert fmt(clip) == "inconclusive: 1 [< 0.001, 1e+04] (n=8/8)"
  assert fmt(_row(status="not_reached", threshold=None)) == "not reached (leaks at 0.99)"
  assert fmt(_row(status="at_weakest", threshold=1e-4, low=1e-4, high=1e-4)).startswith("<= ")


def test_unit_equivalents_convert_both_ways(tmp_path):
  """Absolute clipping / noising report their relative setting, relative ones the absolute."""
  search = threshold_search.ThresholdSearch(
    str(tmp_path), ["digits"], ["idlg"], ["clipping"], num_images=3, progress=False
  )
  stats = {"norm": np.array([10.0, 20.0, 40.0]), "rms": np.array([0.1, 0.2, 0.4])}
  search.evaluator.stats["digits"] = stats
  # Clipping to norm 5: 0.5, 0.25 and 0.125 of the three updates' norms; median 0.25.
  assert search.equivalents("digits", "clipping", 5.0) == (None, pytest.approx(0.25))
  assert search.equivalents("digits", "noising", 0.02) == (None, pytest.approx(0.1))
  # Ratio 0.5 of the norms 10, 20, 40: median absolute norm 10.
  assert search.equivalents("digits", "clipping_ratio", 0.5) == (pytest.approx(10.0), None)
  assert search.equivalents("digits", "noising_ratio", 2.0) == (pytest.approx(0.4), None)
  assert search.equivalents("digits", "masking", 0.3) == (None, None)
