"""The client's local training, simulated by the attacker with the client's own optimizer.

The FedAvg-delta threat model (`threat_model.ObservedUpdate`) lets the attacker know the
client's optimizer, learning rate, batch size and local steps. `functional.fedavg_delta`
simulates plain SGD; a client that trains with Adam (the project's FedAvg default) sends
`lr * m / (sqrt(v) + eps)` summed over its steps, which is not a scaled gradient: after
one step it is close to `lr * sign(gradient)`. Here the attacker runs the client's own
`tff.learning.optimizers` optimizer (any object with its `initialize(specs)` /
`next(state, weights, gradients)` interface) on per-attack copies of the weights, so
Adam, momentum and SGD are simulated exactly as TFF's client work applies them.

`match_gallery` is `tf_dlg.attacks.gallery.match_gallery` for such updates: every gallery
candidate's own update (the candidate alone, trained for `steps` local steps with the
client's optimizer, BatchNorm in training mode on its own statistics) scored by the
masked cosine against each observed update, streamed in chunks, with the gallery
module's scoring and ranking (ties against the attacker).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import List, Sequence

import numpy as np
import tensorflow as tf

from tf_dlg import validation
from tf_dlg.attacks import functional, gallery


@dataclasses.dataclass(frozen=True)
class ClientTraining:
  """What the attacker knows of the client's local training (the FedAvg threat model).

  `optimizer` is a `tf_dlg.federated.fedavg.build_optimizer` name (`sgd`, `sgdm`, `adam`).
  """

  optimizer: str
  learning_rate: float
  steps: int = 1
  batch_size: int = 1

  def __post_init__(self):
    validation.check_int("steps", self.steps, 1)
    validation.check_int("batch_size", self.batch_size, 1)

  def build(self):
    """The client's `tff.learning.optimizers` optimizer."""
    from tf_dlg.federated import fedavg

    return fedavg.build_optimizer(self.optimizer, self.learning_rate)


# Weight of the BatchNorm prior beside the cosine distance (range 0-2); see
# `batchnorm_prior`.
BN_WEIGHT = 1e-2


def _tile(weights, copies):
  return [
    tf.tile(w[None], tf.concat([[copies], tf.ones([len(w.shape)], tf.int32)], 0)) for w in weights
  ]


class _Spec:
  """A tensor spec whose shape may be a tensor (a leaf to `tf.nest`, unlike a tuple)."""

  def __init__(self, shape, dtype):
    self.shape, self.dtype = shape, dtype


def local_update(fmodel, weights, x, labels, steps: int, batch_size: int, optimizer):
  """Per-attack `initial - final` weights after `steps` local steps of `optimizer`.

  Args:
    fmodel: A `functional.BatchedModel`.
    weights: Per-attack trainable weights, each [A, ...] (static shapes).
    x: Images [A, N, H, W, C]; labels: [A, N, K] (one-hot or soft).
    steps: Local steps; step t trains on `functional.batch_indices(t, N, batch_size)`.
    optimizer: A `tff.learning.optimizers.Optimizer` (elementwise state, so each attack's
      copy trains on its own), e.g. `tf_dlg.federated.fedavg.build_optimizer("adam", lr)`.
  """
  n = int(x.shape[1])
  current = tuple(weights)
  # The optimizers build their state as zeros of each spec's shape; a shape tensor lets the
  # attack axis stay unknown when traced (the attack engine relaxes it).
  state = optimizer.initialize(tuple(_Spec(tf.shape(w), w.dtype) for w in current))
  for step in range(int(steps)):
    idx = functional.batch_indices(step, n, batch_size)
    if len(idx) == n and np.all(idx == np.arange(n)):
      xb, yb = x, labels
    else:
      xb, yb = tf.gather(x, idx, axis=1), tf.gather(labels, idx, axis=1)
    grads = functional.client_gradients(fmodel, list(current), xb, yb)
    state, current = optimizer.next(state, current, tuple(grads))
  return [w0 - w for w0, w in zip(weights, current)]


def attack_model(model):
  """`model` with every plain ReLU layer as an `Activation("relu")` (same function).

  `functional.BatchedModel` runs a ReLU layer by calling the Keras layer, and after TFF
  has built its computations in this process that call fails inside a compiled function
  (Keras 2.14 takes the layer for a graph-mode v1 layer); `Activation` runs `tf.nn.relu`.
  """
  import tensorflow as tf

  kl = tf.keras.layers

  def plain(layer):
    cfg = layer.get_config() if isinstance(layer, kl.ReLU) else None
    if (
      cfg
      and not cfg.get("max_value")
      and not cfg.get("negative_slope")
      and not cfg.get("threshold")
    ):
      return kl.Activation("relu", name=layer.name)
    return layer.__class__.from_config(layer.get_config())

  if not any(isinstance(layer, kl.ReLU) for layer in model.layers):
    return model
  clone = tf.keras.models.clone_model(model, clone_function=plain)
  clone.set_weights(model.get_weights())
  return clone


# One compiled candidate function per (architecture, steps, optimizer, chunk): weights are
# arguments, so every round of a training (a new Keras model each) reuses one compilation.
_COMPILED: "collections.OrderedDict" = collections.OrderedDict()
_MAX_COMPILED = 16


def _candidate_fn(model, training: ClientTraining, chunk: int):
  from tf_dlg.attacks import compile_cache

  key = (compile_cache.architecture_key(model), training, int(chunk))
  if key not in _COMPILED:
    fmodel = functional.BatchedModel(model)
    steps, optimizer = training.steps, training.build()

    def compute(weights, images, labels):
      tiled = _tile(weights, chunk)
      y = tf.one_hot(labels, fmodel.num_classes)[:, None]
      delta = local_update(fmodel, tiled, images[:, None], y, steps, 1, optimizer)
      return tf.concat([tf.reshape(d, [chunk, -1]) for d in delta], axis=1)

    _COMPILED[key] = (fmodel, tf.function(compute, jit_compile=True))
    while len(_COMPILED) > _MAX_COMPILED:
      _COMPILED.popitem(last=False)
  return _COMPILED[key]


def candidate_updates(model, model_weights, images, labels, training, chunk: int = 500):
  """Yields (start, stop, [c, P] updates) of every candidate trained alone by `training`
  (a `ClientTraining`; its batch size is the candidate's, 1). `model_weights` is a
  `model.get_weights()` list."""
  fmodel, fn = _candidate_fn(model, dataclasses.replace(training, batch_size=1), chunk)
  weights = [tf.constant(w, tf.float32) for w in fmodel.trainable_weights_from(model_weights)]
  n = len(images)
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    # Pad the last chunk: one compiled shape for the whole gallery.
    idx = np.minimum(np.arange(start, start + chunk), n - 1)
    g = fn(weights, tf.constant(images[idx], tf.float32), tf.constant(labels[idx], tf.int64))
    yield start, stop, g.numpy()[: stop - start]


def match_gallery(
  model,
  model_weights,
  observed: Sequence[Sequence[np.ndarray]],
  gallery_images,
  gallery_labels,
  members: Sequence[Sequence[int]],
  training: ClientTraining,
  chunk: int = 500,
) -> List[gallery.MatchResult]:
  """Ranks each observed update's members among the gallery, candidates trained alone.

  Args:
    model: A Keras model of the observed architecture.
    model_weights: `get_weights()` of the global model every observation started from.
    observed: Per observation, the (defended) update of the trainable weights, one array
      per `model.trainable_variables`.
    gallery_images / gallery_labels: [N, H, W, C] in [0, 1] and [N] integers.
    members: Per observation, the gallery indices of the client's own examples (for
      scoring only).
    training: The client's optimizer and local steps each candidate is trained for (the
      client's, or fewer when the caller bounds the simulation's cost).
  """
  validation.check_int("chunk", chunk, 1, 100_000)
  images = np.asarray(gallery_images, np.float32)
  glabels = np.asarray(gallery_labels, np.int64)
  if len(members) != len(observed):
    raise ValueError(f"members has {len(members)} entries for {len(observed)} observed updates.")
  flat = np.stack([np.concatenate([np.ravel(u) for u in o]).astype(np.float32) for o in observed])
  observed_t = tf.constant(flat)
  carried_t = tf.constant((flat != 0).astype(np.float32))
  scores = np.empty((len(images), len(observed)), np.float32)
  for start, stop, g in candidate_updates(model, model_weights, images, glabels, training, chunk):
    # The gallery attacker's own scoring: masked cosine on the carried coordinates.
    scores[start:stop] = gallery.masked_cosine_scores(tf.constant(g), observed_t, carried_t).numpy()
  used = np.broadcast_to(glabels[:, None], scores.shape)
  return [gallery.match_result(scores[:, j], used[:, j], members[j]) for j in range(len(observed))]


def _problem_consts(fmodel, model, observed, labels, statistics):
  """The per-observation constants of `reconstruct`'s problems (slot axis first)."""
  # The variables' values, not `get_weights()`: after TFF has traced in this process,
  # Keras 2.14 takes `get_weights` on this model for a v1 graph model and fails.
  weights = [np.asarray(v.numpy(), np.float32) for v in model.trainable_variables]
  u = len(observed)
  consts = {
    "weights": [np.repeat(w[None], u, 0) for w in weights],
    "observed": [
      np.stack([np.asarray(o[i], np.float32) for o in observed]) for i in range(len(weights))
    ],
    "labels": np.eye(fmodel.num_classes, dtype=np.float32)[np.asarray(labels, np.int64)],
  }
  if statistics is not None:
    if len(statistics) != u:
      raise ValueError(f"statistics has {len(statistics)} entries for {u} observations.")
    consts["statistics"] = [
      (
        np.stack([np.asarray(s[layer].mean, np.float32) for s in statistics]),
        np.stack([np.asarray(s[layer].variance, np.float32) for s in statistics]),
      )
      for layer in range(len(statistics[0]))
    ]
  return consts


def reconstruct(
  model,
  observed: Sequence[Sequence[np.ndarray]],
  labels: Sequence[Sequence[int]],
  training: ClientTraining,
  iterations: int = 300,
  tv_weight: float = 1e-4,
  seed: int = 0,
  statistics=None,
) -> np.ndarray:
  """Cosine + total-variation reconstruction through the client's simulated training.

  Each observation's batch (its size: len of its labels, recovered beforehand, e.g. by
  `labels.infer_labels`) is optimised so that its simulated update (`local_update`:
  the client's optimizer, steps and batch size of `training`, from `model`'s weights)
  has the observed direction (`objectives.CosineMatching`), with L-BFGS from
  `optimize.minimize`. `statistics`: per observation, the batch statistics its BatchNorm
  update carries (`batchnorm_prior.observed_statistics`); given, the loss adds
  `BN_WEIGHT` x the BatchNorm prior of the dummy batch (its statistics at the global
  weights). Returns images [U, B, H, W, C] clipped to [0, 1].
  """
  from tf_dlg.attacks import batchnorm_prior, group, objectives, optimize

  validation.check_int("iterations", iterations, 1)
  sizes = {len(lab) for lab in labels}
  if len(sizes) != 1 or len(labels) != len(observed):
    raise ValueError(
      f"labels must give one equally long label list per observation, got sizes {sorted(sizes)} "
      f"for {len(observed)} observations."
    )
  fmodel = functional.BatchedModel(model)
  shape = (sizes.pop(),) + fmodel.input_shape
  consts = _problem_consts(fmodel, model, observed, labels, statistics)
  objective = objectives.CosineMatching(tv_weight=tv_weight)
  steps, batch, optimizer = training.steps, training.batch_size, training.build()

  def value_fn(pos, c):
    with tf.GradientTape() as tape:
      tape.watch(pos)
      x = tf.reshape(pos, tf.concat([[tf.shape(pos)[0]], shape], 0))
      update = local_update(fmodel, c["weights"], x, c["labels"], steps, batch, optimizer)
      dist = objective.distance(update, c["observed"])
      loss = dist + objective.regularizer(x)
      if "statistics" in c:
        dummy = []
        fmodel(c["weights"], x, statistics=dummy)
        loss = loss + BN_WEIGHT * batchnorm_prior.prior(dummy, c["statistics"])
    return loss, dist, tape.gradient(loss, pos)

  u, size = len(observed), int(np.prod(shape))
  start = tf.random.stateless_uniform([u, size], [int(seed) % (2**31 - 1), 11]).numpy()
  # XLA repays its start-up only on long runs (the attack runner's measured break-even).
  jit = iterations >= group.AUTO_JIT_AFTER
  if not jit:
    fmodel = fmodel.without_xla()
  value = tf.function(value_fn, autograph=False)
  result = optimize.minimize(
    "lbfgs", value, start, consts, iterations, tolerance=1e-9, jit_compile=jit
  )
  return np.clip(result.position.reshape((u,) + shape), 0.0, 1.0)
