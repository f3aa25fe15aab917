"""The Flower engine's client side: the `ClientApp` and its local training.

Runs in Ray's actor processes (and in tests, in process). Each process keeps its
training data, partitions, traced local training and the run's Defense (built once a
process and run). A train message carries the run (`CONFIG_KEY`: the `FederatedConfig`
as JSON), the round and the key of the training data in Ray's object store.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import numpy as np

from tf_dlg.federated.config import FederatedConfig
from tf_dlg.federated.rounds import client_partitions, round_seed
from tf_dlg.integrations.flower_dp import dp_mod

# The keys of what a train message and its reply carry.
CONFIG_KEY = "tf_dlg.config"
ROUND_KEY = "tf_dlg.round"
DATA_KEY = "tf_dlg.data"
WEIGHT_KEY = "num-examples"
UNIT_KEY = "tf_dlg.unit"  # every client's weight 1: the unweighted mean of central DP
DP_KEY = "tf_dlg.dp_mechanism"

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


def keras_model(config: FederatedConfig, input_shape, num_classes: int):
  """The TFF engine's model of `config` (as `tf_dlg.federated.fedavg.build_fedavg` builds it)."""
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

    self.model = model = keras_model(config, input_shape, num_classes)
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


def trainer(config: FederatedConfig, input_shape, num_classes: int) -> ClientTrainer:
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


def client_data(key: str, refs: Dict[str, Any]):
  """(x_train, y_train, num_classes) of a data key (from Ray's object store, once a process)."""
  cache_key = ("data", key)
  if cache_key not in _PROCESS_CACHE:
    ref = refs[key]
    if not isinstance(ref, tuple):
      import ray

      ref = ray.get(ref)
    _PROCESS_CACHE[cache_key] = ref
  return _PROCESS_CACHE[cache_key]


def client_parts(key: str, y, config: FederatedConfig):
  """The run's client partitions of data `key` (the TFF engine's), once a process."""
  cache_key = ("parts", key, config.partition, config.num_clients, config.alpha)
  cache_key += (config.classes_per_client, config.seed)
  if cache_key not in _PROCESS_CACHE:
    _PROCESS_CACHE[cache_key] = client_partitions(config, y)
  return _PROCESS_CACHE[cache_key]


def local_update(config: FederatedConfig, data, arrays, round_num: int, cid: int):
  """Client `cid`'s local training in round `round_num`, from the server's `arrays`.

  `data` is `(key, x_train, y_train, num_classes)` (the key names the partition cache).
  Returns `(weights, examples, loss sum, correct predictions)`, undefended: what the
  `ClientApp` replies before `DefenseMod`.
  """
  from tf_dlg import data as data_lib

  key, x, y, num_classes = data
  parts = client_parts(key, y, config)
  (batches,) = data_lib.client_datasets(
    x,
    y,
    [parts[cid]],
    batch_size=config.batch_size,
    epochs=config.local_epochs,
    shuffle=True,
    # The TFF engine's shuffling seed of client `cid` (`rounds.client_data`).
    seed=round_seed(config, round_num) + cid,
  )
  return trainer(config, x.shape[1:], num_classes).train(arrays, batches)


def message_config(msg):
  """(FederatedConfig, round, data key) a train message carries."""
  record = msg.content["config"]
  text = str(record[CONFIG_KEY])
  if ("config", text) not in _PROCESS_CACHE:  # checked once a run, not once a message
    _PROCESS_CACHE["config", text] = FederatedConfig(**json.loads(text))
  return _PROCESS_CACHE["config", text], int(record[ROUND_KEY]), str(record[DATA_KEY])


def run_defense(config: FederatedConfig, exclude):
  """The run's Defense in this process (None: no defence), built once a process and run."""
  key = ("defense", config, tuple(bool(e) for e in exclude))
  if key not in _PROCESS_CACHE:
    _PROCESS_CACHE[key] = config.build_defense(list(exclude))
  return _PROCESS_CACHE[key]


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
    config, round_num, key = message_config(msg)
    if config.defense == "none":
      return call_next(msg, context)
    x, _, num_classes = client_data(key, refs)
    exclude = trainer(config, x.shape[1:], num_classes).exclude
    defense = run_defense(config, exclude)
    tag = f"client{_client_id(context)}/round{round_num}"
    if config.defense == "dp":
      mechanism = str(msg.content["config"][DP_KEY])
      return dp_mod(defense, config.seed, mechanism, exclude, tag)(msg, context, call_next)
    mod = flower.DefenseMod(defense, seed=config.seed, exclude=exclude, seed_tag=lambda m, c: tag)
    return mod(msg, context, call_next)

  app = ClientApp(mods=[defense_mod])

  @app.train()
  def train(msg, context):
    config, round_num, key = message_config(msg)
    x, y, num_classes = client_data(key, refs)
    arrays = flower.record_arrays(msg.content["arrays"])
    cid = _client_id(context)
    weights, n, loss_sum, hits = local_update(
      config, (key, x, y, num_classes), arrays, round_num, cid
    )
    metrics = {
      WEIGHT_KEY: n,
      UNIT_KEY: 1,
      "train_loss": loss_sum / max(n, 1),
      "train_accuracy": hits / max(n, 1),
      "tf_dlg.client": cid,
    }
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)

  return app
