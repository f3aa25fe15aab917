"""FedAvg in TFF: BatchNorm sync, capture, checkpoints/resume, remote workers, entry point.

Short runs here (default suite); the long convergence and Byzantine runs that the issue's
"done when" names are in tests/test_federated_convergence.py (short versions default,
full versions `-m slow`).
"""

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import data as data_lib
from tf_dlg.attacks.threat_model import ObservedUpdate
from tf_dlg.federated import fedavg as fedavg_lib
from tf_dlg.execution import runtime
from tf_dlg.federated import simulation as sim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
  return data_lib.load_dataset("digits")


@pytest.fixture(scope="module")
def config():
  return sim.SimulationConfig(dataset="digits", num_clients=10, rounds=3, aggregator="mean",
                              seed=0)


@pytest.fixture(scope="module")
def fa(config, digits):
  """One built FedAvg (mean) shared by every test of this config."""
  return sim.build_for_config(config, digits)


def _strip(history):
  return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _worker_pids():
  pids = set()
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          if b"worker_binary" in f.read():
            pids.add(int(entry))
      except OSError:
        pass
  return pids


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("field,value,match", [
    ("aggregator", "mode", r"aggregator='mode' is not one of mean, median, trimmed_mean"),
    ("partition", "zipf", r"partition='zipf' is not one of iid, dirichlet, shards"),
    ("num_clients", 0, r"num_clients=0 must be an integer in \[1, 1438\]"),
    ("clients_per_round", 11, r"clients_per_round=11 must be an integer in \[1, 10\]"),
    ("malicious_clients", 11, r"malicious_clients=11 must be an integer in \[0, 9\]"),
    ("rounds", 0, r"rounds=0 must be an integer in \[1, inf\]"),
    ("trim_fraction", 0.5, r"trim_fraction=0.5 must be a number in \[0, 0.5\)"),
    ("client_lr", -1.0, r"client_lr=-1.0 must be a number in \(0, inf\)"),
    ("client_lr", float("nan"), r"client_lr=nan must be a number in \(0, inf\)"),
    ("capture_round", 5, r"capture_round=5 must be an integer in \[1, 3\]"),
    ("defense_param", 0.3, r"defense_param=0.3 is set but defense='none'"),
])
def test_config_errors_name_value_and_range(config, digits, field, value, match):
  bad = dataclasses.replace(config, **{field: value})
  with pytest.raises(ValueError, match=match):
    bad.validate(len(digits.x_train))


def test_all_malicious_runs_are_refused(config, digits):
  """Every client malicious (NaN loss from round 1) is refused before any work."""
  with pytest.raises(ValueError, match=r"^malicious_clients=10 must be an integer in "
                     r"\[0, 9\] \(num_clients - 1\)"):
    dataclasses.replace(config, malicious_clients=10).validate(len(digits.x_train))
  # With sampling, a round that draws only malicious clients is refused too ...
  bad = dataclasses.replace(config, malicious_clients=8, clients_per_round=2, rounds=20)
  with pytest.raises(ValueError, match=r"malicious_clients=8 with clients_per_round=2: "
                     r"round \d+ samples only malicious clients; use malicious_clients in "
                     r"\[0, 1\] or clients_per_round in \[9, 10\]"):
    bad.validate()
  # ... but never one where each round keeps an honest client.
  dataclasses.replace(bad, clients_per_round=9).validate()
  dataclasses.replace(config, malicious_clients=9).validate()


def test_sampling_and_malicious_sets_are_seeded(config):
  c = dataclasses.replace(config, clients_per_round=4, malicious_clients=2)
  assert sim.sample_clients(c, 3) == sim.sample_clients(c, 3)
  assert len(sim.sample_clients(c, 3)) == 4
  assert {tuple(sim.sample_clients(c, r)) for r in range(1, 6)} != {tuple(sim.sample_clients(c, 1))}
  assert sim.malicious_ids(c) == sim.malicious_ids(c) and len(sim.malicious_ids(c)) == 2
  assert sim.sample_clients(config, 1) == list(range(10))


# --------------------------------------------------------------------------- BatchNorm


def test_batchnorm_statistics_are_averaged_and_used(config, fa, digits):
  """Server BN moving stats leave their init and equal the weighted client mean."""
  parts = data_lib.partition(digits.y_train, 10, "iid", seed=0)
  ids = sim.sample_clients(config, 1)
  client_data = sim._client_data(config, digits, parts, ids, 1, set())
  state0 = fa.process.initialize()
  out = fa.capture_process.next(state0, client_data)
  w0 = fa.process.get_model_weights(state0)
  w1 = fa.process.get_model_weights(out.state)
  deltas = sim._find(out.metrics, "client_values")
  counts = np.array([len(parts[i]) * config.local_epochs for i in ids], np.float64)
  nt = fa.num_trainable
  for j, (before, after) in enumerate(zip(w0.non_trainable, w1.non_trainable)):
    expected = before - np.average(np.asarray(deltas[nt + j]), axis=0, weights=counts)
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(after, before), "BN statistic stuck at its initial value"
  # Moving means start at 0 and variances at 1; both must have moved.
  keras_model = fa.keras_model_fn()
  fa.assign_to_keras(w1, keras_model)
  bn = keras_model.get_layer("bn2")
  assert np.abs(bn.moving_mean.numpy()).max() > 1e-3
  assert np.abs(bn.moving_variance.numpy() - 1.0).max() > 1e-2


def test_update_layout_and_exclusion_line_up(fa):
  keras_model = fa.keras_model_fn()
  variables = fedavg_lib.update_variables(keras_model)
  assert len(variables) == fa.num_trainable + len(keras_model.non_trainable_variables)
  names = [v.name for v in variables]
  assert all("moving" in n for n in names[fa.num_trainable:])


# --------------------------------------------------------------------------- resume


def test_interrupt_and_resume_matches_uninterrupted(config, fa, digits, tmp_path):
  full = sim.run_simulation(config, str(tmp_path / "full"), dataset=digits, fedavg=fa,
                            progress=False)
  part = sim.run_simulation(config, str(tmp_path / "part"), dataset=digits, fedavg=fa,
                            progress=False, stop_after=1)
  assert len(part.history) == 1
  resumed = sim.run_simulation(config, str(tmp_path / "part"), dataset=digits, fedavg=fa,
                               progress=False)
  assert resumed.resumed_from == 1
  assert _strip(resumed.history) == _strip(full.history)
  assert _strip(sim.read_history(str(tmp_path / "part" / "history.csv"))) == \
      _strip(full.history)
  for a, b in zip(tf.nest.flatten(full.server_state), tf.nest.flatten(resumed.server_state)):
    np.testing.assert_array_equal(a, b)
  assert full.history[-1]["test_accuracy"] > 0.3


def test_foreign_or_corrupt_checkpoint_and_history(config, fa, digits, tmp_path):
  d = tmp_path / "run"
  sim.run_simulation(dataclasses.replace(config, rounds=1), str(d), dataset=digits,
                     fedavg=fa, progress=False)
  other = dataclasses.replace(config, client_lr=0.01)
  with pytest.raises(sim.CheckpointError, match="different configuration"):
    sim.run_simulation(other, str(d), dataset=digits, fedavg=fa, progress=False)
  (d / "checkpoint.npz").write_bytes(b"not a checkpoint")
  with pytest.raises(sim.CheckpointError, match="not a readable tf-dlg federated checkpoint"):
    sim.run_simulation(config, str(d), dataset=digits, fedavg=fa, progress=False)
  e = tmp_path / "foreign"
  e.mkdir()
  (e / "history.csv").write_text("epoch,acc\n1,0.5\n")
  with pytest.raises(sim.CheckpointError, match="not a tf-dlg history"):
    sim.run_simulation(config, str(e), dataset=digits, fedavg=fa, progress=False)


def test_garbage_history_row_is_named_and_never_overwritten(config, fa, digits, tmp_path):
  d = tmp_path / "run"
  sim.run_simulation(dataclasses.replace(config, rounds=2), str(d), dataset=digits,
                     fedavg=fa, progress=False)
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
    sim.run_simulation(config, str(d), dataset=digits, fedavg=fa, progress=False)
  assert path.read_bytes() == damaged
  path.write_text(lines[0] + "\n1.5,1,1,1,1,1\n")
  with pytest.raises(sim.CheckpointError, match=r"line 2, column 'round': '1.5' is not a "
                     "round number"):
    sim.read_history(str(path))


def test_checkpoint_is_an_npz_with_json_header(config, fa, digits, tmp_path):
  from tf_dlg import io as io_lib  # pylint: disable=g-import-not-at-top
  sim.run_simulation(dataclasses.replace(config, rounds=1), str(tmp_path), dataset=digits,
                     fedavg=fa, progress=False)
  header, arrays = io_lib.load_npz(str(tmp_path / "checkpoint.npz"),
                                   expected_format="tf_dlg.federated.checkpoint/v1")
  assert header["round"] == 1 and len(arrays) == header["num_leaves"] > 0
  assert [h["round"] for h in header["history"]] == [1]
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# --------------------------------------------------------------------------- capture


def test_capture_round_trips_and_is_the_clients_real_update(config, fa, digits, tmp_path):
  c = dataclasses.replace(config, rounds=2, capture_round=2, capture_client=3)
  result = sim.run_simulation(c, str(tmp_path / "cap"), dataset=digits, fedavg=fa,
                              progress=False)
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
  keras_model = fa.keras_model_fn()
  assert [u.shape for u in obs.update] == [tuple(v.shape) for v in keras_model.trainable_variables]

  # The model it started from is the server model after round 1 (Keras order).
  one = sim.run_simulation(dataclasses.replace(config, rounds=1), str(tmp_path / "one"),
                           dataset=digits, fedavg=fa, progress=False)
  fa.assign_to_keras(fa.process.get_model_weights(one.server_state), keras_model)
  for a, b in zip(obs.model_weights, keras_model.get_weights()):
    np.testing.assert_array_equal(a, b)

  # The update is exactly client 3's local delta: train client 3 alone from that model.
  ids = sim.sample_clients(c, 2)
  data = sim._client_data(c, digits, parts, ids, 2, set())[ids.index(3)]
  alone = fa.process.next(one.server_state, [data])
  before = fa.process.get_model_weights(one.server_state).trainable
  after = fa.process.get_model_weights(alone.state).trainable
  for u, b, a in zip(obs.update, before, after):
    np.testing.assert_allclose(u, np.asarray(b) - np.asarray(a), rtol=1e-4, atol=1e-6)
  assert max(np.abs(u).max() for u in obs.update) > 1e-4


def test_capture_client_must_be_sampled(config, digits):
  c = dataclasses.replace(config, clients_per_round=3, capture_round=1,
                          capture_client=[i for i in range(10)
                                          if i not in sim.sample_clients(
                                              dataclasses.replace(config, clients_per_round=3),
                                              1)][0])
  with pytest.raises(ValueError, match="is not sampled in round 1"):
    sim.run_simulation(c, "/tmp/unused_tf_dlg_capture", dataset=digits, progress=False)


# --------------------------------------------------------------------------- remote


def test_remote_worker_on_loopback_gives_the_local_result(config, fa, digits, tmp_path):
  c = dataclasses.replace(config, rounds=2)
  local = sim.run_simulation(c, str(tmp_path / "local"), dataset=digits, fedavg=fa,
                             progress=False)
  proc, address = runtime.start_local_worker()
  try:
    assert address.startswith("127.0.0.1:")
    remote = sim.run_simulation(c, str(tmp_path / "remote"), dataset=digits, fedavg=fa,
                                progress=False, workers=[address])
  finally:
    runtime.stop_worker(proc)
  assert proc.poll() is not None, "worker still running"
  assert _strip(remote.history) == _strip(local.history)


def test_two_loopback_workers_split_the_clients(config, fa, digits, tmp_path):
  """Mergeable-computation context: each worker trains half the clients of a round."""
  c = dataclasses.replace(config, rounds=1)
  local = sim.run_simulation(c, str(tmp_path / "local"), dataset=digits, fedavg=fa,
                             progress=False)
  workers = [runtime.start_local_worker() for _ in range(2)]
  try:
    remote = sim.run_simulation(c, str(tmp_path / "two"), dataset=digits, fedavg=fa,
                                progress=False, workers=[a for _, a in workers])
  finally:
    for proc, _ in workers:
      runtime.stop_worker(proc)
  assert all(proc.poll() is not None for proc, _ in workers)
  # Partial sums are merged in another order: equal up to float rounding.
  for a, b in zip(tf.nest.flatten(local.server_state), tf.nest.flatten(remote.server_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert remote.history[0]["test_accuracy"] == pytest.approx(
      local.history[0]["test_accuracy"], abs=0.01)


def test_unreachable_worker_is_a_clear_error(config, fa, digits, tmp_path):
  import portpicker  # pylint: disable=g-import-not-at-top
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  with pytest.raises(ConnectionError, match="No TFF worker answers"):
    with runtime.execution_target([address], timeout=1.0):
      pass


@pytest.mark.parametrize("bad", ["localhost", "host:0", "h:99999", "h:x"])
def test_bad_worker_address(bad):
  with pytest.raises(ValueError, match="must be host:port"):
    runtime.parse_workers(bad)


# --------------------------------------------------------------------------- entry point


def _started_by(pid, parent):
  """Whether worker `pid` was started by process `parent` or is an orphan now.

  By pid, not by name: other tests on the machine run workers of their own.
  """
  try:
    with open(f"/proc/{pid}/environ", "rb") as f:
      if f"TF_DLG_WORKER_PARENT={parent}".encode() in f.read().split(b"\0"):
        return True
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[1]) == 1
  except (OSError, ValueError, IndexError):
    return False


def _run_entry(args, tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  before = _worker_pids()
  proc = subprocess.Popen([sys.executable, "-m", "experiments.federated", *args],
                          cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  stdout, stderr = proc.communicate(timeout=300)
  leaked = {p for p in _worker_pids() - before if _started_by(p, proc.pid)}
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), leaked


def test_entry_point_small_run_writes_outputs_and_leaves_no_worker(tmp_path):
  out = tmp_path / "fl"
  proc, leaked = _run_entry(
      ["--dataset=digits", "--partition=dirichlet", "--alpha=1.0", "--num_clients=4",
       "--clients_per_round=3", "--rounds=2", "--aggregator=trimmed_mean",
       "--malicious_clients=1", "--capture_round=2", f"--output_dir={out}", "--seed=1",
       "--noprogress"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not leaked, f"worker_binary left running: {leaked}"
  assert "sklearn.datasets.load_digits" in proc.stdout
  history = sim.read_history(str(out / "history.csv"))
  assert [h["round"] for h in history] == [1, 2]
  assert all(0.0 <= h["test_accuracy"] <= 1.0 and h["seconds"] > 0 for h in history)
  assert (out / "curve.png").stat().st_size > 1000
  captures = list(out.glob("capture_round2_client*.npz"))
  assert len(captures) == 1 and ObservedUpdate.load(str(captures[0])).kind == "fedavg_delta"


def test_entry_point_bad_flag_is_one_clear_error(tmp_path):
  proc, leaked = _run_entry(["--num_clients=10", "--malicious_clients=12",
                             f"--output_dir={tmp_path}"], tmp_path)
  assert proc.returncode == 2
  assert "malicious_clients=12 must be an integer in [0, 9]" in proc.stderr
  assert not leaked


@pytest.mark.parametrize("args,message", [
    (["--num_clients=3", "--malicious_clients=3"],
     "error: malicious_clients=3 must be an integer in [0, 2] (num_clients - 1)"),
    (["--defense=none", "--defense_param=0.3"],
     "error: defense_param=0.3 is set but defense='none'"),
    (["--client_optimizer=adamw"], "error: client_optimizer='adamw' is not one of"),
])
def test_entry_point_refuses_before_any_work(tmp_path, args, message):
  out = tmp_path / "fl"
  proc, leaked = _run_entry([*args, f"--output_dir={out}"], tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
  assert not leaked and not (out / "history.csv").exists()


def test_entry_point_refuses_a_file_as_output_dir(tmp_path):
  target = tmp_path / "a_file"
  target.write_text("x")
  proc, _ = _run_entry([f"--output_dir={target}"], tmp_path)
  assert proc.returncode == 2
  assert f"output_dir='{target}' exists and is not a directory" in proc.stderr
