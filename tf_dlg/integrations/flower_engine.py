"""Flower's simulation engine on Ray: the federated study's second engine (no TFF).

`run_simulation(config, output_dir, dataset=...)` trains one `FederatedConfig` run with
Flower (`pip install tf-dlg[flower,simulation]`) and writes the same `history.csv` as
`tf_dlg.federated.simulation.run_simulation` (TFF), so `tf_dlg.study.convergence` reads
either engine's runs alike. What is the same as the TFF engine:

- the clients: `config.num_clients` Flower SuperNodes, client i = partition id i, each
  holding the examples `tf_dlg.data.partition` gives it (same scheme, alpha, seed);
- the model: `tf_dlg.models.build_model(config.model, seed=config.seed)`, BatchNorm
  momentum `config.bn_momentum`, its initial weights as the server's round-0 model;
- local training: `config.local_epochs` epochs of `config.batch_size` batches, shuffled
  by `tf_dlg.data.client_datasets` with the TFF engine's per-round seed, a fresh client
  optimizer (`client_optimizer`, `client_lr`) every round, sparse cross-entropy;
- what a client sends: every model weight, trainable ones and BatchNorm's moving
  statistics, defended by `tf_dlg.integrations.flower.DefenseMod` with BatchNorm
  variables passed through (as the TFF engine's `update_exclusion`), seeded by
  (seed, client, round) so that reruns repeat exactly;
- aggregation: Flower's own strategies -- `FedAvg` (weighted by client examples: the
  server model becomes the example-weighted mean of the clients' models, which is TFF's
  mean with server SGD at 1.0), `FedMedian` (coordinate-wise, unweighted) and
  `FedTrimmedAvg` (beta = `trim_fraction`);
- the `dp` defence (clip norm C = `DPGaussian.l2_norm_clip`, noise multiplier z =
  `defense_param`) with Flower's own DP, BatchNorm arrays left out as above
  (`dp_mechanism`):
  * `"local"` (default): Flower's `LocalDpMod` on every client -- clip the update to C,
    add N(0, (z C)^2) to every entry -- which is the TFF engine's `dp` defence
    (tensorflow-privacy's Gaussian query on each client update), then `FedAvg`;
  * `"central"`: DP-FedAvg as Flower builds it -- `fixedclipping_mod` clips each
    client's update to C, `DifferentialPrivacyClientSideFixedClipping` averages them
    unweighted and adds N(0, (z C / n)^2) to the mean of the n clients. The noise sits
    at the server, not on each update: the mean carries sqrt(n) times less of it than
    under the local mechanism, and the server itself sees the clipped updates without
    noise (see `DP_MECHANISMS`).
- evaluation: the server model on the test split in inference mode
  (`tf_dlg.federated.evaluation.Evaluator`), once per round.

History rows: train loss / accuracy are the clients' example-weighted means during
local training; `zero_fraction` (with a defence) and `clipped_fraction` (with one that
clips) are the mean over clients of what `DefenseMod` reported. No TensorBoard files.
A `checkpoint.npz` (server arrays, history, configuration fingerprint) after every
round lets an interrupted run resume; a checkpoint of another configuration or engine
is refused (`CheckpointError`). Settings this engine does not have (client sampling,
Byzantine clients, a server optimizer other than SGD 1.0, `clipping_median`, update
capture) are refused before any work, in one line.

Ray: one Flower simulation (one Ray start and one pool of client actors) serves every
run of the process (`flower_session.session()`); it ends at exit or with `shutdown()`.
By default Ray
starts locally on this machine's CPUs (one actor per CPU, each TensorFlow limited to
one thread); with `RAY_ADDRESS=HOST:PORT` (or `address=`) the runs use an existing
Ray cluster (`ray start --head` / `ray start --address=...`, see docs/FLOWER.md), one
actor per CPU of every node.

Parts in their own modules: `flower_client` (the ClientApp and its local training),
`flower_dp` (Flower's DP mods on the kept arrays), `flower_server` (strategies,
aggregation, one round) and `flower_session` (the simulation on Ray). The run's Defense
is built once: by the server once a run, by each client process once a run.

Importing this module imports neither TFF nor Ray nor Flower's simulation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np

from tf_dlg.federated import run_store
from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.federated.evaluation import Evaluator
from tf_dlg.integrations import flower_session
from tf_dlg.integrations.flower_client import keras_model
from tf_dlg.integrations.flower_dp import DP_MECHANISMS
from tf_dlg.integrations.flower_server import STRATEGIES, strategy_for, train_round

# The engine's API for drivers: `shutdown` ends the process's Flower simulation.
from tf_dlg.integrations.flower_session import shutdown

__all__ = ["CHECKPOINT_FORMAT", "DP_MECHANISMS", "check_config", "run_simulation", "shutdown"]

ENGINE = "flower"
# v2: the TFF engine's shape (`run_store.write_checkpoint`); v1 files are refused.
CHECKPOINT_FORMAT = "tf_dlg.integrations.flower_engine.checkpoint/v2"


def check_config(config: FederatedConfig, dp_mechanism: str = "local") -> FederatedConfig:
  """`config` if the Flower engine runs it as the TFF engine would; else one-line ValueError."""
  from tf_dlg import validation

  if not isinstance(config, FederatedConfig):
    raise TypeError(f"config must be a FederatedConfig, got {type(config).__name__}.")
  validation.check_choice("dp_mechanism", dp_mechanism, DP_MECHANISMS)
  missing = [m for m in ("flwr", "ray") if importlib.util.find_spec(m) is None]
  if missing:
    raise ValueError(
      f"the flower engine needs {' and '.join(missing)}: pip install 'tf-dlg[flower,simulation]' "
      "(bash bazel_free_scripts/setup_core.sh builds .venv-k3 with them)."
    )
  refused = []
  if config.clients_per_round not in (None, config.num_clients):
    refused.append(f"clients_per_round={config.clients_per_round} (every client trains)")
  if config.malicious_clients:
    refused.append(f"malicious_clients={config.malicious_clients}")
  if (config.server_optimizer, float(config.server_lr)) != ("sgd", 1.0):
    refused.append(
      f"server_optimizer={config.server_optimizer} at {config.server_lr} (SGD 1.0 only)"
    )
  if config.defense == "clipping_median":
    refused.append(f"defense={config.defense} (needs the TFF engine's aggregator)")
  if config.defense == "dp" and dp_mechanism == "central" and config.aggregator != "mean":
    refused.append(
      f"central DP with aggregator={config.aggregator} (Flower's wraps FedAvg; the local "
      "mechanism, --engine=flower, takes any aggregator)"
    )
  if config.capture_round is not None:
    refused.append("capture_round (update capture)")
  if config.aggregator not in STRATEGIES:
    refused.append(f"aggregator={config.aggregator}")
  if refused:
    raise ValueError(
      "the flower engine does not run " + "; ".join(refused) + ": use --engine=tff for these."
    )
  return config


@dataclasses.dataclass
class _Job:
  """One run for the session's ServerApp thread."""

  config: FederatedConfig
  output_dir: str
  dataset: Any
  data_key: str
  arrays: List[np.ndarray]
  start: int
  history: List[Dict[str, Any]]
  last: int
  progress: bool
  dp_mechanism: str = "local"


def load_checkpoint(path: str, template, fingerprint: str):
  """(arrays, round, history) of a Flower engine checkpoint; CheckpointError if not ours.

  The TFF engine's checkpoint shape (`run_store.write_checkpoint`) under this engine's
  format name, so neither engine reads the other's.
  """
  arrays, round_num, history = run_store.read_checkpoint(path, fingerprint, CHECKPOINT_FORMAT)
  if len(arrays) != len(template) or any(a.shape != t.shape for a, t in zip(arrays, template)):
    raise run_store.CheckpointError(f"{path!r} holds a model of a different structure.")
  return arrays, round_num, history


def fingerprint(config: FederatedConfig, dp_mechanism: str = "local") -> str:
  """The configuration's fingerprint, marked as this engine's (never a TFF run's), and
  for the `dp` defence as its DP mechanism's."""
  mechanism = f"{dp_mechanism}_dp-" if config.defense == "dp" else ""
  return f"{ENGINE}-{mechanism}{config.fingerprint()}"


def _run_job(grid, job: _Job) -> None:
  """Trains `job`'s rounds in the ServerApp thread, writing history and checkpoint each round."""
  import tqdm

  from tf_dlg import defenses

  config, dataset = job.config, job.dataset
  model = keras_model(config, dataset.input_shape, dataset.num_classes)
  exclude = list(defenses.batchnorm_exclusion(model, model.weights))
  defense = config.build_defense(exclude)  # the run's, built once (None: no defence)
  strategy = strategy_for(config, job.dp_mechanism, defense)
  evaluator, arrays, history = Evaluator(model), job.arrays, job.history
  hist_path = os.path.join(job.output_dir, run_store.HISTORY_NAME)
  ckpt_path = os.path.join(job.output_dir, run_store.CHECKPOINT_NAME)
  bar = tqdm.tqdm(
    range(job.start + 1, job.last + 1),
    initial=job.start,
    total=config.rounds,
    disable=not job.progress,
    desc=f"Flower[{STRATEGIES[config.aggregator]}]",
    unit="round",
  )
  for round_num in bar:
    t0 = time.perf_counter()
    arrays, metrics = train_round(
      grid,
      strategy,
      config,
      arrays,
      round_num,
      job.data_key,
      dp_mechanism=job.dp_mechanism,
      exclude=exclude,
    )
    model.set_weights(arrays)
    test_loss, test_acc = evaluator(dataset.x_test, dataset.y_test)
    row = dict(
      round=round_num,
      train_loss=float(metrics["train_loss"]),
      train_accuracy=float(metrics["train_accuracy"]),
      test_loss=test_loss,
      test_accuracy=test_acc,
      seconds=round(time.perf_counter() - t0, 4),
      zero_fraction=None,
      clipped_fraction=None,
    )
    if defense is not None:
      row["zero_fraction"] = float(metrics.get("tf_dlg.zero_fraction", 0.0))
      if defense.clips:
        row["clipped_fraction"] = float(metrics.get("tf_dlg.clipped", 0.0))
    history.append(row)
    run_store.write_history(hist_path, history)
    run_store.write_checkpoint(
      ckpt_path,
      arrays,
      round_num,
      history,
      fingerprint(config, job.dp_mechanism),
      CHECKPOINT_FORMAT,
    )
    bar.set_postfix(test_acc=f"{test_acc:.3f}")
  bar.close()
  job.arrays = arrays


def run_simulation(
  config: FederatedConfig,
  output_dir: str,
  *,
  dataset=None,
  progress: bool = True,
  stop_after: Optional[int] = None,
  overwrite: bool = False,
  dp_mechanism: str = "local",
  **session_options,
) -> "sim.SimulationResult":
  """Runs (or resumes) one run with Flower; the TFF engine's `run_simulation` contract.

  Args:
    config: The run's `FederatedConfig` (`check_config` says what this engine runs).
    output_dir: Where `history.csv` and `checkpoint.npz` go.
    dataset: A preloaded `ImageDataset` (else `load_dataset(config.dataset)`).
    progress: Show a tqdm bar.
    stop_after: Stop after this round (the checkpoint is written as usual).
    overwrite: Start afresh even if `output_dir` holds a run.
    dp_mechanism: How the `dp` defence runs: "local" (Flower's `LocalDpMod`, the TFF
      engine's `dp`) or "central" (Flower's DP-FedAvg); see `DP_MECHANISMS`.
    **session_options: `Session` options (`address`, `num_cpus`, `client_cpus`,
      `verbose`).
  """
  check_config(config, dp_mechanism)
  dataset, _ = sim.prepare(config, output_dir, dataset, overwrite)
  hist_path = os.path.join(output_dir, run_store.HISTORY_NAME)
  ckpt_path = os.path.join(output_dir, run_store.CHECKPOINT_NAME)
  arrays = [
    np.asarray(w)
    for w in keras_model(config, dataset.input_shape, dataset.num_classes).get_weights()
  ]
  start, history = 0, []
  if os.path.exists(ckpt_path):
    arrays, start, history = load_checkpoint(ckpt_path, arrays, fingerprint(config, dp_mechanism))
  run_store.write_history(hist_path, history)
  last = config.rounds if stop_after is None else min(config.rounds, stop_after)
  job = _Job(config, output_dir, dataset, "", arrays, start, history, last, progress, dp_mechanism)
  if last > start:
    session = flower_session.session(config.num_clients, **session_options).start()
    job.data_key = session.data_key(dataset)
    session.call(lambda grid: _run_job(grid, job))
  return sim.SimulationResult(
    history=job.history,
    dataset_source=dataset.source,
    malicious=[],
    resumed_from=start,
    server_state=job.arrays,
  )
