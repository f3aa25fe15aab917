"""FedAvg in TFF (`tf_dlg.federated.fedavg`): BatchNorm statistics travel with the update,
its layout lines up with the defences' exclusion, and a defence is applied per client.
"""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import data as data_lib
from tf_dlg import defenses
from tf_dlg.execution import runtime
from tf_dlg.federated import defense_aggregator as aggregator
from tf_dlg.federated import fedavg as fedavg_lib
from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.study import defense_table

runtime.install_context()


def test_batchnorm_statistics_are_averaged_and_used(sim_config, mean_fedavg, digits):
  """Server BN moving stats leave their init and equal the weighted client mean."""
  parts = data_lib.partition(digits.y_train, 10, "iid", seed=0)
  ids = sim.sample_clients(sim_config, 1)
  client_data = sim.client_data(sim_config, digits, parts, ids, 1, set())
  state0 = mean_fedavg.process.initialize()
  out = mean_fedavg.capture_process.next(state0, client_data)
  w0 = mean_fedavg.process.get_model_weights(state0)
  w1 = mean_fedavg.process.get_model_weights(out.state)
  deltas = sim.find_metric(out.metrics, "client_values")
  counts = np.array([len(parts[i]) * sim_config.local_epochs for i in ids], np.float64)
  nt = mean_fedavg.num_trainable
  for j, (before, after) in enumerate(zip(w0.non_trainable, w1.non_trainable)):
    expected = before - np.average(np.asarray(deltas[nt + j]), axis=0, weights=counts)
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(after, before), "BN statistic stuck at its initial value"
  # Moving means start at 0 and variances at 1; both must have moved.
  keras_model = mean_fedavg.keras_model_fn()
  mean_fedavg.assign_to_keras(w1, keras_model)
  bn = keras_model.get_layer("bn2")
  assert np.abs(bn.moving_mean.numpy()).max() > 1e-3
  assert np.abs(bn.moving_variance.numpy() - 1.0).max() > 1e-2


def test_update_layout_and_exclusion_line_up(mean_fedavg):
  keras_model = mean_fedavg.keras_model_fn()
  variables = fedavg_lib.update_variables(keras_model)
  assert len(variables) == mean_fedavg.num_trainable + len(keras_model.non_trainable_variables)
  names = [v.name for v in variables]
  assert all("moving" in n for n in names[mean_fedavg.num_trainable :])


# --------------------------------------------------------------------------- configuration


def test_config_overrides_are_checked_by_name(digits):
  with pytest.raises(TypeError, match="modle"):
    fedavg_lib.build_fedavg(digits.x_train.shape[1:], digits.num_classes, modle="lenet")
  base = FederatedConfig(model="lenet", client_lr=0.1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    base.model = "bn_cnn"
  fa = fedavg_lib.build_fedavg(
    digits.x_train.shape[1:], digits.num_classes, base, aggregator="median"
  )
  assert fa.config == dataclasses.replace(base, aggregator="median")
  assert (fa.model_name, fa.aggregator, fa.client_learning_rate) == ("lenet", "median", 0.1)


# --------------------------------------------------------------------------- defences


def _middle(name):
  low, high, scale, _ = defense_table.PARAMETER_SEARCH[name]
  return math.sqrt(low * high) if scale == "log" else 0.5 * (low + high)


def _round_one(config, digits):
  parts = data_lib.partition(digits.y_train, config.num_clients, "iid", seed=config.seed)
  ids = sim.sample_clients(config, 1)
  return parts, ids, sim.client_data(config, digits, parts, ids, 1, set())


@pytest.fixture(scope="module")
def plain_build(mean_fedavg):
  """4 clients, undefended; the build is the session's (it does not depend on clients)."""
  plain = FederatedConfig(num_clients=4, rounds=1, seed=0)
  assert dataclasses.replace(mean_fedavg.config, num_clients=4, rounds=1) == plain
  return plain, mean_fedavg


@pytest.mark.parametrize("name", ["clipping_ratio", "masking"])
def test_training_applies_the_searched_transform_per_client(digits, plain_build, name):
  """One name, one transform: a TFF round sends get_defense(name)(raw update, seed).

  The client update is captured after the defence inside a round and compared with
  the very `Defense` the threshold search attacks, applied to the same client's raw
  update with the client's seed (`aggregator.client_seed`, round 0, base seed 0).
  """
  param = _middle(name)
  plain, fa_plain = plain_build
  plain = FederatedConfig(num_clients=4, rounds=1, seed=0)
  defended = dataclasses.replace(plain, defense=name, defense_param=param)
  fa_def = sim.build_for_config(defended, digits)
  _, _, client_data = _round_one(plain, digits)
  # Each process starts from its own state (the defended aggregator keeps a round
  # counter); both start from the same seeded model weights. `initialize()`, not
  # `process.initialize()`: the build may be shared with an earlier run of this defence at
  # another parameter (build reuse), and only the bundle sets this config's parameter.
  state = fa_plain.initialize()
  state_def = fa_def.initialize()
  for a, b in zip(
    fa_plain.process.get_model_weights(state).trainable,
    fa_def.process.get_model_weights(state_def).trainable,
  ):
    np.testing.assert_array_equal(a, b)
  raw = sim.find_metric(fa_plain.capture_process.next(state, client_data).metrics, "client_values")
  out = fa_def.capture_process.next(state_def, client_data)
  got = sim.find_metric(out.metrics, "client_values")

  keras_model = fa_plain.keras_model_fn()
  exclude = fedavg_lib.update_exclusion(keras_model)
  n_bn_stats = len(keras_model.non_trainable_variables)
  assert exclude[-n_bn_stats:] == [True] * n_bn_stats  # moving statistics pass through
  defense = defenses.get_defense(name, param, exclude=exclude)
  assert fa_def.defense.get_config() == defense.get_config()
  zero_fractions = []
  for c in range(len(client_data)):
    update = [tf.constant(np.asarray(v[c])) for v in raw]
    expected = defense(update, aggregator.client_seed(update, 0, 0))
    kept = [np.asarray(e).ravel() for e, ex in zip(expected, exclude) if not ex]
    zero_fractions.append(np.mean(np.concatenate(kept) == 0))
    for j, (e, g) in enumerate(zip(expected, got)):
      np.testing.assert_allclose(
        np.asarray(g[c]),
        np.asarray(e),
        rtol=1e-4,
        atol=1e-6,
        err_msg=f"client {c}, update entry {j}",
      )
    for j in range(len(raw) - n_bn_stats, len(raw)):  # BN statistics untouched
      np.testing.assert_allclose(np.asarray(got[j][c]), np.asarray(raw[j][c]), rtol=1e-6)

  if name == "clipping_ratio":  # own-norm rescaling: every client, by exactly the ratio
    assert sim.find_metric(out.metrics, "defense_clipped_fraction") == 1.0
    assert sim.find_metric(out.metrics, "defense_clip_scale") == pytest.approx(param, rel=1e-6)
  else:  # masking leaves no clipping statistic
    assert sim.find_metric(out.metrics, "defense_clipped_fraction") is None
  zero = sim.find_metric(out.metrics, "defense_zero_fraction")
  assert zero == pytest.approx(np.mean(zero_fractions), abs=1e-6)


# --------------------------------------------------------------------------- median


def test_median_round_moves_the_server_by_numpys_median_of_client_deltas(digits):
  """One median round: every server weight -- trainable (server SGD, lr 1) and BatchNorm
  statistic -- becomes before - np.median(client deltas), uniformly weighted although the
  clients hold very different numbers of examples."""
  config = FederatedConfig(
    num_clients=5, rounds=1, aggregator="median", partition="dirichlet", alpha=0.3, seed=0
  )
  assert (config.server_optimizer, config.server_lr) == ("sgd", 1.0)
  parts = data_lib.partition(digits.y_train, 5, "dirichlet", alpha=0.3, seed=0)
  sizes = sorted(len(p) for p in parts)
  assert sizes[-1] > 2 * sizes[0], sizes  # weighting by examples would differ
  fa = sim.build_for_config(config, digits)
  ids = sim.sample_clients(config, 1)
  state0 = fa.initialize()
  out = fa.capture_process.next(state0, sim.client_data(config, digits, parts, ids, 1, set()))
  deltas = [np.asarray(d) for d in sim.find_metric(out.metrics, "client_values")]
  assert all(d.shape[0] == 5 for d in deltas)
  w0 = fa.process.get_model_weights(state0)
  w1 = fa.process.get_model_weights(out.state)
  before = list(w0.trainable) + list(w0.non_trainable)
  after = list(w1.trainable) + list(w1.non_trainable)
  assert len(after) == len(deltas)
  for j, (b, a, d) in enumerate(zip(before, after, deltas)):
    want = np.asarray(b) - np.median(d, axis=0)
    np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-6, err_msg=f"weight {j}")
  # The BN statistics moved off their initial 0 / 1.
  assert any(
    not np.allclose(a, b) for a, b in zip(after[fa.num_trainable :], before[fa.num_trainable :])
  )
