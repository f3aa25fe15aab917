"""Robust `tff.aggregators` factories: coordinate-wise median and trimmed mean.

TFF 0.87 ships no median and no `federated_collect`. Both factories here follow the
construction of TFF's own `tff.aggregators.UnweightedReservoirSamplingFactory`
(`aggregators/sampling.py`): a `tff.federated_aggregate` whose accumulator is every
client value stacked along a new leading axis. The accumulator starts as an empty
`[0, *shape]` tensor per leaf (TFF type `[None, *shape]`); `accumulate` appends one
client's value (`concat`), `merge` concatenates two partial stacks (so the
construction also works when clients are spread over several workers / subrounds), and
`report` -- a `tff.tensorflow.computation` at the server -- sorts the stack along the
client axis and reads an order statistic. No reservoir eviction is needed: the stack
simply keeps every client, which is what the reservoir does when its size is at least
the number of clients.

Cost: the server holds all `n` client values (memory `n x model size`), the appends
copy `O(n^2 x model size)` elements over a round, and the sort is
`O(model size x n log n)`. For the tens of clients and ~10^4-parameter models of this
project that is negligible next to local training; for thousands of clients or large
models a streaming (e.g. quantile-sketch) estimator would be the better choice.

Semantics (unit-tested against NumPy / SciPy):
* median: `numpy.median(values, axis=0)` -- the mean of the two middle values for an
  even client count.
* trimmed mean: `scipy.stats.trim_mean(values, f, axis=0)` -- drop `floor(f * n)`
  values from each end of every coordinate, average the rest.
* An empty round (no clients) reports zeros.

`capture_factory(inner)` wraps any factory and additionally reports, as a
measurement, every client's value in client order, so that a simulation can record the
exact (defended) update one client sent. `stats_factory(inner, include, clip_norm)`
reports the zero fraction of the client values (and the clipped share of clients), for
a simulation's TensorBoard defence statistics.
"""

from __future__ import annotations

import collections
import math
from typing import Callable

import numpy as np
import tensorflow as tf

from tf_dlg.execution.runtime import import_tff

tff = import_tff()


# --------------------------------------------------------------------------- stacking


def _check_float_structure(value_type) -> None:
  """Raises TypeError unless `value_type` is a structure of floating-point tensors."""
  if not tff.types.is_tensorflow_compatible_type(value_type):
    raise TypeError(
      f"Expected `value_type` to be a structure of tensors, found "
      f"{type(value_type).__name__}: {value_type}."
    )
  for spec in tf.nest.flatten(tff.types.type_to_tf_tensor_specs(value_type)):
    if not spec.dtype.is_floating:
      raise TypeError(
        f"Order statistics need floating-point values; found a tensor of "
        f"dtype {spec.dtype.name} in {value_type}."
      )
    if not spec.shape.is_fully_defined():
      raise TypeError(
        f"Order statistics need fully defined shapes; found {spec.shape} in {value_type}."
      )


def _stack_specs(value_type):
  """`value_type`'s tf.TensorSpecs with an unknown leading (client) axis added."""
  specs = tff.types.type_to_tf_tensor_specs(value_type)
  return tf.nest.map_structure(lambda s: tf.TensorSpec([None, *s.shape], s.dtype), specs)


def _build_stack_computations(value_type, report_fn: Callable):
  """zero / accumulate / merge / report for a `federated_aggregate` that stacks values.

  `report_fn(stacked)` maps the stacked structure (leading axis: clients) to the result.
  """
  stack_specs = _stack_specs(value_type)
  stack_type = tff.types.tensorflow_to_type(stack_specs)

  @tff.tensorflow.computation
  def zero():
    return tf.nest.map_structure(lambda s: tf.zeros([0, *s.shape[1:]], s.dtype), stack_specs)

  @tff.tensorflow.computation(stack_type, value_type)
  def accumulate(stack, value):
    return tf.nest.map_structure(
      lambda a, v: tf.concat([a, tf.expand_dims(v, 0)], axis=0), stack, value
    )

  @tff.tensorflow.computation(stack_type, stack_type)
  def merge(a, b):
    return tf.nest.map_structure(lambda x, y: tf.concat([x, y], axis=0), a, b)

  @tff.tensorflow.computation(stack_type)
  def report(stack):
    return report_fn(stack)

  return zero, accumulate, merge, report


def _empty_guard(stacked: tf.Tensor, statistic: Callable[[tf.Tensor], tf.Tensor]):
  """`statistic(stacked)`, or zeros of one row's shape when no client contributed."""
  return tf.cond(
    tf.shape(stacked)[0] > 0,
    lambda: statistic(stacked),
    lambda: tf.zeros(tf.shape(stacked)[1:], stacked.dtype),
  )


def coordinate_median(stacked: tf.Tensor) -> tf.Tensor:
  """`numpy.median(stacked, axis=0)` in TensorFlow (leading axis: clients)."""

  def median(x):
    n = tf.shape(x)[0]
    s = tf.sort(x, axis=0)
    return 0.5 * (tf.gather(s, (n - 1) // 2) + tf.gather(s, n // 2))

  return _empty_guard(stacked, median)


def coordinate_trimmed_mean(stacked: tf.Tensor, trim_fraction: float) -> tf.Tensor:
  """`scipy.stats.trim_mean(stacked, trim_fraction, axis=0)` in TensorFlow."""

  def trimmed(x):
    n = tf.shape(x)[0]
    # floor(f * n) per side, as scipy; f < 0.5 keeps at least one value.
    k = tf.cast(tf.math.floor(trim_fraction * tf.cast(n, tf.float64)), tf.int32)
    s = tf.sort(x, axis=0)
    return tf.reduce_mean(s[k : n - k], axis=0)

  return _empty_guard(stacked, trimmed)


# --------------------------------------------------------------------------- factories


class _OrderStatisticFactory(tff.aggregators.UnweightedAggregationFactory):
  """Shared body of the median and trimmed-mean factories."""

  def __init__(self, statistic: Callable[[tf.Tensor], tf.Tensor]):
    self._statistic = statistic

  def create(self, value_type):
    _check_float_structure(value_type)
    statistic = self._statistic
    zero, accumulate, merge, report = _build_stack_computations(
      value_type, lambda stack: tf.nest.map_structure(statistic, stack)
    )

    @tff.tensorflow.computation(value_type)
    def one(value):
      del value
      return tf.constant(1, tf.int32)

    @tff.federated_computation()
    def init_fn():
      return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(
      init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS)
    )
    def next_fn(state, value):
      result = tff.federated_aggregate(value, zero(), accumulate, merge, report)
      num_clients = tff.federated_sum(tff.federated_map(one, value))
      measurements = tff.federated_zip(collections.OrderedDict(num_clients=num_clients))
      return tff.templates.MeasuredProcessOutput(
        state=state, result=result, measurements=measurements
      )

    return tff.templates.AggregationProcess(init_fn, next_fn)


class MedianFactory(_OrderStatisticFactory):
  """`UnweightedAggregationFactory` for the coordinate-wise median.

  The created `tff.templates.AggregationProcess` gathers the values placed at
  `CLIENTS` at the `SERVER` (one `tff.federated_aggregate` that stacks them) and
  outputs, per coordinate, their median placed at `SERVER`; for an even number of
  clients the mean of the two middle values (as `numpy.median`).

  The process is unweighted and has empty `state`. Its `measurements` are
  `OrderedDict(num_clients=...)`, the number of values aggregated.

  The value type must be a structure of floating-point tensors with fully defined
  shapes.
  """

  def __init__(self):
    super().__init__(coordinate_median)


class TrimmedMeanFactory(_OrderStatisticFactory):
  """`UnweightedAggregationFactory` for the coordinate-wise trimmed mean.

  The created `tff.templates.AggregationProcess` gathers the values placed at
  `CLIENTS` at the `SERVER`, drops per coordinate the `floor(trim_fraction * n)`
  smallest and largest of the `n` client values, and outputs the mean of the rest
  placed at `SERVER` (as `scipy.stats.trim_mean`).

  The process is unweighted and has empty `state`. Its `measurements` are
  `OrderedDict(num_clients=...)`, the number of values aggregated.
  """

  def __init__(self, trim_fraction: float):
    """Initializes `TrimmedMeanFactory`.

    Args:
      trim_fraction: Fraction of clients dropped from each end, in [0, 0.5).

    Raises:
      TypeError: `trim_fraction` is not a real number.
      ValueError: `trim_fraction` is outside [0, 0.5).
    """
    if isinstance(trim_fraction, bool) or not isinstance(trim_fraction, (int, float, np.floating)):
      raise TypeError(f"trim_fraction must be a float, found {type(trim_fraction).__name__}.")
    trim_fraction = float(trim_fraction)
    if not (math.isfinite(trim_fraction) and 0.0 <= trim_fraction < 0.5):
      raise ValueError(f"trim_fraction={trim_fraction!r} must be in [0, 0.5).")
    self.trim_fraction = trim_fraction
    super().__init__(lambda x: coordinate_trimmed_mean(x, trim_fraction))


def median_factory() -> MedianFactory:
  """The coordinate-wise median, an unweighted `tff.aggregators` factory."""
  return MedianFactory()


def trimmed_mean_factory(trim_fraction: float = 0.1) -> TrimmedMeanFactory:
  """The coordinate-wise `trim_fraction`-trimmed mean, an unweighted factory."""
  return TrimmedMeanFactory(trim_fraction)


# --------------------------------------------------------------------------- capture


def _wrap_next(inner_process, value_type, weighted: bool, extra_fn: Callable):
  """`next` of `inner_process` whose measurements also hold `extra_fn(value)`.

  `extra_fn` maps the CLIENTS-placed value to an `OrderedDict` of SERVER-placed values;
  the measurements become `OrderedDict(inner=<inner measurements>, **extra)`.
  """
  state_type = inner_process.initialize.type_signature.result

  def body(state, value, weight=None):
    args = (state, value) if weight is None else (state, value, weight)
    out = inner_process.next(*args)
    measurements = tff.federated_zip(
      collections.OrderedDict(inner=out.measurements, **extra_fn(value))
    )
    return tff.templates.MeasuredProcessOutput(
      state=out.state, result=out.result, measurements=measurements
    )

  value_param = tff.FederatedType(value_type, tff.CLIENTS)
  if weighted:
    weight_type = inner_process.next.type_signature.parameter[2]

    @tff.federated_computation(state_type, value_param, weight_type)
    def next_fn(state, value, weight):
      return body(state, value, weight)
  else:

    @tff.federated_computation(state_type, value_param)
    def next_fn(state, value):
      return body(state, value)

  return next_fn


def _capture_next(inner_process, value_type, weighted: bool):
  """`next` of a capture process: the inner aggregation plus every client's value."""
  zero, accumulate, merge, report = _build_stack_computations(value_type, lambda s: s)

  def extra(value):
    return collections.OrderedDict(
      client_values=tff.federated_aggregate(value, zero(), accumulate, merge, report)
    )

  return _wrap_next(inner_process, value_type, weighted, extra)


def _stats_next(inner_process, value_type, weighted: bool, include, clip_norm):
  """`next` of a stats process: the inner aggregation plus `zero_fraction` etc."""
  leaves = tf.nest.flatten(tff.types.type_to_tf_tensor_specs(value_type))
  include = [True] * len(leaves) if include is None else [bool(i) for i in include]
  if len(include) != len(leaves):
    raise ValueError(f"include has {len(include)} entries, the value {len(leaves)} leaves.")
  size = float(sum(s.shape.num_elements() for s, i in zip(leaves, include) if i))
  bound = -1.0 if clip_norm is None else float(clip_norm) * (1.0 - 1e-4)

  @tff.tensorflow.computation(value_type)
  def per_client(value):
    kept = [v for v, i in zip(tf.nest.flatten(value), include) if i]
    zeros = tf.add_n(
      [tf.reduce_sum(tf.cast(tf.equal(v, 0), tf.float32)) for v in kept] + [tf.constant(0.0)]
    )
    if kept and clip_norm is not None:
      clipped = tf.cast(tf.linalg.global_norm(kept) >= bound, tf.float32)
    else:
      clipped = tf.constant(0.0)
    return collections.OrderedDict(zeros=zeros, clipped=clipped, clients=tf.constant(1.0))

  @tff.tensorflow.computation
  def finish(sums):
    n = tf.maximum(sums["clients"], 1.0)
    out = collections.OrderedDict(zero_fraction=sums["zeros"] / (n * max(size, 1.0)))
    if clip_norm is not None:
      out["clipped_fraction"] = sums["clipped"] / n
    return out

  def extra(value):
    sums = tff.federated_sum(tff.federated_map(per_client, value))
    return collections.OrderedDict(defense_stats=tff.federated_map(finish, sums))

  return _wrap_next(inner_process, value_type, weighted, extra)


class _UnweightedWrapFactory(tff.aggregators.UnweightedAggregationFactory):
  """`inner` with extra measurements from `build_next(inner_process, type, weighted)`."""

  def __init__(self, inner, build_next):
    self._inner = inner
    self._build_next = build_next

  def create(self, value_type):
    _check_float_structure(value_type)
    inner = self._inner.create(value_type)
    return tff.templates.AggregationProcess(
      inner.initialize, self._build_next(inner, value_type, False)
    )


class _WeightedWrapFactory(tff.aggregators.WeightedAggregationFactory):
  """Weighted version of `_UnweightedWrapFactory`."""

  def __init__(self, inner, build_next):
    self._inner = inner
    self._build_next = build_next

  def create(self, value_type, weight_type):
    _check_float_structure(value_type)
    inner = self._inner.create(value_type, weight_type)
    return tff.templates.AggregationProcess(
      inner.initialize, self._build_next(inner, value_type, True)
    )


def _wrap(inner, build_next):
  """`inner` wrapped with its weightedness kept; TypeError if not a factory."""
  if isinstance(inner, tff.aggregators.WeightedAggregationFactory):
    return _WeightedWrapFactory(inner, build_next)
  if isinstance(inner, tff.aggregators.UnweightedAggregationFactory):
    return _UnweightedWrapFactory(inner, build_next)
  raise TypeError(f"inner must be a tff.aggregators factory, found {type(inner).__name__}.")


def capture_factory(inner):
  """Wraps `inner` so that its process also reports every client's value.

  The created process returns `inner`'s state and result unchanged; its
  `measurements` are `OrderedDict(inner=<inner measurements>, client_values=<stack>)`
  where `client_values` holds each leaf of the client values stacked along a leading
  axis in client order (the order of the `CLIENTS` data passed to the computation).
  This costs one extra gather of every value at the server, so use it only in the
  round being captured. The weightedness of `inner` is kept.

  Raises:
    TypeError: `inner` is not a `tff.aggregators` factory.
  """
  return _wrap(inner, _capture_next)


def stats_factory(inner, include=None, clip_norm=None):
  """Wraps `inner` so that its process also reports statistics of the client values.

  Put it inside a defence (`defense_factory(defense, stats_factory(inner))`) to
  measure what the defence outputs. The measurements become `OrderedDict(inner=...,
  defense_stats=OrderedDict(zero_fraction=[, clipped_fraction]))`:

  * `zero_fraction`: zero entries / entries, over all clients and the leaves marked
    True in `include` (default: every leaf) -- the masked or pruned share.
  * `clipped_fraction` (only with `clip_norm`): the share of clients whose included
    leaves have a global L2 norm of at least `clip_norm` (1e-4 relative tolerance),
    i.e. whose update norm clipping cut down to the bound.

  Both cost one pass over each client's value and two scalars' sum; state and result
  are `inner`'s, unchanged.
  """
  return _wrap(inner, lambda p, t, w: _stats_next(p, t, w, include, clip_norm))
