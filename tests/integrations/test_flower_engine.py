"""Flower's simulation engine (`tf_dlg.integrations.flower_engine`) on a local Ray.

A real Flower simulation -- `ServerApp` and `ClientApp` on Ray actors, 2 clients, 1
round, 60 digits -- with the defence mod, checked against the same round computed by
hand: each client's local training alone, its update defended as the mod must
(clipping to half its norm; masking's outcomes), then NumPy's mean (FedAvg) or
`np.median` (FedMedian). Ray runs on 2 CPUs with one client per CPU; every test here
shares one Flower simulation (one Ray start).
"""

import dataclasses
import json
import os

import numpy as np
import pytest

from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.integrations import flower_client, flower_engine, flower_session
from tf_dlg.study import convergence, convergence_report, run_store

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
  """(start arrays, each client's trained arrays, examples) without Flower.

  Each client's local training runs alone (`flower_client.local_update`, in a Ray
  worker: one TensorFlow thread, as in the client actors).
  """
  import ray

  model = flower_client.keras_model(config, dataset.input_shape, dataset.num_classes)
  start = [np.asarray(w) for w in model.get_weights()]
  data = ("by-hand", dataset.x_train, dataset.y_train, dataset.num_classes)
  train = ray.remote(num_cpus=0)(flower_client.local_update)
  trained = ray.get([train.remote(config, data, start, 1, c) for c in range(config.num_clients)])
  return start, [t[0] for t in trained], [t[1] for t in trained]


def _checkpoint_arrays(run_dir):
  from tf_dlg import io as io_lib

  header, arrays = io_lib.load_npz(
    os.path.join(run_dir, sim.CHECKPOINT_NAME), expected_format=flower_engine.CHECKPOINT_FORMAT
  )
  return [arrays[f"leaf_{i}"] for i in range(int(header["num_leaves"]))], header


def test_a_masked_fedavg_round_is_the_mean_of_independently_masked_clients(tiny, tmp_path):
  """Server = start + mean over the 2 clients of (own mask x own update), BN excluded.

  The masks' seeds fold in each update's exact bits (`defenses.base.folded_seed`), so
  they are not recomputed here: every entry must be one of the four mask outcomes, each
  about a quarter of the time (independent masks of rate 0.5), and excluded (BatchNorm)
  arrays the plain mean.
  """
  config = _config(defense="masking", defense_param=0.5)
  result = flower_engine.run_simulation(
    config, str(tmp_path), dataset=tiny, progress=False, num_cpus=CLIENTS
  )
  (row,) = result.history
  start, trained, sizes = _by_hand(config, tiny)
  assert sizes == [30, 30]  # equal weights: the mean is the half sum
  got, header = _checkpoint_arrays(str(tmp_path))
  assert header["fingerprint"].startswith("flower-") and header["round"] == 1
  exclude = flower_client.ClientTrainer(config, tiny.input_shape, tiny.num_classes).exclude
  counts = np.zeros(4)
  for i, (g, s) in enumerate(zip(got, start)):
    d0, d1 = (trained[0][i] - s).astype(np.float64), (trained[1][i] - s).astype(np.float64)
    u = (g - s).astype(np.float64)
    if exclude[i]:
      np.testing.assert_allclose(u, (d0 + d1) / 2, rtol=1e-4, atol=1e-6)
      continue
    outcomes = np.stack([0 * d0, d0 / 2, d1 / 2, (d0 + d1) / 2])
    err = np.abs(outcomes - u)
    assert np.all(err.min(axis=0) <= 1e-6 + 1e-3 * np.abs(u)), f"array {i}"
    # Where the four outcomes are far apart, which one it is counts.
    spread = np.min([np.abs(outcomes[a] - outcomes[b]) for a in range(4) for b in range(a)], axis=0)
    clear = spread > 1e-5
    counts += np.bincount(err.argmin(axis=0)[clear], minlength=4)
  assert counts.sum() > 5000
  np.testing.assert_allclose(counts / counts.sum(), 0.25, atol=0.03)
  assert 0.4 < row["zero_fraction"] < 0.8 and row["clipped_fraction"] is None
  # The server evaluated what it holds.
  model = flower_client.keras_model(config, tiny.input_shape, tiny.num_classes)
  model.set_weights(got)
  _, acc = sim.Evaluator(model)(tiny.x_test, tiny.y_test)
  assert row["test_accuracy"] == pytest.approx(acc)
  assert sim.read_history(os.path.join(tmp_path, sim.HISTORY_NAME)) == result.history


def test_fedmedian_round_equals_numpy_median_and_resumes(tiny, tmp_path):
  config = _config(aggregator="median", defense="clipping_ratio", defense_param=0.5)
  flower_engine.run_simulation(
    config, str(tmp_path), dataset=tiny, progress=False, num_cpus=CLIENTS
  )
  start, trained, _ = _by_hand(config, tiny)
  exclude = flower_client.ClientTrainer(config, tiny.input_shape, tiny.num_classes).exclude
  # clipping_ratio 0.5: each client sends start + half its update (no randomness);
  # BatchNorm arrays are excluded, sent as trained.
  sent = [
    [s + (t - s) * (1.0 if e else 0.5) for s, t, e in zip(start, client, exclude)]
    for client in trained
  ]
  got, _ = _checkpoint_arrays(str(tmp_path))
  for g, *ws in zip(got, *sent):
    np.testing.assert_allclose(g, np.median(np.stack(ws), axis=0), rtol=1e-5, atol=1e-6)
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
  csv_rows = convergence_report.read_convergence(str(tmp_path / "convergence.csv"))
  assert {r["engine"] for r in csv_rows} == {"flower"}
  assert "engine `flower`" in (tmp_path / "convergence.md").read_text()
  cell = json.loads((tmp_path / "runs" / "mean_iid_none" / "seed0" / "cell.json").read_text())
  assert cell["config"]["engine"] == "flower"
  # The TFF engine's study refuses the Flower runs' folders before any training.
  with pytest.raises(run_store.CellError):
    convergence.Convergence(str(tmp_path), {}, **common).prepare()


@pytest.mark.parametrize("mechanism, noise_on_mean", [("local", 2**-0.5), ("central", 0.5)])
def test_dp_rounds_with_flowers_own_dp_match_numpy(mechanism, noise_on_mean, tiny, tmp_path):
  """One `dp` round, z = 0.05, C = 1, 2 clients of 30 digits each.

  Server = start + mean of the clients' updates clipped to C (kept arrays; BatchNorm
  statistics: the plain mean) + noise: each client's N(0, (z C)^2) under "local" (std
  z C / sqrt 2 on the mean), the server's N(0, (z C / 2)^2) under "central".
  """
  z = 0.05
  config = _config(defense="dp", defense_param=z)
  result = flower_engine.run_simulation(
    config, str(tmp_path), dataset=tiny, progress=False, num_cpus=CLIENTS, dp_mechanism=mechanism
  )
  start, trained, _ = _by_hand(config, tiny)
  exclude = flower_client.ClientTrainer(config, tiny.input_shape, tiny.num_classes).exclude
  updates = [[(t - s).astype(np.float64) for s, t in zip(start, client)] for client in trained]
  norms = [np.sqrt(sum(np.sum(u**2) for u, e in zip(us, exclude) if not e)) for us in updates]
  got, _ = _checkpoint_arrays(str(tmp_path))
  noise = []
  for i, (g, s, e) in enumerate(zip(got, start, exclude)):
    clipped = [us[i] * (1.0 if e else min(1.0, 1.0 / n)) for us, n in zip(updates, norms)]
    residual = (g - s).astype(np.float64) - np.mean(clipped, axis=0)
    if e:
      np.testing.assert_allclose(residual, 0.0, atol=1e-5)
    else:
      noise.append(residual.ravel())
  noise = np.concatenate(noise)
  assert noise.size > 5000
  assert noise.std() == pytest.approx(z * noise_on_mean, rel=0.05)
  (row,) = result.history
  assert row["clipped_fraction"] == np.mean([n > 1.0 for n in norms])
  # The other mechanism's run folder is refused, naming the configuration.
  other = {"local": "central", "central": "local"}[mechanism]
  with pytest.raises(sim.CheckpointError, match="written by a different configuration"):
    flower_engine.run_simulation(
      dataclasses.replace(config, rounds=2),
      str(tmp_path),
      dataset=tiny,
      progress=False,
      num_cpus=CLIENTS,
      dp_mechanism=other,
    )


def test_convergence_with_central_dp_records_its_engine(tiny, tmp_path):
  common = dict(aggregators=["mean"], partitions=["iid"], seeds=[0], subsets=(60, 40))
  common.update(progress=False, dataset="digits", num_clients=CLIENTS, rounds=1, batch_size=16)
  conv = convergence.Convergence(
    str(tmp_path), {"dp": (0.05, "given")}, engine="flower-central-dp", **common
  )
  rows = conv.run()
  assert {r["engine"] for r in rows} == {"flower-central-dp"}
  (dp_row,) = [r for r in rows if r["label"] == "dp"]
  assert dp_row["clipped_fraction"] is not None
  cell = json.loads((tmp_path / "runs" / "mean_iid_dp" / "seed0" / "cell.json").read_text())
  assert cell["config"]["engine"] == "flower-central-dp"
  # The local mechanism's study refuses these run folders before any training.
  with pytest.raises(run_store.CellError):
    convergence.Convergence(
      str(tmp_path), {"dp": (0.05, "given")}, engine="flower", **common
    ).prepare()


@pytest.mark.parametrize(
  "change, says",
  [
    (dict(clients_per_round=1), "clients_per_round=1"),
    (dict(malicious_clients=1, num_clients=3), "malicious_clients=1"),
    (dict(server_optimizer="adam"), "server_optimizer=adam"),
    (dict(defense="clipping_median", defense_param=1.0), "defense=clipping_median"),
    (dict(aggregator="median", defense="dp", defense_param=1.0), "central DP with aggregator"),
    (dict(capture_round=1), "capture_round"),
  ],
)
def test_settings_the_engine_does_not_have_are_refused(change, says, tmp_path):
  with pytest.raises(ValueError, match=f"the flower engine does not run {says}.*--engine=tff"):
    flower_engine.run_simulation(
      _config(**change), str(tmp_path), progress=False, dp_mechanism="central"
    )
  assert not os.listdir(tmp_path)


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch, tmp_path):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
  )
  with pytest.raises(ValueError, match=r"needs ray: pip install 'tf-dlg\[flower,simulation\]'"):
    flower_engine.run_simulation(_config(), str(tmp_path), progress=False)


def test_a_run_builds_its_defense_once(tiny, tmp_path, monkeypatch):
  """The server builds the run's Defense once a run (not once a round); a client process
  once a run (not once a message). Rounds here run in this thread with a stand-in for
  Flower's round, so the count is the engine's own."""
  built = []
  real = FederatedConfig.build_defense

  def counting(self, exclude=None):
    built.append(exclude)
    return real(self, exclude)

  class InThisThread:  # the Session's interface, without Ray
    def start(self):
      return self

    def data_key(self, dataset):
      return "d0"

    def call(self, fn):
      return fn(None)

  def fake_round(grid, strategy, config, arrays, round_num, data_key, **kwargs):
    metrics = {"train_loss": 1.0, "train_accuracy": 0.5}
    return arrays, {**metrics, "tf_dlg.zero_fraction": 0.25, "tf_dlg.clipped": 1.0}

  monkeypatch.setattr(FederatedConfig, "build_defense", counting)
  monkeypatch.setattr(flower_session, "session", lambda num_clients, **kw: InThisThread())
  monkeypatch.setattr(flower_engine, "train_round", fake_round)
  config = _config(defense="clipping", defense_param=1.0, rounds=3)
  result = flower_engine.run_simulation(config, str(tmp_path), dataset=tiny, progress=False)
  assert [r["round"] for r in result.history] == [1, 2, 3]
  assert [r["clipped_fraction"] for r in result.history] == [1.0, 1.0, 1.0]
  assert len(built) == 1 and any(built[0])  # BatchNorm arrays excluded
  exclude = built[0]
  first = flower_client.run_defense(config, exclude)
  assert flower_client.run_defense(config, exclude) is first and len(built) == 2
  assert first.name == "clipping" and first.param == 1.0
  other = dataclasses.replace(config, defense_param=2.0)
  assert flower_client.run_defense(other, exclude).param == 2.0 and len(built) == 3
