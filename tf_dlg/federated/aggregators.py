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
  even client count; a coordinate where some client sent NaN is NaN (as NumPy's).
* trimmed mean: `scipy.stats.trim_mean(values, f, axis=0)` -- drop `floor(f * n)`
  values from each end of every coordinate, average the rest.
* An empty round (no clients) reports zeros.

`capture_factory(inner)` wraps any factory (`tff.aggregators.add_measurements`) and
additionally reports, as a measurement, every client's value in client order, so that a
simulation can record the exact (defended) update one client sent.

Importing this module leaves TFF's execution context alone.
"""

from __future__ import annotations

import collections
import math
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

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
    middle = 0.5 * (tf.gather(s, (n - 1) // 2) + tf.gather(s, n // 2))
    # tf.sort places NaN anywhere; as numpy.median, a coordinate with a NaN is NaN.
    has_nan = tf.reduce_any(tf.math.is_nan(x), axis=0)
    return tf.where(has_nan, tf.constant(np.nan, x.dtype), middle)

  return _empty_guard(stacked, median)


def coordinate_trimmed_mean(stacked: tf.Tensor, trim_fraction: float) -> tf.Tensor:
  """`scipy.stats.trim_mean(stacked, trim_fraction, axis=0)` in TensorFlow."""

  def trimmed(x):
    n = tf.shape(x)[0]
    # floor(f * n) per side, as scipy; f < 0.5 keeps at least one value.
    k = tf.cast(tf.math.floor(trim_fraction * tf.cast(n, tf.float64)), tf.int32)
    s = tf.sort(x, axis=0)
    # tf.sort places NaN anywhere, so which values are trimmed would be arbitrary; a NaN
    # coordinate stays NaN (as the median's), visible rather than silently trimmed away.
    has_nan = tf.reduce_any(tf.math.is_nan(x), axis=0)
    return tf.where(has_nan, tf.constant(np.nan, x.dtype), tf.reduce_mean(s[k : n - k], axis=0))

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


def capture_factory(inner):
  """Wraps `inner` so that its process also reports every client's value.

  Built on `tff.aggregators.add_measurements`: the created process returns `inner`'s
  state and result unchanged, and its measurements are `inner`'s with `client_values`
  added, which holds each leaf of the client values stacked along a leading axis in
  client order (the order of the `CLIENTS` data passed to the computation). This costs
  one extra gather of every value at the server, so use it only in the round being
  captured. The weightedness of `inner` is kept.

  Raises:
    TypeError: `inner` is not a `tff.aggregators` factory.
  """
  weighted = isinstance(inner, tff.aggregators.WeightedAggregationFactory)
  if not weighted and not isinstance(inner, tff.aggregators.UnweightedAggregationFactory):
    raise TypeError(f"inner must be a tff.aggregators factory, found {type(inner).__name__}.")

  def gather(value):
    value_type = value.type_signature.member
    _check_float_structure(value_type)
    zero, accumulate, merge, report = _build_stack_computations(value_type, lambda s: s)
    stacked = tff.federated_aggregate(value, zero(), accumulate, merge, report)
    return collections.OrderedDict(client_values=stacked)

  if weighted:
    return tff.aggregators.add_measurements(
      inner, client_measurement_fn=lambda value, weight: gather(value)
    )
  return tff.aggregators.add_measurements(inner, client_measurement_fn=gather)
