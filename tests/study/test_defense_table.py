"""The studies' table of the defences (`tf_dlg.study.defense_table`): its ranges are valid
parameters of the transforms it names, and its views follow the rows."""

import pytest
from defense_cases import PARAMS

from tf_dlg import defenses
from tf_dlg.study import defense_table


def test_parameter_search_ranges_are_valid_parameters():
  assert set(defense_table.PARAMETER_SEARCH) == set(PARAMS) - {"none"}
  for name, (low, high, scale, stronger) in defense_table.PARAMETER_SEARCH.items():
    assert low < high and scale in ("log", "linear") and stronger in ("higher", "lower")
    defenses.check_param(name, low), defenses.check_param(name, high)


def test_parameter_search_has_relative_units_with_their_direction():
  assert defense_table.PARAMETER_SEARCH["clipping_ratio"][1] == 1.0  # 1 = no-op, weakest
  assert defense_table.PARAMETER_SEARCH["clipping_ratio"][3] == "lower"
  assert defense_table.PARAMETER_SEARCH["noising_ratio"][3] == "higher"


def test_every_registered_defence_has_one_row_and_the_paper_four_are_searched():
  assert [defense_table.row(name).name for name in defenses.DEFENSES] == list(defenses.DEFENSES)
  for name in defense_table.PAPER_DEFENSES:
    assert name in defense_table.PARAMETER_SEARCH and defense_table.row(name).frontier
  assert defense_table.ABSOLUTE_OF["clipping_ratio"] == ("clipping", "norm")
  assert defense_table.RELATIVE_OF["noising"] == ("noising_ratio", "rms")
  assert defense_table.paper_cost_claims() == {
    "masking": "almost_none",
    "clipping": "almost_none",
    "pruning": "degrades",
    "noising": "degrades",
  }
  with pytest.raises(ValueError, match="Unknown defence 'mask'"):
    defense_table.row("mask")
