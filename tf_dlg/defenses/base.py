"""The `Defense` interface: a seeded transform of a client update before it leaves.

A defence maps a nested structure of float tensors (an update: one tensor per model
variable) to a structure of the same shapes. It is pure TensorFlow (usable inside
`tf.function` and TFF computations) and its randomness is *stateless*: the output is a
function of the update and the `seed` alone, so the attack experiments, TFF and Keras
training all see exactly the same transform for the same seed.

`exclude` (a structure of bools like the update) marks tensors passed through untouched,
e.g. BatchNorm variables (`tf_dlg.defenses.batchnorm_exclusion`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import tensorflow as tf

from tf_dlg.validation import check_number  # noqa: F401  (re-exported)


def as_seed(seed) -> tf.Tensor:
  """An int or shape-[2] integer seed as the int64 [2] tensor stateless ops take."""
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64):
    raise TypeError(f"seed must be an int or an integer tensor, got dtype {seed.dtype.name}.")
  seed = tf.cast(seed, tf.int64)
  if seed.shape.rank == 0:
    return tf.stack([seed, tf.constant(0x5EED, tf.int64)])
  if seed.shape.as_list() != [2]:
    raise ValueError(f"seed must be a scalar or have shape [2], got shape {seed.shape}.")
  return seed


def tensor_seed(seed: tf.Tensor, index: int) -> tf.Tensor:
  """A distinct stateless seed for the index-th tensor of an update."""
  return tf.random.experimental.stateless_fold_in(seed, index)


class Defense:
  """Base class. Subclasses implement `_apply(tensors, seed) -> tensors`.

  Args:
    param: The defence's strength parameter (validated by the subclass).
    exclude: Optional structure of bools like the update, or a flat list in
      `tf.nest.flatten` order; True tensors are left untouched.
  """

  name = "defense"
  param_name = "param"

  def __init__(self, param: Optional[float] = None, exclude=None):
    self.param = param
    self.exclude = None if exclude is None else [bool(e) for e in tf.nest.flatten(exclude)]

  def _apply(self, tensors: List[tf.Tensor], seed: tf.Tensor) -> List[tf.Tensor]:
    raise NotImplementedError

  def __call__(self, update, seed=0):
    """Returns the defended update (same structure), deterministic in `seed`."""
    flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(update)]
    for i, t in enumerate(flat):
      if not t.dtype.is_floating:
        raise TypeError(
          f"{self.name}: update tensor {i} has dtype {t.dtype.name}; "
          "defences take floating-point updates."
        )
    if self.exclude is not None and len(self.exclude) != len(flat):
      raise ValueError(
        f"{self.name}: exclude has {len(self.exclude)} entries but the update "
        f"has {len(flat)} tensors."
      )
    # A NaN/inf update (a diverged client) must not be masked or noised into something
    # that looks valid: fail loudly, naming the defence and the tensor.
    flat = [
      tf.debugging.assert_all_finite(
        t, f"{self.name}: update tensor {i} has NaN or inf entries; defences take finite updates"
      )
      for i, t in enumerate(flat)
    ]
    keep = self.kept_indices(len(flat))
    out = list(flat)
    if keep:
      defended = self._apply([flat[i] for i in keep], as_seed(seed))
      for i, t in zip(keep, defended):
        out[i] = t
    return tf.nest.pack_sequence_as(update, out)

  def kept_indices(self, n: int) -> List[int]:
    """Positions, among an update's n flattened tensors, that the defence transforms."""
    return [i for i in range(n) if not (self.exclude and self.exclude[i])]

  def kept_tensors(self, update) -> List[tf.Tensor]:
    """The update's tensors that the defence transforms (not excluded), flattened."""
    flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(update)]
    return [flat[i] for i in self.kept_indices(len(flat))]

  def clip_scale(self, update) -> tf.Tensor:
    """The factor by which the defence scales `update`'s norm: 1.0 = not clipped.

    A cheap statistic of whether clipping acted (the federated side logs it); defences
    that do not clip by norm return 1.0.
    """
    del update
    return tf.constant(1.0, tf.float32)

  def get_config(self) -> Dict[str, Any]:
    return {"name": self.name, self.param_name: self.param}

  def __repr__(self):
    args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
    return f"{type(self).__name__}({args})"


class NoDefense(Defense):
  """The identity: the undefended baseline."""

  name = "none"

  def __init__(self, param=None, exclude=None):
    super().__init__(None, exclude)

  def _apply(self, tensors, seed):
    return tensors

  def get_config(self):
    return {"name": "none"}


def zero_fraction(update) -> tf.Tensor:
  """Fraction of exactly-zero entries in an update (what masking/pruning measure)."""
  flat = [tf.reshape(tf.cast(tf.equal(t, 0), tf.float32), [-1]) for t in tf.nest.flatten(update)]
  return tf.reduce_mean(tf.concat(flat, 0))


def global_norm(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """Joint L2 norm of tensors, as a float32 scalar (0 for an empty list)."""
  if not tensors:
    return tf.constant(0.0, tf.float32)
  return tf.cast(tf.linalg.global_norm(list(tensors)), tf.float32)


def root_mean_square(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """RMS over every entry of the tensors together, as a float32 scalar."""
  size = tf.add_n([tf.size(t, out_type=tf.int64) for t in tensors]) if tensors else 0
  return global_norm(tensors) / tf.sqrt(tf.maximum(tf.cast(size, tf.float32), 1.0))


def concat_flat(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)


def split_like(flat: tf.Tensor, tensors: Sequence[tf.Tensor]) -> List[tf.Tensor]:
  sizes = [
    int(tf.size(t)) if t.shape.num_elements() is None else t.shape.num_elements() for t in tensors
  ]
  return [tf.reshape(p, tf.shape(t)) for p, t in zip(tf.split(flat, sizes), tensors)]
