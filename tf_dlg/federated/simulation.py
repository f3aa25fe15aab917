"""The FedAvg simulation loop: sampling, training, evaluation, logging, checkpoints, capture.

`run_simulation(config, output_dir)` trains for `config.rounds` rounds. Each round it

1. samples `clients_per_round` of `num_clients` clients (all by default) with a
   generator seeded by `(seed, round)`, so a resumed run samples the same clients;
2. builds their datasets shuffled with a seed derived from `(seed, round)` and their
   roles (honest, or Byzantine for the `malicious_clients` fixed, seeded clients);
3. runs one `LearningProcess.next` in TFF (the capture round runs the process variant
   that also reports every client's defended update);
4. evaluates the server model (trainable and BatchNorm weights) on the held-out test
   set in inference mode (`Evaluator`);
5. appends `round, train_loss, train_accuracy, test_loss, test_accuracy, seconds,
   zero_fraction, clipped_fraction` to `history.csv` (the last two: the defence's
   statistics as TFF measured them in the round -- zero entries among the defended
   client updates, and the fraction of clients it clipped, for a defence that clips;
   empty where they do not apply) and writes a checkpoint (`checkpoint.npz`: the whole TFF server state
   -- model, optimizer and aggregator state -- flattened, the history so far, and a
   fingerprint of the configuration).

6. writes that round's TensorBoard scalars to `tensorboard/` (`train/loss`,
   `train/accuracy`, `test/loss`, `test/accuracy`, `round/seconds`,
   `update/global_norm` -- the L2 norm of the aggregated update of the trainable
   weights -- and, with a defence, `defense/zero_fraction` and, for one that clips,
   `defense/clipped_fraction`: the history's values), step = round.

Every setting is checked before any work (`FederatedConfig` checks itself when built:
one line naming the value and the allowed range; a run where a round could sample only
malicious clients is refused). Starting again with the same `output_dir` resumes after
the last checkpointed round; a checkpoint written by a different configuration, a file
that is not one of ours, a history row that is not numbers, or a run that already went
past `rounds` raises `CheckpointError` naming the file (and line and column) instead of
silently mixing runs or overwriting it. The TFF execution context (loopback-only local
worker, or the given workers) is installed when the run starts.
History and checkpoint are written atomically (`tf_dlg.io`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import math
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import numpy as np

from tf_dlg import io as io_lib
from tf_dlg import validation
from tf_dlg.federated.config import FederatedConfig

HISTORY_FIELDS = (
  "round",
  "train_loss",
  "train_accuracy",
  "test_loss",
  "test_accuracy",
  "seconds",
  "zero_fraction",
  "clipped_fraction",
)
# Defence statistics: empty where the run has no defence, or one that does not clip.
_OPTIONAL_FIELDS = ("zero_fraction", "clipped_fraction")
_CHECKPOINT_FORMAT = "tf_dlg.federated.checkpoint/v1"
CHECKPOINT_NAME = "checkpoint.npz"
HISTORY_NAME = "history.csv"
TENSORBOARD_DIR = "tensorboard"


class CheckpointError(ValueError):
  """A checkpoint or history file in `output_dir` is corrupt or from another run."""


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


def sample_clients(config: FederatedConfig, round_num: int) -> List[int]:
  """The sorted client ids of a 1-based round (seeded by (seed, round))."""
  k = config.clients_per_round or config.num_clients
  if k >= config.num_clients:
    return list(range(config.num_clients))
  rng = np.random.default_rng([config.seed, round_num, 0xC11E])
  return sorted(int(c) for c in rng.choice(config.num_clients, size=k, replace=False))


def malicious_ids(config: FederatedConfig) -> List[int]:
  """The fixed, seeded set of Byzantine client ids."""
  rng = np.random.default_rng([config.seed, 0xBAD])
  return sorted(int(c) for c in rng.permutation(config.num_clients)[: config.malicious_clients])


def round_seed(config: FederatedConfig, round_num: int) -> int:
  return int(np.random.default_rng([config.seed, round_num, 0xDA7A]).integers(2**31 - 1))


def client_data(config, dataset, parts, ids, round_num, bad=()):
  """Per-client `OrderedDict(batches=, role=)` of round `round_num` for the TFF process.

  Args:
    config: The run's `FederatedConfig`.
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
    seed=round_seed(config, round_num),
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


def build_for_config(config: FederatedConfig, dataset):
  """The `FedAvg` bundle of a configuration, reusing this process's build where one fits.

  Runs that differ only in runtime settings (seed, defence parameter, data, rounds)
  share one TFF build (`fedavg.build_fedavg(reuse=True)`).
  """
  from tf_dlg.federated import fedavg

  return fedavg.build_fedavg(dataset.input_shape, dataset.num_classes, config, reuse=True)


def _bundle_for(config: FederatedConfig, fa):
  """`fa` carrying `config`'s runtime settings when it is a build of `config`'s key."""
  from tf_dlg.federated import fedavg

  same = fedavg.build_key(fa.input_shape, fa.num_classes, config) == fedavg.build_key(
    fa.input_shape, fa.num_classes, fa.config
  )
  return fa.for_config(config) if same and fa.config != config else fa


# --------------------------------------------------------------------------- checkpoints


def _flatten_state(state) -> List[np.ndarray]:
  import tensorflow as tf

  return [np.asarray(x) for x in tf.nest.flatten(state)]


def write_checkpoint(
  path: str, leaves, round_num: int, history, fingerprint: str, kind: str = _CHECKPOINT_FORMAT
) -> None:
  """Atomically writes flat server arrays after `round_num` and the history so far.

  Every engine's checkpoint has this shape; `kind` (its format name) keeps one engine's
  checkpoints from being read as another's.
  """
  header = dict(
    format=kind,
    round=round_num,
    fingerprint=fingerprint,
    num_leaves=len(leaves),
    history=history,
  )
  # Uncompressed: model weights barely compress and this runs every round.
  io_lib.save_npz(path, header, {f"leaf_{i}": v for i, v in enumerate(leaves)}, compressed=False)


def read_checkpoint(path: str, fingerprint: str, kind: str = _CHECKPOINT_FORMAT):
  """(flat arrays, round, history) of a `write_checkpoint` file of format `kind`.

  CheckpointError if it is corrupt, of another format or another configuration's.
  """
  try:
    header, arrays = io_lib.load_npz(path, expected_format=kind)
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
  return leaves, int(header["round"]), history


def save_checkpoint(path: str, state, round_num: int, history, fingerprint: str) -> None:
  """Atomically writes the server state after `round_num` and the history so far."""
  write_checkpoint(path, _flatten_state(state), round_num, history, fingerprint)


def load_checkpoint(path: str, template_state, fingerprint: str):
  """(state, round, history) from `path`; CheckpointError if corrupt or foreign."""
  import tensorflow as tf

  leaves, round_num, history = read_checkpoint(path, fingerprint)
  template = tf.nest.flatten(template_state)
  if len(template) != len(leaves) or any(
    np.shape(a) != np.shape(b) for a, b in zip(template, leaves)
  ):
    raise CheckpointError(f"{path!r} holds a server state of a different structure.")
  leaves = [np.asarray(b, dtype=np.asarray(a).dtype) for a, b in zip(template, leaves)]
  state = tf.nest.pack_sequence_as(template_state, leaves)
  return state, round_num, history


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
    if key in _OPTIONAL_FIELDS and value in ("", None):
      out[key] = None
      continue
    out[key] = _as_number(key, value)
    if out[key] is None:
      kind = "round number" if key == "round" else "number"
      raise CheckpointError(
        f"{path!r} line {line}, column {key!r}: {value!r} is not a {kind}; the run's "
        "files are damaged: move them away or use another --output_dir."
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


def write_history(path: str, history) -> None:
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
  evaluator: Evaluator  # the server model's test loss and accuracy


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
  defense = fa.defense  # the run's own, built once
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
      data_seed=round_seed(config, round_num),
      shuffled=True,
      update_layout="trainable_variables",
    ),
    true_images=dataset.x_train[idx],
    true_labels=dataset.y_train[idx],
  )
  path = os.path.join(run.output_dir, f"capture_round{round_num}_client{cid}.npz")
  return obs.save(path)


# --------------------------------------------------------------------------- the loop


def prepare(config: FederatedConfig, output_dir: str, dataset, overwrite: bool):
  """Validates everything and checks `output_dir` before any training; (dataset, parts)."""
  from tf_dlg import data as data_lib

  if not isinstance(config, FederatedConfig):
    raise TypeError(f"config must be a FederatedConfig, got {type(config).__name__}.")
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
  _check_resume(config, hist_path, ckpt_path)
  return dataset, parts


def _check_resume(config: FederatedConfig, hist_path: str, ckpt_path: str) -> None:
  """Refuses a run folder this config cannot resume (before any training)."""
  # Read the history whole before anything is rewritten: a damaged file is refused,
  # never overwritten.
  done = len(read_history(hist_path)) if os.path.exists(hist_path) else 0
  if done and not os.path.exists(ckpt_path):
    raise CheckpointError(
      f"{hist_path!r} has rounds but there is no {CHECKPOINT_NAME} "
      "to resume from; move it away or use another --output_dir."
    )
  # A resumed run never reports rounds past the ones asked for: it cannot undo them.
  if done > config.rounds:
    raise CheckpointError(
      f"{hist_path!r} already holds {done} rounds, more than rounds={config.rounds}; "
      f"use rounds in [{done}, inf] to resume it, or another --output_dir."
    )


class Evaluator:
  """Test loss and accuracy of server weights, in inference mode.

  One Keras model and one traced function per architecture, reused by every run of a
  process: Keras' `evaluate` re-traces for each new model and re-wraps the data on every
  call, which cost about as much as the evaluation itself. The loss is the mean
  sparse cross-entropy over all test examples, as `evaluate` reports it.
  """

  CHUNK = 1000  # examples per call: bounded memory on a full test split

  def __init__(self, keras_model):
    import tensorflow as tf

    self.model = keras_model

    def sums(x, y):
      logits = keras_model(x, training=False)
      loss = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
      hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float64)
      return tf.reduce_sum(tf.cast(loss, tf.float64)), tf.reduce_sum(hits)

    self._sums = tf.function(sums)

  def __call__(self, x, y):
    """(loss, accuracy) of the model's current weights on (x, y)."""
    loss = hits = 0.0
    y = np.asarray(y, np.int64)
    for i in range(0, len(x), self.CHUNK):
      a, b = self._sums(x[i : i + self.CHUNK], y[i : i + self.CHUNK])
      loss, hits = loss + float(a), hits + float(b)
    return loss / len(x), hits / len(x)


_EVALUATORS: "collections.OrderedDict[tuple, Evaluator]" = collections.OrderedDict()


def evaluator_for(fa) -> Evaluator:
  """The process's `Evaluator` of `fa`'s architecture (built on first use)."""
  key = (fa.model_name, tuple(fa.input_shape), fa.num_classes)
  if key not in _EVALUATORS:
    _EVALUATORS[key] = Evaluator(fa.keras_model_fn())
    while len(_EVALUATORS) > 4:
      _EVALUATORS.popitem(last=False)
  return _EVALUATORS[key]


def _evaluate(fa, state, evaluator: Evaluator, dataset):
  """(test_loss, test_accuracy) of the server model (trainable and BatchNorm weights)."""
  fa.assign_to_keras(fa.process.get_model_weights(state), evaluator.model)
  return evaluator(dataset.x_test, dataset.y_test)


def _write_summaries(writer, row, metrics) -> None:
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
  for key in _OPTIONAL_FIELDS:
    if row.get(key) is not None:
      scalars[f"defense/{key}"] = row[key]
  with writer.as_default(step=row["round"]):
    for tag, value in scalars.items():
      tf.summary.scalar(tag, float(value))
  writer.flush()


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
  test_loss, test_acc = _evaluate(run.fa, out.state, run.evaluator, run.dataset)
  row = dict(
    round=round_num,
    train_loss=float(train["loss"]),
    train_accuracy=float(train["sparse_categorical_accuracy"]),
    test_loss=test_loss,
    test_accuracy=test_acc,
    seconds=round(time.perf_counter() - t0, 4),
  )
  # Measured once, inside the round, by the defence's TFF factory.
  for key in _OPTIONAL_FIELDS:
    value = _find(out.metrics, f"defense_{key}")
    row[key] = None if value is None else float(value)
  return out.state, row, out.metrics, path


def run_simulation(
  config: FederatedConfig,
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
    config: The run's `FederatedConfig`.
    output_dir: Where `history.csv`, `checkpoint.npz`, captures and `tensorboard/`
      (per-round scalars: `tensorboard --logdir OUTPUT_DIR`) go.
    workers: None (local TFF runtime) or worker addresses `host:port`
      (`tf_dlg.execution.runtime.create_execution_context`).
    dataset: A preloaded `ImageDataset` (else `load_dataset(config.dataset)`).
    fedavg: A prebuilt `FedAvg` (lets runs share one build); a build of the same
      `fedavg.build_key` runs with `config`'s seed and defence parameter.
    progress: Show a tqdm bar.
    stop_after: Stop after this round (simulates an interruption; the checkpoint is
      written as usual).
    overwrite: Start afresh even if `output_dir` holds a run.
  """
  import tensorflow as tf
  import tqdm

  from tf_dlg.execution import runtime

  dataset, parts = prepare(config, output_dir, dataset, overwrite)
  runtime.install_context()
  ckpt_path = os.path.join(output_dir, CHECKPOINT_NAME)
  hist_path = os.path.join(output_dir, HISTORY_NAME)
  fa = _bundle_for(config, fedavg) if fedavg is not None else build_for_config(config, dataset)
  bad = frozenset(malicious_ids(config))
  run = _Run(fa, dataset, parts, bad, output_dir, evaluator_for(fa))
  writer = tf.summary.create_file_writer(os.path.join(output_dir, TENSORBOARD_DIR))
  with runtime.execution_target(workers):
    state = fa.initialize()
    start, history, capture_path = 0, [], None
    if os.path.exists(ckpt_path):
      state, start, history = load_checkpoint(ckpt_path, state, config.fingerprint())
    write_history(hist_path, history)
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
      write_history(hist_path, history)
      save_checkpoint(ckpt_path, state, round_num, history, config.fingerprint())
      # After the checkpoint: once per round.
      _write_summaries(writer, row, metrics)
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
