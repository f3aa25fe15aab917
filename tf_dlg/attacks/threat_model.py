"""What a gradient-inversion attacker observes: the threat model.

An honest-but-curious server sees, for one client, the global model it sent (architecture
and weights) and the update that came back -- after the client's defence. Two kinds of
update are modelled, as in the breaching framework:

* `gradient`: the gradient of the mean cross-entropy loss of one local batch (FedSGD;
  batch size 1 as in DLG/iDLG, or larger).
* `fedavg_delta`: a multi-step FedAvg client delta, `initial - final` trainable weights
  after `local_steps` local SGD steps of `learning_rate` (TFF's sign convention); the
  attacker knows the step count, learning rate and batch size.

`ObservedUpdate` holds one such observation and round-trips to disk (`save` / `load`),
so that an update captured inside a TFF simulation can be attacked later. The true
images/labels ride along for scoring only; an attack must never read them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import numpy as np

from tf_dlg import io as tf_io

UPDATE_KINDS = ("gradient", "fedavg_delta")
_FORMAT = "tf_dlg.ObservedUpdate/v1"
# Scoring compares images with SSIM's 7x7 window; smaller ones cannot be scored.
MIN_IMAGE_SIDE = 7


def check_images(images, name: str = "images") -> np.ndarray:
  """`images` as float32 [N, H, W, C], or one ValueError: finite, in [0, 1], H, W >= 7.

  Images in [0, 255] would be scored against a data range of 1 and a perfect copy would
  score "not leaked" (the unsafe side); images smaller than SSIM's window could be
  attacked but never scored. Both are refused here, before any attack.
  """
  x = np.asarray(images)
  if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or x.dtype == np.uint8):
    raise ValueError(f"{name} must be a float array in [0, 1], got dtype {x.dtype}.")
  if x.dtype == np.uint8:
    raise ValueError(f"{name} are 8-bit (uint8); pass them as float32 in [0, 1] (x / 255).")
  if x.ndim != 4 or min(x.shape[1:3], default=0) < MIN_IMAGE_SIDE:
    raise ValueError(
      f"{name} must have shape [N, H, W, C] with H, W >= {MIN_IMAGE_SIDE} (SSIM's window), "
      f"got {x.shape}."
    )
  if x.size and not np.all(np.isfinite(x)):
    raise ValueError(f"{name} have NaN or inf pixels; expected finite values in [0, 1].")
  if x.size and (x.min() < 0.0 or x.max() > 1.0):
    raise ValueError(
      f"{name} have values in [{float(x.min()):g}, {float(x.max()):g}]; expected [0, 1] "
      "(divide 8-bit images by 255)."
    )
  return x.astype(np.float32)


def check_labels(labels, num_classes: Optional[int] = None, name: str = "labels") -> np.ndarray:
  """`labels` as int64, or one ValueError: whole numbers in [0, num_classes)."""
  y = np.asarray(labels)
  if y.dtype == bool or not np.issubdtype(y.dtype, np.number):
    raise ValueError(f"{name} must be integer class ids, got dtype {y.dtype}.")
  if not np.issubdtype(y.dtype, np.integer):
    whole = np.isfinite(y) & (y == np.round(y)) if y.size else np.ones(0, bool)
    if not np.all(whole):
      bad = y[~whole].ravel()[0].item()
      raise ValueError(f"{name} must be whole class ids; got {bad!r} (it would be truncated).")
  y = y.astype(np.int64)
  if num_classes is not None and y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(
      f"{name} must lie in [0, {num_classes - 1}], got [{int(y.min())}, {int(y.max())}]."
    )
  return y


@dataclasses.dataclass
class ObservedUpdate:
  """One client's update as the attacker observes it.

  Attributes:
    kind: `gradient` or `fedavg_delta`.
    update: One array per `model.trainable_variables`, in that order (the defended update).
    model_weights: `model.get_weights()` of the model the client started from (all
      variables, trainable and not, in Keras order).
    model_name: Registry name in `tf_dlg.models` (e.g. `lenet`, `bn_cnn`).
    input_shape: Image shape (H, W, C).
    num_classes: Number of classes of the model head.
    num_examples: Number of examples behind the update.
    batch_size: Local batch size.
    local_steps: Local SGD steps (1 for `gradient`).
    learning_rate: Client learning rate (`fedavg_delta` only).
    defense: `get_config()` of the defence applied, or None.
    metadata: Free-form provenance (dataset, round, client id, seed, ...).
    true_images / true_labels: Ground truth for scoring only.
  """

  kind: str
  update: List[np.ndarray]
  model_weights: List[np.ndarray]
  model_name: str
  input_shape: tuple
  num_classes: int
  num_examples: int = 1
  batch_size: int = 1
  local_steps: int = 1
  learning_rate: Optional[float] = None
  defense: Optional[Dict[str, Any]] = None
  metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)
  true_images: Optional[np.ndarray] = None
  true_labels: Optional[np.ndarray] = None

  def __post_init__(self):
    if self.kind not in UPDATE_KINDS:
      raise ValueError(f"kind={self.kind!r} must be one of {', '.join(UPDATE_KINDS)}.")
    if self.kind == "fedavg_delta" and not self.learning_rate:
      raise ValueError(
        f"A fedavg_delta observation needs the client learning_rate (got {self.learning_rate!r})."
      )
    self.update = [np.asarray(u) for u in self.update]
    self.model_weights = [np.asarray(w) for w in self.model_weights]
    self.input_shape = tuple(int(d) for d in self.input_shape)
    bad = [i for i, u in enumerate(self.update) if not np.all(np.isfinite(u))]
    if bad:
      raise ValueError(f"Observed update has non-finite values in tensors {bad}.")
    # The ground truth is only scored, but checked now: never after an attack's work.
    if self.true_images is not None:
      self.true_images = check_images(self.true_images, "true_images")
    if self.true_labels is not None:
      self.true_labels = check_labels(self.true_labels, self.num_classes, "true_labels")

  def save(self, path: str) -> str:
    """Writes `path` (.npz) holding arrays and a JSON header, atomically; returns it."""
    header = {
      k: getattr(self, k)
      for k in (
        "kind",
        "model_name",
        "input_shape",
        "num_classes",
        "num_examples",
        "batch_size",
        "local_steps",
        "learning_rate",
        "defense",
        "metadata",
      )
    }
    header["format"] = _FORMAT
    header["num_update"] = len(self.update)
    header["num_weights"] = len(self.model_weights)
    arrays = {f"update_{i}": u for i, u in enumerate(self.update)}
    arrays.update({f"weight_{i}": w for i, w in enumerate(self.model_weights)})
    if self.true_images is not None:
      arrays["true_images"] = np.asarray(self.true_images)
    if self.true_labels is not None:
      arrays["true_labels"] = np.asarray(self.true_labels)
    return tf_io.save_npz(path, header, arrays)

  @classmethod
  def load(cls, path: str) -> "ObservedUpdate":
    """Reads a file written by `save`; a foreign or corrupt file raises ValueError."""
    header, z = tf_io.load_npz(path, expected_format=_FORMAT)
    try:
      update = [z[f"update_{i}"] for i in range(header.pop("num_update"))]
      weights = [z[f"weight_{i}"] for i in range(header.pop("num_weights"))]
    except KeyError as e:
      raise ValueError(f"{path!r} is not a readable tf-dlg observed update: {e}") from e
    header.pop("format")
    return cls(
      update=update,
      model_weights=weights,
      true_images=z.get("true_images"),
      true_labels=z.get("true_labels"),
      **header,
    )


# --------------------------------------------------------------------------- capture
# Helpers that produce an ObservedUpdate from a Keras model and a local batch, as an
# honest client would compute it (plain Keras + GradientTape, independent of the attack
# code, so that tests can cross-check the attack's differentiable re-implementation).


def _defend(update, defense, seed):
  if defense is None:
    return update, None
  import tensorflow as tf

  out = defense([tf.convert_to_tensor(u) for u in update], seed)
  return [np.asarray(u) for u in out], defense.get_config()


def observe_gradient(
  model, images, labels, defense=None, seed: int = 0, model_name: str = "lenet", metadata=None
) -> ObservedUpdate:
  """FedSGD observation: gradient of the mean cross-entropy of the batch (images, labels).

  Args:
    model: Keras model with logits output (its current weights are the global model).
    images: [N, H, W, C] float32; labels: [N] int.
    defense: Optional `tf_dlg.defenses` Defense applied to the update (seeded by `seed`).
  """
  import tensorflow as tf

  images = check_images(images)
  labels = check_labels(labels, int(model.output_shape[-1]))
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(
      tf.keras.losses.sparse_categorical_crossentropy(
        labels, model(images, training=True), from_logits=True
      )
    )
  grads = tape.gradient(loss, model.trainable_variables)
  update, config = _defend([g.numpy() for g in grads], defense, seed)
  return ObservedUpdate(
    kind="gradient",
    update=update,
    model_weights=model.get_weights(),
    model_name=model_name,
    input_shape=images.shape[1:],
    num_classes=int(model.output_shape[-1]),
    num_examples=len(images),
    batch_size=len(images),
    local_steps=1,
    defense=config,
    metadata=dict(metadata or {}),
    true_images=images,
    true_labels=labels,
  )


def observe_fedavg_delta(
  model,
  images,
  labels,
  local_steps: int,
  learning_rate: float,
  batch_size: Optional[int] = None,
  defense=None,
  **description,
) -> ObservedUpdate:
  """FedAvg observation: `initial - final` weights after `local_steps` local SGD steps.

  Step t trains on examples `[t * batch_size, (t + 1) * batch_size)` modulo N (unshuffled
  epochs), the schedule the attacker simulates. The model's weights are left unchanged.
  `description` takes `observe_gradient`'s other keywords: `seed` of the defence
  (default 0), `model_name` (default `lenet`) and `metadata` (a dict).
  """
  import tensorflow as tf

  unknown = sorted(set(description) - {"seed", "model_name", "metadata"})
  if unknown:
    raise TypeError(f"observe_fedavg_delta got unexpected arguments {unknown}.")
  seed = description.get("seed", 0)
  model_name = description.get("model_name", "lenet")
  metadata = description.get("metadata")

  images = check_images(images)
  labels = check_labels(labels, int(model.output_shape[-1]))
  n = len(images)
  batch_size = n if batch_size is None else int(batch_size)
  if local_steps < 1 or not 1 <= batch_size <= n:
    raise ValueError(
      f"local_steps={local_steps} must be >= 1 and batch_size={batch_size} in [1, {n}]."
    )
  initial = model.get_weights()
  start = [v.numpy() for v in model.trainable_variables]
  try:
    for step in range(local_steps):
      idx = (step * batch_size + np.arange(batch_size)) % n
      with tf.GradientTape() as tape:
        loss = tf.reduce_mean(
          tf.keras.losses.sparse_categorical_crossentropy(
            labels[idx], model(images[idx], training=True), from_logits=True
          )
        )
      grads = tape.gradient(loss, model.trainable_variables)
      for v, g in zip(model.trainable_variables, grads):
        v.assign_sub(learning_rate * g)
    delta = [s - v.numpy() for s, v in zip(start, model.trainable_variables)]
  finally:
    model.set_weights(initial)
  update, config = _defend(delta, defense, seed)
  return ObservedUpdate(
    kind="fedavg_delta",
    update=update,
    model_weights=initial,
    model_name=model_name,
    input_shape=images.shape[1:],
    num_classes=int(model.output_shape[-1]),
    num_examples=n,
    batch_size=batch_size,
    local_steps=int(local_steps),
    learning_rate=float(learning_rate),
    defense=config,
    metadata=dict(metadata or {}),
    true_images=images,
    true_labels=labels,
  )
