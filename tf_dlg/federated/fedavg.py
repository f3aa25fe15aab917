"""FedAvg learning processes in TFF with robust aggregators, defences and BatchNorm sync.

`build_fedavg(input_shape, num_classes, FederatedConfig(...))` returns a `FedAvg` bundle
whose `process` is a `tff.learning.templates.LearningProcess`. It is composed (with
`tff.learning.templates.compose_learning_process`) from the same parts that
`tff.learning.algorithms.build_weighted_fed_avg` / `build_unweighted_fed_avg` use --
TFF's broadcast distributor, a model-delta client work, an aggregator, an
apply-optimizer finalizer -- with two changes in the client work and the finalizer:

**BatchNorm statistics.** In TFF 0.87 FedAvg aggregates only the *trainable* weights'
deltas (`model_delta_client_work` returns `initial.trainable - final.trainable`) and
`build_apply_optimizer_finalizer` copies the server's non-trainable weights unchanged,
so a BatchNorm model's moving mean/variance stay at their initial 0/1 on the server
forever, and evaluating the global model in inference mode normalises with the wrong
statistics. Here every client sends one flat list: the deltas of the trainable weights
(Keras `trainable_variables` order) followed by the deltas of the non-trainable weights
(`non_trainable_variables` order; for `bn_cnn` the BN moving statistics). The list goes
through the defence and the aggregator as a whole; the finalizer applies the server
optimizer to the trainable part and sets the non-trainable weights to
`server - aggregate(delta)`, i.e. the (weighted mean | median | trimmed mean) of the
clients' own moving statistics -- the "average all model state" rule of FedAvg.
Evaluation copies the whole server `ModelWeights` (both parts) into a Keras model and
runs it in inference mode, so it uses these averaged statistics. Defences see the
same list; `update_exclusion(keras_model)` marks the BN entries (moving statistics are
passed through untouched) in exactly that layout.

**Client roles.** Each client's data is `OrderedDict(batches=<tf.data of x/y batches>,
role=<one-element tf.data of ROLE_SPEC>)`. The role makes a client Byzantine inside the
TFF computation: `scale` multiplies its delta (e.g. x1000) and mode `random` replaces it
by Gaussian noise of the delta's RMS times `scale`. Malicious clients change what they
*train*, then their (honest) client software applies the defence. Honest clients have
mode 0, scale 1.

Weighting: `mean` is TFF's `MeanFactory` weighted by client example counts (as
`build_weighted_fed_avg`); `median` and `trimmed_mean` are unweighted (uniform client
weights, as `build_unweighted_fed_avg`) because an order statistic has no weights.

**Defences.** The configured defence is built once per run (`_probe`, with the BatchNorm
entries excluded) and enters through the TFF adapter
(`tf_dlg.federated.defense_aggregator.factory`): the very transform the attack
experiments apply, or, for a defence that needs the round's clients (`clipping_median`),
its own factory. Its parameter is part of the aggregator's state, not of the computation.

**One build, many runs.** A build fixes the model architecture, aggregator, defence
name and optimisers; the model seed (initial weights) and the defence parameter are
runtime inputs that `FedAvg.initialize()` writes into the state. `build_fedavg(...,
reuse=True)` therefore returns a view of an earlier build when only such settings (or
the data, partition, rounds, ...) differ; `build_count()` says how many TFF builds this
process made.

Importing this module leaves TFF's execution context alone.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tf_dlg import models as models_lib
from tf_dlg.federated import AGGREGATORS, OPTIMIZERS, defense_aggregator
from tf_dlg.federated import aggregators as aggregators_lib
from tf_dlg.federated.config import FederatedConfig

# Per-client role, one element of the `role` sequence.
ROLE_SPEC = collections.OrderedDict(
  mode=tf.TensorSpec([], tf.int32),  # 0 honest, 1 scale, 2 random
  scale=tf.TensorSpec([], tf.float32),
  seed=tf.TensorSpec([2], tf.int64),
)
_MODE_CODES = {"honest": 0, "scale": 1, "random": 2}


def role(mode: str = "honest", scale: float = 1.0, seed: int = 0) -> tf.data.Dataset:
  """The one-element role dataset for a client (`honest`, `scale` or `random`)."""
  if mode not in _MODE_CODES:
    raise ValueError(f"role mode={mode!r} must be one of {', '.join(_MODE_CODES)}.")
  element = collections.OrderedDict(
    mode=np.int32(_MODE_CODES[mode]),
    scale=np.float32(scale),
    seed=np.asarray([seed, 0x5EED], np.int64),
  )
  return tf.data.Dataset.from_tensors(element)


def build_optimizer(name: str, learning_rate: float):
  """A `tff.learning.optimizers` optimizer by name (`sgd`, `sgdm` (0.9), `adam`)."""
  if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
    raise ValueError(f"learning_rate={learning_rate!r} must be a number > 0.")
  if name == "sgd":
    return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)
  if name == "sgdm":
    return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate, momentum=0.9)
  if name == "adam":
    return tff.learning.optimizers.build_adam(learning_rate=learning_rate)
  raise ValueError(f"optimizer={name!r} must be one of {', '.join(OPTIMIZERS)}.")


def update_variables(keras_model: tf.keras.Model) -> List[tf.Variable]:
  """The variables behind each entry of a client's update, in update order."""
  return list(keras_model.trainable_variables) + list(keras_model.non_trainable_variables)


def update_exclusion(keras_model: tf.keras.Model) -> List[bool]:
  """Defence `exclude` mask for the update layout (True: a BatchNorm variable)."""
  from tf_dlg import defenses

  return list(defenses.batchnorm_exclusion(keras_model, update_variables(keras_model)))


def _inner_factory(name: str, trim_fraction: float):
  """(aggregation factory, client weighting) for an aggregator name."""
  if name == "mean":
    return tff.aggregators.MeanFactory(), tff.learning.ClientWeighting.NUM_EXAMPLES
  if name == "median":
    return aggregators_lib.median_factory(), tff.learning.ClientWeighting.UNIFORM
  if name == "trimmed_mean":
    return (
      aggregators_lib.trimmed_mean_factory(trim_fraction),
      tff.learning.ClientWeighting.UNIFORM,
    )
  raise ValueError(f"aggregator={name!r} must be one of {', '.join(AGGREGATORS)}.")


# --------------------------------------------------------------------------- client work


def _client_update_fn(model_fn, weighting):
  """The client's local training as a `tf.function` (after TFF's model_delta_client_work)."""
  model = model_fn()

  @tf.function
  def client_update(optimizer, hparams, initial_weights, batches, roles):
    weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial_weights)
    trainable = tuple(tf.nest.flatten(weights.trainable))

    def reduce_fn(state, batch):
      num_examples, opt_state = state
      with tf.GradientTape() as tape:
        output = model.forward_pass(batch, training=True)
      grads = tape.gradient(output.loss, trainable)
      opt_state, updated = optimizer.next(opt_state, trainable, grads)
      for v, u in zip(trainable, updated):
        v.assign(u)
      num_examples += tf.shape(output.predictions, out_type=tf.int64)[0]
      return num_examples, opt_state

    specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)
    opt_state = optimizer.set_hparams(optimizer.initialize(specs), hparams)
    # A loop over the dataset's iterator, not `batches.reduce`: ops inside a tf.data
    # reduce function run without the graph runtime's scheduling, which makes local
    # training about twice as slow (TFF's `use_experimental_simulation_loop` does the same).
    state = (tf.zeros([], tf.int64), opt_state)
    for batch in iter(batches):
      state = reduce_fn(state, batch)
    num_examples, _ = state

    initial = list(tf.nest.flatten(initial_weights.trainable)) + list(
      tf.nest.flatten(initial_weights.non_trainable)
    )
    final = list(tf.nest.flatten(weights.trainable)) + list(tf.nest.flatten(weights.non_trainable))
    delta = [a - b for a, b in zip(initial, final)]  # TFF sign: initial - final

    # Byzantine behaviour (honest: mode 0, scale 1 -> unchanged).
    r = roles.reduce(
      collections.OrderedDict(
        mode=tf.constant(0), scale=tf.constant(1.0), seed=tf.zeros([2], tf.int64)
      ),
      lambda _, x: x,
    )
    is_random = tf.cast(tf.equal(r["mode"], 2), tf.float32)
    out = []
    for i, d in enumerate(delta):
      rms = tf.sqrt(tf.reduce_mean(tf.square(d)))
      noise = tf.random.stateless_normal(tf.shape(d), seed=r["seed"] + i)
      out.append(r["scale"] * ((1.0 - is_random) * d + is_random * rms * noise))

    # As TFF: a non-finite update is zeroed and gets weight 0.
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(u)) for u in out])
    out = [tf.where(finite, u, tf.zeros_like(u)) for u in out]
    if weighting == tff.learning.ClientWeighting.NUM_EXAMPLES:
      weight = tf.cast(num_examples, tf.float32)
    else:
      weight = tf.constant(1.0)
    weight = tf.where(finite, weight, 0.0)
    if not finite:
      model.reset_metrics()
    return (
      tff.learning.templates.ClientResult(update=out, update_weight=weight),
      model.report_local_unfinalized_metrics(),
    )

  return client_update


def _build_client_work(model_fn, optimizer, weighting):
  """A `ClientWorkProcess` sending all weights' deltas (see the module docstring)."""
  with tf.Graph().as_default():
    model = model_fn()
    metrics_fn = tff.learning.metrics.sum_then_finalize(model.metric_finalizers())
  data_type = tff.types.to_type(
    collections.OrderedDict(
      batches=tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec)),
      role=tff.SequenceType(tff.types.tensorflow_to_type(ROLE_SPEC)),
    )
  )
  weights_type = tff.learning.models.weights_type_from_model(model)
  hparams = optimizer.get_hparams(optimizer.initialize(tf.TensorSpec([], tf.float32)))

  @tff.federated_computation
  def init_fn():
    return tff.federated_value(hparams, tff.SERVER)

  state_type = init_fn.type_signature.result.member

  @tff.tensorflow.computation(state_type, weights_type, data_type)
  def client_update(state, initial_weights, data):
    fn = _client_update_fn(model_fn, weighting)
    return fn(optimizer, state, initial_weights, data["batches"], data["role"])

  @tff.federated_computation(
    init_fn.type_signature.result,
    tff.FederatedType(weights_type, tff.CLIENTS),
    tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, data):
    result, model_outputs = tff.federated_map(
      client_update, (tff.federated_broadcast(state), weights, data)
    )
    measurements = tff.federated_zip(collections.OrderedDict(train=metrics_fn(model_outputs)))
    return tff.templates.MeasuredProcessOutput(state, result, measurements)

  @tff.tensorflow.computation(state_type)
  def get_hparams_fn(state):
    return state

  @tff.tensorflow.computation(state_type, state_type)
  def set_hparams_fn(state, new_hparams):
    del state
    return new_hparams

  return tff.learning.templates.ClientWorkProcess(
    init_fn, next_fn, get_hparams_fn=get_hparams_fn, set_hparams_fn=set_hparams_fn
  )


# --------------------------------------------------------------------------- finalizer


def _build_finalizer(optimizer, weights_type, num_trainable: int):
  """Server optimizer on the trainable part; non-trainable = server - aggregate delta."""
  trainable_type = weights_type.trainable
  update_type = _update_type(weights_type)

  @tff.tensorflow.computation
  def init_tf():
    return optimizer.initialize(tff.types.type_to_tf_tensor_specs(trainable_type))

  opt_state_type = init_tf.type_signature.result

  @tff.tensorflow.computation(opt_state_type, weights_type, update_type)
  @tf.function
  def next_tf(opt_state, weights, update):
    non_trainable = tf.nest.flatten(weights.non_trainable)
    update = list(update)
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(u)) for u in update])
    new_state, new_trainable = optimizer.next(
      opt_state,
      weights.trainable,
      tf.nest.pack_sequence_as(weights.trainable, update[:num_trainable]),
    )
    new_non_trainable = [w - u for w, u in zip(non_trainable, update[num_trainable:])]
    # The norm of the aggregated update of the trainable weights (what the server
    # optimizer receives), for the run's TensorBoard.
    measurements = collections.OrderedDict(
      update_non_finite=tf.cast(tf.logical_not(finite), tf.int32),
      update_norm=tf.linalg.global_norm(update[:num_trainable]),
    )
    if not finite:  # as TFF's reject_non_finite_update: keep the old model
      return opt_state, weights, measurements
    new_weights = tff.learning.models.ModelWeights(
      new_trainable, tf.nest.pack_sequence_as(weights.non_trainable, new_non_trainable)
    )
    return new_state, new_weights, measurements

  @tff.federated_computation
  def init_fn():
    return tff.federated_eval(init_tf, tff.SERVER)

  @tff.federated_computation(
    init_fn.type_signature.result,
    tff.FederatedType(weights_type, tff.SERVER),
    tff.FederatedType(update_type, tff.SERVER),
  )
  def next_fn(state, weights, update):
    new_state, new_weights, measurements = tff.federated_map(next_tf, (state, weights, update))
    return tff.templates.MeasuredProcessOutput(new_state, new_weights, measurements)

  @tff.tensorflow.computation(opt_state_type)
  def get_hparams_fn(state):
    return optimizer.get_hparams(state)

  @tff.tensorflow.computation(opt_state_type, get_hparams_fn.type_signature.result)
  def set_hparams_fn(state, hparams):
    return optimizer.set_hparams(state, hparams)

  return tff.learning.templates.FinalizerProcess(
    init_fn, next_fn, get_hparams_fn=get_hparams_fn, set_hparams_fn=set_hparams_fn
  )


def _update_type(weights_type):
  """TFF type of a client update: [trainable..., non_trainable...] as a list."""
  leaves = list(weights_type.trainable) + list(weights_type.non_trainable)
  return tff.types.to_type([t for t in leaves])


# --------------------------------------------------------------------------- builder


# Settings a build does not bake in: the data and schedule (clients' datasets and roles
# are inputs), and the runtime inputs `FedAvg.initialize` sets. Every other field keys
# a build, so a field added to FederatedConfig is safe (never wrongly shared) by default.
_RUNTIME_FIELDS = (
  "dataset",
  "data_dir",
  "partition",
  "alpha",
  "classes_per_client",
  "num_clients",
  "clients_per_round",
  "rounds",
  "defense_param",
  "malicious_clients",
  "malicious_mode",
  "malicious_scale",
  "local_epochs",
  "batch_size",
  "seed",
  "capture_round",
  "capture_client",
)
_CACHE_SIZE = 8  # builds kept for reuse (least recently used dropped)
_builds: "collections.OrderedDict[tuple, FedAvg]" = collections.OrderedDict()
_build_count = 0


def build_count() -> int:
  """TFF processes built in this Python process (capture variants not counted)."""
  return _build_count


def build_key(input_shape: Sequence[int], num_classes: int, config: FederatedConfig) -> tuple:
  """What identifies a build: model shape and the config fields baked into it."""
  fields = dataclasses.asdict(config)
  baked = tuple(sorted((k, v) for k, v in fields.items() if k not in _RUNTIME_FIELDS))
  return (tuple(int(d) for d in input_shape), int(num_classes), baked)


@dataclasses.dataclass
class FedAvg:
  """A built FedAvg process and what a simulation needs to drive and read it.

  Attributes:
    process: The `tff.learning.templates.LearningProcess`.
    keras_model_fn: No-arg function returning a fresh (uncompiled) Keras model.
    input_shape, num_classes: Model input and head.
    num_trainable: Number of leading update entries that are trainable weights.
    config: The `FederatedConfig` it was built from (also read through the properties
      `model_name`, `aggregator`, `client_optimizer`, `client_learning_rate`,
      `batch_size`, `local_epochs`).
    defense: The `tf_dlg.defenses.Defense` every client applies (BatchNorm entries
      excluded), or None.
    capture_process: Same algorithm, whose `aggregator` metrics also hold every
      client's (defended) update (`client_values`); built on first use.
  """

  process: Any
  keras_model_fn: Callable[[], tf.keras.Model]
  input_shape: tuple
  num_classes: int
  num_trainable: int
  config: FederatedConfig
  defense: Any = None
  _build_capture: Callable[[], Any] = dataclasses.field(repr=False, default=None)
  _capture_process: Any = dataclasses.field(repr=False, default=None)

  model_name = property(lambda self: self.config.model)
  aggregator = property(lambda self: self.config.aggregator)
  client_optimizer = property(lambda self: self.config.client_optimizer)
  client_learning_rate = property(lambda self: float(self.config.client_lr))
  batch_size = property(lambda self: int(self.config.batch_size))
  local_epochs = property(lambda self: int(self.config.local_epochs))

  @property
  def capture_process(self):
    if self._capture_process is None:
      self._capture_process = self._build_capture()
    return self._capture_process

  def initialize(self):
    """The process's initial state for this bundle's `config`.

    The model's initial weights are those of `config.seed` and the defence parameter
    is `config.defense_param`, whichever configuration the process was built for.
    """
    state = self.process.initialize()
    keras_model = self.keras_model_fn()
    state = self.process.set_model_weights(
      state, tff.learning.models.ModelWeights.from_model(keras_model)
    )
    if self.defense is not None:
      aggregator = defense_aggregator.initial_state(state.aggregator, self.defense.param)
      state = state._replace(aggregator=aggregator)
    return state

  def for_config(self, config: FederatedConfig) -> "FedAvg":
    """This build as the bundle of `config`, which may differ in runtime settings only."""
    if build_key(self.input_shape, self.num_classes, config) != build_key(
      self.input_shape, self.num_classes, self.config
    ):
      raise ValueError(
        "for_config: the configuration differs from the build's in a setting baked into "
        "the TFF computation; build it with build_fedavg."
      )
    keras_model_fn = _keras_model_fn(config, self.input_shape, self.num_classes)
    _, defense = _probe(keras_model_fn, config)
    view = dataclasses.replace(
      self, keras_model_fn=keras_model_fn, config=config, defense=defense, _capture_process=None
    )
    # The capture variant is built once, on first use by any view.
    view._build_capture = lambda: self.capture_process
    return view

  def assign_to_keras(self, model_weights, keras_model: tf.keras.Model) -> None:
    """Copies TFF `ModelWeights` (both parts) into `keras_model`."""
    if not isinstance(model_weights, tff.learning.models.ModelWeights):
      model_weights = tff.learning.models.ModelWeights(*model_weights)
    model_weights.assign_weights_to(keras_model)


def _keras_model_fn(config: FederatedConfig, input_shape: tuple, num_classes: int):
  """A no-arg function building the (uncompiled) Keras model of `config`."""

  def keras_model_fn():
    keras_model = models_lib.build_model(config.model, input_shape, num_classes, seed=config.seed)
    if config.bn_momentum is not None:
      for layer, _ in models_lib.batchnorm_variables(keras_model):
        layer.momentum = float(config.bn_momentum)  # read at call time, so this takes effect
    return keras_model

  return keras_model_fn


def _tff_model_fn(keras_model_fn, input_shape: tuple):
  """A no-arg function wrapping a fresh Keras model as a TFF model."""
  spec = models_lib.input_spec(input_shape)

  def model_fn():
    with warnings.catch_warnings():
      # TFF warns that BN statistics "won't be updated during training"; this module
      # is precisely what sends and averages them (see the module docstring).
      warnings.filterwarnings("ignore", message="Batch Normalization contains")
      return tff.learning.models.from_keras_model(
        keras_model_fn(),
        input_spec=spec,
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
      )

  return model_fn


def _probe(keras_model_fn, config: FederatedConfig):
  """(number of trainable variables, the clients' defence or None) of the model."""
  probe = keras_model_fn()
  for v in probe.non_trainable_variables:
    if not v.dtype.is_floating:
      raise TypeError(
        f"Non-trainable variable {v.name} has dtype {v.dtype.name}; "
        "FedAvg here averages non-trainable weights, which must be float."
      )
  defense = None if config.defense == "none" else config.build_defense(update_exclusion(probe))
  return len(probe.trainable_variables), defense


def _aggregation_process(config: FederatedConfig, weights_type, defense, capture: bool):
  """(aggregation process over the update list, client weighting) of `config`."""
  factory, weighting = _inner_factory(config.aggregator, config.trim_fraction)
  if capture:
    # Inside the defence, so it records exactly what the defence outputs.
    factory = aggregators_lib.capture_factory(factory)
  if defense is not None:
    factory = defense_aggregator.factory(defense, factory)
  if isinstance(factory, tff.aggregators.UnweightedAggregationFactory):
    factory = tff.aggregators.as_weighted_aggregator(factory)
  return factory.create(_update_type(weights_type), tff.TensorType(np.float32)), weighting


def build_fedavg(
  input_shape: Sequence[int],
  num_classes: int,
  config: Optional[FederatedConfig] = None,
  reuse: bool = False,
  **overrides,
) -> FedAvg:
  """Builds FedAvg over a `tf_dlg.models` Keras model.

  Args:
    input_shape, num_classes: Data shape (H, W, C) and class count.
    config: A `FederatedConfig` (default: `FederatedConfig()`); its model, seed,
      aggregator, defence and optimisers define the process (the client data decides
      batches and epochs).
    reuse: Return a view (`FedAvg.for_config`) of an earlier build of this process
      with the same `build_key` instead of building anew.
    **overrides: `FederatedConfig` fields replacing those of `config`
      (`dataclasses.replace`: a misspelt name raises TypeError naming it).

  Returns:
    A `FedAvg` bundle.
  """
  global _build_count
  config = dataclasses.replace(config or FederatedConfig(), **overrides)
  input_shape = tuple(int(d) for d in input_shape)
  key = build_key(input_shape, num_classes, config)
  if reuse and key in _builds:
    _builds.move_to_end(key)
    return _builds[key].for_config(config)
  keras_model_fn = _keras_model_fn(config, input_shape, num_classes)
  model_fn = _tff_model_fn(keras_model_fn, input_shape)
  num_trainable, defense = _probe(keras_model_fn, config)
  client_opt = build_optimizer(config.client_optimizer, config.client_lr)
  server_opt = build_optimizer(config.server_optimizer, config.server_lr)

  @tff.tensorflow.computation
  def initial_weights_fn():
    return tff.learning.models.ModelWeights.from_model(model_fn())

  weights_type = initial_weights_fn.type_signature.result

  def compose(capture: bool):
    agg_process, weighting = _aggregation_process(config, weights_type, defense, capture)
    return tff.learning.templates.compose_learning_process(
      initial_weights_fn,
      tff.learning.templates.build_broadcast_process(weights_type),
      _build_client_work(model_fn, client_opt, weighting),
      agg_process,
      _build_finalizer(server_opt, weights_type, num_trainable),
    )

  fa = FedAvg(
    process=compose(False),
    keras_model_fn=keras_model_fn,
    input_shape=input_shape,
    num_classes=num_classes,
    num_trainable=num_trainable,
    config=config,
    defense=defense,
    _build_capture=lambda: compose(True),
  )
  _build_count += 1
  _builds[key] = fa
  while len(_builds) > _CACHE_SIZE:
    _builds.popitem(last=False)
  return fa
