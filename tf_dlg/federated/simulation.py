"""The FedAvg simulation loop: sampling, training, evaluation, logging, checkpoints, capture.

`run_simulation(config, output_dir)` trains for `config.rounds` rounds. Each round it

1. samples `clients_per_round` of `num_clients` clients (all by default) with a
   generator seeded by `(seed, round)`, so a resumed run samples the same clients;
2. builds their datasets shuffled with a seed derived from `(seed, round)` and their
   roles (honest, or Byzantine for the `malicious_clients` fixed, seeded clients);
3. runs one `LearningProcess.next` in TFF (the capture round runs the process variant
   that also reports every client's defended update);
4. evaluates the server model (trainable and BatchNorm weights) on the held-out test
   set with Keras in inference mode;
5. appends `round, train_loss, train_accuracy, test_loss, test_accuracy, seconds` to
   `history.csv` and writes a checkpoint (`checkpoint.npz`: the whole TFF server state
   -- model, optimizer and aggregator state -- flattened, the history so far, and a
   fingerprint of the configuration).

6. writes that round's TensorBoard scalars to `tensorboard/` (`train/loss`,
   `train/accuracy`, `test/loss`, `test/accuracy`, `round/seconds`,
   `update/global_norm` -- the L2 norm of the aggregated update of the trainable
   weights -- and, with a defence, `defense/zero_fraction` of the defended client
   updates and, for clipping / dp, `defense/clipped_fraction` of clients), step = round.

Every setting is checked before any work (`SimulationConfig.validate`: one line naming
the value and the allowed range; a run where some round would sample only malicious
clients is refused). Starting again with the same `output_dir` resumes after the last
checkpointed round; a checkpoint written by a different configuration, a file that is
not one of ours, or a history row that is not numbers raises `CheckpointError` naming
the file (and line and column) instead of silently mixing runs or overwriting it.
History and checkpoint are written atomically (`tf_dlg.io`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import numpy as np

from tf_dlg import io as io_lib
from tf_dlg import validation

HISTORY_FIELDS = ("round", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds")
_CHECKPOINT_FORMAT = "tf_dlg.federated.checkpoint/v1"
CHECKPOINT_NAME = "checkpoint.npz"
HISTORY_NAME = "history.csv"
TENSORBOARD_DIR = "tensorboard"


class CheckpointError(ValueError):
  """A checkpoint or history file in `output_dir` is corrupt or from another run."""


@dataclasses.dataclass
class SimulationConfig:
  """Everything that defines a federated run (see `experiments/federated.py` flags)."""

  dataset: str = "digits"
  data_dir: Optional[str] = None
  partition: str = "iid"
  alpha: float = 0.5
  classes_per_client: int = 2
  num_clients: int = 10
  clients_per_round: Optional[int] = None  # None: all clients every round
  rounds: int = 20
  model: str = "bn_cnn"
  bn_momentum: Optional[float] = 0.5
  aggregator: str = "mean"
  trim_fraction: float = 0.1
  defense: str = "none"
  defense_param: Optional[float] = None
  malicious_clients: int = 0
  malicious_mode: str = "scale"
  malicious_scale: float = 1000.0
  local_epochs: int = 2
  batch_size: int = 10
  client_optimizer: str = "adam"
  client_lr: float = 0.003
  server_optimizer: str = "sgd"
  server_lr: float = 1.0
  seed: int = 0
  capture_round: Optional[int] = None  # 1-based round to capture, or None
  capture_client: Optional[int] = None  # client id; None: first sampled client

  # Fields that do not change the trajectory (may differ on resume).
  _NOT_FINGERPRINTED = ("rounds", "capture_round", "capture_client", "data_dir")

  def validate(self, num_examples: Optional[int] = None) -> "SimulationConfig":
    """Raises ValueError naming the bad value and the allowed range (before any work)."""
    from tf_dlg import data as data_lib
    from tf_dlg import defenses, federated
    from tf_dlg import models as models_lib

    for name, allowed in (
      ("dataset", data_lib.DATASETS),
      ("partition", data_lib.PARTITION_SCHEMES),
      ("model", models_lib.MODELS),
      ("aggregator", federated.AGGREGATORS),
      ("malicious_mode", federated.MALICIOUS_MODES),
      ("client_optimizer", federated.OPTIMIZERS),
      ("server_optimizer", federated.OPTIMIZERS),
    ):
      validation.check_choice(name, getattr(self, name), allowed)
    validation.check_int("num_clients", self.num_clients, 1, num_examples)
    if self.clients_per_round is not None:
      validation.check_int("clients_per_round", self.clients_per_round, 1, self.num_clients)
    for name in ("rounds", "local_epochs", "batch_size", "classes_per_client"):
      validation.check_int(name, getattr(self, name), 1)
    validation.check_int("seed", self.seed, 0)
    self._check_malicious()
    inf = float("inf")
    for name in ("alpha", "malicious_scale", "client_lr", "server_lr"):
      validation.check_number(name, getattr(self, name), 0, inf, low_open=True, high_open=True)
    validation.check_number("trim_fraction", self.trim_fraction, 0, 0.5, high_open=True)
    if self.bn_momentum is not None:
      validation.check_number("bn_momentum", self.bn_momentum, 0, 1, high_open=True)
    if self.defense in (None, "none") and self.defense_param is not None:
      raise ValueError(
        f"defense_param={self.defense_param!r} is set but defense="
        f"{self.defense!r}; set a defence or drop the parameter."
      )
    if self.defense not in (None, "none"):
      defenses.get_defense(self.defense, self.defense_param)  # its own ValueError
    if self.capture_round is not None:
      validation.check_int("capture_round", self.capture_round, 1, self.rounds)
    if self.capture_client is not None:
      validation.check_int("capture_client", self.capture_client, 0, self.num_clients - 1)
      if self.capture_round is None:
        raise ValueError("capture_client is set but capture_round is not; set both.")
    return self

  def _check_malicious(self) -> None:
    """Every round needs an honest client: an all-Byzantine round trains on garbage."""
    m = validation.check_int("malicious_clients", self.malicious_clients, 0)
    if m >= self.num_clients:
      raise ValueError(
        f"malicious_clients={m} must be an integer in "
        f"[0, {self.num_clients - 1}] (num_clients - 1): every client "
        "malicious leaves nothing to learn from."
      )
    k = self.clients_per_round or self.num_clients
    if not self.malicious_clients or k > self.malicious_clients:
      return
    bad = set(malicious_ids(self))
    for round_num in range(1, self.rounds + 1):
      if set(sample_clients(self, round_num)) <= bad:
        raise ValueError(
          f"malicious_clients={self.malicious_clients} with clients_per_round={k}: "
          f"round {round_num} samples only malicious clients; use malicious_clients in "
          f"[0, {k - 1}] or clients_per_round in "
          f"[{self.malicious_clients + 1}, {self.num_clients}]."
        )

  def fingerprint(self) -> str:
    fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self._NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class SimulationResult:
  history: List[Dict[str, float]]
  dataset_source: str
  malicious: List[int]
  capture_path: Optional[str] = None
  resumed_from: int = 0
  server_state: Any = None
  fedavg: Any = None

  @property
  def final(self) -> Dict[str, float]:
    return self.history[-1] if self.history else {}


# --------------------------------------------------------------------------- helpers


def sample_clients(config: SimulationConfig, round_num: int) -> List[int]:
  """The sorted client ids of a 1-based round (seeded by (seed, round))."""
  k = config.clients_per_round or config.num_clients
  if k >= config.num_clients:
    return list(range(config.num_clients))
  rng = np.random.default_rng([config.seed, round_num, 0xC11E])
  return sorted(int(c) for c in rng.choice(config.num_clients, size=k, replace=False))


def malicious_ids(config: SimulationConfig) -> List[int]:
  """The fixed, seeded set of Byzantine client ids."""
  rng = np.random.default_rng([config.seed, 0xBAD])
  return sorted(int(c) for c in rng.permutation(config.num_clients)[: config.malicious_clients])


def _round_seed(config: SimulationConfig, round_num: int) -> int:
  return int(np.random.default_rng([config.seed, round_num, 0xDA7A]).integers(2**31 - 1))


def client_data(config, dataset, parts, ids, round_num, bad=()):
  """Per-client `OrderedDict(batches=, role=)` of round `round_num` for the TFF process.

  Args:
    config: The run's `SimulationConfig`.
    dataset: Its `ImageDataset`.
    parts: Client partitions (indices into the training set), one per client id.
    ids: The round's client ids (`sample_clients`).
    round_num: The 1-based round (seeds the shuffling and Byzantine noise).
    bad: Byzantine client ids (`malicious_ids`).
  """
  from tf_dlg import data as data_lib
  from tf_dlg.federated import fedavg

  batches = data_lib.client_datasets(
    dataset.x_train,
    dataset.y_train,
    [parts[i] for i in ids],
    batch_size=config.batch_size,
    epochs=config.local_epochs,
    shuffle=True,
    seed=_round_seed(config, round_num),
  )
  out = []
  for cid, ds in zip(ids, batches):
    if cid in bad:
      r = fedavg.role(
        config.malicious_mode,
        config.malicious_scale,
        seed=config.seed * 100003 + round_num * 1009 + cid,
      )
    else:
      r = fedavg.role()
    out.append(collections.OrderedDict(batches=ds, role=r))
  return out


def _find(struct, key):
  """The first value under `key` in a nest of mappings / attrs / sequences."""
  if isinstance(struct, collections.abc.Mapping):
    if key in struct:
      return struct[key]
    children = list(struct.values())
  elif isinstance(struct, (list, tuple)):
    children = list(struct)
  else:
    return None
  for child in children:
    found = _find(child, key)
    if found is not None:
      return found
  return None


def _defense(config):
  if config.defense in (None, "none"):
    return None
  from tf_dlg import defenses

  return defenses.get_defense(config.defense, config.defense_param)


def build_for_config(config: SimulationConfig, dataset):
  """The `FedAvg` bundle of a configuration."""
  from tf_dlg.federated import fedavg

  return fedavg.build_fedavg(dataset.input_shape, dataset.num_classes, fedavg_config(config))


def fedavg_config(config: SimulationConfig):
  """The `fedavg.FedAvgConfig` of a simulation configuration."""
  from tf_dlg.federated import fedavg

  return fedavg.FedAvgConfig(
    model=config.model,
    model_seed=config.seed,
    aggregator=config.aggregator,
    trim_fraction=config.trim_fraction,
    defense=_defense(config),
    client_optimizer=config.client_optimizer,
    client_learning_rate=config.client_lr,
    server_optimizer=config.server_optimizer,
    server_learning_rate=config.server_lr,
    batch_size=config.batch_size,
    local_epochs=config.local_epochs,
    bn_momentum=config.bn_momentum,
  )


# --------------------------------------------------------------------------- checkpoints


def _flatten_state(state) -> List[np.ndarray]:
  import tensorflow as tf

  return [np.asarray(x) for x in tf.nest.flatten(state)]


def save_checkpoint(path: str, state, round_num: int, history, fingerprint: str) -> None:
  """Atomically writes the server state after `round_num` and the history so far."""
  leaves = _flatten_state(state)
  header = dict(
    format=_CHECKPOINT_FORMAT,
    round=round_num,
    fingerprint=fingerprint,
    num_leaves=len(leaves),
    history=history,
  )
  # Uncompressed: model weights barely compress and this runs every round.
  io_lib.save_npz(path, header, {f"leaf_{i}": v for i, v in enumerate(leaves)}, compressed=False)


def load_checkpoint(path: str, template_state, fingerprint: str):
  """(state, round, history) from `path`; CheckpointError if corrupt or foreign."""
  import tensorflow as tf

  try:
    header, arrays = io_lib.load_npz(path, expected_format=_CHECKPOINT_FORMAT)
    leaves = [arrays[f"leaf_{i}"] for i in range(int(header["num_leaves"]))]
    history = [_history_row(path, i + 1, row) for i, row in enumerate(header["history"])]
  except CheckpointError:
    raise
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
      f"{path!r} is not a readable tf-dlg federated checkpoint ({type(e).__name__}: {e})."
    ) from e
  if header.get("fingerprint") != fingerprint:
    raise CheckpointError(
      f"{path!r} was written by a different configuration (fingerprint "
      f"{header.get('fingerprint')}, this run {fingerprint}); use another --output_dir "
      "or the original flags."
    )
  template = tf.nest.flatten(template_state)
  if len(template) != len(leaves) or any(
    np.shape(a) != np.shape(b) for a, b in zip(template, leaves)
  ):
    raise CheckpointError(f"{path!r} holds a server state of a different structure.")
  leaves = [np.asarray(b, dtype=np.asarray(a).dtype) for a, b in zip(template, leaves)]
  state = tf.nest.pack_sequence_as(template_state, leaves)
  return state, int(header["round"]), history


def _as_number(key: str, value):
  """float (int for `round`) of a history value, or None if it is not one."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  if key != "round":
    return number
  return int(number) if number >= 1 and number == int(number) else None


def _history_row(path: str, line: int, row) -> Dict[str, float]:
  """One history row as numbers; CheckpointError naming the file, line and column."""
  out = {}
  for key in HISTORY_FIELDS:
    value = row.get(key) if isinstance(row, dict) else None
    out[key] = _as_number(key, value)
    if out[key] is None:
      kind = "round number" if key == "round" else "number"
      raise CheckpointError(
        f"{path!r} line {line}, column {key!r}: {value!r} is not a {kind}; the run's "
        "files are damaged: use another --output_dir or --overwrite."
      )
  return out


def _check_history_file(path: str) -> None:
  with open(path, newline="") as f:
    header = next(csv.reader(f), None)
  if header != list(HISTORY_FIELDS):
    raise CheckpointError(
      f"{path!r} is not a tf-dlg history (header {header!r}, expected "
      f"{list(HISTORY_FIELDS)}); use another --output_dir."
    )


def _write_history(path: str, history) -> None:
  """Rewrites the whole history atomically (a kill leaves the old or the new file)."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
  w.writeheader()
  w.writerows(history)
  io_lib.atomic_write_text(path, buf.getvalue())


def read_history(path: str) -> List[Dict[str, float]]:
  """The rows of a history.csv; CheckpointError naming the line and column if damaged."""
  _check_history_file(path)
  with open(path, newline="") as f:
    # Line numbers as an editor shows them: the header is line 1.
    return [_history_row(path, i + 2, row) for i, row in enumerate(csv.DictReader(f))]


# --------------------------------------------------------------------------- capture


@dataclasses.dataclass(frozen=True)
class _Run:
  """What stays fixed across the rounds of one simulation."""

  fa: Any  # the FedAvg bundle
  dataset: Any
  parts: List[np.ndarray]
  bad: frozenset  # Byzantine client ids
  output_dir: str
  keras_model: Any  # compiled, evaluates the server model (`_evaluate`)


def _capture(config, run: _Run, ids, round_num, start_weights, client_values):
  """Writes the chosen client's update as an ObservedUpdate; returns the path."""
  from tf_dlg.attacks.threat_model import ObservedUpdate

  fa, dataset, parts, bad = run.fa, run.dataset, run.parts, run.bad
  cid = ids[0] if config.capture_client is None else config.capture_client
  pos = ids.index(cid)
  update = [np.asarray(v[pos]) for v in client_values][: fa.num_trainable]
  keras_model = fa.keras_model_fn()
  fa.assign_to_keras(start_weights, keras_model)
  idx = parts[cid]
  steps = int(math.ceil(len(idx) * config.local_epochs / config.batch_size))
  defense = _defense(config)
  obs = ObservedUpdate(
    kind="fedavg_delta",
    update=update,
    model_weights=keras_model.get_weights(),
    model_name=config.model,
    input_shape=dataset.input_shape,
    num_classes=dataset.num_classes,
    num_examples=int(len(idx)),
    batch_size=config.batch_size,
    local_steps=steps,
    learning_rate=config.client_lr,
    defense=None if defense is None else defense.get_config(),
    metadata=dict(
      dataset=dataset.name,
      dataset_source=dataset.source,
      round=round_num,
      client=cid,
      seed=config.seed,
      aggregator=config.aggregator,
      local_epochs=config.local_epochs,
      client_optimizer=config.client_optimizer,
      bn_momentum=config.bn_momentum,
      malicious=cid in bad,
      data_seed=_round_seed(config, round_num),
      shuffled=True,
      update_layout="trainable_variables",
    ),
    true_images=dataset.x_train[idx],
    true_labels=dataset.y_train[idx],
  )
  path = os.path.join(run.output_dir, f"capture_round{round_num}_client{cid}.npz")
  return obs.save(path)


# --------------------------------------------------------------------------- the loop


def _prepare(config: SimulationConfig, output_dir: str, dataset, overwrite: bool):
  """Validates everything and checks `output_dir` before any training; (dataset, parts)."""
  from tf_dlg import data as data_lib

  config.validate()  # cheap checks first, before the dataset loads
  validation.check_output_dir("output_dir", output_dir)
  if dataset is None:
    dataset = data_lib.load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
  config.validate(len(dataset.x_train))
  if dataset.x_test is None:
    raise ValueError(f"dataset {dataset.name!r} has no test split to evaluate on.")
  parts = data_lib.partition(
    dataset.y_train,
    config.num_clients,
    config.partition,
    alpha=config.alpha,
    classes_per_client=config.classes_per_client,
    seed=config.seed,
  )
  if any(len(p) == 0 for p in parts):
    raise ValueError(
      f"partition {config.partition!r} left a client with no examples; "
      "lower num_clients or change alpha/classes_per_client."
    )
  if config.capture_round is not None and config.capture_client is not None:
    ids = sample_clients(config, config.capture_round)
    if config.capture_client not in ids:
      raise ValueError(
        f"capture_client={config.capture_client} is not sampled in round "
        f"{config.capture_round} (clients {ids}); choose one of those."
      )
  ckpt_path = os.path.join(output_dir, CHECKPOINT_NAME)
  hist_path = os.path.join(output_dir, HISTORY_NAME)
  if overwrite:
    for p in (ckpt_path, hist_path):
      if os.path.exists(p):
        os.remove(p)
    # Old event files would show two runs' curves on one chart.
    shutil.rmtree(os.path.join(output_dir, TENSORBOARD_DIR), ignore_errors=True)
  # Read the history whole before anything is rewritten: a damaged file is refused,
  # never overwritten.
  if os.path.exists(hist_path) and read_history(hist_path) and not os.path.exists(ckpt_path):
    raise CheckpointError(
      f"{hist_path!r} has rounds but there is no {CHECKPOINT_NAME} "
      "to resume from; use another --output_dir or overwrite."
    )
  return dataset, parts


def _evaluate(fa, state, keras_model, dataset):
  """(test_loss, test_accuracy) of the server model, Keras in inference mode."""
  fa.assign_to_keras(fa.process.get_model_weights(state), keras_model)
  loss, acc = keras_model.evaluate(dataset.x_test, dataset.y_test, batch_size=256, verbose=0)
  return float(loss), float(acc)


def _write_summaries(writer, row, metrics, defense=None) -> None:
  """One round's TensorBoard scalars (step = round), flushed so a watcher sees them."""
  import tensorflow as tf

  scalars = {
    "train/loss": row["train_loss"],
    "train/accuracy": row["train_accuracy"],
    "test/loss": row["test_loss"],
    "test/accuracy": row["test_accuracy"],
    "round/seconds": row["seconds"],
  }
  norm = _find(metrics, "update_norm")
  if norm is not None:
    scalars["update/global_norm"] = norm
  stats = _find(metrics, "defense_stats") or {}
  for key in ("zero_fraction", "clipped_fraction"):
    if key in stats:
      scalars[f"defense/{key}"] = stats[key]
  # A bound set by the round itself (median-relative clipping) is known only to the
  # defence, which measures the clients it scaled.
  if defense == "clipping_ratio":
    clipped = _find(metrics, "defense_clipped_fraction")
    if clipped is not None:
      scalars["defense/clipped_fraction"] = clipped
  with writer.as_default(step=row["round"]):
    for tag, value in scalars.items():
      tf.summary.scalar(tag, float(value))
  writer.flush()


def _evaluation_model(fa):
  """A compiled Keras model of `fa`'s architecture that evaluates server weights."""
  import tensorflow as tf

  keras_model = fa.keras_model_fn()
  keras_model.compile(
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
  )
  return keras_model


def _round(config, run: _Run, state, round_num):
  """One FedAvg round, evaluated: (new state, history row, TFF metrics, capture path)."""
  t0 = time.perf_counter()
  ids = sample_clients(config, round_num)
  data = client_data(config, run.dataset, run.parts, ids, round_num, run.bad)
  path = None
  if round_num != config.capture_round:
    out = run.fa.process.next(state, data)
  else:
    start_weights = run.fa.process.get_model_weights(state)
    out = run.fa.capture_process.next(state, data)
    path = _capture(config, run, ids, round_num, start_weights, _find(out.metrics, "client_values"))
  train = out.metrics["client_work"]["train"]
  test_loss, test_acc = _evaluate(run.fa, out.state, run.keras_model, run.dataset)
  row = dict(
    round=round_num,
    train_loss=float(train["loss"]),
    train_accuracy=float(train["sparse_categorical_accuracy"]),
    test_loss=test_loss,
    test_accuracy=test_acc,
    seconds=round(time.perf_counter() - t0, 4),
  )
  return out.state, row, out.metrics, path


def run_simulation(
  config: SimulationConfig,
  output_dir: str,
  *,
  workers=None,
  dataset=None,
  fedavg=None,
  progress: bool = True,
  stop_after: Optional[int] = None,
  overwrite: bool = False,
) -> SimulationResult:
  """Runs (or resumes) a federated simulation; see the module docstring.

  Args:
    config: The run's `SimulationConfig`.
    output_dir: Where `history.csv`, `checkpoint.npz`, captures and `tensorboard/`
      (per-round scalars: `tensorboard --logdir OUTPUT_DIR`) go.
    workers: None (local TFF runtime) or worker addresses `host:port`
      (`tf_dlg.execution.runtime.create_execution_context`).
    dataset: A preloaded `ImageDataset` (else `load_dataset(config.dataset)`).
    fedavg: A prebuilt `FedAvg` for this config (lets tests share one build).
    progress: Show a tqdm bar.
    stop_after: Stop after this round (simulates an interruption; the checkpoint is
      written as usual).
    overwrite: Start afresh even if `output_dir` holds a run.
  """
  import tensorflow as tf
  import tqdm

  from tf_dlg.execution import runtime

  dataset, parts = _prepare(config, output_dir, dataset, overwrite)
  ckpt_path = os.path.join(output_dir, CHECKPOINT_NAME)
  hist_path = os.path.join(output_dir, HISTORY_NAME)
  fa = fedavg if fedavg is not None else build_for_config(config, dataset)
  bad = frozenset(malicious_ids(config))
  run = _Run(fa, dataset, parts, bad, output_dir, _evaluation_model(fa))
  writer = tf.summary.create_file_writer(os.path.join(output_dir, TENSORBOARD_DIR))
  with runtime.execution_target(workers):
    state = fa.process.initialize()
    start, history, capture_path = 0, [], None
    if os.path.exists(ckpt_path):
      state, start, history = load_checkpoint(ckpt_path, state, config.fingerprint())
    _write_history(hist_path, history)
    last = config.rounds if stop_after is None else min(config.rounds, stop_after)
    bar = tqdm.tqdm(
      range(start + 1, last + 1),
      initial=start,
      total=config.rounds,
      disable=not progress,
      desc=f"FedAvg[{config.aggregator}]",
      unit="round",
    )
    for round_num in bar:
      state, row, metrics, path = _round(config, run, state, round_num)
      capture_path = path or capture_path
      history.append(row)
      _write_history(hist_path, history)
      save_checkpoint(ckpt_path, state, round_num, history, config.fingerprint())
      # After the checkpoint: once per round.
      _write_summaries(writer, row, metrics, config.defense)
      bar.set_postfix(test_acc=f"{row['test_accuracy']:.3f}")
    bar.close()
  writer.close()
  return SimulationResult(
    history=history,
    dataset_source=dataset.source,
    malicious=sorted(bad),
    capture_path=capture_path,
    resumed_from=start,
    server_state=state,
    fedavg=fa,
  )
