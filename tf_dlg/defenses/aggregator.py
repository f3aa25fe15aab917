"""Defences as TFF aggregators: transform each client's update on the client.

`defense_factory(defense, inner_agg_factory)` wraps any `tf_dlg.defenses.Defense` around
an inner `tff.aggregators` factory, in the style of TFF's `clipping_factory`: the pure
TensorFlow transform lives in the defence's own module, and this file only does the
federated plumbing (seed broadcast, client-side map, inner aggregation, measurements).
"""

from __future__ import annotations

import collections
import copy

import numpy as np
import tensorflow as tf

from tf_dlg.defenses import base
from tf_dlg.federated.runtime import import_tff

tff = import_tff()


def value_fingerprint(value) -> tf.Tensor:
  """An int64 that differs between clients' values: wrapped integer sum of their bits.

  Integer addition is exact and order-free, so eager code (tests, `client_seed`) and
  the TFF graph compute the same number.
  """
  parts = [tf.reduce_sum(tf.cast(tf.bitcast(tf.cast(tf.reshape(t, [-1]), tf.float32),
                                            tf.int32), tf.int64))
           for t in tf.nest.flatten(value)]
  return tf.add_n(parts)


def client_seed(value, round_num, base_seed: int = 0) -> tf.Tensor:
  """The seed a client uses in round `round_num`: (base_seed, round) folded with its value."""
  round_seed = tf.stack([tf.constant(base_seed, tf.int64), tf.cast(round_num, tf.int64)])
  return tf.random.experimental.stateless_fold_in(round_seed, value_fingerprint(value))


def _check_value_type(value_type):
  if not tff.types.is_structure_of_floats(value_type):
    raise TypeError("All values in the provided value_type must be of floating dtype; "
                    f"got value_type {value_type}.")


def defense_factory(defense: base.Defense, inner_agg_factory, exclude=None,
                    seed: int = 0):
  """Creates an aggregation factory that applies `defense` on every client.

  The created `tff.templates.AggregationProcess` sends each client the round's seed,
  applies `defense` to the client's value *on the client* (with a seed folded from the
  server's `(seed, round)` and a fingerprint of the client's own value, so that clients
  and rounds get different masks/noise yet a run is reproducible), and then aggregates
  the defended values as specified by `inner_agg_factory`.

  The process keeps the round number in its state and reports measurements
  * `defense_zero_fraction`: mean over clients of the fraction of exactly-zero entries
    in the defended value (what masking and pruning change);
  * `inner_agg`: the inner process's measurements.
  (Log `defense.get_config()` beside them; it is static, so it is not a measurement.)

  The returned factory takes its weightedness (`UnweightedAggregationFactory` vs.
  `WeightedAggregationFactory`) from `inner_agg_factory`.

  Args:
    defense: A `tf_dlg.defenses.Defense`.
    inner_agg_factory: The aggregation after the defence (e.g. `tff.aggregators.MeanFactory`
      or `tf_dlg.federated.aggregators.median_factory()`).
    exclude: Optional flat list of bools over the value's tensors (BatchNorm entries),
      overriding `defense.exclude`.
    seed: Base seed of the clients' randomness.
  """
  if not isinstance(defense, base.Defense):
    raise TypeError(f"defense must be a tf_dlg.defenses.Defense, got {type(defense).__name__}.")
  if exclude is not None:
    defense = copy.copy(defense)
    defense.exclude = [bool(e) for e in exclude]
  if not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {type(seed).__name__}.")

  def make_defend_fn(value_type):
    @tff.tensorflow.computation(value_type, tff.TensorType(np.int64))
    def defend_fn(value, round_num):
      defended = defense(value, client_seed(value, round_num, int(seed)))
      return defended, base.zero_fraction(defended)
    return defend_fn

  @tff.tensorflow.computation
  def initial_round():
    return tf.constant(0, tf.int64)

  @tff.tensorflow.computation(tff.TensorType(np.int64))
  def next_round(r):
    return r + 1

  def init_fn_impl(inner_process):
    return tff.federated_zip(collections.OrderedDict(
        round=tff.federated_eval(initial_round, tff.SERVER),
        inner_agg=inner_process.initialize()))

  def next_fn_impl(state, value, defend_fn, inner_process, weight=None):
    round_num, inner_state = state
    defended, zero_fraction = tff.federated_map(
        defend_fn, (value, tff.federated_broadcast(round_num)))
    if weight is None:
      out = inner_process.next(inner_state, defended)
    else:
      out = inner_process.next(inner_state, defended, weight)
    new_state = collections.OrderedDict(
        round=tff.federated_map(next_round, round_num), inner_agg=out.state)
    measurements = collections.OrderedDict(
        defense_zero_fraction=tff.federated_mean(zero_fraction),
        inner_agg=out.measurements)
    return tff.templates.MeasuredProcessOutput(
        state=tff.federated_zip(new_state), result=out.result,
        measurements=tff.federated_zip(measurements))

  if isinstance(inner_agg_factory, tff.aggregators.WeightedAggregationFactory):

    class WeightedDefenseFactory(tff.aggregators.WeightedAggregationFactory):
      """Weighted: applies the defence on clients, then the weighted inner aggregation."""

      def create(self, value_type, weight_type):
        _check_value_type(value_type)
        inner_process = inner_agg_factory.create(value_type, weight_type)
        defend_fn = make_defend_fn(value_type)

        @tff.federated_computation()
        def init_fn():
          return init_fn_impl(inner_process)

        @tff.federated_computation(init_fn.type_signature.result,
                                   tff.FederatedType(value_type, tff.CLIENTS),
                                   tff.FederatedType(weight_type, tff.CLIENTS))
        def next_fn(state, value, weight):
          return next_fn_impl(state, value, defend_fn, inner_process, weight)

        return tff.templates.AggregationProcess(init_fn, next_fn)

    return WeightedDefenseFactory()
  if isinstance(inner_agg_factory, tff.aggregators.UnweightedAggregationFactory):

    class UnweightedDefenseFactory(tff.aggregators.UnweightedAggregationFactory):
      """Unweighted: applies the defence on clients, then the inner aggregation."""

      def create(self, value_type):
        _check_value_type(value_type)
        inner_process = inner_agg_factory.create(value_type)
        defend_fn = make_defend_fn(value_type)

        @tff.federated_computation()
        def init_fn():
          return init_fn_impl(inner_process)

        @tff.federated_computation(init_fn.type_signature.result,
                                   tff.FederatedType(value_type, tff.CLIENTS))
        def next_fn(state, value):
          return next_fn_impl(state, value, defend_fn, inner_process)

        return tff.templates.AggregationProcess(init_fn, next_fn)

    return UnweightedDefenseFactory()
  raise TypeError("inner_agg_factory must be a tff.aggregators Weighted- or "
                  f"UnweightedAggregationFactory, got {type(inner_agg_factory).__name__}.")
