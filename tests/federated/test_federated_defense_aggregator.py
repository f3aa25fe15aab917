"""The defences as TFF aggregators (`tf_dlg.federated.defense_aggregator`).

Every check compares TFF's output with the pure defence (`Defense.__call__`) applied
in eager TensorFlow with the client seeds `aggregator.client_seed(value, round, seed)`
reproduces: the aggregate must be *exactly* what the pure function predicts (up to
float rounding of the mean), for the factory on its own and inside a one-round
`tff.learning.algorithms.build_weighted_fed_avg` run on `digits` with 3 clients.

Kept fast: tiny value types, one tiny Keras model, and one TFF build per defence.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from defense_cases import PARAMS, RANDOM

from tf_dlg import data as data_lib
from tf_dlg import defenses, models
from tf_dlg.execution import runtime
from tf_dlg.federated import aggregators as aggregators_lib
from tf_dlg.federated import defense_aggregator as aggregator

tff = runtime.install_context()


SHAPES = [(5, 4), (3,)]
VALUE_TYPE = tff.types.to_type([tff.TensorType(np.float32, s) for s in SHAPES])
WEIGHT_TYPE = tff.TensorType(np.float32)
WEIGHTS = [1.0, 2.0, 5.0]


def _client_values(num_clients=3, scale=1.0):
  rng = np.random.default_rng(42)
  return [
    [(rng.normal(size=s) * scale).astype(np.float32) for s in SHAPES] for _ in range(num_clients)
  ]


def _defend_clients(defense, values, round_num, seed):
  """What each client sends: the pure defence with the client's reproduced seed."""
  out = []
  for v in values:
    v = [tf.constant(a) for a in v]
    out.append([np.asarray(t) for t in defense(v, aggregator.client_seed(v, round_num, seed))])
  return out


def _mean(defended, weights=None):
  w = np.ones(len(defended)) if weights is None else np.asarray(weights, np.float64)
  return [
    sum(wc * np.asarray(d[j], np.float64) for wc, d in zip(w, defended)) / w.sum()
    for j in range(len(defended[0]))
  ]


def _zero_fraction(defended, exclude=None):
  """Mean over clients of the zero share of their non-excluded entries."""
  exclude = exclude or [False] * len(defended[0])
  return np.mean(
    [
      np.mean(np.concatenate([t.ravel() for t, e in zip(d, exclude) if not e]) == 0)
      for d in defended
    ]
  )


def _assert_close(got, want, **kw):
  for j, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6, err_msg=f"leaf {j}", **kw)


# ----------------------------------------------------------------------------- the factory


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_weighted_factory_aggregate_is_the_pure_defence(name):
  defense = defenses.get_defense(name, PARAMS[name])
  factory = aggregator.defense_factory(defense, tff.aggregators.MeanFactory(), seed=3)
  assert isinstance(factory, tff.aggregators.WeightedAggregationFactory)
  process = factory.create(VALUE_TYPE, WEIGHT_TYPE)
  values = _client_values(scale=3.0)  # norms > 1 so that clipping and dp clip
  state = process.initialize()
  results = []
  for round_num in (0, 1):
    assert state["round"] == round_num
    out = process.next(state, values, WEIGHTS)
    defended = _defend_clients(defense, values, round_num, seed=3)
    _assert_close(out.result, _mean(defended, WEIGHTS))
    # Measured once, by add_measurements on what the inner aggregation receives.
    assert out.measurements["inner_agg"]["defense_zero_fraction"] == pytest.approx(
      _zero_fraction(defended), abs=1e-6
    )
    assert "mean_value" in out.measurements["inner_agg"]  # MeanFactory's own, kept
    scales = [float(defense.clip_scale([tf.constant(a) for a in v])) for v in values]
    if defense.clips:
      assert out.measurements["defense_clip_scale"] == pytest.approx(np.mean(scales), rel=1e-5)
      assert out.measurements["defense_clipped_fraction"] == pytest.approx(
        np.mean(np.asarray(scales) < 1.0)
      )
    else:  # nothing to report for a defence that cannot clip
      assert "defense_clipped_fraction" not in out.measurements and set(scales) == {1.0}
    results.append(out.result)
    state = out.state
  assert state["round"] == 2
  if name in RANDOM:  # a fresh mask / noise every round
    assert np.any(np.asarray(results[0][0]) != np.asarray(results[1][0]))
  else:
    _assert_close(results[1], [np.asarray(r) for r in results[0]])
  if name == "masking":
    assert _zero_fraction(defended) > 0.3
  if name == "none":
    _assert_close(results[0], _mean(values, WEIGHTS))
  if name in ("clipping", "clipping_ratio", "dp"):  # norms > 1: every client clipped
    assert defense.clips
    assert out.measurements["defense_clipped_fraction"] == 1.0
    assert out.measurements["defense_clip_scale"] < 1.0


def test_clients_and_seeds_get_different_masks():
  values = _client_values()
  defense = defenses.get_defense("masking", 0.5)
  same = [values[0]] * 3
  seeds = [
    tuple(aggregator.client_seed([tf.constant(a) for a in v], 0, 3).numpy())
    for v in values + same[:1]
  ]
  assert len(set(seeds[:3])) == 3 and seeds[3] == seeds[0]
  # Three clients with the same value and base seed get the same mask (the seed is a
  # function of the value) -- the mean is then exactly one client's masked value.
  process = aggregator.defense_factory(
    defense, tff.aggregators.UnweightedMeanFactory(), seed=3
  ).create(VALUE_TYPE)
  out = process.next(process.initialize(), same)
  _assert_close(out.result, _defend_clients(defense, same[:1], 0, 3)[0])
  # Another base seed: other masks.
  other = aggregator.defense_factory(
    defense, tff.aggregators.UnweightedMeanFactory(), seed=4
  ).create(VALUE_TYPE)
  out4 = other.next(other.initialize(), same)
  _assert_close(out4.result, _defend_clients(defense, same[:1], 0, 4)[0])
  assert np.any(np.asarray(out4.result[0]) != np.asarray(out.result[0]))


def test_unweighted_inner_factories_are_inherited():
  defense = defenses.get_defense("pruning", 0.5)
  values = _client_values()
  defended = _defend_clients(defense, values, 0, 0)
  factory = aggregator.defense_factory(defense, tff.aggregators.UnweightedMeanFactory())
  assert isinstance(factory, tff.aggregators.UnweightedAggregationFactory)
  assert not isinstance(factory, tff.aggregators.WeightedAggregationFactory)
  process = factory.create(VALUE_TYPE)
  out = process.next(process.initialize(), values)
  _assert_close(out.result, _mean(defended))
  assert out.measurements["inner_agg"]["defense_zero_fraction"] == pytest.approx(0.5, abs=0.05)
  # The coordinate-wise median (unweighted, from the federated-training work).
  median = aggregator.defense_factory(defense, aggregators_lib.median_factory())
  assert isinstance(median, tff.aggregators.UnweightedAggregationFactory)
  process = median.create(VALUE_TYPE)
  out = process.next(process.initialize(), values)
  _assert_close(
    out.result, [np.median(np.stack([d[j] for d in defended]), axis=0) for j in range(len(SHAPES))]
  )


def test_exclude_passes_tensors_through_and_overrides_the_defence():
  defense = defenses.get_defense("masking", 0.9, exclude=[True, True])
  process = aggregator.defense_factory(
    defense, tff.aggregators.MeanFactory(), exclude=[False, True]
  ).create(VALUE_TYPE, WEIGHT_TYPE)
  values = _client_values()
  out = process.next(process.initialize(), values, WEIGHTS)
  assert defense.exclude == [True, True]  # the caller's defence is not modified
  raw_mean = _mean(values, WEIGHTS)
  np.testing.assert_allclose(np.asarray(out.result[1]), raw_mean[1], rtol=1e-5)
  expected = _defend_clients(
    defenses.get_defense("masking", 0.9, exclude=[False, True]), values, 0, 0
  )
  _assert_close(out.result, _mean(expected, WEIGHTS))
  # Only the transformed (non-excluded) entries count: 0.9 of the 20, not of all 23.
  zero = out.measurements["inner_agg"]["defense_zero_fraction"]
  assert zero == pytest.approx(_zero_fraction(expected, [False, True]), abs=1e-6)
  assert zero == pytest.approx(0.9, abs=0.1)


def test_type_errors():
  mean = tff.aggregators.MeanFactory()
  with pytest.raises(TypeError, match="tf_dlg.defenses.Defense"):
    aggregator.defense_factory("masking", mean)
  with pytest.raises(TypeError, match="tf_dlg.defenses.Defense"):
    aggregator.defense_factory(lambda u, s: u, mean)
  with pytest.raises(TypeError, match="inner_agg_factory"):
    aggregator.defense_factory(defenses.get_defense("masking", 0.5), object())
  with pytest.raises(TypeError, match="seed"):
    aggregator.defense_factory(defenses.get_defense("masking", 0.5), mean, seed=0.5)
  factory = aggregator.defense_factory(defenses.get_defense("masking", 0.5), mean)
  for bad in (
    tff.TensorType(np.int32, [3]),
    tff.types.to_type([tff.TensorType(np.float32, [2]), tff.TensorType(np.int64, [2])]),
  ):
    with pytest.raises(TypeError, match="floating"):
      factory.create(bad, WEIGHT_TYPE)
  unweighted = aggregator.defense_factory(
    defenses.get_defense("noising", 0.1), tff.aggregators.UnweightedMeanFactory()
  )
  with pytest.raises(TypeError, match="floating"):
    unweighted.create(tff.TensorType(np.int32, [3]))


# ----------------------------------------------------------------------------- median clipping


def _norms(values, exclude=(False, False)):
  return np.asarray(
    [
      math.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a, e in zip(v, exclude) if not e))
      for v in values
    ]
  )


@pytest.mark.parametrize("num_clients,ratio", [(3, 1.0), (4, 0.5)])
def test_median_clipping_clips_to_ratio_times_the_round_median_norm(num_clients, ratio):
  rng = np.random.default_rng(7)
  values = [
    [(rng.normal(size=s) * scale).astype(np.float32) for s in SHAPES]
    for scale in (0.5, 1.0, 2.0, 8.0)[:num_clients]
  ]
  weights = (WEIGHTS + [3.0])[:num_clients]
  norms = _norms(values)
  bound = ratio * np.median(norms)  # an even count: the mean of the middle two
  scales = np.minimum(1.0, bound / norms)
  expected = [[a * s for a in v] for v, s in zip(values, scales)]
  factory = aggregator.median_clipping_factory(ratio, tff.aggregators.MeanFactory())
  assert isinstance(factory, tff.aggregators.WeightedAggregationFactory)
  process = factory.create(VALUE_TYPE, WEIGHT_TYPE)
  out = process.next(process.initialize(), values, weights)
  _assert_close(out.result, _mean(expected, weights))
  assert out.measurements["defense_clipped_fraction"] == pytest.approx(np.mean(scales < 1))
  assert out.measurements["defense_clip_scale"] == pytest.approx(np.mean(scales), rel=1e-5)
  if ratio == 1.0:  # 3 clients: only the largest is above the median, the median is kept
    assert np.sum(scales < 1) == 1


def test_median_clipping_excludes_tensors_and_works_unweighted():
  values = _client_values(num_clients=3, scale=2.0)
  exclude = [False, True]
  norms = _norms(values, exclude)
  bound = 0.5 * np.median(norms)
  expected = [[v[0] * min(1.0, bound / n), v[1]] for v, n in zip(values, norms)]
  factory = aggregator.median_clipping_factory(
    0.5, tff.aggregators.UnweightedMeanFactory(), exclude=exclude
  )
  assert not isinstance(factory, tff.aggregators.WeightedAggregationFactory)
  process = factory.create(VALUE_TYPE)
  out = process.next(process.initialize(), values)
  _assert_close(out.result, _mean(expected))
  clipped = np.mean(norms > bound)
  assert 0 < clipped and out.measurements["defense_clipped_fraction"] == pytest.approx(clipped)
  with pytest.raises(ValueError, match="clip_ratio=1.5"):
    aggregator.median_clipping_factory(1.5, tff.aggregators.MeanFactory())


def test_median_matches_numpy():
  for n in range(0, 7):
    x = np.random.default_rng(n).normal(size=n).astype(np.float32)
    want = np.median(x) if n else 0.0
    assert float(aggregator._median(tf.constant(x))) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- FedAvg


NUM_EXAMPLES = (20, 30, 40)  # unequal, so that the example weighting matters


@pytest.fixture(scope="module")
def digits_clients(digits):
  starts = np.cumsum((0,) + NUM_EXAMPLES)
  parts = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
  clients = data_lib.client_datasets(
    digits.x_train, digits.y_train, parts, batch_size=10, epochs=1, shuffle=False
  )
  return digits, clients


@pytest.mark.parametrize(
  "name", ["masking", "clipping", "clipping_ratio", "pruning", "noising", "noising_ratio", "dp"]
)
def test_one_round_weighted_fed_avg_aggregate_is_the_pure_defence(
  digits_clients, tiny_bn_model, name
):
  """3 `digits` clients, one round of TFF's own FedAvg with the defence as aggregator.

  The model update is TFF's (trainable weights only); BN gamma/beta are excluded with
  `batchnorm_exclusion`. `capture_factory` outside the defence records each client's
  raw update, so the expected aggregate is the example-weighted mean of the pure
  defence on those updates; the server (SGD, lr 1) moves by exactly that aggregate.
  """
  ds, clients = digits_clients
  shape = ds.x_train.shape[1:]
  probe = tiny_bn_model(shape, ds.num_classes)
  exclude = defenses.batchnorm_exclusion(probe, probe.trainable_variables)
  assert sum(exclude) == 2  # gamma, beta
  defense = defenses.get_defense(name, PARAMS[name], exclude=exclude)

  def model_fn():
    return tff.learning.models.from_keras_model(
      tiny_bn_model(shape, ds.num_classes),
      input_spec=models.input_spec(shape),
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

  process = tff.learning.algorithms.build_weighted_fed_avg(
    model_fn,
    client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.5),
    server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
    model_aggregator=aggregators_lib.capture_factory(
      aggregator.defense_factory(defense, tff.aggregators.MeanFactory(), seed=7)
    ),
  )
  state = process.initialize()
  before = process.get_model_weights(state).trainable
  out = process.next(state, clients)
  after = process.get_model_weights(out.state).trainable
  captured = out.metrics["aggregator"]
  raw = [[np.asarray(leaf[c]) for leaf in captured["client_values"]] for c in range(3)]
  assert all(np.any(r[0] != raw[0][0]) for r in raw[1:])  # three different clients

  defended = _defend_clients(defense, raw, 0, seed=7)
  expected = _mean(defended, NUM_EXAMPLES)
  moved = [np.asarray(b) - np.asarray(a) for b, a in zip(before, after)]
  _assert_close(moved, expected)
  zero = captured["inner_agg"]["defense_zero_fraction"]
  assert zero == pytest.approx(_zero_fraction(defended, exclude), abs=1e-6)
  for j, ex in enumerate(exclude):  # BN gamma/beta: the plain weighted mean
    if ex:
      np.testing.assert_allclose(moved[j], _mean(raw, NUM_EXAMPLES)[j], rtol=1e-5, atol=1e-7)
  if name == "masking":
    assert zero > 0.3
  elif name == "clipping":
    norms = [np.sqrt(sum(np.sum(t**2) for t, e in zip(d, exclude) if not e)) for d in defended]
    assert max(norms) <= PARAMS[name] * (1 + 1e-5)


# ------------------------------------------------------------------ the runtime parameter

OTHER_PARAMS = {
  "masking": 0.2,
  "clipping": 0.7,
  "clipping_ratio": 0.3,
  "value_clipping": 0.02,
  "pruning": 0.29,
  "noising": 0.3,
  "noising_ratio": 0.3,
  "dp": 1.5,
}


@pytest.mark.parametrize("name", sorted(OTHER_PARAMS))
def test_parameter_set_in_the_state_is_the_pure_defence_of_that_parameter(name):
  """One built process serves another parameter: exactly its Python-float transform."""
  built_with = defenses.get_defense(name, PARAMS[name])
  process = aggregator.defense_factory(built_with, tff.aggregators.MeanFactory(), seed=3).create(
    VALUE_TYPE, WEIGHT_TYPE
  )
  state = process.initialize()
  assert state["param"] == PARAMS[name]
  state = aggregator.initial_state(state, OTHER_PARAMS[name])
  values = _client_values(scale=3.0)
  out = process.next(state, values, WEIGHTS)
  assert out.state["param"] == OTHER_PARAMS[name]  # kept for the next round
  other = defenses.get_defense(name, OTHER_PARAMS[name])
  want = _mean(_defend_clients(other, values, 0, seed=3), WEIGHTS)
  _assert_close(out.result, want)
  # The parameter matters here: the built one gives another aggregate.
  before = _mean(_defend_clients(built_with, values, 0, seed=3), WEIGHTS)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(want, before)) > 1e-4


def test_median_clipping_ratio_set_in_the_state():
  values = _client_values(num_clients=5, scale=3.0)
  outs = []
  for built, run in ((0.5, 0.5), (1.0, 0.5)):
    process = aggregator.median_clipping_factory(built, tff.aggregators.MeanFactory()).create(
      VALUE_TYPE, WEIGHT_TYPE
    )
    state = aggregator.initial_state(process.initialize(), run)
    outs.append(process.next(state, values, [1.0] * 5))
  _assert_close(outs[1].result, outs[0].result)
  assert outs[1].measurements["defense_clip_scale"] == pytest.approx(
    outs[0].measurements["defense_clip_scale"], rel=1e-6
  )


def test_initial_state_refuses_a_state_without_a_parameter():
  with pytest.raises(TypeError, match="not the state of a defence aggregation process"):
    aggregator.initial_state({"round": 0}, 0.5)


# ----------------------------------------------------------------------------- one entry


def test_factory_is_the_one_entry_and_refuses_what_it_cannot_train():
  median = defenses.get_defense("clipping_median", 1.0)
  with pytest.raises(ValueError, match="clipping_median needs the round's other clients"):
    aggregator.defense_factory(median, tff.aggregators.MeanFactory())
  process = aggregator.factory(median, tff.aggregators.MeanFactory()).create(
    VALUE_TYPE, WEIGHT_TYPE
  )
  values = [[np.full(s, c, np.float32) for s in SHAPES] for c in (1.0, 2.0, 4.0)]
  out = process.next(process.initialize(), values, [1.0, 1.0, 1.0])
  # Median client norm 2 x sqrt(23): the third client is clipped to it, the others pass.
  _assert_close(out.result, [np.full(s, (1.0 + 2.0 + 2.0) / 3) for s in SHAPES])
  masking = defenses.get_defense("masking", 0.5)
  direct = aggregator.factory(masking, tff.aggregators.MeanFactory(), seed=3).create(
    VALUE_TYPE, WEIGHT_TYPE
  )
  out = direct.next(direct.initialize(), _client_values(), WEIGHTS)
  _assert_close(out.result, _mean(_defend_clients(masking, _client_values(), 0, 3), WEIGHTS))


def test_a_run_builds_its_defence_once(digits, tmp_path, monkeypatch):
  from tf_dlg.attacks.threat_model import ObservedUpdate
  from tf_dlg.defenses import base
  from tf_dlg.federated import simulation
  from tf_dlg.federated.config import FederatedConfig

  config = FederatedConfig(
    defense="masking",
    defense_param=0.5,
    model="lenet",
    num_clients=2,
    rounds=1,
    capture_round=1,
  )
  built = []
  init = base.Defense.__init__

  def counting(self, *args, **kwargs):
    built.append(type(self).__name__)
    init(self, *args, **kwargs)

  monkeypatch.setattr(base.Defense, "__init__", counting)
  result = simulation.run_simulation(config, str(tmp_path), dataset=digits, progress=False)
  assert built == ["Masking"]  # not for the check, the factory or the capture
  (capture,) = tmp_path.glob("capture_round1_*.npz")
  assert ObservedUpdate.load(str(capture)).defense == result.fedavg.defense.get_config()
  assert result.fedavg.defense.get_config() == {"name": "masking", "rate": 0.5, "rescale": False}
