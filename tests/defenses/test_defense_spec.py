"""A defence is a transform (one registration line) and a study row (one more), and every
path that reads them.

A toy defence declared here (a `Defense` subclass registered in `tf_dlg.defenses`, and its
`DefenseRow` in `tf_dlg.study.defense_table`) is searched by the threshold search,
trained with in TFF and used by Keras, with no other file edited. Also: `clipping_median`
says it is training-only, the one federated configuration, and importing tf_dlg leaves
TFF's execution context alone.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import defenses
from tf_dlg.analysis import threshold as threshold_lib
from tf_dlg.defenses import base
from tf_dlg.integrations import keras as defenses_keras
from tf_dlg.study import defense_table


class ToyScale(base.Defense):
  """Multiplies the update by `factor` in (0, 1] (a stand-in for a new defence)."""

  name = "toy_scale"
  param_name = "factor"
  clips = True

  @staticmethod
  def check(factor):
    return base.check_number("factor", factor, 0.0, 1.0, low_open=True)

  def _apply(self, tensors, param, seed):
    return [t * tf.cast(param, t.dtype) for t in tensors]

  def _clip_scale(self, tensors, param):
    return tf.cast(param, tf.float32)  # a float64 tensor in TFF training


def _toy_row():
  return defense_table.DefenseRow(
    name="toy_scale",
    search=defense_table.SearchRange(1e-3, 1.0, "log", "lower"),
    strongest_attackers=("ig",),
    family="toy",
    absolute=defense_table.UnitLink("clipping", "norm"),
    paper_cost="degrades",
  )


@pytest.fixture
def toy():
  """The two registration lines, undone afterwards so other tests see the real tables."""
  defenses.register(ToyScale)
  row = defense_table.register(_toy_row())
  yield row
  defense_table.unregister(row.name)
  defenses.unregister(row.name)


def test_registering_adds_the_defence_to_every_view(toy):
  from tf_dlg.study import threshold_search

  assert defenses.DEFENSES["toy_scale"] is ToyScale
  assert defense_table.PARAMETER_SEARCH["toy_scale"] == (1e-3, 1.0, "log", "lower")
  assert threshold_search.STRONGEST_ATTACKER["toy_scale"] == ("ig",)
  assert threshold_search.ABSOLUTE_OF["toy_scale"] == ("clipping", "norm")
  assert "toy_scale" not in threshold_search.RELATIVE_OF
  d = defenses.get_defense("toy_scale", 0.5)
  np.testing.assert_allclose(d([tf.ones([3])])[0], [0.5] * 3)
  with pytest.raises(ValueError, match="already in the table"):
    defense_table.register(dataclasses.replace(toy, family="other"))

  class Other(ToyScale):
    pass

  with pytest.raises(ValueError, match="already registered"):
    defenses.register(Other)


def test_the_papers_cost_claim_about_a_defence_is_tested_in_claims(toy, tmp_path):
  from tf_dlg.study import claims

  assert defense_table.paper_cost_claims()["toy"] == "degrades"
  row = dict(aggregator="mean", partition="iid", param=0.1, param_source="plain threshold")
  row.update(seeds="0 1 2", cost_low=0.05, cost_high=0.09)
  conv = [
    dict(row, defense="none", label="none", cost=0.0, cost_low=0.0, cost_high=0.0),
    dict(row, defense="toy_scale", label="toy_scale", cost=0.07),
  ]
  claims.write_claims(str(tmp_path), [], [], conv)
  line = next(x for x in (tmp_path / "claims.md").read_text().splitlines() if "toy (" in x)
  assert "toy (toy_scale) at its threshold degrades accuracy" in line
  assert "+7.0 pp [+5.0, +9.0]" in line and line.endswith("| agrees |")


def test_unregistered_names_and_inconsistent_specs_are_refused():
  assert "toy_scale" not in defenses.DEFENSES
  assert "toy_scale" not in defense_table.PARAMETER_SEARCH
  with pytest.raises(ValueError, match="Unknown defence 'toy_scale'; expected one of none"):
    defenses.get_defense("toy_scale", 0.5)
  # A study row needs its transform registered first.
  with pytest.raises(ValueError, match="'toy_scale': no such defence in tf_dlg.defenses"):
    _toy_row()
  defenses.register(ToyScale)
  try:
    with pytest.raises(ValueError, match="paper_cost='cheap' is not one of"):
      dataclasses.replace(_toy_row(), paper_cost="cheap")
  finally:
    defenses.unregister("toy_scale")
  with pytest.raises(ValueError, match="low < high"):
    defense_table.SearchRange(1.0, 1e-3, "log", "lower")
  with pytest.raises(TypeError, match="DefenseRow"):
    defense_table.register(ToyScale)
  with pytest.raises(TypeError, match="Defense subclass"):
    defenses.register(_toy_row)


# --------------------------------------------------------------------------- search


def _fake_attack(install_fake_attack, truth):
  """Image k leaks while the defence's strength (0 weakest, 1 strongest) is below truth[k]."""

  def reconstruction(o, k, attack):
    del attack
    strength = -1.0
    if o.defense is not None:
      space = threshold_lib.SearchSpace(*defense_table.PARAMETER_SEARCH[o.defense["name"]])
      strength = threshold_lib.strength_of(space, o.defense["factor"])
    if strength < truth[k]:
      return o.true_images
    return np.random.default_rng(k).random(o.true_images.shape)

  install_fake_attack(reconstruction)


def test_toy_defence_is_searched_plain_and_adaptive(toy, tmp_path, install_fake_attack):
  from tf_dlg.study import threshold_search

  truth = [0.3, 0.6]
  _fake_attack(install_fake_attack, truth)
  search = threshold_search.ThresholdSearch(
    str(tmp_path),
    datasets=["digits"],
    attacks=["idlg"],
    defenses=["toy_scale"],
    adaptive=True,
    num_images=2,
    iterations=10,
    restarts=1,
    progress=False,
  )
  rows = search.run()
  assert {(r["kind"], r["attack"]) for r in rows} == {("plain", "idlg"), ("adaptive", "ig")}
  space = threshold_lib.SearchSpace(*toy.search.as_tuple())
  for row in rows:
    assert row["defense"] == "toy_scale" and row["unit"] == "factor"
    assert (row["search_low"], row["search_high"], row["stronger"]) == (1e-3, 1.0, "lower")
    per_image = json.loads(row["per_image"])
    for t, value in zip(truth, per_image):  # defended at its threshold, within 1.5x
      assert threshold_lib.strength_of(space, value) >= t - 1e-3
      assert space.param(t) / value <= 1.5 * 1.01
    # The row's unit link: absolute equivalent = median over images of factor x norm.
    norm = search.update_stats("digits")["norm"]
    assert row["absolute_equivalent"] == pytest.approx(float(np.median(row["threshold"] * norm)))


def test_training_only_defence_is_refused_by_the_search_and_on_one_update():
  from tf_dlg.study import threshold_search

  assert not defenses.DEFENSES["clipping_median"].single_update
  assert defense_table.row("clipping_median").search is None
  assert "clipping_median" not in defense_table.PARAMETER_SEARCH
  with pytest.raises(ValueError, match="a search needs a single-update defence"):
    dataclasses.replace(
      defense_table.row("clipping_median"), search=defense_table.SearchRange(0.1, 1, "log", "lower")
    )
  d = defenses.get_defense("clipping_median", 0.5)  # the setting is valid ...
  with pytest.raises(ValueError, match="runs only in federated training"):
    d([tf.ones([3])])  # ... but one update cannot express it
  with pytest.raises(ValueError, match="defenses: 'clipping_median' not one of"):
    threshold_search.ThresholdSearch(
      "/tmp/unused_toy_search", ["digits"], ["idlg"], ["clipping_median"], progress=False
    )
  with pytest.raises(ValueError, match="clip_ratio=1.5"):
    defenses.get_defense("clipping_median", 1.5)


# --------------------------------------------------------------------------- Keras


def test_toy_defence_in_keras_training(toy):
  model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3)])
  defended = defenses_keras.DefendedModel(model, defenses.get_defense("toy_scale", 0.25), seed=0)
  loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  defended.compile(optimizer=tf.keras.optimizers.SGD(1.0), loss=loss)
  x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
  y = np.arange(8) % 3
  with tf.GradientTape() as tape:
    raw = tape.gradient(loss(y, defended(x, training=True)), defended.trainable_variables)
  before = [v.numpy() for v in defended.trainable_variables]
  defended.train_on_batch(x, y)
  for b, a, g in zip(before, defended.trainable_variables, raw):
    np.testing.assert_allclose(b - a.numpy(), 0.25 * g.numpy(), rtol=1e-4, atol=1e-7)
  got = defenses_keras.defended_gradients(defenses.get_defense("toy_scale", 0.5), raw, seed=0)
  np.testing.assert_allclose(got[0], 0.5 * raw[0].numpy(), rtol=1e-6)
  assert defenses.defense_from_config(defended.defense_config()["defense"]).get_config() == {
    "name": "toy_scale",
    "factor": 0.25,
  }


# --------------------------------------------------------------------------- TFF


def test_toy_defence_in_a_tff_round(toy, digits, tmp_path):
  from tf_dlg.federated import simulation
  from tf_dlg.federated.config import FederatedConfig

  config = FederatedConfig(
    defense="toy_scale",
    defense_param=0.25,
    model="lenet",
    num_clients=2,
    rounds=1,
    local_epochs=1,
  )
  result = simulation.run_simulation(config, str(tmp_path), dataset=digits, progress=False)
  (row,) = result.history
  assert np.isfinite(row["test_loss"])
  # Measured inside the round by the defence's factory: every client scaled by 0.25.
  assert row["clipped_fraction"] == 1.0 and row["zero_fraction"] < 0.5
  assert result.fedavg.defense.get_config() == {"name": "toy_scale", "factor": 0.25}
  # The client transform itself: the defence object the run built, once.
  assert result.fedavg.defense.single_update


def test_clipping_median_trains_through_its_own_factory():
  from tf_dlg.execution import runtime
  from tf_dlg.federated import defense_aggregator

  tff = runtime.install_context()
  value_type = tff.types.to_type([tff.TensorType(np.float32, [3])])
  d = defenses.get_defense("clipping_median", 1.0)
  factory = defense_aggregator.factory(d, tff.aggregators.MeanFactory())
  process = factory.create(value_type, tff.TensorType(np.float32))
  values = [[np.full(3, s, np.float32)] for s in (1.0, 2.0, 4.0)]
  out = process.next(process.initialize(), values, [1.0, 1.0, 1.0])
  # Median norm 2 * sqrt(3): the third client is clipped to it, the others pass.
  np.testing.assert_allclose(out.result[0], np.full(3, (1.0 + 2.0 + 2.0) / 3), rtol=1e-5)
  assert out.measurements["defense_clipped_fraction"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- configuration


def test_one_federated_configuration_checked_once_without_data(monkeypatch):
  from tf_dlg import data
  from tf_dlg.federated import config as config_lib
  from tf_dlg.federated import fedavg, simulation
  from tf_dlg.study import convergence

  for gone in (
    (simulation, "SimulationConfig"),
    (fedavg, "FedAvgConfig"),
    (convergence, "DEFAULTS"),
  ):
    assert not hasattr(*gone)
  monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
  c = config_lib.FederatedConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.rounds = 3
  with pytest.raises(ValueError, match=r"client_lr=0 must be"):
    dataclasses.replace(c, client_lr=0)
  with pytest.raises(ValueError, match=r"clip_ratio=2"):
    dataclasses.replace(c, defense="clipping_median", defense_param=2.0)
  with pytest.raises(ValueError, match=r"num_clients=10 must be an integer in \[1, 5\]"):
    c.validate(num_examples=5)


def test_malicious_check_does_not_depend_on_the_number_of_rounds():
  from tf_dlg.federated.config import FederatedConfig

  # A check that looped over the rounds would not return before pytest-timeout at 10**15.
  ok = FederatedConfig(rounds=10**15, malicious_clients=3, clients_per_round=4)
  assert ok.rounds == 10**15
  with pytest.raises(ValueError, match=r"a round could sample only malicious clients; use "):
    FederatedConfig(rounds=10**8, malicious_clients=4, clients_per_round=4)


# --------------------------------------------------------------------------- TFF context


def test_importing_tf_dlg_leaves_the_tff_context_alone():
  code = (
    "import tensorflow_federated as tff; ctx = tff.framework.get_context_stack().current; "
    "import tf_dlg.federated.defense_aggregator, tf_dlg.federated, tf_dlg.federated.fedavg, "
    "tf_dlg.federated.simulation, tf_dlg.federated.aggregators; "
    "assert tff.framework.get_context_stack().current is ctx; print('context kept')"
  )
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
  )
  assert out.returncode == 0 and "context kept" in out.stdout, out.stderr[-2000:]
