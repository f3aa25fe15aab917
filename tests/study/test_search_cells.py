"""Which (dataset, kind, attackers, defence) cells a threshold search covers."""

import pytest

from tf_dlg.study import threshold_search as search_lib


def test_strongest_attacker_search_can_be_confined_to_some_datasets(tmp_path):
  search = search_lib.ThresholdSearch(
    str(tmp_path / "a"),
    ["digits", "photos"],
    ["idlg"],
    ["masking", "clipping_ratio"],
    progress=False,
    adaptive=True,
    adaptive_datasets=["photos"],
  )
  cells = search.cells()
  plain = [(d, f) for d, kind, _, f in cells if kind == "plain"]
  adaptive = [(d, a, f) for d, kind, a, f in cells if kind == "adaptive"]
  assert len(plain) == 4  # every dataset x defence against the paper's attack
  assert adaptive == [
    ("photos", search_lib.STRONGEST_ATTACKER["masking"], "masking"),
    ("photos", search_lib.STRONGEST_ATTACKER["clipping_ratio"], "clipping_ratio"),
  ]
  everywhere = search_lib.ThresholdSearch(
    str(tmp_path / "b"), ["digits", "photos"], ["idlg"], ["masking"], progress=False, adaptive=True
  )
  assert sorted(d for d, kind, _, _ in everywhere.cells() if kind == "adaptive") == [
    "digits",
    "photos",
  ]


def test_a_strongest_attacker_dataset_outside_the_search_is_refused(tmp_path):
  with pytest.raises(ValueError, match="adaptive_datasets: 'mnist' not one of digits"):
    search_lib.ThresholdSearch(
      str(tmp_path), ["digits"], ["idlg"], ["masking"], adaptive=True, adaptive_datasets=["mnist"]
    )
