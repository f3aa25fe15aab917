"""The `Defense` interface: a seeded transform of a client update before it leaves.

A defence maps a nested structure of float tensors (an update: one tensor per model
variable) to a structure of the same shapes. It is pure TensorFlow (usable inside
`tf.function` and TFF computations) and its randomness is *stateless*: the output is a
function of the update and the `seed` alone, so the attack experiments, TFF and Keras
training all see exactly the same transform for the same seed.

`exclude` (a structure of bools like the update) marks tensors passed through untouched,
e.g. BatchNorm variables (`tf_dlg.defenses.batchnorm_exclusion`).

`DefenseSpec` is what each defence module declares beside its transform: the
parameter's search range and direction, its units, the attackers known to break it, and
how it maps into TFF training. `tf_dlg.defenses` registers the specs, one line each.
"""

from __future__ import annotations

import dataclasses
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
  number. The TFF aggregator folds it into each client's seed (`aggregator.client_seed`);
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


@dataclasses.dataclass(frozen=True)
class SearchRange:
  """Where the threshold search bisects a parameter: [low, high] on a `scale`.

  `stronger` says which end protects more: "higher" or "lower".
  """

  low: float
  high: float
  scale: str  # "log" | "linear"
  stronger: str  # "higher" | "lower"

  def __post_init__(self):
    if self.scale not in ("log", "linear") or self.stronger not in ("higher", "lower"):
      raise ValueError(f"{self}: scale must be log|linear and stronger higher|lower.")
    if not self.low < self.high or (self.scale == "log" and self.low <= 0):
      raise ValueError(f"{self}: needs 0 < low < high on a log scale, low < high otherwise.")

  def as_tuple(self) -> Tuple[float, float, str, str]:
    return (self.low, self.high, self.scale, self.stronger)


@dataclasses.dataclass(frozen=True)
class UnitLink:
  """The same defence in the other unit: `other`'s parameter = this one's x or / `statistic`.

  `statistic` names a statistic of the undefended update (`norm`: global L2 norm, `rms`:
  root mean square of its entries). A relative defence's value times the statistic is
  the absolute equivalent; an absolute value divided by it is the relative one.
  """

  other: str
  statistic: str


# The paper's claims about a defence's accuracy cost at its threshold ("" = none).
PAPER_COSTS = ("", "almost_none", "degrades")


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
  """One defence, declared once in its own module and registered by `tf_dlg.defenses`.

  Attributes:
    name: Registry name (`get_defense(name, param)`).
    cls: The `Defense` subclass: `cls(param, exclude=..., **options)`.
    search: The threshold search's range, or None: not searched.
    single_update: Whether one update can express it (the attack setting); False for a
      defence that needs the round's other clients (TFF training only).
    strongest_attackers: Attacks known to break it best; an image leaks if any does.
    family: The paper's name of the defence in any unit (`clipping_ratio` -> clipping).
    absolute: For a relative-unit defence, its absolute counterpart (`UnitLink`).
    relative: For an absolute-unit defence, its relative counterpart.
    tff: How it maps into TFF training: None = the client transform itself
      (`tf_dlg.defenses.defense_factory`); else `tff(defense, inner_factory, seed)`
      building the `tff.aggregators` factory (for defences that need the round's
      clients, such as a bound relative to their median norm).
    frontier: The privacy-utility frontier's default settings, weakest (leaks) to
      strongest (meant to protect against `strongest_attackers`); () = not on it.
    paper_cost: What the paper claims its threshold costs in accuracy, one of
      `PAPER_COSTS` (`almost_none`, `degrades`), or "" (no claim); claims.md tests it.
  """

  name: str
  cls: type
  search: Optional[SearchRange] = None
  single_update: bool = True
  strongest_attackers: Tuple[str, ...] = ()
  family: str = ""
  absolute: Optional[UnitLink] = None
  relative: Optional[UnitLink] = None
  tff: Optional[Callable[..., Any]] = None
  frontier: Tuple[float, ...] = ()
  paper_cost: str = ""

  @property
  def param_name(self) -> str:
    return self.cls.param_name

  def __post_init__(self):
    if not (isinstance(self.cls, type) and issubclass(self.cls, Defense)):
      raise TypeError(f"DefenseSpec {self.name!r}: cls must be a Defense subclass.")
    if self.cls.name != self.name:
      raise ValueError(f"DefenseSpec {self.name!r}: its class is named {self.cls.name!r}.")
    if self.paper_cost not in PAPER_COSTS:
      raise ValueError(
        f"DefenseSpec {self.name!r}: paper_cost={self.paper_cost!r} is not one of {PAPER_COSTS}."
      )
    if self.search is not None and not self.single_update:
      raise ValueError(f"DefenseSpec {self.name!r}: a search needs single_update=True.")
    outside = [
      v for v in self.frontier if self.search and not self.search.low <= v <= self.search.high
    ]
    if outside:
      raise ValueError(
        f"DefenseSpec {self.name!r}: frontier settings {outside} lie outside the searched "
        f"range [{self.search.low:g}, {self.search.high:g}]."
      )

  def tff_factory(self, defense: "Defense", inner_factory, seed: int = 0):
    """The `tff.aggregators` factory that trains with `defense` before `inner_factory`."""
    if self.tff is not None:
      return self.tff(defense, inner_factory, seed)
    from tf_dlg.defenses import aggregator

    return aggregator.defense_factory(defense, inner_factory, seed=seed)


class Defense:
  """Base class. Subclasses implement `_apply(tensors, seed) -> tensors`.

  `_apply` and `clip_scale` must accept `self.param` as a Python number *or* a float64
  scalar tensor (cast it, e.g. `tf.cast(self.param, t.dtype)`; never `tf.constant` or
  `float()` it): TFF training keeps the parameter in the process state, so one built
  computation serves every setting (`tf_dlg.defenses.aggregator.with_param`).

  Args:
    param: The defence's strength parameter (validated by the subclass).
    exclude: Optional structure of bools like the update, or a flat list in
      `tf.nest.flatten` order; True tensors are left untouched.
  """

  name = "defense"
  param_name = "param"
  # Whether `clip_scale` can be below 1 (training then reports the clipped fraction).
  clips = False

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
        # A finite update defended into inf (a rescale past float16's 65504) is refused.
        out[i] = tf.debugging.assert_all_finite(
          t,
          f"{self.name}: defended tensor {i} overflows its dtype {t.dtype.name}; "
          "defend a float32 copy of the update",
        )
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
