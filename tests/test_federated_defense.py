"""Defences inside the TFF round: the aggregator sees exactly the defended update.

Skipped until `tf_dlg.defenses` (the defences work) provides `get_defense`,
`defense_factory` and `batchnorm_exclusion`.
"""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import data as data_lib
from tf_dlg.federated import fedavg as fedavg_lib
from tf_dlg.federated import simulation as sim

defenses = pytest.importorskip("tf_dlg.defenses")
for _name in ("get_defense", "defense_factory", "batchnorm_exclusion", "PARAMETER_SEARCH"):
  if not hasattr(defenses, _name):
    pytest.skip(f"tf_dlg.defenses.{_name} not available yet", allow_module_level=True)


def _middle(name):
  low, high, scale, _ = defenses.PARAMETER_SEARCH[name]
  return math.sqrt(low * high) if scale == "log" else 0.5 * (low + high)


@pytest.fixture(scope="module")
def digits():
  return data_lib.load_dataset("digits")


def _round_one(config, digits):
  parts = data_lib.partition(digits.y_train, config.num_clients, "iid", seed=config.seed)
  ids = sim.sample_clients(config, 1)
  return parts, ids, sim._client_data(config, digits, parts, ids, 1, set())


def test_clipping_defense_is_applied_per_client_with_batchnorm_excluded(digits):
  name = "clipping"
  if name not in defenses.PARAMETER_SEARCH:
    pytest.skip(f"no {name!r} defence")
  param = _middle(name)
  plain = sim.SimulationConfig(num_clients=4, rounds=1, seed=0)
  defended = dataclasses.replace(plain, defense=name, defense_param=param)
  fa_plain = sim.build_for_config(plain, digits)
  fa_def = sim.build_for_config(defended, digits)
  _, _, client_data = _round_one(plain, digits)
  # Each process starts from its own state (the defended aggregator keeps a round
  # counter); both start from the same seeded model weights.
  state = fa_plain.process.initialize()
  state_def = fa_def.process.initialize()
  for a, b in zip(fa_plain.process.get_model_weights(state).trainable,
                  fa_def.process.get_model_weights(state_def).trainable):
    np.testing.assert_array_equal(a, b)
  raw = sim._find(fa_plain.capture_process.next(state, client_data).metrics, "client_values")
  got = sim._find(fa_def.capture_process.next(state_def, client_data).metrics,
                  "client_values")

  keras_model = fa_plain.keras_model_fn()
  exclude = fedavg_lib.update_exclusion(keras_model)
  n_bn_stats = len(keras_model.non_trainable_variables)
  assert exclude[-n_bn_stats:] == [True] * n_bn_stats   # moving statistics pass through
  defense = defenses.get_defense(name, param, exclude=exclude)
  for c in range(len(client_data)):
    update = [tf.constant(np.asarray(v[c])) for v in raw]
    # Clipping draws no randomness, so the client's seed does not matter here.
    expected = defense(update, 0)
    for j, (e, g) in enumerate(zip(expected, got)):
      np.testing.assert_allclose(np.asarray(g[c]), np.asarray(e), rtol=1e-4, atol=1e-6,
                                 err_msg=f"client {c}, update entry {j}")
    for j in range(len(raw) - n_bn_stats, len(raw)):   # BN statistics untouched
      np.testing.assert_allclose(np.asarray(got[j][c]), np.asarray(raw[j][c]), rtol=1e-6)


@pytest.mark.parametrize("name", ["masking", "noising"])
def test_defended_run_trains_and_captures(digits, tmp_path, name):
  if name not in defenses.PARAMETER_SEARCH:
    pytest.skip(f"no {name!r} defence")
  config = sim.SimulationConfig(num_clients=4, rounds=2, defense=name,
                                defense_param=_middle(name), capture_round=2, seed=0)
  result = sim.run_simulation(config, str(tmp_path), dataset=digits, progress=False)
  assert all(np.isfinite(h["test_loss"]) for h in result.history)
  from tf_dlg.attacks.threat_model import ObservedUpdate  # pylint: disable=g-import-not-at-top
  obs = ObservedUpdate.load(result.capture_path)
  assert obs.defense is not None and obs.defense.get("name", name) == name
