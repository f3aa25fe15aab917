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
import json
import os
from typing import Any, Dict, List, Optional

import numpy as np

UPDATE_KINDS = ("gradient", "fedavg_delta")
_FORMAT = "tf_dlg.ObservedUpdate/v1"


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
      raise ValueError("A fedavg_delta observation needs the client learning_rate "
                       f"(got {self.learning_rate!r}).")
    self.update = [np.asarray(u) for u in self.update]
    self.model_weights = [np.asarray(w) for w in self.model_weights]
    self.input_shape = tuple(int(d) for d in self.input_shape)
    bad = [i for i, u in enumerate(self.update) if not np.all(np.isfinite(u))]
    if bad:
      raise ValueError(f"Observed update has non-finite values in tensors {bad}.")

  def save(self, path: str) -> str:
    """Writes `path` (.npz) holding arrays and a JSON header; returns the path."""
    header = {k: getattr(self, k) for k in (
        "kind", "model_name", "input_shape", "num_classes", "num_examples", "batch_size",
        "local_steps", "learning_rate", "defense", "metadata")}
    header["format"] = _FORMAT
    header["num_update"] = len(self.update)
    header["num_weights"] = len(self.model_weights)
    arrays = {f"update_{i}": u for i, u in enumerate(self.update)}
    arrays.update({f"weight_{i}": w for i, w in enumerate(self.model_weights)})
    if self.true_images is not None:
      arrays["true_images"] = np.asarray(self.true_images)
    if self.true_labels is not None:
      arrays["true_labels"] = np.asarray(self.true_labels)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, header=np.asarray(json.dumps(header, default=_jsonable)), **arrays)
    os.replace(tmp, path)
    return path

  @classmethod
  def load(cls, path: str) -> "ObservedUpdate":
    """Reads a file written by `save`; a foreign or corrupt file raises ValueError."""
    try:
      with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        if header.get("format") != _FORMAT:
          raise ValueError(f"format={header.get('format')!r}, expected {_FORMAT!r}")
        update = [z[f"update_{i}"] for i in range(header.pop("num_update"))]
        weights = [z[f"weight_{i}"] for i in range(header.pop("num_weights"))]
        images = z["true_images"] if "true_images" in z else None
        labels = z["true_labels"] if "true_labels" in z else None
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
      raise ValueError(f"{path!r} is not a readable tf-dlg observed update: {e}") from e
    header.pop("format")
    return cls(update=update, model_weights=weights, true_images=images,
               true_labels=labels, **header)


def _jsonable(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"Cannot store {type(value).__name__} in an ObservedUpdate header.")
