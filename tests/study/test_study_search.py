"""tf_dlg.study.threshold_search: identification as a second leak criterion.

A fake attacker whose output is known replaces the attack: below strength `SSIM[k]`
it returns image k itself (leaks under both criteria), between `SSIM[k]` and `ID[k]` the
inverted image 1 - x (adjusted SSIM, with positive gains only, calls it defended; the
attacker, who looks at both polarities, still names the original), above `ID[k]` noise.
"""

import json

import matplotlib.figure
import numpy as np
import pytest
from scipy import stats

from tf_dlg import defenses
from tf_dlg.analysis import threshold as threshold_lib
from tf_dlg.study import defense_table, records, results
from tf_dlg.study import threshold_search as search_lib

SSIM = [0.3, 0.5, None]  # image 2 never leaks
ID = [0.7, 0.5, None]
SETTINGS = dict(
  datasets=["digits"],
  attacks=["idlg"],
  defenses=["masking"],
  num_images=3,
  iterations=10,
  restarts=1,
  seed=0,
  progress=False,
)


def _strength(config):
  if config is None:
    return -1.0
  name = config["name"]
  space = threshold_lib.SearchSpace(*defense_table.PARAMETER_SEARCH[name])
  return threshold_lib.strength_of(space, config[defenses.DEFENSES[name].param_name])


def _reconstruction(o, k, attack):
  del attack
  s, true = _strength(o.defense), o.true_images.astype(np.float32)
  if SSIM[k] is not None and s < SSIM[k]:
    return true
  if ID[k] is not None and s < ID[k]:
    return 1.0 - true
  return np.random.default_rng(k).random(true.shape).astype(np.float32)


@pytest.fixture
def fake_attack(install_fake_attack):
  return install_fake_attack(_reconstruction)


def _exact(count, n):
  ci = stats.binomtest(count, n).proportion_ci(method="exact")
  return pytest.approx([count / n, ci.low, ci.high])


def test_identification_threshold_sees_through_an_inverted_leak(tmp_path, fake_attack):
  search = search_lib.ThresholdSearch(str(tmp_path), **SETTINGS)
  (row,) = search.run()
  space = threshold_lib.SearchSpace(*defense_table.PARAMETER_SEARCH["masking"])
  ssim, ident = json.loads(row["per_image"]), json.loads(row["id_per_image"])
  assert json.loads(row["id_per_image_status"]) == ["found", "found", "untested"]
  for truth, value in zip(SSIM[:2] + ID[:2], ssim[:2] + ident[:2]):
    # Defended at its threshold, leaking within the resolution (factor 1.5) below it.
    assert threshold_lib.strength_of(space, value) >= truth - 1e-3
    assert value / space.param(truth) <= 1.5 * 1.01
  # Image 0 is identified well beyond its adjusted-SSIM threshold: the dataset thresholds
  # differ, and at the adjusted-SSIM threshold the inverted image 0 is still named.
  assert row["id_threshold"] == max(ident[:2]) > row["threshold"] == max(ssim[:2])
  assert row["id_num_tested"] == 2 and row["gallery_size"] == 1797
  got = [row[f"top1_at_threshold{s}"] for s in ("", "_low", "_high")]
  assert got == _exact(1, 3)
  got = [row[f"undefended_top1{s}"] for s in ("", "_low", "_high")]
  assert got == _exact(2, 3)
  got = [row[f"top1_at_id_threshold{s}"] for s in ("", "_low", "_high")]
  assert got == _exact(0, 3)
  # Every point carries its identification: the original (gallery index = training
  # index) is the pick exactly when the attacker returned the image or its inverse.
  for p in search.log:
    s, k = _strength(p["defense_config"]), p["image"]
    shown = SSIM[k] is not None and s < (ID[k] if ID[k] is not None else SSIM[k])
    assert p["top1"] == shown == (p["pick"] == p["index"]) == (not p["id_defended"]), p
    assert p["rank"] >= 1 and p["top5"] >= p["top1"] and p["gallery_size"] == 1797
  md = (tmp_path / "thresholds.md").read_text()
  assert "0.33 [0.0084, 0.91]" in md
  # No adaptive search here: the strongest-attacker section says so, before the plain one.
  assert md.index("## Against each defence's strongest attacker") < md.index(
    "## The paper's reproduction: plain `idlg`"
  )
  assert "Not searched in this run" in md


def test_points_of_the_older_format_are_refused(tmp_path, fake_attack):
  config = dict(search_lib.ThresholdSearch(str(tmp_path / "new"), **SETTINGS).config)
  assert config["points"] == "per_image/v3"
  del config["identification"]
  config["points"] = "per_image/v2"
  results.ResultsLog(str(tmp_path / "old" / "points.jsonl"), "threshold_search", config)
  with pytest.raises(results.ResultsFileError, match="differs in: identification, points"):
    search_lib.ThresholdSearch(str(tmp_path / "old"), **SETTINGS)
  assert fake_attack == []  # refused before any attack


def test_leak_grid_shows_the_attackers_pick(tmp_path, fake_attack, monkeypatch):
  shown = {}
  real = matplotlib.figure.Figure.savefig

  def savefig(fig, fname, *args, **kwargs):
    images = [np.asarray(im.get_array()) for ax in fig.axes for im in ax.images]
    shown[str(fname).rsplit("/", 1)[-1]] = images
    return real(fig, fname, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
  search = search_lib.ThresholdSearch(str(tmp_path), **dict(SETTINGS, num_images=2))
  search.run()
  panels = shown["grid_digits_idlg_masking.png"]
  assert len(panels) == 3 * 4  # undefended, one step weaker, threshold x 4 columns
  (row,) = records.read_thresholds(str(tmp_path / "thresholds.csv"))
  # The median-threshold image is image 0; at its adjusted-SSIM threshold the attacker
  # returns it inverted: "defended" by adjusted SSIM, yet the pick is its original.
  threshold = row["per_image"][0]
  point = search.log.get(records.point_key("digits", "idlg", "masking", threshold, image=0))
  assert point["adjusted_ssim"] < search.leak_ssim and point["top1"]
  original = search.case("digits")[2][0][..., 0]
  np.testing.assert_allclose(panels[3], original, atol=1e-6)  # undefended row's pick
  np.testing.assert_allclose(panels[11], original, atol=1e-6)  # threshold row's pick
  # A pick is a gallery image as the dataset stores it: the weaker row (image 0 itself).
  weaker = search.log.get(
    records.point_key("digits", "idlg", "masking", _weaker(search, threshold), image=0)
  )
  ds = search.case("digits")[0]
  np.testing.assert_allclose(panels[7], ds.x_train[weaker["pick"]][..., 0], atol=1e-6)


def _weaker(search, threshold):
  """The strongest setting weaker than `threshold` at which image 0 was attacked."""
  params = [
    p["param"]
    for p in search.log
    if p["image"] == 0 and p["defense"] == "masking" and p["param"] < threshold
  ]
  return max(params)


def test_strongest_attacker_table_comes_first(tmp_path, fake_attack):
  search = search_lib.ThresholdSearch(str(tmp_path), **dict(SETTINGS, num_images=2, adaptive=True))
  rows = search.run()
  md = (tmp_path / "thresholds.md").read_text()
  lines = md.splitlines()
  first = next(i for i, line in enumerate(lines) if line.startswith("| "))
  heading = next(line for line in reversed(lines[:first]) if line.startswith("#"))
  assert heading == "## Against each defence's strongest attacker"
  cells = [c.strip() for c in lines[first + 2].strip("|").split("|")]
  adaptive = next(r for r in rows if r["kind"] == "adaptive")
  assert cells[:3] == ["digits", "masked_ig+gallery_match (strongest)", "masking"]
  assert cells[3].startswith(f"{adaptive['threshold']:.3g} [")
  assert md.index(heading) < md.index("## The paper's reproduction: plain `idlg`")


def test_report_opens_with_the_strongest_attacker_table(tmp_path, fake_attack):
  from tf_dlg.study import presets, report

  search = search_lib.ThresholdSearch(
    str(tmp_path / "thresholds"), **dict(SETTINGS, num_images=2, adaptive=True)
  )
  search.run()
  settings = presets.PRESETS["quick"].override(datasets=["digits"], defenses=["masking"])
  path = report.write_report(str(tmp_path), settings, {"digits": "x"}, {"search": 1.0}, {})
  lines = open(path).read().splitlines()
  first = next(i for i, line in enumerate(lines) if line.startswith("| "))
  heading = next(line for line in reversed(lines[:first]) if line.startswith("#"))
  assert heading.lstrip("#").strip() == "Against each defence's strongest attacker"
  assert "masked_ig+gallery_match (strongest)" in lines[first + 2]
