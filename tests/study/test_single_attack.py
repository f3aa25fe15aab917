"""tf_dlg.study.single_attack: one attack from Python, checked before work, written to a folder.

The command line around it (flags, exit codes, messages with `--`) is tests/experiments/test_attack_cli.py.
"""

import json
import time

import pytest

from tf_dlg import metrics
from tf_dlg.attacks.runner import AttackConfig
from tf_dlg.study import single_attack


@pytest.mark.parametrize(
  "fields, match",
  [
    (dict(defense_param=0.3), r"^defense_param=0.3 given with defense=none"),
    (dict(local_steps=2), r"^local_steps=2 needs update=fedavg_delta"),
    (dict(batch=2, local_batch_size=3), r"^local_batch_size=3 must be an integer in \[1, 2\]"),
    (dict(defense="masking", defense_param=5.0), r"^masking rate=5.0 must be a number in"),
    (dict(defense="bogus"), r"^Unknown defence 'bogus'"),
  ],
)
def test_bad_settings_fail_before_any_data_is_read(tmp_path, monkeypatch, fields, match):
  def no_data(*args, **kwargs):
    raise AssertionError("data read before the settings were checked")

  monkeypatch.setattr(single_attack.data_lib, "load_dataset", no_data)
  with pytest.raises(ValueError, match=match):
    single_attack.run(str(tmp_path), dataset="digits", **fields)
  assert not (tmp_path / "attack.json").exists()


@pytest.mark.parametrize(
  "fields, match",
  [
    (dict(restarts=0), r"^attack.restarts=0 must be an integer in \[1, 64\]"),
    (dict(attack="gan"), r"^attack.attack='gan' is not one of"),
    (dict(iterations=0), r"^attack.iterations=0 must be an integer in \[1, inf\]"),
  ],
)
def test_the_attack_is_checked_as_its_config_is_built_and_named_by_path(fields, match):
  with pytest.raises(ValueError, match=match):
    AttackConfig(**fields)


def test_an_unknown_argument_is_refused_by_name(tmp_path):
  with pytest.raises(TypeError, match=r"unknown arguments \['iterations'\]"):
    single_attack.run(str(tmp_path), dataset="digits", iterations=30)


def test_the_range_of_index_names_the_dataset_and_the_arguments(tmp_path):
  with pytest.raises(
    ValueError, match=r"^index=1437 is out of range for dataset=digits with batch=2: .*0..1436"
  ):
    single_attack.run(str(tmp_path), dataset="digits", index=1437, batch=2)


def test_one_attack_writes_the_record_it_returns(tmp_path):
  started = time.time() - 100.0  # the process started 100 s ago
  record = single_attack.run(
    str(tmp_path),
    AttackConfig(iterations=30),
    started=started,
    dataset="digits",
    index=2,
    tensorboard=False,
  )
  assert json.loads((tmp_path / "attack.json").read_text()) == record
  assert (tmp_path / "attack.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert record["png"] == str(tmp_path / "attack.png")
  assert (record["dataset"], record["index"], record["defense"]) == ("digits", 2, "none")
  assert record["max_iterations"] == 30 and 1 <= record["iterations"] <= 30
  timing = record["timing"]
  assert list(timing) == ["startup", "data", "observe", "attack", "score_and_write", "total"]
  assert timing["startup"] >= 100.0 and record["seconds"] == timing["attack"]
  assert timing["total"] >= sum(v for k, v in timing.items() if k != "total") - 1e-6
  assert record["leak_threshold"] == metrics.DEFAULT_LEAK_SSIM
  assert record["leaked"] == (record["adjusted_ssim"] >= metrics.DEFAULT_LEAK_SSIM)
  assert not (tmp_path / "tensorboard").exists()
