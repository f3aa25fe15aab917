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

**Client roles.** Each client's data is `OrderedDict(batches=, role=)`; the role
(`tf_dlg.federated.client_work.role`) can make a client Byzantine inside the TFF
computation (see that module).

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
from tf_dlg.federated.client_work import build_client_work
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.federated.finalizer import build_finalizer, update_type


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
  return factory.create(update_type(weights_type), tff.TensorType(np.float32)), weighting


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
      build_client_work(model_fn, client_opt, weighting),
      agg_process,
      build_finalizer(server_opt, weights_type, num_trainable),
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
