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

Parts in their own modules: `rounds` (client sampling, roles, data seeds), `run_store`
(history and checkpoint files), `evaluation` (the server model's test metrics) and
`capture` (the capture round's `ObservedUpdate`).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import numpy as np

from tf_dlg import validation
from tf_dlg.federated.capture import save_capture
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.federated.evaluation import Evaluator, evaluate_server, evaluator_for
from tf_dlg.federated.rounds import client_data, client_partitions, malicious_ids, sample_clients

# CheckpointError (what a run raises), HISTORY_FIELDS and read_history (how its rows
# read) are re-exported: callers of run_simulation use them beside it.
from tf_dlg.federated.run_store import (
  CHECKPOINT_NAME,
  HISTORY_FIELDS,
  HISTORY_NAME,
  OPTIONAL_FIELDS,
  TENSORBOARD_DIR,
  CheckpointError,
  check_resume,
  load_checkpoint,
  read_history,
  save_checkpoint,
  write_history,
)

__all__ = [
  "CHECKPOINT_NAME",
  "HISTORY_FIELDS",
  "HISTORY_NAME",
  "CheckpointError",
  "TENSORBOARD_DIR",
  "SimulationResult",
  "build_for_config",
  "client_data",
  "evaluator_for",
  "find_metric",
  "malicious_ids",
  "prepare",
  "read_history",
  "run_simulation",
  "sample_clients",
]


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


def find_metric(struct, key):
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
    found = find_metric(child, key)
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


@dataclasses.dataclass(frozen=True)
class _Run:
  """What stays fixed across the rounds of one simulation."""

  fa: Any  # the FedAvg bundle
  dataset: Any
  parts: List[np.ndarray]
  bad: frozenset  # Byzantine client ids
  output_dir: str
  evaluator: Evaluator  # the server model's test loss and accuracy


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
  parts = client_partitions(config, dataset.y_train)
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
  check_resume(config, hist_path, ckpt_path)
  return dataset, parts


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
  norm = find_metric(metrics, "update_norm")
  if norm is not None:
    scalars["update/global_norm"] = norm
  for key in OPTIONAL_FIELDS:
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
    path = save_capture(
      config, run, ids, round_num, start_weights, find_metric(out.metrics, "client_values")
    )
  train = out.metrics["client_work"]["train"]
  test_loss, test_acc = evaluate_server(run.fa, out.state, run.evaluator, run.dataset)
  row = dict(
    round=round_num,
    train_loss=float(train["loss"]),
    train_accuracy=float(train["sparse_categorical_accuracy"]),
    test_loss=test_loss,
    test_accuracy=test_acc,
    seconds=round(time.perf_counter() - t0, 4),
  )
  # Measured once, inside the round, by the defence's TFF factory.
  for key in OPTIONAL_FIELDS:
    value = find_metric(out.metrics, f"defense_{key}")
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
