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
  (`tf_dlg.federated.simulation.Evaluator`), once per round.

History rows: train loss / accuracy are the clients' example-weighted means during
local training; `zero_fraction` (with a defence) and `clipped_fraction` (with one that
clips) are the mean over clients of what `DefenseMod` reported. No TensorBoard files.
A `checkpoint.npz` (server arrays, history, configuration fingerprint) after every
round lets an interrupted run resume; a checkpoint of another configuration or engine
is refused (`CheckpointError`). Settings this engine does not have (client sampling,
Byzantine clients, a server optimizer other than SGD 1.0, `clipping_median`, update
capture) are refused before any work, in one line.

Ray: one Flower simulation (one Ray start and one pool of client actors) serves every
run of the process (`session()`); it ends at exit or with `shutdown()`. By default Ray
starts locally on this machine's CPUs (one actor per CPU, each TensorFlow limited to
one thread); with `RAY_ADDRESS=HOST:PORT` (or `address=`) the runs use an existing
Ray cluster (`ray start --head` / `ray start --address=...`, see docs/FLOWER.md), one
actor per CPU of every node.

Importing this module imports neither TFF nor Ray nor Flower's simulation.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import queue
import threading
import time
import zlib
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig

ENGINE = "flower"
# v2: the TFF engine's shape (`simulation.write_checkpoint`); v1 files are refused.
CHECKPOINT_FORMAT = "tf_dlg.integrations.flower_engine.checkpoint/v2"
STRATEGIES = {"mean": "FedAvg", "median": "FedMedian", "trimmed_mean": "FedTrimmedAvg"}
_CONFIG_KEY = "tf_dlg.config"
_ROUND_KEY = "tf_dlg.round"
_DATA_KEY = "tf_dlg.data"
_WEIGHT_KEY = "num-examples"
_UNIT_KEY = "tf_dlg.unit"  # every client's weight 1: the unweighted mean of central DP
_DP_KEY = "tf_dlg.dp_mechanism"
# How the `dp` defence runs on this engine (Flower's own DP; module docstring). Epsilon
# (`tf_dlg.defenses.dp_fedavg_epsilon`): both release, each round, a Gaussian mechanism
# of noise z C on the sum of updates clipped to C, so one accounting fits both; what
# differs is who sees the noised value. "local": each client's own update (the view of
# this study's attacker, the server) -- the TFF engine's `dp`; "central": only the
# aggregate, while the server sees each clipped update un-noised (against it, this is
# clipping to C alone).
DP_MECHANISMS = ("local", "central")
# LocalDpMod is parameterised by a one-release (epsilon, delta); it draws noise of std
# sensitivity x sqrt(2 ln(1.25 / delta)) / epsilon. With sensitivity C and this delta,
# epsilon = sqrt(2 ln(1.25 / delta)) / z gives std z C: the mod's own epsilon is only that
# calibration, not the run's epsilon (which composes every round; see DP_MECHANISMS).
LOCAL_DP_DELTA = 1e-5
# A round that waits longer than this on its clients fails (seconds).
ROUND_TIMEOUT_S = 3600.0


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


# --------------------------------------------------------------------------- clients
# Everything below up to the server part runs in Ray's actor processes (and in tests, in
# process). Each process keeps its data, partitions and compiled models.

_PROCESS_CACHE: Dict[Any, Any] = {}


def _limit_threads() -> None:
  """One actor per CPU: each actor's TensorFlow gets that many threads (once a process)."""
  if _PROCESS_CACHE.get("threads_set"):
    return
  import tensorflow as tf

  n = int(os.environ.get("TF_DLG_FLOWER_THREADS", "0") or 0)
  if n > 0:
    try:
      tf.config.threading.set_intra_op_parallelism_threads(n)
      tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:  # TensorFlow already initialised in this process
      pass
  _PROCESS_CACHE["threads_set"] = True


def _keras_model(config: FederatedConfig, input_shape, num_classes: int):
  """The TFF engine's model of `config` (`tf_dlg.federated.fedavg._keras_model_fn`)."""
  from tf_dlg import models as models_lib

  model = models_lib.build_model(config.model, tuple(input_shape), num_classes, seed=config.seed)
  if config.bn_momentum is not None:
    for layer, _ in models_lib.batchnorm_variables(model):
      layer.momentum = float(config.bn_momentum)
  return model


class ClientTrainer:
  """One process's model, client optimizer and traced local training of a model shape.

  `train(arrays, dataset)` starts from `arrays` (the server's model, `model.weights`
  order) with a fresh optimizer and runs every batch of `dataset` in one `tf.function`
  call; returns `(weights, examples, loss sum, correct predictions)`.
  """

  def __init__(self, config: FederatedConfig, input_shape, num_classes: int):
    import tensorflow as tf

    from tf_dlg import defenses

    self.model = model = _keras_model(config, input_shape, num_classes)
    self.exclude = list(defenses.batchnorm_exclusion(model, model.weights))
    lr = float(config.client_lr)
    if config.client_optimizer == "adam":
      opt = tf.keras.optimizers.Adam(lr)
    elif config.client_optimizer == "sgdm":
      opt = tf.keras.optimizers.SGD(lr, momentum=0.9)
    else:
      opt = tf.keras.optimizers.SGD(lr)
    opt.build(model.trainable_variables)
    self.optimizer = opt
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables

    @tf.function(reduce_retracing=True)
    def run(batches):
      n = tf.constant(0, tf.int64)
      loss_sum = tf.constant(0.0, tf.float64)
      hits = tf.constant(0.0, tf.float64)
      for batch in iter(batches):  # a while loop: `for .. in batches` becomes a slow reduce
        x, y = batch["x"], batch["y"]
        with tf.GradientTape() as tape:
          logits = model(x, training=True)
          loss = loss_fn(y, logits)
        grads = tape.gradient(loss, variables)
        opt.apply_gradients(zip(grads, variables))
        b = tf.shape(y, out_type=tf.int64)[0]
        n += b
        loss_sum += tf.cast(loss, tf.float64) * tf.cast(b, tf.float64)
        right = tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y)
        hits += tf.reduce_sum(tf.cast(right, tf.float64))
      return n, loss_sum, hits

    self._run = run

  def _reset_optimizer(self) -> None:
    """A fresh client optimizer each round (iterations and moments to 0, rate kept)."""
    for v in self.optimizer.variables:
      name = getattr(v, "path", None) or v.name
      if "learning_rate" not in name:
        v.assign(np.zeros(v.shape, v.dtype))

  def train(self, arrays, batches):
    self.model.set_weights(arrays)
    self._reset_optimizer()
    n, loss_sum, hits = self._run(batches)
    return [np.asarray(w) for w in self.model.get_weights()], int(n), float(loss_sum), float(hits)


def _trainer(config: FederatedConfig, input_shape, num_classes: int) -> ClientTrainer:
  key = (
    "trainer",
    config.model,
    tuple(input_shape),
    num_classes,
    config.bn_momentum,
    config.client_optimizer,
    float(config.client_lr),
  )
  if key not in _PROCESS_CACHE:
    _limit_threads()
    _PROCESS_CACHE[key] = ClientTrainer(config, input_shape, num_classes)
  return _PROCESS_CACHE[key]


def _client_data(key: str, refs: Dict[str, Any]):
  """(x_train, y_train, num_classes) of a data key (from Ray's object store, once a process)."""
  cache_key = ("data", key)
  if cache_key not in _PROCESS_CACHE:
    ref = refs[key]
    if not isinstance(ref, tuple):
      import ray

      ref = ray.get(ref)
    _PROCESS_CACHE[cache_key] = ref
  return _PROCESS_CACHE[cache_key]


def _client_parts(key: str, y, config: FederatedConfig):
  from tf_dlg import data as data_lib

  cache_key = ("parts", key, config.partition, config.num_clients, config.alpha)
  cache_key += (config.classes_per_client, config.seed)
  if cache_key not in _PROCESS_CACHE:
    _PROCESS_CACHE[cache_key] = data_lib.partition(
      y,
      config.num_clients,
      config.partition,
      alpha=config.alpha,
      classes_per_client=config.classes_per_client,
      seed=config.seed,
    )
  return _PROCESS_CACHE[cache_key]


def local_update(config: FederatedConfig, data, arrays, round_num: int, cid: int):
  """Client `cid`'s local training in round `round_num`, from the server's `arrays`.

  `data` is `(key, x_train, y_train, num_classes)` (the key names the partition cache).
  Returns `(weights, examples, loss sum, correct predictions)`, undefended: what the
  `ClientApp` replies before `DefenseMod`.
  """
  from tf_dlg import data as data_lib

  key, x, y, num_classes = data
  parts = _client_parts(key, y, config)
  (batches,) = data_lib.client_datasets(
    x,
    y,
    [parts[cid]],
    batch_size=config.batch_size,
    epochs=config.local_epochs,
    shuffle=True,
    # The TFF engine's shuffling seed of client `cid` (`simulation.client_data`).
    seed=sim.round_seed(config, round_num) + cid,
  )
  return _trainer(config, x.shape[1:], num_classes).train(arrays, batches)


def _message_config(msg):
  """(FederatedConfig, round, data key) a train message carries."""
  record = msg.content["config"]
  text = str(record[_CONFIG_KEY])
  if ("config", text) not in _PROCESS_CACHE:  # checked once a run, not once a message
    _PROCESS_CACHE["config", text] = FederatedConfig(**json.loads(text))
  return _PROCESS_CACHE["config", text], int(record[_ROUND_KEY]), str(record[_DATA_KEY])


@contextlib.contextmanager
def numpy_seed(*entropy: int):
  """NumPy's global generator seeded from `entropy` inside the block, restored after.

  Flower's DP (`LocalDpMod`, the strategy wrappers) draws its noise from `np.random`,
  unseeded: seeding it per (seed, client, round) makes a rerun repeat exactly.
  """
  state = np.random.get_state()
  np.random.seed(np.random.SeedSequence([int(e) for e in entropy]).generate_state(8))
  try:
    yield
  finally:
    np.random.set_state(state)


def _tag_seed(tag: str) -> int:
  return zlib.crc32(tag.encode())


def on_kept_arrays(flower_mod, exclude: Sequence[bool], clip_norm: float):
  """A client mod: `flower_mod` applied to the arrays not excluded; the others as trained.

  Flower's DP mods clip (and noise) every array of the record; the TFF engine's `dp`
  leaves BatchNorm's moving statistics out, as every defence here does. The wrapper
  hands `flower_mod` a message and a reply that hold only the kept arrays (so its own
  checks and errors apply to them), then puts the excluded arrays back, bit for bit.
  It adds to the reply's MetricRecord `tf_dlg.update_norm` (the kept update's L2 norm as
  trained), `tf_dlg.clipped` (1 where that exceeds `clip_norm`, which both of Flower's
  DP mods clip to) and `tf_dlg.zero_fraction` (zero entries of the kept update sent).
  """
  from flwr.app import ArrayRecord, MetricRecord

  exclude = [bool(e) for e in exclude]

  def mod(msg, context, call_next):
    if len(msg.content.array_records) != 1:
      return flower_mod(msg, context, call_next)  # Flower's mod gives its error reply
    ((key, received),) = msg.content.array_records.items()
    names = list(received.keys())
    if len(names) != len(exclude):
      raise ValueError(f"exclude has {len(exclude)} entries, the record {len(names)} arrays.")
    kept = [n for n, e in zip(names, exclude) if not e]
    seen = {}

    def inner(m, c):
      m.content[key] = received  # local training starts from every array
      out = call_next(m, c)
      if out.has_error() or len(out.content.array_records) != 1:
        return out
      ((out_key, sent),) = out.content.array_records.items()
      if list(sent.keys()) == names:  # else Flower's mod refuses the key mismatch
        seen.update(key=out_key, sent=sent)
        out.content[out_key] = ArrayRecord({n: sent[n] for n in kept})
      return out

    msg.content[key] = ArrayRecord({n: received[n] for n in kept})
    try:
      out = flower_mod(msg, context, inner)
    finally:
      msg.content[key] = received
    if out.has_error() or "sent" not in seen:
      return out
    sent, defended = seen["sent"], out.content.array_records[seen["key"]]
    out.content[seen["key"]] = ArrayRecord(
      {n: defended[n] if n in kept else sent[n] for n in names}
    )
    before = [sent[n].numpy().astype(np.float64) - received[n].numpy() for n in kept]
    after = [defended[n].numpy().astype(np.float64) - received[n].numpy() for n in kept]
    norm = float(np.sqrt(sum(np.sum(d**2) for d in before)))
    zeros = sum(int(np.sum(d == 0)) for d in after)
    stats = {"update_norm": norm, "clipped": int(norm > clip_norm)}
    stats["zero_fraction"] = zeros / max(sum(d.size for d in after), 1)
    metrics = {"tf_dlg." + k: v for k, v in stats.items()}
    if out.content.metric_records:
      record = next(iter(out.content.metric_records.values()))
      for k, v in metrics.items():
        record[k] = v
    else:
      out.content["metrics"] = MetricRecord(metrics)
    return out

  return mod


def dp_mod(config: FederatedConfig, dp_mechanism: str, exclude, tag: str):
  """The client mod of the `dp` defence with Flower's own DP (see `DP_MECHANISMS`).

  "local": `LocalDpMod` (clip C, noise of std z C); "central": `fixedclipping_mod` (clip
  C; the server's `DifferentialPrivacyClientSideFixedClipping` sends C and adds the
  noise). Both on the kept arrays (`on_kept_arrays`), NumPy seeded by (seed, `tag`).
  """
  from flwr.clientapp import mod as flower_mods

  defense = config.build_defense()
  clip, z = float(defense.l2_norm_clip), float(defense.param)
  if dp_mechanism == "central":
    inner = flower_mods.fixedclipping_mod
  else:
    epsilon = math.sqrt(2 * math.log(1.25 / LOCAL_DP_DELTA)) / z if z > 0 else math.inf
    inner = flower_mods.LocalDpMod(clip, clip, epsilon, LOCAL_DP_DELTA)
  kept = on_kept_arrays(inner, exclude, clip)

  def mod(msg, context, call_next):
    with numpy_seed(config.seed, _tag_seed(tag)):
      return kept(msg, context, call_next)

  return mod


def _client_id(context) -> int:
  from flwr.common.constant import PARTITION_ID_KEY

  return int(context.node_config[PARTITION_ID_KEY])


def client_app(refs: Dict[str, Any]):
  """The `ClientApp`: local training behind the run's defence (`DefenseMod`).

  `refs` maps a data key to the training data (a Ray object reference, or the
  `(x, y, num_classes)` tuple itself); the app reads it when a message names the key.
  """
  from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
  from flwr.app.message_type import MessageType
  from flwr.clientapp import ClientApp

  from tf_dlg.integrations import flower

  def defense_mod(msg, context, call_next):
    """`DefenseMod` of the run a train message belongs to (none: passes through)."""
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
      return call_next(msg, context)
    config, round_num, key = _message_config(msg)
    if config.defense == "none":
      return call_next(msg, context)
    x, _, num_classes = _client_data(key, refs)
    exclude = _trainer(config, x.shape[1:], num_classes).exclude
    tag = f"client{_client_id(context)}/round{round_num}"
    if config.defense == "dp":
      mechanism = str(msg.content["config"][_DP_KEY])
      return dp_mod(config, mechanism, exclude, tag)(msg, context, call_next)
    mod = flower.DefenseMod(
      config.build_defense(exclude), seed=config.seed, exclude=exclude, seed_tag=lambda m, c: tag
    )
    return mod(msg, context, call_next)

  app = ClientApp(mods=[defense_mod])

  @app.train()
  def train(msg, context):
    config, round_num, key = _message_config(msg)
    x, y, num_classes = _client_data(key, refs)
    arrays = flower.record_arrays(msg.content["arrays"])
    cid = _client_id(context)
    weights, n, loss_sum, hits = local_update(
      config, (key, x, y, num_classes), arrays, round_num, cid
    )
    metrics = {
      _WEIGHT_KEY: n,
      _UNIT_KEY: 1,
      "train_loss": loss_sum / max(n, 1),
      "train_accuracy": hits / max(n, 1),
      "tf_dlg.client": cid,
    }
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)

  return app


# --------------------------------------------------------------------------- server


def train_metrics(contents, weight_key: str):
  """The round's MetricRecord: example-weighted train loss / accuracy, mean defence stats."""
  from flwr.app import MetricRecord

  metrics = [next(iter(c.metric_records.values())) for c in contents]
  weights = np.array([float(m[weight_key]) for m in metrics])
  out = {weight_key: float(weights.sum())}
  for k in ("train_loss", "train_accuracy"):
    out[k] = float(np.dot(weights, [float(m[k]) for m in metrics]) / max(weights.sum(), 1.0))
  for k in ("zero_fraction", "clipped", "update_norm"):
    values = [float(m["tf_dlg." + k]) for m in metrics if "tf_dlg." + k in m]
    if values:
      out["tf_dlg." + k] = float(np.mean(values))
  return MetricRecord(out)


def _train_metrics(contents, weight_key: str):
  # Train loss and accuracy stay example-weighted whatever the strategy's weights.
  del weight_key
  return train_metrics(contents, _WEIGHT_KEY)


def strategy_for(config: FederatedConfig, dp_mechanism: str = "local"):
  """Flower's own strategy of `config.aggregator`, every client every round.

  With the `dp` defence and `dp_mechanism="central"`: Flower's
  `DifferentialPrivacyClientSideFixedClipping` (noise multiplier z, clip C, n clients a
  round) around an unweighted `FedAvg` -- the mean's sensitivity is C / n only when every
  client weighs the same (TFF's `dp_aggregator` is unweighted too).
  """
  from flwr.serverapp import strategy as strategies

  n = config.num_clients
  kwargs = dict(
    fraction_train=1.0,
    fraction_evaluate=0.0,  # the server evaluates (the TFF engine's rule)
    min_train_nodes=n,
    min_available_nodes=n,
    weighted_by_key=_WEIGHT_KEY,
    train_metrics_aggr_fn=_train_metrics,
  )
  if config.defense == "dp" and dp_mechanism == "central":
    defense = config.build_defense()
    return strategies.DifferentialPrivacyClientSideFixedClipping(
      strategies.FedAvg(**{**kwargs, "weighted_by_key": _UNIT_KEY}),
      noise_multiplier=float(defense.param),
      clipping_norm=float(defense.l2_norm_clip),
      num_sampled_clients=n,
    )
  if config.aggregator == "trimmed_mean":
    return strategies.FedTrimmedAvg(beta=float(config.trim_fraction), **kwargs)
  return getattr(strategies, STRATEGIES[config.aggregator])(**kwargs)


def aggregate(strategy, round_num: int, replies, exclude=None, seed: int = 0):
  """`strategy.aggregate_train` of the replies; (ArrayRecord, MetricRecord).

  A DP wrapper adds noise to every array the strategy it wraps returns; with `exclude`
  it aggregates the kept arrays through the wrapper and the excluded ones (BatchNorm
  statistics, which the TFF engine's `dp` leaves un-noised) through the wrapped strategy,
  and puts them back in order. The wrapper's noise comes from NumPy seeded by (seed,
  round).
  """
  from flwr.app import ArrayRecord
  from flwr.serverapp import strategy as strategies

  dp = isinstance(strategy, strategies.DifferentialPrivacyClientSideFixedClipping)
  if not dp or exclude is None or not any(exclude):
    with numpy_seed(seed, round_num, 0xD9):
      return strategy.aggregate_train(round_num, replies)
  replies = list(replies)
  full = [next(iter(m.content.array_records.items())) for m in replies]
  names = list(full[0][1].keys())
  if len(names) != len(exclude):
    raise ValueError(f"exclude has {len(exclude)} entries, the replies {len(names)} arrays.")
  parts = {}
  for side in (False, True):
    chosen = [n for n, e in zip(names, exclude) if bool(e) == side]
    for m, (key, record) in zip(replies, full):
      m.content[key] = ArrayRecord({n: record[n] for n in chosen})
    if side:  # excluded arrays: the plain mean of the wrapped strategy
      part, _ = strategy.strategy.aggregate_train(round_num, replies)
    else:
      with numpy_seed(seed, round_num, 0xD9):
        part, metrics = strategy.aggregate_train(round_num, replies)
    if part is None:
      raise RuntimeError(f"round {round_num}: Flower's {strategy!r} aggregated nothing.")
    parts.update(zip(chosen, part.to_numpy_ndarrays()))
  for m, (key, record) in zip(replies, full):
    m.content[key] = record
  return ArrayRecord([parts[n] for n in names]), metrics


def _client_of(msg) -> int:
  return int(next(iter(msg.content.metric_records.values()))["tf_dlg.client"])


@dataclasses.dataclass
class _Call:
  """A function for the session's ServerApp thread, and what it gave back."""

  fn: Any
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: Any = None
  error: Optional[BaseException] = None


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

  The TFF engine's checkpoint shape (`simulation.write_checkpoint`) under this engine's
  format name, so neither engine reads the other's.
  """
  arrays, round_num, history = sim.read_checkpoint(path, fingerprint, CHECKPOINT_FORMAT)
  if len(arrays) != len(template) or any(a.shape != t.shape for a, t in zip(arrays, template)):
    raise sim.CheckpointError(f"{path!r} holds a model of a different structure.")
  return arrays, round_num, history


def fingerprint(config: FederatedConfig, dp_mechanism: str = "local") -> str:
  """The configuration's fingerprint, marked as this engine's (never a TFF run's), and
  for the `dp` defence as its DP mechanism's."""
  mechanism = f"{dp_mechanism}_dp-" if config.defense == "dp" else ""
  return f"{ENGINE}-{mechanism}{config.fingerprint()}"


def train_round(
  grid,
  strategy,
  config: FederatedConfig,
  arrays,
  round_num: int,
  data_key: str,
  *,
  dp_mechanism: str = "local",
  exclude=None,
):
  """One training round through Flower: (the server's new arrays, the round's metrics).

  Sends every client the arrays and the run (`config`, round, data key, DP mechanism),
  waits for all replies (a client that fails fails the round), and aggregates them with
  `strategy` in client order (the weighted sum is then the same every run; `aggregate`,
  `exclude`: the arrays a DP wrapper leaves un-noised).
  """
  from flwr.app import ArrayRecord, ConfigRecord

  run_config = json.dumps(dataclasses.asdict(config), sort_keys=True)
  record = ConfigRecord({_CONFIG_KEY: run_config, _ROUND_KEY: round_num, _DATA_KEY: data_key})
  record[_DP_KEY] = dp_mechanism
  messages = strategy.configure_train(round_num, ArrayRecord(list(arrays)), record, grid)
  replies = list(grid.send_and_receive(messages, timeout=ROUND_TIMEOUT_S))
  failed = [m for m in replies if m.has_error()]
  if failed or len(replies) != config.num_clients:
    reason = failed[0].error.reason if failed else "no reply"
    raise RuntimeError(
      f"round {round_num}: {len(failed) or config.num_clients - len(replies)} of "
      f"{config.num_clients} clients failed ({reason.strip().splitlines()[-1]})"
    )
  replies.sort(key=_client_of)
  aggregated, metrics = aggregate(strategy, round_num, replies, exclude, config.seed)
  return [np.asarray(a) for a in aggregated.to_numpy_ndarrays()], metrics


def _run_job(grid, job: _Job) -> None:
  """Trains `job`'s rounds in the ServerApp thread, writing history and checkpoint each round."""
  import tqdm

  config, dataset = job.config, job.dataset
  strategy = strategy_for(config, job.dp_mechanism)
  model = _keras_model(config, dataset.input_shape, dataset.num_classes)
  from tf_dlg import defenses

  exclude = list(defenses.batchnorm_exclusion(model, model.weights))
  evaluator = sim.Evaluator(model)
  hist_path = os.path.join(job.output_dir, sim.HISTORY_NAME)
  ckpt_path = os.path.join(job.output_dir, sim.CHECKPOINT_NAME)
  arrays, history = job.arrays, job.history
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
    if config.defense != "none":
      row["zero_fraction"] = float(metrics.get("tf_dlg.zero_fraction", 0.0))
      if config.build_defense().clips:
        row["clipped_fraction"] = float(metrics.get("tf_dlg.clipped", 0.0))
    history.append(row)
    sim.write_history(hist_path, history)
    sim.write_checkpoint(
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


# Passed to every client actor, on every node: the same TensorFlow set-up everywhere
# (thread count and oneDNN change the float rounding, and Adam's first steps amplify it).
_ACTOR_ENV = ("TF_DLG_FLOWER_THREADS", "TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL")


def _actor_env() -> Dict[str, str]:
  env = {k: os.environ[k] for k in _ACTOR_ENV if k in os.environ}
  env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p)
  return env


def _ray_loopback() -> None:
  """A local Ray on 127.0.0.1 only.

  Ray gives its nodes this machine's network address even when started locally; its
  switch for loopback is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import (so the
  imported constant is set too). Ray's processes inherit the environment. (Set it
  yourself for `ray start` nodes on one machine, as tests/integrations do.)
  """
  from ray._private import ray_constants

  os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
  ray_constants.ENABLE_RAY_CLUSTER = False


class Session:
  """One Flower simulation on Ray that trains runs one after another (`run`).

  Args:
    num_clients: SuperNodes of the simulation (every run's `num_clients`).
    address: A Ray cluster to join (`HOST:PORT`); default `RAY_ADDRESS`, else a local
      Ray on `num_cpus` CPUs (default: all of this machine's).
    client_cpus: CPUs per client actor (and TensorFlow threads in it).
    verbose: Flower's and Ray's logs (default: warnings only).
  """

  def __init__(
    self,
    num_clients: int,
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    client_cpus: int = 1,
    verbose: bool = False,
  ):
    self.num_clients = int(num_clients)
    self.address = address or os.environ.get("RAY_ADDRESS") or None
    self.num_cpus = None if self.address else int(num_cpus or os.cpu_count() or 1)
    self.client_cpus = int(client_cpus)
    self.verbose = verbose
    self._jobs: "queue.Queue[Optional[_Call]]" = queue.Queue()
    self._refs: Dict[str, Any] = {}
    self._data_keys: Dict[int, str] = {}
    self._thread: Optional[threading.Thread] = None
    self._failure: List[BaseException] = []
    self._owns_ray = False

  def options(self) -> tuple:
    return (self.num_clients, self.address, self.num_cpus, self.client_cpus)

  def start(self) -> "Session":
    import ray
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    if self._thread is not None:
      return self
    if not self.verbose:
      # Flower warns of its own settings here (run_simulation's deprecation in favour of
      # `flwr run`, fraction_evaluate=0): errors only.
      logging.getLogger("flwr").setLevel(logging.ERROR)
    # TensorFlow threads per actor; Ray's workers inherit this process's environment.
    os.environ["TF_DLG_FLOWER_THREADS"] = str(self.client_cpus)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # a FutureWarning
    if not ray.is_initialized():
      init = dict(
        include_dashboard=False,
        log_to_driver=self.verbose,
        logging_level=logging.INFO if self.verbose else logging.WARNING,
      )
      if self.address:
        init["address"] = self.address
      else:
        # A new local Ray (never a cluster `ray start` left running), on loopback only.
        _ray_loopback()
        init["address"] = "local"
        init["num_cpus"] = self.num_cpus
      ray.init(runtime_env={"env_vars": _actor_env()}, **init)
      self._owns_ray = True
    # At exit this simulation ends before Ray's own exit hook (registered by ray.init)
    # stops Ray: atexit runs the latest first. Else Flower's teardown finds its actors
    # gone and logs a traceback.
    atexit.unregister(shutdown)
    atexit.register(shutdown)
    ready = threading.Event()
    server = ServerApp()

    @server.main()
    def main(grid, context):
      ready.set()
      while True:
        call = self._jobs.get()
        if call is None:
          return
        try:
          call.result = call.fn(grid)
        except BaseException as e:  # handed to the caller's thread
          call.error = e
        finally:
          call.done.set()

    backend = {"client_resources": {"num_cpus": self.client_cpus, "num_gpus": 0.0}}

    def simulate():
      try:
        run_simulation(
          server_app=server,
          client_app=client_app(self._refs),
          num_supernodes=self.num_clients,
          backend_name="ray",
          backend_config=backend,
        )
      except BaseException as e:
        self._failure.append(e)
      finally:
        ready.set()

    self._thread = threading.Thread(target=simulate, name="tf_dlg-flower", daemon=True)
    self._thread.start()
    ready.wait()
    self._check_alive()
    return self

  def _check_alive(self) -> None:
    if self._failure or self._thread is None or not self._thread.is_alive():
      cause = self._failure[0] if self._failure else None
      raise RuntimeError(f"the Flower simulation stopped ({cause!r}).") from cause

  def data_key(self, dataset) -> str:
    """The key of `dataset`'s training data in Ray's object store (put there once)."""
    import ray

    key = self._data_keys.get(id(dataset.x_train))
    if key is None:
      key = f"d{len(self._data_keys)}"
      payload = (dataset.x_train, dataset.y_train, int(dataset.num_classes))
      self._refs[key] = ray.put(payload)
      self._data_keys[id(dataset.x_train)] = key
      self._keep = getattr(self, "_keep", []) + [dataset.x_train]  # ids stay unique
    return key

  def call(self, fn):
    """`fn(grid)` run in the simulation's ServerApp thread; returns its result."""
    self.start()
    call = _Call(fn)
    self._jobs.put(call)
    while not call.done.wait(1.0):
      self._check_alive()
    if call.error is not None:
      raise call.error
    return call.result

  def run(self, job: _Job) -> _Job:
    """Trains `job`'s rounds (history and checkpoint written each round)."""
    self.start()
    job.data_key = self.data_key(job.dataset)
    self.call(lambda grid: _run_job(grid, job))
    return job

  def close(self) -> None:
    if self._thread is None:
      return
    self._jobs.put(None)
    self._thread.join(timeout=120)
    self._thread = None
    if self._owns_ray:
      import ray

      ray.shutdown()  # Flower's backend shuts Ray down too; this one is a no-op then


_SESSION: List[Session] = []


def session(num_clients: int, **options) -> Session:
  """The process's `Session` for `num_clients` (a new one when the options differ)."""
  want = Session(num_clients, **options)
  if _SESSION and _SESSION[0].options() == want.options():
    return _SESSION[0]
  shutdown()
  _SESSION.append(want)
  return want


def shutdown() -> None:
  """Ends the process's Flower simulation (and the Ray it started), if any."""
  while _SESSION:
    _SESSION.pop().close()


atexit.register(shutdown)


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
  hist_path = os.path.join(output_dir, sim.HISTORY_NAME)
  ckpt_path = os.path.join(output_dir, sim.CHECKPOINT_NAME)
  arrays = [
    np.asarray(w)
    for w in _keras_model(config, dataset.input_shape, dataset.num_classes).get_weights()
  ]
  start, history = 0, []
  if os.path.exists(ckpt_path):
    arrays, start, history = load_checkpoint(ckpt_path, arrays, fingerprint(config, dp_mechanism))
  sim.write_history(hist_path, history)
  last = config.rounds if stop_after is None else min(config.rounds, stop_after)
  job = _Job(config, output_dir, dataset, "", arrays, start, history, last, progress, dp_mechanism)
  if last > start:
    session(config.num_clients, **session_options).run(job)
  return sim.SimulationResult(
    history=job.history,
    dataset_source=dataset.source,
    malicious=[],
    resumed_from=start,
    server_state=job.arrays,
  )
