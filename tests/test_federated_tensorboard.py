"""A federated run's TensorBoard scalars, read back from the event files."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import data as data_lib
from tf_dlg.federated import simulation as sim

_BASE = {"train/loss", "train/accuracy", "test/loss", "test/accuracy", "round/seconds",
         "update/global_norm"}


@pytest.fixture(scope="module")
def digits():
  return data_lib.load_dataset("digits")


def read_scalars(directory):
  """{tag: {step: value}} from every event file under `directory`."""
  out = {}
  files = glob.glob(os.path.join(directory, "events.out.tfevents.*"))
  assert files, f"no event file in {directory}"
  for path in files:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def _run(digits, tmp_path, **kwargs):
  config = sim.SimulationConfig(num_clients=3, rounds=2, local_epochs=1, model="lenet",
                                **kwargs)
  result = sim.run_simulation(config, str(tmp_path), dataset=digits, progress=False)
  return result, read_scalars(str(tmp_path / sim.TENSORBOARD_DIR))


def test_undefended_run_writes_round_scalars(digits, tmp_path):
  result, scalars = _run(digits, tmp_path)
  assert set(scalars) == _BASE
  for tag in _BASE:
    assert sorted(scalars[tag]) == [1, 2], tag
  for row in result.history:
    r = row["round"]
    assert 0.0 <= scalars["test/accuracy"][r] <= 1.0
    assert scalars["test/accuracy"][r] == pytest.approx(row["test_accuracy"])
    assert scalars["train/loss"][r] == pytest.approx(row["train_loss"])
  assert all(v > 0 and np.isfinite(v) for v in scalars["update/global_norm"].values())


def test_masking_and_clipping_report_defence_statistics(digits, tmp_path):
  _, masked = _run(digits, tmp_path / "mask", defense="masking", defense_param=0.6)
  assert set(masked) == _BASE | {"defense/zero_fraction"}
  for step in (1, 2):
    # Each entry is kept with probability 0.4; thousands of entries: close to 0.6.
    assert masked["defense/zero_fraction"][step] == pytest.approx(0.6, abs=0.02)
  _, clipped = _run(digits, tmp_path / "clip", defense="clipping", defense_param=1e-3)
  assert set(clipped) == _BASE | {"defense/zero_fraction", "defense/clipped_fraction"}
  assert clipped["defense/clipped_fraction"] == {1: 1.0, 2: 1.0}
  # Three clients clipped to norm 1e-3: their weighted mean has a norm of at most 1e-3.
  assert all(v <= 1e-3 * (1 + 1e-4) for v in clipped["update/global_norm"].values())
