"""The FedAvg simulation loop (`tf_dlg.federated.simulation`): configuration checks,
sampling, resume, checkpoints and history, capture, remote workers, TensorBoard scalars.

Short runs here (default suite); the long convergence and Byzantine runs are in
tests/federated/test_federated_convergence.py (short versions default, full versions `-m slow`).
"""

import dataclasses
import glob
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import data as data_lib
from tf_dlg import defenses
from tf_dlg import io as io_lib
from tf_dlg.attacks.threat_model import ObservedUpdate
from tf_dlg.execution import runtime
from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.study import defense_table


@pytest.fixture
def simulate(digits, mean_fedavg):
  """`run_simulation` on `digits`, quietly, with the session's FedAvg build."""

  def run(config, output_dir, **kwargs):
    return sim.run_simulation(
      config, str(output_dir), dataset=digits, fedavg=mean_fedavg, progress=False, **kwargs
    )

  return run


def _strip(history):
  return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
  "field,value,match",
  [
    (
      "aggregator",
      "mode",
      r"^federated\.aggregator='mode' is not one of mean, median, trimmed_mean",
    ),
    ("partition", "zipf", r"^federated\.partition='zipf' is not one of iid, dirichlet, shards"),
    ("num_clients", 0, r"^federated\.num_clients=0 must be an integer in \[1, inf\]"),
    ("num_clients", 1439, r"^federated\.num_clients=1439 must be an integer in \[1, 1438\]"),
    ("clients_per_round", 11, r"^federated\.clients_per_round=11 must be an integer in \[1, 10\]"),
    ("malicious_clients", 11, r"^federated\.malicious_clients=11 must be an integer in \[0, 9\]"),
    ("rounds", 0, r"^federated\.rounds=0 must be an integer in \[1, inf\]"),
    ("trim_fraction", 0.5, r"^federated\.trim_fraction=0.5 must be a number in \[0, 0.5\)"),
    ("client_lr", -1.0, r"^federated\.client_lr=-1.0 must be a number in \(0, inf\)"),
    ("client_lr", float("nan"), r"^federated\.client_lr=nan must be a number in \(0, inf\)"),
    ("capture_round", 5, r"^federated\.capture_round=5 must be an integer in \[1, 3\]"),
    ("defense_param", 0.3, r"^federated\.defense_param=0.3 is set but federated\.defense='none'"),
    (
      "defense",
      "masking",
      r"^Defence 'masking' needs a parameter; none was given \(federated\.defense_param=None\)",
    ),
  ],
)
def test_config_errors_name_value_and_range(sim_config, digits, field, value, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(sim_config, **{field: value}).validate(len(digits.x_train))


def test_all_malicious_runs_are_refused(sim_config, digits):
  """Every client malicious (NaN loss from round 1) is refused before any work."""
  with pytest.raises(
    ValueError,
    match=r"^federated\.malicious_clients=10 must be an integer in "
    r"\[0, 9\] \(federated\.num_clients - 1\)",
  ):
    dataclasses.replace(sim_config, malicious_clients=10).validate(len(digits.x_train))
  # With sampling, a round that could draw only malicious clients is refused too ...
  with pytest.raises(
    ValueError,
    match=r"^federated\.malicious_clients=8 with federated\.clients_per_round=2: "
    r"a round could sample only malicious clients; use federated\.malicious_clients in "
    r"\[0, 1\] or federated\.clients_per_round in \[9, 10\]",
  ):
    dataclasses.replace(sim_config, malicious_clients=8, clients_per_round=2, rounds=20)
  # ... but never one where each round keeps an honest client.
  dataclasses.replace(sim_config, malicious_clients=8, clients_per_round=9).validate()
  dataclasses.replace(sim_config, malicious_clients=9).validate()


def test_client_sampling_is_uniform_fixed_size_without_replacement(sim_config):
  """Against what sampling k of n without replacement must give (not against a second
  call): k distinct sorted ids a round; each client in a round with probability k/n and each
  pair with k(k-1)/(n(n-1)) (a Poisson draw would vary in size); the same ids from a config
  built anew after the global RNG moved; another seed, other rounds."""
  from scipy import stats

  n, k, rounds = 10, 4, 2000
  c = dataclasses.replace(sim_config, clients_per_round=k, rounds=rounds)
  draws = [sim.sample_clients(c, r) for r in range(1, rounds + 1)]
  assert all(d == sorted(set(d)) and len(d) == k and 0 <= d[0] and d[-1] < n for d in draws)
  hits = np.zeros((n, n), int)
  for d in draws:
    hits[np.ix_(d, d)] += 1
  for count, p in [(hits[i, i], k / n) for i in range(n)] + [
    (hits[i, j], k * (k - 1) / (n * (n - 1))) for i in range(n) for j in range(i + 1, n)
  ]:
    assert stats.binomtest(int(count), rounds, p).pvalue > 1e-4, (count, p)
  np.random.seed(12345)
  np.random.rand(7)  # the global RNG state must not matter
  again = FederatedConfig(**dataclasses.asdict(c))
  assert [sim.sample_clients(again, r) for r in range(1, 21)] == draws[:20]
  other = dataclasses.replace(c, seed=1)
  assert [sim.sample_clients(other, r) for r in range(1, 21)] != draws[:20]
  assert sim.sample_clients(sim_config, 1) == list(range(n))  # everyone, no draw


def test_malicious_set_is_fixed_seeded_and_uniform(sim_config):
  """m distinct ids, the same every round (rounds do not enter); over many seeds each
  client is malicious with probability m/n."""
  from scipy import stats

  n, m, seeds = 10, 2, 2000
  sets = [
    sim.malicious_ids(dataclasses.replace(sim_config, seed=s, malicious_clients=m))
    for s in range(seeds)
  ]
  assert all(x == sorted(set(x)) and len(x) == m for x in sets)
  counts = np.bincount(np.concatenate(sets), minlength=n)
  for count in counts:
    assert stats.binomtest(int(count), seeds, m / n).pvalue > 1e-4, counts
  longer = dataclasses.replace(sim_config, seed=3, malicious_clients=m, rounds=50)
  assert sim.malicious_ids(longer) == sets[3]
  assert len({tuple(x) for x in sets}) > 40  # C(10, 2) = 45 possible sets, all reached


# --------------------------------------------------------------------------- resume


def test_interrupt_and_resume_matches_uninterrupted(simulate, sim_config, tmp_path):
  full = simulate(sim_config, tmp_path / "full")
  part = simulate(sim_config, tmp_path / "part", stop_after=1)
  assert len(part.history) == 1
  resumed = simulate(sim_config, tmp_path / "part")
  assert resumed.resumed_from == 1
  assert _strip(resumed.history) == _strip(full.history)
  assert _strip(sim.read_history(str(tmp_path / "part" / "history.csv"))) == _strip(full.history)
  for a, b in zip(tf.nest.flatten(full.server_state), tf.nest.flatten(resumed.server_state)):
    np.testing.assert_array_equal(a, b)
  # Three times chance (10 classes): the compared runs trained, not just matched at random.
  assert full.history[-1]["test_accuracy"] > 0.3


def test_foreign_or_corrupt_checkpoint_and_history(simulate, sim_config, tmp_path):
  d = tmp_path / "run"
  simulate(dataclasses.replace(sim_config, rounds=1), d)
  other = dataclasses.replace(sim_config, client_lr=0.01)
  with pytest.raises(sim.CheckpointError, match="different configuration"):
    simulate(other, d)
  (d / "checkpoint.npz").write_bytes(b"not a checkpoint")
  with pytest.raises(sim.CheckpointError, match="not a readable tf-dlg federated checkpoint"):
    simulate(sim_config, d)
  e = tmp_path / "foreign"
  e.mkdir()
  (e / "history.csv").write_text("epoch,acc\n1,0.5\n")
  with pytest.raises(sim.CheckpointError, match="not a tf-dlg history"):
    simulate(sim_config, e)


def test_garbage_history_row_is_named_and_never_overwritten(simulate, sim_config, tmp_path):
  d = tmp_path / "run"
  simulate(dataclasses.replace(sim_config, rounds=2), d)
  path = d / "history.csv"
  lines = path.read_text().splitlines()
  cols = lines[2].split(",")
  cols[3] = "abc"  # test_loss of round 2
  lines[2] = ",".join(cols)
  path.write_text("\n".join(lines) + "\n")
  damaged = path.read_bytes()
  message = rf"'{path}' line 3, column 'test_loss': 'abc' is not a number"
  with pytest.raises(sim.CheckpointError, match=message):
    sim.read_history(str(path))
  with pytest.raises(sim.CheckpointError, match=message):
    simulate(sim_config, d)
  assert path.read_bytes() == damaged
  path.write_text(lines[0] + "\n1.5,1,1,1,1,1\n")
  with pytest.raises(
    sim.CheckpointError,
    match=r"line 2, column 'round': '1.5' is not a "
    "round number",
  ):
    sim.read_history(str(path))


def test_checkpoint_is_an_npz_with_json_header(simulate, sim_config, tmp_path):
  simulate(dataclasses.replace(sim_config, rounds=1), tmp_path)
  header, arrays = io_lib.load_npz(
    str(tmp_path / "checkpoint.npz"), expected_format="tf_dlg.federated.checkpoint/v1"
  )
  assert header["round"] == 1 and len(arrays) == header["num_leaves"] > 0
  assert [h["round"] for h in header["history"]] == [1]
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# --------------------------------------------------------------------------- capture


def test_capture_round_trips_and_is_the_clients_real_update(
  simulate, sim_config, mean_fedavg, digits, tmp_path
):
  c = dataclasses.replace(sim_config, rounds=2, capture_round=2, capture_client=3)
  result = simulate(c, tmp_path / "cap")
  obs = ObservedUpdate.load(result.capture_path)
  parts = data_lib.partition(digits.y_train, 10, "iid", seed=0)
  idx = parts[3]
  assert obs.kind == "fedavg_delta" and obs.model_name == "bn_cnn"
  assert obs.metadata["round"] == 2 and obs.metadata["client"] == 3
  assert obs.num_examples == len(idx) and obs.batch_size == c.batch_size
  assert obs.local_steps == math.ceil(len(idx) * c.local_epochs / c.batch_size)
  assert obs.learning_rate == pytest.approx(c.client_lr)
  np.testing.assert_array_equal(obs.true_images, digits.x_train[idx])
  np.testing.assert_array_equal(obs.true_labels, digits.y_train[idx])
  keras_model = mean_fedavg.keras_model_fn()
  assert [u.shape for u in obs.update] == [tuple(v.shape) for v in keras_model.trainable_variables]

  # The model it started from is the server model after round 1 (Keras order).
  one = simulate(dataclasses.replace(sim_config, rounds=1), tmp_path / "one")
  mean_fedavg.assign_to_keras(mean_fedavg.process.get_model_weights(one.server_state), keras_model)
  for a, b in zip(obs.model_weights, keras_model.get_weights()):
    np.testing.assert_array_equal(a, b)

  # The update is exactly client 3's local delta: train client 3 alone from that model.
  ids = sim.sample_clients(c, 2)
  data = sim.client_data(c, digits, parts, ids, 2, set())[ids.index(3)]
  alone = mean_fedavg.process.next(one.server_state, [data])
  before = mean_fedavg.process.get_model_weights(one.server_state).trainable
  after = mean_fedavg.process.get_model_weights(alone.state).trainable
  for u, b, a in zip(obs.update, before, after):
    np.testing.assert_allclose(u, np.asarray(b) - np.asarray(a), rtol=1e-4, atol=1e-6)
  assert max(np.abs(u).max() for u in obs.update) > 1e-4


def test_capture_client_must_be_sampled(sim_config, digits, tmp_path):
  c = dataclasses.replace(
    sim_config,
    clients_per_round=3,
    capture_round=1,
    capture_client=[
      i
      for i in range(10)
      if i not in sim.sample_clients(dataclasses.replace(sim_config, clients_per_round=3), 1)
    ][0],
  )
  with pytest.raises(ValueError, match="is not sampled in round 1"):
    sim.run_simulation(c, str(tmp_path), dataset=digits, progress=False)


# --------------------------------------------------------------------------- remote


def test_remote_worker_on_loopback_gives_the_local_result(simulate, sim_config, tmp_path):
  c = dataclasses.replace(sim_config, rounds=2)
  local = simulate(c, tmp_path / "local")
  proc, address = runtime.start_local_worker()
  try:
    assert address.startswith("127.0.0.1:")
    remote = simulate(c, tmp_path / "remote", workers=[address])
  finally:
    runtime.stop_worker(proc)
  assert proc.poll() is not None, "worker still running"
  assert _strip(remote.history) == _strip(local.history)


@pytest.mark.slow  # resume and workers: shorter default tests cover them
def test_two_loopback_workers_split_the_clients(simulate, sim_config, tmp_path):
  """Mergeable-computation context: each worker trains half the clients of a round."""
  c = dataclasses.replace(sim_config, rounds=1)
  local = simulate(c, tmp_path / "local")
  workers = [runtime.start_local_worker() for _ in range(2)]
  try:
    remote = simulate(c, tmp_path / "two", workers=[a for _, a in workers])
  finally:
    for proc, _ in workers:
      runtime.stop_worker(proc)
  assert all(proc.poll() is not None for proc, _ in workers)
  # Partial sums are merged in another order: equal up to float rounding.
  for a, b in zip(tf.nest.flatten(local.server_state), tf.nest.flatten(remote.server_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert remote.history[0]["test_accuracy"] == pytest.approx(
    local.history[0]["test_accuracy"], abs=0.01
  )


# --------------------------------------------------------------------------- defences


def _middle(name):
  low, high, scale, _ = defense_table.PARAMETER_SEARCH[name]
  return math.sqrt(low * high) if scale == "log" else 0.5 * (low + high)


@pytest.mark.parametrize("name", ["masking", pytest.param("noising", marks=pytest.mark.slow)])
def test_defended_run_trains_and_captures(digits, tmp_path, name):
  config = FederatedConfig(
    num_clients=4, rounds=2, defense=name, defense_param=_middle(name), capture_round=2, seed=0
  )
  result = sim.run_simulation(config, str(tmp_path), dataset=digits, progress=False)
  assert all(np.isfinite(h["test_loss"]) for h in result.history)
  obs = ObservedUpdate.load(result.capture_path)
  # The capture records the defence the clients applied, by name and parameter.
  assert obs.defense["name"] == name
  param_name = defenses.DEFENSES[name].param_name
  assert obs.defense[param_name] == pytest.approx(_middle(name), rel=1e-6)


# --------------------------------------------------------------------------- TensorBoard


_BASE = {
  "train/loss",
  "train/accuracy",
  "test/loss",
  "test/accuracy",
  "round/seconds",
  "update/global_norm",
}


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
  config = FederatedConfig(num_clients=3, rounds=2, local_epochs=1, model="lenet", **kwargs)
  result = sim.run_simulation(config, str(tmp_path), dataset=digits, progress=False)
  return result, read_scalars(str(tmp_path / sim.TENSORBOARD_DIR))


def test_evaluator_matches_keras_evaluate_across_chunks(digits, monkeypatch):
  """The round's evaluation gives what Keras `evaluate` gives, over several chunks."""
  from tf_dlg import models

  model = models.bn_cnn(digits.input_shape, digits.num_classes, seed=3)
  model.compile(
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
  )
  model.fit(digits.x_train[:200], digits.y_train[:200], epochs=2, verbose=0)  # not chance
  x, y = digits.x_test[:250], digits.y_test[:250]
  monkeypatch.setattr(sim.Evaluator, "CHUNK", 64)  # 250 = 3 full chunks and a partial one
  loss, acc = sim.Evaluator(model)(x, y)
  want_loss, want_acc = model.evaluate(x, y, batch_size=256, verbose=0)
  assert 0.2 < acc < 1.0
  assert acc == pytest.approx(want_acc, abs=1e-6) and loss == pytest.approx(want_loss, rel=1e-5)


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


def test_median_clipping_clips_against_the_rounds_median_client(digits, tmp_path):
  """clipping_median in training: bound = ratio x median client norm, so some clients act."""
  _, scalars = _run(digits, tmp_path, defense="clipping_median", defense_param=0.5)
  fractions = scalars["defense/clipped_fraction"]
  assert sorted(fractions) == [1, 2]
  # Clients at or above the median (at least 2 of 3) exceed half of it; a client far
  # below it may pass unclipped, so the fraction is in [2/3, 1].
  assert all(2 / 3 - 1e-6 <= v <= 1.0 for v in fractions.values()), fractions
  _, loose = _run(digits, tmp_path / "loose", defense="clipping_median", defense_param=1.0)
  # Ratio 1: only clients strictly above the median are clipped (at most 1 of 3).
  assert all(v <= 1 / 3 + 1e-6 for v in loose["defense/clipped_fraction"].values())
