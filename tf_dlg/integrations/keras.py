"""The Keras adapter of the defences: train a Keras model on defended gradients (`fit`).

    from tf_dlg.defenses import get_defense
    from tf_dlg.integrations.keras import DefendedModel

    model = DefendedModel(my_keras_model, get_defense("masking", 0.5), seed=0)
    model.compile(optimizer="sgd", loss=..., metrics=[...])
    model.fit(x, y, epochs=...)

Every training step computes the gradient of the batch loss, applies the defence to it
-- the same `tf_dlg.defenses.Defense` object the attack experiments and the TFF
aggregators use -- and hands the *defended* gradient to the optimizer. The defence's
seed is `batch_seed(step, x)`: `step_seed(step) = fold_in([seed, 0x5EED],
optimizer.iterations)` folded with a fingerprint of the step's inputs and the model's
weights before it (`base.value_fingerprint`; the TFF adapter folds in each client's
value the same way). So every step draws fresh masks / noise, and clients that share the
default seed (other data) -- or a client whose optimizer restarts each round (other
weights) -- still draw different ones: with one seed for all, two clients' defended
updates would differ exactly as their clean ones do, and the noise would cancel.
Reproducible: the same seed, step, batch and weights give the same draw. (Inputs and
weights, not the gradient: a gradient can differ in its last bit between eager and graph
execution, and its fingerprint with it.)

BatchNorm: with `exclude="auto"` (default) the defence's own `exclude` is used if it has
one, else the model's BatchNorm gamma/beta gradients are passed through untouched
(`batchnorm_exclusion` over `trainable_variables`; the moving statistics have no
gradient and are updated by the forward pass as usual). `exclude="batchnorm"` forces
that, `None` defends every gradient, and a list of bools over `trainable_variables`
is used as given.

The defence sees one step's gradient, which is what a DLG attacker observes of a
client that shares gradients (FedSGD); for FedAvg-style updates use the TFF factory
(`tf_dlg.federated.defense_aggregator`). Notes: a variable without a gradient is skipped (its entry stays
None); sparse (`IndexedSlices`) gradients are densified; with a
`tf.keras.mixed_precision.LossScaleOptimizer` the defence acts on the unscaled
gradient and is skipped on the non-finite steps that the optimizer itself skips; under
a `tf.distribute` strategy each replica defends its own gradient before the all-reduce.
Otherwise a non-finite gradient raises (as every defence does).

`DefenseTrainStepMixin` gives the same `train_step` to your own `tf.keras.Model`
subclass (call `set_defense(...)` in its `__init__`); `defended_gradients(...)` is the
function behind both, for custom training loops.

What a FedAvg client sends is its weights after `fit`, not each gradient:
`defend_weights_delta(before, after, defense, seed)` defends that delta (and reports
`update_statistics`), and the `DefendUpdate` callback applies it at the end of `fit`;
its seed is `seed` folded with the delta's fingerprint, so clients and rounds differ
under one seed here too.
All of it runs on Keras 2 (TF 2.14) and Keras 3 (TF 2.16+, `tf.keras` is Keras 3).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_dlg import defenses
from tf_dlg.defenses import base, batchnorm

_EXCLUDE_MODES = ("auto", "batchnorm")


def defended_gradients(
  defense: base.Defense, gradients: Sequence[Any], seed, exclude: Optional[Sequence[bool]] = None
) -> List[Any]:
  """Applies `defense` to a list of gradients (one per variable); None entries stay None.

  Args:
    defense: A `tf_dlg.defenses.Defense`.
    gradients: As from `tape.gradient(loss, variables)`: tensors, `IndexedSlices`
      (densified) or None (variables without a gradient; skipped).
    seed: An int or a shape-[2] integer tensor (e.g. `step_seed`).
    exclude: Optional bools, one per gradient, overriding `defense.exclude`.

  Returns:
    The defended gradients, in order, with the None entries kept.
  """
  gradients = list(gradients)
  if exclude is None:
    exclude = defense.exclude
  if exclude is not None:
    exclude = [bool(e) for e in exclude]
    if len(exclude) != len(gradients):
      raise ValueError(
        f"exclude has {len(exclude)} entries but there are {len(gradients)} gradients."
      )
  present = [i for i, g in enumerate(gradients) if g is not None]
  if not present:
    return gradients
  # The present gradients' own exclusion, passed in (nothing excluded: all False).
  exclude = [False] * len(present) if exclude is None else [exclude[i] for i in present]
  tensors = [tf.convert_to_tensor(gradients[i]) for i in present]
  defended = defense.apply(tensors, defense.param, seed, exclude)
  out = list(gradients)
  for i, g in zip(present, defended):
    out[i] = g
  return out


# Keras 2 (TF <= 2.15) and Keras 3 (TF >= 2.16) spell loss scaling differently: Keras 2's
# LossScaleOptimizer takes unscaled gradients, Keras 3's takes scaled ones and unscales
# (and skips non-finite steps) itself.
def _scaled_loss(optimizer, loss):
  if hasattr(optimizer, "get_scaled_loss"):
    return optimizer.get_scaled_loss(loss)
  return optimizer.scale_loss(loss)


def _unscaled(optimizer, grads):
  if hasattr(optimizer, "get_unscaled_gradients"):
    return optimizer.get_unscaled_gradients(grads)
  return [None if g is None else tf.convert_to_tensor(g) / _loss_scale(optimizer) for g in grads]


def _rescaled(optimizer, grads):
  if hasattr(optimizer, "get_unscaled_gradients"):
    return grads
  return [None if g is None else g * _loss_scale(optimizer) for g in grads]


def _loss_scale(optimizer):
  # As Keras 3's `scale_loss`: the initial scale until the first step builds the optimizer.
  scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
  return tf.cast(scale, tf.float32)


def _track_loss(model, loss, x) -> None:
  """Keras 3: feed the step's loss to `fit`'s loss tracker, as its own `train_step` does.

  Keras 2's `compute_loss` updates its compiled loss metric itself; Keras 3's does not,
  and without this `fit` reports loss 0.0 (so `EarlyStopping(monitor="loss")` stops at
  once). The loss is unscaled by the replica count as Keras 3 does under `tf.distribute`.
  """
  tracker = getattr(model, "_loss_tracker", None)
  if tracker is None:
    return
  replicas = tf.distribute.get_strategy().num_replicas_in_sync
  batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
  tracker.update_state(loss * tf.cast(replicas, loss.dtype), sample_weight=batch)


def _saving():
  """`keras.saving` of the Keras that `tf.keras` is (TF 2.16+'s `tf.keras` lacks it)."""
  saving = getattr(tf.keras, "saving", None)
  if saving is None:
    import keras

    saving = keras.saving
  return saving


class DefenseTrainStepMixin:
  """A `train_step` that defends the gradient; mix into a `tf.keras.Model` subclass.

  class MyModel(DefenseTrainStepMixin, tf.keras.Model):
    def __init__(self, ...):
      super().__init__()
      ...
      self.set_defense(get_defense("noising", 1e-3), seed=0)
  """

  def set_defense(self, defense: base.Defense, seed: int = 0, exclude="auto") -> None:
    """Sets the defence, its base seed and the exclusion (see the module docstring)."""
    if not isinstance(defense, base.Defense):
      raise TypeError(f"defense must be a tf_dlg.defenses.Defense, got {type(defense).__name__}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
      raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    if isinstance(exclude, str):
      if exclude not in _EXCLUDE_MODES:
        raise ValueError(
          f"exclude={exclude!r} must be one of {', '.join(_EXCLUDE_MODES)}, "
          "None or a list of bools."
        )
    elif exclude is not None:
      exclude = [bool(e) for e in exclude]
    self._defense = defense
    self._defense_seed = int(seed)
    self._defense_exclude = exclude

  @property
  def defense(self) -> base.Defense:
    return self._defense

  @property
  def defense_seed(self) -> int:
    return self._defense_seed

  def gradient_exclusion(self) -> Optional[List[bool]]:
    """The exclusion over `trainable_variables` that the training step uses."""
    mode = self._defense_exclude
    if mode == "auto" and self._defense.exclude is not None:
      return list(self._defense.exclude)
    if mode in _EXCLUDE_MODES:
      return batchnorm.batchnorm_exclusion(self, self.trainable_variables)
    return None if mode is None else list(mode)

  def step_seed(self, step) -> tf.Tensor:
    """The defence's seed at optimizer step `step` (0 for the first training step)."""
    return tf.random.experimental.stateless_fold_in(
      base.as_seed(self._defense_seed), tf.cast(step, tf.int64)
    )

  def batch_seed(self, step, x) -> tf.Tensor:
    """The defence's seed at `step` on inputs `x`: `step_seed(step)` folded with the
    fingerprint of `x`'s numeric tensors and the current trainable weights."""
    inputs = [t for t in tf.nest.flatten(x) if t is not None and tf.as_dtype(t.dtype).is_numeric]
    return base.folded_seed(self.step_seed(step), inputs + list(self.trainable_variables))

  def train_step(self, data):
    x, y, sample_weight = tf.keras.utils.unpack_x_y_sample_weight(data)
    seed = self.batch_seed(self.optimizer.iterations, x)
    loss_scale = isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    with tf.GradientTape() as tape:
      y_pred = self(x, training=True)
      loss = self.compute_loss(x, y, y_pred, sample_weight)
      scaled = _scaled_loss(self.optimizer, loss) if loss_scale else loss
    _track_loss(self, loss, x)
    variables = self.trainable_variables
    grads = tape.gradient(scaled, variables)
    if loss_scale:
      grads = _unscaled(self.optimizer, grads)
    exclude = self.gradient_exclusion()

    def defend():
      return defended_gradients(self._defense, grads, seed, exclude)

    if loss_scale:
      present = [i for i, g in enumerate(grads) if g is not None]
      finite = tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(grads[i]))) for i in present]
      )
      dense = [tf.convert_to_tensor(grads[i]) for i in present]

      def defend_present():
        out = defend()
        return [out[i] for i in present]

      chosen = tf.cond(finite, defend_present, lambda: dense)
      grads = list(grads)
      for i, g in zip(present, chosen):
        grads[i] = g
      grads = _rescaled(self.optimizer, grads)
    else:
      grads = defend()
    self.optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
    return self.compute_metrics(x, y, y_pred, sample_weight)

  def defense_config(self) -> Dict[str, Any]:
    exclude = self._defense_exclude
    if exclude == "auto" and self._defense.exclude is not None:
      exclude = list(self._defense.exclude)
    return {"defense": self._defense.get_config(), "seed": self._defense_seed, "exclude": exclude}


@tf.keras.utils.register_keras_serializable(package="tf_dlg")
class DefendedModel(DefenseTrainStepMixin, tf.keras.Model):
  """Wraps a Keras model so that `fit` trains it on defended gradients.

  Args:
    model: Any Keras model; `DefendedModel` calls it and trains its variables (they are
      the same variable objects, so `model` itself is trained).
    defense: A `tf_dlg.defenses.Defense` (e.g. `get_defense("masking", 0.5)`).
    seed: Base seed of the per-step defence seeds (`step_seed`).
    exclude: "auto" (default), "batchnorm", None or a list of bools over
      `model.trainable_variables` (see the module docstring).

  `get_config()` holds the inner model's serialisation, the defence's `get_config()`,
  the seed and the exclusion, so `model.save("m.keras")` / `tf.keras.models.load_model`
  round-trip it.
  """

  def __init__(
    self, model: tf.keras.Model, defense: base.Defense, seed: int = 0, exclude="auto", **kwargs
  ):
    super().__init__(**kwargs)
    if not isinstance(model, tf.keras.Model):
      raise TypeError(f"model must be a tf.keras.Model, got {type(model).__name__}.")
    self.model = model
    self.set_defense(defense, seed, exclude)

  def call(self, inputs, training=None):
    return self.model(inputs, training=training)

  def gradient_exclusion(self) -> Optional[List[bool]]:
    if self._defense_exclude in _EXCLUDE_MODES and not (
      self._defense_exclude == "auto" and self._defense.exclude is not None
    ):
      return batchnorm.batchnorm_exclusion(self.model, self.trainable_variables)
    return super().gradient_exclusion()

  def get_config(self):
    return dict(
      model=_saving().serialize_keras_object(self.model),
      **self.defense_config(),
      name=self.name,
    )

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    model = _saving().deserialize_keras_object(config.pop("model"), custom_objects=custom_objects)
    defense = defenses.defense_from_config(config.pop("defense"))
    return cls(model, defense, **config)


def update_statistics(
  defense: base.Defense, update: Sequence[Any], defended: Sequence[Any], exclude=None
) -> Dict[str, float]:
  """What a defence did to one update, over the tensors it transforms (not excluded).

  `zero_fraction`: exact zeros in the defended update (masking / pruning); `clip_scale`:
  the factor its norm was scaled by (1.0 = not clipped); `norm` / `defended_norm`: L2
  norms before and after. `exclude`: in place of `defense.exclude` (None: its own).
  """
  kept = defense.kept_indices(len(update), exclude)
  before = [tf.convert_to_tensor(update[i]) for i in kept]
  after = [tf.convert_to_tensor(defended[i]) for i in kept]
  return {
    "zero_fraction": float(base.zero_fraction(after)) if after else 0.0,
    "clip_scale": float(defense.clip_scale(list(update), exclude=exclude)),
    "norm": float(base.global_norm(before)),
    "defended_norm": float(base.global_norm(after)),
  }


def defend_weights_delta(
  before: Sequence[Any], after: Sequence[Any], defense: base.Defense, seed=0, exclude=None
):
  """Defends what a client sends after local training: `before + defense(after - before)`.

  Args:
    before: The weights the client received, e.g. `model.get_weights()` before `fit`.
    after: Its weights after local training, in the same order and shapes.
    defense: A `tf_dlg.defenses.Defense`.
    seed: An int or shape-[2] integer seed; it is folded with the delta's fingerprint
      (`base.folded_seed`), so clients and rounds sharing a seed still draw differently.
    exclude: Optional bools, one per weight, overriding `defense.exclude` (e.g.
      `batchnorm_exclusion(model, model.weights)` passes BatchNorm variables through).

  Returns:
    `(weights, statistics)`: the defended weights as float arrays in `after`'s dtypes,
    and `update_statistics` of the delta.
  """
  before, after = list(before), list(after)
  if len(before) != len(after):
    raise ValueError(f"before has {len(before)} weights but after has {len(after)}.")
  for i, (b, a) in enumerate(zip(before, after)):
    if np.shape(b) != np.shape(a):
      raise ValueError(f"weight {i}: shape {np.shape(b)} before but {np.shape(a)} after.")
  delta = [np.asarray(a, np.float32) - np.asarray(b, np.float32) for b, a in zip(before, after)]
  seed = base.folded_seed(seed, delta)
  defended = [t.numpy() for t in defense.apply(delta, defense.param, seed, exclude)]
  weights = [
    (np.asarray(b, np.float32) + t).astype(np.asarray(a).dtype)
    for b, a, t in zip(before, after, defended)
  ]
  return weights, update_statistics(defense, delta, defended, exclude)


class DefendUpdate(tf.keras.callbacks.Callback):
  """A `fit` callback: the model ends training at `before + defense(after - before)`.

  What the client sends (its weights, or their delta) then carries the defence, as in
  federated averaging, where the server sees one update per round rather than each
  gradient (`DefendedModel` defends those). `exclude="batchnorm"` (default) passes the
  BatchNorm variables through; None defends every weight; a list of bools over
  `model.weights` is used as given. `statistics` holds the last `update_statistics`.

      cb = DefendUpdate(get_defense("masking", 0.5), seed=round_seed)
      model.fit(x, y, epochs=1, callbacks=[cb])
  """

  def __init__(self, defense: base.Defense, seed=0, exclude="batchnorm"):
    super().__init__()
    if not isinstance(defense, base.Defense):
      raise TypeError(f"defense must be a tf_dlg.defenses.Defense, got {type(defense).__name__}.")
    if isinstance(exclude, str) and exclude != "batchnorm":
      raise ValueError(f"exclude={exclude!r} must be 'batchnorm', None or a list of bools.")
    self.defense = defense
    self.seed = seed
    self.exclude = exclude
    self.statistics: Dict[str, float] = {}
    self._before = None

  def on_train_begin(self, logs=None):
    self._before = self.model.get_weights()

  def on_train_end(self, logs=None):
    exclude = self.exclude
    if exclude == "batchnorm":
      exclude = batchnorm.batchnorm_exclusion(self.model, self.model.weights)
    weights, self.statistics = defend_weights_delta(
      self._before, self.model.get_weights(), self.defense, self.seed, exclude
    )
    self.model.set_weights(weights)
