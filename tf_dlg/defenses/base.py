"""The `Defense` interface: a pure, seeded transform of a client update before it leaves.

A defence maps a nested structure of float tensors (an update: one tensor per model
variable) to a structure of the same shapes, as a pure function of the update, its
parameter and a seed: `defense.apply(update, param, seed)`, in the style of optax's
gradient transformations. It is plain TensorFlow (usable inside `tf.function` and TFF
computations) and its randomness is *stateless*, so the attack experiments, TFF and Keras
training all see exactly the same transform for the same parameter and seed.

A `Defense` object is frozen: it holds the setting it was checked with (`param`, the
options, `exclude`), and `defense(update, seed)` applies that setting. An adapter that
keeps the parameter elsewhere (TFF keeps it in the process state, so that one built
computation serves every setting) passes it in: `apply` takes `param` as a Python number
or a float64 scalar tensor. Nothing is copied and changed.

`Chain(param, exclude, steps=((defense, param_of), ...))` composes transforms, as
optax's `chain` does (`dp` is clip then noise).

`exclude` (a structure of bools like the update) marks tensors passed through untouched,
e.g. BatchNorm variables (`tf_dlg.defenses.batchnorm_exclusion`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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


def value_fingerprint(value) -> tf.Tensor:
  """An int64 that differs between clients' values: wrapped integer sum of their bits.

  Integer addition is exact and order-free, so eager code and a graph compute the same
  number. The TFF adapter folds it into each client's seed
  (`tf_dlg.federated.defense_aggregator.client_seed`);
  the Keras glue does the same, so that clients (and rounds) given one base seed draw
  different noise and masks.
  """
  parts = [
    tf.reduce_sum(tf.cast(tf.bitcast(tf.cast(tf.reshape(t, [-1]), tf.float32), tf.int32), tf.int64))
    for t in tf.nest.flatten(value)
  ]
  return tf.add_n(parts) if parts else tf.constant(0, tf.int64)


def folded_seed(seed, value) -> tf.Tensor:
  """`seed` folded with `value_fingerprint(value)`: a client's own seed for its update."""
  return tf.random.experimental.stateless_fold_in(as_seed(seed), value_fingerprint(value))


def tensor_seed(seed: tf.Tensor, index: int) -> tf.Tensor:
  """A distinct stateless seed for the index-th tensor of an update."""
  return tf.random.experimental.stateless_fold_in(seed, index)


def _freezing(init):
  """`init`, after which the object is frozen (when `init` is its class's outermost one)."""

  @functools.wraps(init)
  def frozen_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if type(self).__init__ is frozen_init:
      self.__dict__["_frozen"] = True

  return frozen_init


class Defense:
  """Base class: a transform and the setting it was checked with, frozen once built.

  Subclasses define `check(param)` (the parameter, validated, or ValueError naming it and
  its range), `_apply(tensors, param, seed) -> tensors` on the transformed tensors, and,
  if they clip by norm, `_clip_scale(tensors, param)`. Both take `param` as a Python
  number *or* a float64 scalar tensor (cast it, e.g. `tf.cast(param, t.dtype)`; never
  `tf.constant` or `float()` it): TFF training passes the parameter from the process state.
  Options (masking's `rescale`, ...) are attributes set in the subclass's `__init__` and
  named in `option_names`, which puts them in `get_config()`.

  Args:
    param: The defence's strength parameter (validated by `check`).
    exclude: Optional structure of bools like the update, or a flat list in
      `tf.nest.flatten` order; True tensors are left untouched.
  """

  name = "defense"
  param_name = "param"
  # Whether `clip_scale` can be below 1 (training then reports the clipped fraction).
  clips = False
  # Whether it draws randomness from its seed (`Chain` gives such steps their seeds).
  draws = False
  # Whether one update expresses it; False: it needs the round's other clients, so it
  # exists in federated training only (the TFF adapter applies it) and is not searched.
  single_update = True
  # Attributes that `get_config()` reports beside the parameter (and `__init__` takes).
  option_names: Tuple[str, ...] = ()

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "__init__" in cls.__dict__:
      cls.__init__ = _freezing(cls.__dict__["__init__"])

  def __init__(self, param: Optional[float] = None, exclude=None):
    self.param = type(self).check(param)
    self.exclude = _flat_bools(exclude)

  def __setattr__(self, name, value):
    if self.__dict__.get("_frozen"):
      raise AttributeError(
        f"{type(self).__name__} is frozen ({name}={value!r}): pass a parameter to "
        "`apply`, or build another defence."
      )
    super().__setattr__(name, value)

  @staticmethod
  def check(param):
    return param

  def _apply(self, tensors: List[tf.Tensor], param, seed: tf.Tensor) -> List[tf.Tensor]:
    raise NotImplementedError

  def _clip_scale(self, tensors: List[tf.Tensor], param) -> tf.Tensor:
    del tensors, param
    return tf.constant(1.0, tf.float32)

  def apply(self, update, param, seed, exclude=None):
    """The transform: `update` defended at `param` with `seed` (same structure).

    Deterministic in `seed` (an int or shape-[2] integer tensor). `exclude`: bools over
    the flattened update, in place of `self.exclude` (None: `self.exclude`).
    """
    flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(update)]
    for i, t in enumerate(flat):
      if not t.dtype.is_floating:
        raise TypeError(
          f"{self.name}: update tensor {i} has dtype {t.dtype.name}; "
          "defences take floating-point updates."
        )
    exclude = self.exclude if exclude is None else _flat_bools(exclude)
    if exclude is not None and len(exclude) != len(flat):
      raise ValueError(
        f"{self.name}: exclude has {len(exclude)} entries but the update has {len(flat)} tensors."
      )
    # A NaN/inf update (a diverged client) must not be masked or noised into something
    # that looks valid: fail loudly, naming the defence and the tensor.
    flat = [
      tf.debugging.assert_all_finite(
        t, f"{self.name}: update tensor {i} has NaN or inf entries; defences take finite updates"
      )
      for i, t in enumerate(flat)
    ]
    keep = _kept(len(flat), exclude)
    out = list(flat)
    if keep:
      defended = self._apply([flat[i] for i in keep], param, as_seed(seed))
      for i, t in zip(keep, defended):
        # A finite update defended into inf (a rescale past float16's 65504) is refused.
        out[i] = tf.debugging.assert_all_finite(
          t,
          f"{self.name}: defended tensor {i} overflows its dtype {t.dtype.name}; "
          "defend a float32 copy of the update",
        )
    return tf.nest.pack_sequence_as(update, out)

  def __call__(self, update, seed=0):
    """`apply` at this defence's own parameter."""
    return self.apply(update, self.param, seed)

  def kept_indices(self, n: int, exclude=None) -> List[int]:
    """Positions, among an update's n flattened tensors, that the defence transforms."""
    return _kept(n, self.exclude if exclude is None else _flat_bools(exclude))

  def kept_tensors(self, update, exclude=None) -> List[tf.Tensor]:
    """The update's tensors that the defence transforms (not excluded), flattened."""
    flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(update)]
    return [flat[i] for i in self.kept_indices(len(flat), exclude)]

  def clip_scale(self, update, param=None, exclude=None) -> tf.Tensor:
    """The factor by which the defence at `param` (None: its own) scales `update`'s norm.

    1.0 = not clipped: a cheap statistic of whether clipping acted (the federated side
    logs it); defences that do not clip by norm return 1.0.
    """
    param = self.param if param is None else param
    return self._clip_scale(self.kept_tensors(update, exclude), param)

  def get_config(self) -> Dict[str, Any]:
    options = {k: getattr(self, k) for k in self.option_names}
    return {"name": self.name, self.param_name: self.param, **options}

  def __repr__(self):
    args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
    return f"{type(self).__name__}({args})"


Defense.__init__ = _freezing(Defense.__init__)


def _flat_bools(exclude) -> Optional[List[bool]]:
  return None if exclude is None else [bool(e) for e in tf.nest.flatten(exclude)]


def _kept(n: int, exclude: Optional[List[bool]]) -> List[int]:
  return [i for i in range(n) if not (exclude and exclude[i])]


class NoDefense(Defense):
  """The identity: the undefended baseline."""

  name = "none"

  def __init__(self, param=None, exclude=None):
    super().__init__(None, exclude)

  def _apply(self, tensors, param, seed):
    return tensors

  def get_config(self):
    return {"name": "none"}


class Chain(Defense):
  """Defences applied in turn, each to the previous one's output (optax's `chain`).

  `steps` are `(defense, param_of)` pairs: the chain's parameter `p` reaches a step as
  `param_of(p)` (dp's noise multiplier z becomes its noise step's stddev z x C); the
  steps' own parameters and `exclude` are not used (the chain's `exclude` holds).
  The first step that draws randomness gets the chain's seed and each later one that
  seed folded with its position, so a chain with one random step draws exactly what
  that step draws on its own. At most one step may clip by norm: the chain's
  `clip_scale` is that step's.
  """

  def __init__(self, param, exclude=None, steps: Sequence[Tuple[Defense, Callable]] = ()):
    super().__init__(param, exclude)
    self.steps = tuple(steps)
    if sum(step.clips for step, _ in self.steps) > 1:
      raise ValueError(f"{self.name}: a chain takes at most one norm-clipping step.")

  def _apply(self, tensors, param, seed):
    drawn = False
    for k, (step, param_of) in enumerate(self.steps):
      step_seed = tensor_seed(seed, k) if drawn and step.draws else seed
      drawn = drawn or step.draws
      tensors = step._apply(tensors, param_of(param), step_seed)
    return tensors

  def _clip_scale(self, tensors, param):
    for step, param_of in self.steps:
      if step.clips:
        return step._clip_scale(tensors, param_of(param))
    return super()._clip_scale(tensors, param)


def zero_fraction(update) -> tf.Tensor:
  """Fraction of exactly-zero entries in an update (what masking/pruning measure); 0 for
  an update without entries (nothing was zeroed), never NaN."""
  flat = [tf.reshape(tf.cast(tf.equal(t, 0), tf.float32), [-1]) for t in tf.nest.flatten(update)]
  if not flat:
    return tf.constant(0.0, tf.float32)
  flat = tf.concat(flat, 0)
  return tf.math.divide_no_nan(tf.reduce_sum(flat), tf.cast(tf.size(flat), tf.float32))


def _wide(t: tf.Tensor) -> tf.Tensor:
  """float16 / bfloat16 as float32: a sum of squares overflows half precision (max 65504)."""
  return tf.cast(t, tf.float32) if t.dtype in (tf.float16, tf.bfloat16) else t


def global_norm(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """Joint L2 norm of tensors, as a float32 scalar (0 for an empty list)."""
  if not tensors:
    return tf.constant(0.0, tf.float32)
  return tf.cast(
    tf.linalg.global_norm([_wide(tf.convert_to_tensor(t)) for t in tensors]), tf.float32
  )


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
