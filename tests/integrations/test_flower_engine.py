"""Flower's simulation engine (`tf_dlg.integrations.flower_engine`) on a local Ray.

A real Flower simulation -- `ServerApp` and `ClientApp` on Ray actors, 2 clients, 1
round, 60 digits -- with the defence mod, checked against the same round computed by
hand: each client's local training alone, its update defended by `DefenseMod.defend`
with the seed the engine promises, then NumPy's example-weighted mean (FedAvg) or
`np.median` (FedMedian). Ray runs on 2 CPUs with one client per CPU; every test here
shares one Flower simulation (one Ray start).
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from tf_dlg import data
from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.integrations import flower, flower_engine
from tf_dlg.study import convergence

CLIENTS = 2


@pytest.fixture(scope="module")
def tiny(digits):
  """60 training and 40 test digits: 30 a client, one batch of 32 and one of the rest."""
  data_set = convergence.subset(digits, 60, 40, seed=0)
  yield data_set
  flower_engine.shutdown()


def _config(**kw):
  base = dict(dataset="digits", num_clients=CLIENTS, rounds=1, seed=0, batch_size=16)
  return FederatedConfig(**{**base, **kw})


def _by_hand(config, dataset):
  """(server arrays after round 1, per-client (n, loss)) computed without Flower or Ray."""
  model = flower_engine._keras_model(config, dataset.input_shape, dataset.num_classes)
  start = [np.asarray(w) for w in model.get_weights()]
  parts = data.partition(dataset.y_train, config.num_clients, config.partition, seed=config.seed)
  trainer = flower_engine.ClientTrainer(config, dataset.input_shape, dataset.num_classes)
  sent, sizes = [], []
  for cid in range(config.num_clients):
    (batches,) = data.client_datasets(
      dataset.x_train,
      dataset.y_train,
      [parts[cid]],
      batch_size=config.batch_size,
      shuffle=True,
      seed=sim._round_seed(config, 1) + cid,
    )
    weights, n, _, _ = trainer.train(start, batches)
    if config.defense != "none":
      mod = flower.DefenseMod(
        config.build_defense(trainer.exclude), seed=config.seed, exclude=trainer.exclude
      )
      seed = flower.message_seed(config.seed, 0, None, f"client{cid}/round1")
      weights, _ = mod.defend(start, weights, seed)
    sent.append(weights)
    sizes.append(n)
  if config.aggregator == "median":
    return start, [np.median(np.stack(ws), axis=0) for ws in zip(*sent)], sizes
  p = np.asarray(sizes, np.float64) / np.sum(sizes)
  return start, [sum(pi * w for pi, w in zip(p, ws)) for ws in zip(*sent)], sizes


def _checkpoint_arrays(run_dir):
  from tf_dlg import io as io_lib

  header, arrays = io_lib.load_npz(
    os.path.join(run_dir, sim.CHECKPOINT_NAME), expected_format=flower_engine.CHECKPOINT_FORMAT
  )
  return [arrays[f"a{i}"] for i in range(int(header["num_arrays"]))], header


def test_a_defended_fedavg_round_equals_the_round_by_hand(tiny, tmp_path):
  config = _config(defense="masking", defense_param=0.5)
  result = flower_engine.run_simulation(
    config, str(tmp_path), dataset=tiny, progress=False, num_cpus=CLIENTS
  )
  (row,) = result.history
  start, expected, sizes = _by_hand(config, tiny)
  got, header = _checkpoint_arrays(str(tmp_path))
  assert header["engine"] == "flower" and header["round"] == 1
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  # The mod acted: about half the defended entries of each client are unchanged.
  moved = np.mean(np.concatenate([(g != s).ravel() for g, s in zip(got, start)]))
  assert 0.4 < moved < 0.95
  assert 0.4 < row["zero_fraction"] < 0.8 and row["clipped_fraction"] is None
  assert sizes == [30, 30]
  # The server evaluated what it holds.
  model = flower_engine._keras_model(config, tiny.input_shape, tiny.num_classes)
  model.set_weights(got)
  _, acc = sim.Evaluator(model)(tiny.x_test, tiny.y_test)
  assert row["test_accuracy"] == pytest.approx(acc)
  assert sim.read_history(os.path.join(tmp_path, sim.HISTORY_NAME)) == result.history


def test_fedmedian_round_equals_numpy_median_and_resumes(tiny, tmp_path):
  config = _config(aggregator="median", defense="clipping_ratio", defense_param=0.5)
  flower_engine.run_simulation(
    config, str(tmp_path), dataset=tiny, progress=False, num_cpus=CLIENTS
  )
  _, expected, _ = _by_hand(config, tiny)
  got, _ = _checkpoint_arrays(str(tmp_path))
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  history = sim.read_history(os.path.join(tmp_path, sim.HISTORY_NAME))
  assert history[0]["clipped_fraction"] == 1.0  # every client clipped to half its norm
  # Resumed for a second round from the checkpoint; round 1 is kept as it was.
  more = flower_engine.run_simulation(
    dataclasses.replace(config, rounds=2),
    str(tmp_path),
    dataset=tiny,
    progress=False,
    num_cpus=CLIENTS,
  )
  assert more.resumed_from == 1 and more.history[0] == history[0] and len(more.history) == 2
  # Another configuration's checkpoint is refused, naming the file.
  with pytest.raises(sim.CheckpointError, match="written by a different configuration"):
    flower_engine.run_simulation(
      dataclasses.replace(config, rounds=2, seed=1),
      str(tmp_path),
      dataset=tiny,
      progress=False,
      num_cpus=CLIENTS,
    )


def test_convergence_records_the_engine(tiny, tmp_path):
  common = dict(aggregators=["mean"], partitions=["iid"], seeds=[0], subsets=(60, 40))
  common.update(progress=False, dataset="digits", num_clients=CLIENTS, rounds=1, batch_size=16)
  conv = convergence.Convergence(
    str(tmp_path), {"masking": (0.3, "given")}, engine="flower", **common
  )
  rows = conv.run()
  assert conv.dataset_source == tiny.source
  assert {r["engine"] for r in rows} == {"flower"}
  csv_rows = convergence.read_convergence(str(tmp_path / "convergence.csv"))
  assert {r["engine"] for r in csv_rows} == {"flower"}
  assert "engine `flower`" in (tmp_path / "convergence.md").read_text()
  cell = json.loads((tmp_path / "runs" / "mean_iid_none" / "seed0" / "cell.json").read_text())
  assert cell["config"]["engine"] == "flower"
  # The TFF engine's study refuses the Flower runs' folders before any training.
  with pytest.raises(convergence.CellError):
    convergence.Convergence(str(tmp_path), {}, **common).prepare()


@pytest.mark.parametrize(
  "change, says",
  [
    (dict(clients_per_round=1), "clients_per_round=1"),
    (dict(malicious_clients=1, num_clients=3), "malicious_clients=1"),
    (dict(server_optimizer="adam"), "server_optimizer=adam"),
    (dict(defense="clipping_median", defense_param=1.0), "defense=clipping_median"),
    (dict(capture_round=1), "capture_round"),
  ],
)
def test_settings_the_engine_does_not_have_are_refused(change, says, tmp_path):
  with pytest.raises(ValueError, match=f"the flower engine does not run {says}.*--engine=tff"):
    flower_engine.run_simulation(_config(**change), str(tmp_path), progress=False)
  assert not os.listdir(tmp_path)
