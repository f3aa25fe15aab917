"""The `dp` defence on the Flower engine: Flower's own DP, BatchNorm arrays left out.

In process, with fixed arrays (no model): the client side (`LocalDpMod`,
`fixedclipping_mod` behind `flower_dp.on_kept_arrays`) and the server side
(`DifferentialPrivacyClientSideFixedClipping` through `flower_server.aggregate`).
Expected values are NumPy's: the clipped update is d x min(1, C / ||d||) over the kept
arrays; noise is measured over 10^5 entries (its std's own sampling error is ~0.2 %,
the bounds allow 2 %).
"""

import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from tf_dlg.federated.config import FederatedConfig
from tf_dlg.integrations import flower_dp, flower_engine, flower_server

pytest.importorskip("flwr.serverapp")

RNG = np.random.default_rng(0)
# Kept, excluded (a BatchNorm statistic), kept.
RECEIVED = [
  RNG.normal(size=(200, 500)).astype(np.float32),
  RNG.normal(size=(6,)).astype(np.float32),
  RNG.normal(size=(7,)).astype(np.float32),
]
EXCLUDE = [False, True, False]


def _message(arrays, config=None, node=7):
  md = Metadata(
    run_id=1,
    message_id=f"m{node}",
    src_node_id=0,
    dst_node_id=node,
    reply_to_message_id="",
    group_id="1",
    created_at=time.time(),
    ttl=3600.0,
    message_type="train",
  )
  content = {"arrays": ArrayRecord(arrays), "config": ConfigRecord(config or {"x": 1})}
  return Message(RecordDict(content), metadata=md)


def _context():
  return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _replier(sent, metrics=None):
  def call_next(msg, context):
    content = {"arrays": ArrayRecord(sent), "metrics": MetricRecord(metrics or {"n": 10})}
    return Message(RecordDict(content), reply_to=msg)

  return call_next


def _update(norm):
  """An update of global L2 norm `norm` over the kept arrays, and 0.5 on the excluded."""
  d = [RNG.normal(size=a.shape) for a in RECEIVED]
  kept = np.sqrt(sum(np.sum(x**2) for x, e in zip(d, EXCLUDE) if not e))
  return [
    (np.full(a.shape, 0.5) if e else x * norm / kept) for a, x, e in zip(RECEIVED, d, EXCLUDE)
  ]


def _config(z):
  return FederatedConfig(dataset="digits", num_clients=4, defense="dp", defense_param=z)


def _sent(out):
  return [a.numpy() for a in out.content["arrays"].values()]


@pytest.mark.parametrize("norm, clipped", [(5.0, 1), (0.25, 0)])
def test_fixed_clipping_clips_the_kept_update_to_c_and_sends_excluded_as_trained(norm, clipped):
  from flwr.clientapp.mod import fixedclipping_mod

  d = _update(norm)
  sent = [(r + x).astype(np.float32) for r, x in zip(RECEIVED, d)]
  msg = _message(RECEIVED, {"clipping_norm": 1.0})
  mod = flower_dp.on_kept_arrays(fixedclipping_mod, EXCLUDE, 1.0)
  out = mod(msg, _context(), _replier(sent))
  assert not out.has_error()
  got = _sent(out)
  scale = min(1.0, 1.0 / norm)  # hand computation: C / ||d|| with C = 1
  for g, r, x, s, e in zip(got, RECEIVED, d, sent, EXCLUDE):
    if e:
      np.testing.assert_array_equal(g, s)  # bit for bit
    else:
      np.testing.assert_allclose(g, r + x * scale, rtol=1e-5, atol=1e-6)
  metrics = out.content["metrics"]
  assert metrics["tf_dlg.update_norm"] == pytest.approx(norm, rel=1e-5)
  assert metrics["tf_dlg.clipped"] == clipped
  assert metrics["tf_dlg.zero_fraction"] < 1e-3  # float32 rounding of the tiniest entries
  assert list(msg.content["arrays"].keys()) == ["0", "1", "2"]  # the message is whole again


def test_fixed_clipping_without_the_server_wrapper_is_an_error_reply():
  from flwr.clientapp.mod import fixedclipping_mod

  mod = flower_dp.on_kept_arrays(fixedclipping_mod, EXCLUDE, 1.0)
  out = mod(_message(RECEIVED), _context(), _replier(RECEIVED))
  assert out.has_error() and "clipping_norm" in out.error.reason


def test_local_dp_clips_to_c_and_adds_noise_of_std_z_c_seeded_by_the_tag():
  z, norm = 0.3, 4.0
  d = _update(norm)
  sent = [(r + x).astype(np.float32) for r, x in zip(RECEIVED, d)]

  config = _config(z)

  def run(tag):
    mod = flower_dp.dp_mod(config.build_defense(), config.seed, "local", EXCLUDE, tag)
    out = mod(_message(RECEIVED), _context(), _replier(sent))
    assert not out.has_error()
    return _sent(out), out.content["metrics"]

  got, metrics = run("client0/round1")
  np.testing.assert_array_equal(got[1], sent[1])  # excluded: as trained, no noise
  noise = (got[0] - RECEIVED[0] - d[0] / norm).astype(np.float64)  # C = 1
  assert noise.std() == pytest.approx(z * 1.0, rel=0.02)
  assert abs(noise.mean()) < 0.01
  assert metrics["tf_dlg.clipped"] == 1 and metrics["tf_dlg.update_norm"] == pytest.approx(norm)
  again, _ = run("client0/round1")
  other, _ = run("client1/round1")
  np.testing.assert_array_equal(again[0], got[0])  # a rerun repeats exactly
  assert not np.allclose(other[0], got[0])
  # NumPy's global generator is left as it was.
  state = np.random.get_state()[1].copy()
  run("client0/round2")
  np.testing.assert_array_equal(np.random.get_state()[1], state)


def _reply(arrays, examples, client):
  metrics = {
    "num-examples": examples,
    "tf_dlg.unit": 1,
    "train_loss": float(client),
    "train_accuracy": 0.5,
    "tf_dlg.client": client,
  }
  content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
  return Message(content, reply_to=_message(RECEIVED, node=client + 1))


def test_central_dp_adds_noise_z_c_over_n_to_the_unweighted_mean_of_kept_arrays():
  z, n = 0.8, 4
  config = _config(z)
  strategy = flower_server.strategy_for(config, "central")
  assert type(strategy).__name__ == "DifferentialPrivacyClientSideFixedClipping"
  examples = [10, 20, 30, 40]
  # Clients already clipped (fixedclipping_mod): what they send is averaged unweighted.
  clients = [[a + 0.01 * (i + 1) for a in RECEIVED] for i in range(n)]

  def run(seed):
    replies = [
      _reply([a.astype(np.float32) for a in c], w, i)
      for i, (c, w) in enumerate(zip(clients, examples))
    ]
    arrays, metrics = flower_server.aggregate(strategy, 1, replies, EXCLUDE, seed)
    return arrays.to_numpy_ndarrays(), metrics

  got, metrics = run(seed=0)
  mean = [np.mean([c[i] for c in clients], axis=0) for i in range(len(RECEIVED))]
  np.testing.assert_allclose(got[1], mean[1], rtol=1e-6)  # excluded: the plain mean, no noise
  noise = (got[0] - mean[0]).astype(np.float64)
  assert noise.std() == pytest.approx(z * 1.0 / n, rel=0.02)  # C = 1, n = 4 clients
  assert abs(noise.mean()) < 0.01
  # Train loss stays example-weighted: (0*10 + 1*20 + 2*30 + 3*40) / 100.
  assert metrics["train_loss"] == pytest.approx(2.0)
  np.testing.assert_array_equal(run(seed=0)[0][0], got[0])
  assert not np.allclose(run(seed=1)[0][0], got[0])


def test_central_dp_runs_with_mean_aggregation_only(tmp_path):
  config = FederatedConfig(
    dataset="digits", num_clients=2, aggregator="median", defense="dp", defense_param=0.1
  )
  with pytest.raises(ValueError, match="central DP with aggregator=median"):
    flower_engine.check_config(config, "central")
  flower_engine.check_config(config, "local")  # the local mechanism is any aggregator's
  with pytest.raises(ValueError, match="dp_mechanism"):
    flower_engine.check_config(config, "server")
