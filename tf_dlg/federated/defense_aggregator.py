"""The TFF adapter of the defences: transform each client's update on the client.

`factory(defense, inner_agg_factory, seed)` is the one entry of federated training: it
wraps the run's `tf_dlg.defenses.Defense` (built once, by `fedavg.build_fedavg`) around an
inner `tff.aggregators` factory. `defense_factory(defense, inner_agg_factory)` does so for
a defence that one update expresses, in the style of TFF's `clipping_factory`: the pure
TensorFlow transform lives in the defence's own module, and this file only does the
federated plumbing (seed broadcast, client-side map, inner aggregation, measurements).
The parameter travels in the process state and is passed to the transform as it stands
(`defense.apply(value, param, seed)`), so one built process serves every setting;
`initial_state(state, param)` is the state of a run at another setting.

`median_clipping_factory(clip_ratio, inner)` clips every client to clip_ratio x the
median client update norm of the round (computed at the server from every client's
norm, then broadcast): the `clipping_median` defence, which needs the round's clients
(`Defense.single_update` is False). `dp_fedavg_aggregator(...)` is DP-FedAvg's
`tff.learning.dp_aggregator`.

Each statistic is measured once: the zero fraction of what clients send by
`tff.aggregators.add_measurements` around the inner aggregation, the clip scale by the
transform that chose it (only it knows the bound it applied: fixed, own-norm or the
round's median).

TFF's own `tff.aggregators.clipping_factory` is not used: it clips every leaf of the
value (the BatchNorm entries too, which the defences exclude) and takes its bound from
an estimation process of earlier rounds, where `clipping_median` uses this round's
median; wrapping it would train a different transform than the one the attacks measure.

Importing this module leaves TFF's execution context alone; running a process needs
one (the drivers install `tf_dlg.execution.runtime`'s loopback-only context).
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tf_dlg.defenses import base, clipping
from tf_dlg.validation import check_number

# The defence parameter in the process state: float64 keeps the Python value exactly.
_PARAM_TYPE = tff.TensorType(np.float64)
# Norms gathered per round for the median: every client's when there are at most this many.
MAX_MEDIAN_CLIENTS = 1000


def client_seed(value, round_num, base_seed: int = 0) -> tf.Tensor:
  """The seed a client uses in round `round_num`: (base_seed, round) folded with its value."""
  round_seed = tf.stack([tf.constant(base_seed, tf.int64), tf.cast(round_num, tf.int64)])
  return tf.random.experimental.stateless_fold_in(round_seed, base.value_fingerprint(value))


def _check_value_type(value_type):
  if not tff.types.is_structure_of_floats(value_type):
    raise TypeError(
      "All values in the provided value_type must be of floating dtype; "
      f"got value_type {value_type}."
    )


def _median(values: tf.Tensor) -> tf.Tensor:
  """`numpy.median` of a 1-D tensor (mean of the middle two for an even count; 0 if empty)."""
  x = tf.sort(values)
  n = tf.size(x)

  def middle():
    return (tf.gather(x, n // 2) + tf.gather(x, (n - 1) // 2)) / 2.0

  return tf.cond(n > 0, middle, lambda: tf.constant(0.0, x.dtype))


class _DefenseComputations:
  """The TFF computations of one defence on one value type, and the round plumbing."""

  def __init__(self, defense: base.Defense, value_type, seed: int, exclude=None):
    self.defense, self.exclude = defense, exclude
    self.median = isinstance(defense, clipping.MedianClipping)
    int_type, float_type = tff.TensorType(np.int64), tff.TensorType(np.float32)

    @tff.tensorflow.computation(tff.TensorType(np.float32))
    def clipped_fn(scale):
      return tf.cast(scale < 1.0, tf.float32)

    self.clipped_fn = clipped_fn
    if not self.median:  # the defence's own client transform

      @tff.tensorflow.computation(value_type, int_type, _PARAM_TYPE)
      def defend_fn(value, round_num, param):
        defended = defense.apply(value, param, client_seed(value, round_num, seed), exclude)
        return defended, defense.clip_scale(value, param, exclude)

      self.defend_fn = defend_fn
    else:
      self._build_median(value_type, float_type)

  def _build_median(self, value_type, float_type):
    """Computations of clipping to ratio x the round's median client norm."""
    defense, exclude = self.defense, self.exclude

    @tff.tensorflow.computation(value_type, float_type)
    def clip_to_bound_fn(value, bound):
      scale = clipping.clip_scale(defense.kept_tensors(value, exclude), bound)
      return _scale_kept(
        defense.kept_indices(len(tf.nest.flatten(value)), exclude), value, scale
      ), scale

    @tff.tensorflow.computation(value_type)
    def norm_fn(value):
      return base.global_norm(defense.kept_tensors(value, exclude))

    @tff.tensorflow.computation(tff.TensorType(np.float32, [None]), _PARAM_TYPE)
    def bound_fn(norms, ratio):
      return tf.cast(ratio, tf.float32) * _median(norms)

    self.norm_fn, self.bound_fn = norm_fn, bound_fn
    self.clip_to_bound_fn = clip_to_bound_fn
    self.sampler = tff.aggregators.UnweightedReservoirSamplingFactory(MAX_MEDIAN_CLIENTS).create(
      float_type
    )

  def defend(self, value, round_num, param):
    """Federated: the defended client values and the clients' statistics."""
    if not self.median:
      setting = tff.federated_broadcast(tff.federated_zip((round_num, param)))
      return tff.federated_map(self.defend_fn, (value, setting[0], setting[1]))
    norms = tff.federated_map(self.norm_fn, value)
    sampled = self.sampler.next(self.sampler.initialize(), norms).result
    bound = tff.federated_map(self.bound_fn, (sampled, param))
    bound = tff.federated_broadcast(bound)
    return tff.federated_map(self.clip_to_bound_fn, (value, bound))

  def next(self, state, value, inner_process, weight=None):
    """Federated: one round (defend on clients, inner aggregation, measurements)."""
    round_num, inner_state, param = state
    defended, scale = self.defend(value, round_num, param)
    if weight is None:
      out = inner_process.next(inner_state, defended)
    else:
      out = inner_process.next(inner_state, defended, weight)
    new_state = collections.OrderedDict(
      round=tff.federated_map(_next_round, round_num), inner_agg=out.state, param=param
    )
    measurements = collections.OrderedDict(inner_agg=out.measurements)
    if self.defense.clips:
      measurements.update(
        defense_clip_scale=tff.federated_mean(scale),
        defense_clipped_fraction=tff.federated_mean(tff.federated_map(self.clipped_fn, scale)),
      )
    return tff.templates.MeasuredProcessOutput(
      state=tff.federated_zip(new_state),
      result=out.result,
      measurements=tff.federated_zip(measurements),
    )


def _scale_kept(kept_indices, value, scale: tf.Tensor):
  """`value` with its tensors at `kept_indices` multiplied by `scale`."""
  flat = tf.nest.flatten(value)
  kept = set(kept_indices)
  out = [t * tf.cast(scale, t.dtype) if i in kept else t for i, t in enumerate(flat)]
  return tf.nest.pack_sequence_as(value, out)


@tff.tensorflow.computation
def _initial_round():
  return tf.constant(0, tf.int64)


@tff.tensorflow.computation(tff.TensorType(np.int64))
def _next_round(r):
  return r + 1


def _init_fn(inner_process, param: float):
  @tff.tensorflow.computation
  def initial_param():
    return tf.constant(0.0 if param is None else param, tf.float64)

  @tff.federated_computation()
  def init_fn():
    return tff.federated_zip(
      collections.OrderedDict(
        round=tff.federated_eval(_initial_round, tff.SERVER),
        inner_agg=inner_process.initialize(),
        param=tff.federated_eval(initial_param, tff.SERVER),
      )
    )

  return init_fn


def initial_state(state, param: float):
  """The defence aggregation's initial `state` for a run at `param` (a new state).

  A process is built once per defence and serves every setting of its parameter (the
  build's own is in `process.initialize()`); a run at another setting starts here.
  """
  if not (isinstance(state, collections.abc.Mapping) and "param" in state):
    raise TypeError(f"state {state!r} is not the state of a defence aggregation process.")
  return collections.OrderedDict(
    round=state["round"], inner_agg=state["inner_agg"], param=np.float64(param)
  )


class _WeightedDefenseFactory(tff.aggregators.WeightedAggregationFactory):
  """Weighted: applies the defence on clients, then the weighted inner aggregation."""

  def __init__(self, defense, inner, seed, exclude=None):
    self._args = (defense, seed, exclude)
    self._inner = inner

  def create(self, value_type, weight_type):
    _check_value_type(value_type)
    inner_process = self._inner.create(value_type, weight_type)
    comps = _DefenseComputations(self._args[0], value_type, *self._args[1:])
    init_fn = _init_fn(inner_process, self._args[0].param)

    @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(value_type, tff.CLIENTS),
      tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
      return comps.next(state, value, inner_process, weight)

    return tff.templates.AggregationProcess(init_fn, next_fn)


class _UnweightedDefenseFactory(tff.aggregators.UnweightedAggregationFactory):
  """Unweighted: applies the defence on clients, then the inner aggregation."""

  def __init__(self, defense, inner, seed, exclude=None):
    self._args = (defense, seed, exclude)
    self._inner = inner

  def create(self, value_type):
    _check_value_type(value_type)
    inner_process = self._inner.create(value_type)
    comps = _DefenseComputations(self._args[0], value_type, *self._args[1:])
    init_fn = _init_fn(inner_process, self._args[0].param)

    @tff.federated_computation(
      init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS)
    )
    def next_fn(state, value):
      return comps.next(state, value, inner_process)

    return tff.templates.AggregationProcess(init_fn, next_fn)


def _zero_fraction_measurement(defense: base.Defense, weighted: bool, exclude=None):
  """`add_measurements`' client function: mean zero fraction of the kept tensors."""

  def measure(value):
    @tff.tensorflow.computation(value.type_signature.member)
    def zero_fraction(v):
      kept = defense.kept_tensors(v, exclude)
      return base.zero_fraction(kept) if kept else tf.constant(0.0)

    fractions = tff.federated_map(zero_fraction, value)
    return collections.OrderedDict(defense_zero_fraction=tff.federated_mean(fractions))

  if weighted:
    return lambda value, weight: measure(value)
  return measure


def _make_factory(defense, inner_agg_factory, seed, exclude=None):
  weighted = isinstance(inner_agg_factory, tff.aggregators.WeightedAggregationFactory)
  if weighted or isinstance(inner_agg_factory, tff.aggregators.UnweightedAggregationFactory):
    # What clients send after the defence, measured where the inner aggregation sees it.
    inner_agg_factory = tff.aggregators.add_measurements(
      inner_agg_factory,
      client_measurement_fn=_zero_fraction_measurement(defense, weighted, exclude),
    )
  for kind, cls in (
    (tff.aggregators.WeightedAggregationFactory, _WeightedDefenseFactory),
    (tff.aggregators.UnweightedAggregationFactory, _UnweightedDefenseFactory),
  ):
    if isinstance(inner_agg_factory, kind):
      return cls(defense, inner_agg_factory, int(seed), exclude)
  raise TypeError(
    "inner_agg_factory must be a tff.aggregators Weighted- or "
    f"UnweightedAggregationFactory, got {type(inner_agg_factory).__name__}."
  )


def _check(defense, seed):
  if not isinstance(defense, base.Defense):
    raise TypeError(f"defense must be a tf_dlg.defenses.Defense, got {type(defense).__name__}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {type(seed).__name__}.")


def defense_factory(defense: base.Defense, inner_agg_factory, exclude=None, seed: int = 0):
  """Creates an aggregation factory that applies `defense` on every client.

  The created `tff.templates.AggregationProcess` sends each client the round's seed,
  applies `defense` to the client's value *on the client* (with a seed folded from the
  server's `(seed, round)` and a fingerprint of the client's own value, so that clients
  and rounds get different masks/noise yet a run is reproducible), and then aggregates
  the defended values as specified by `inner_agg_factory`.

  The process keeps the round number in its state and reports measurements
  * `inner_agg`: the inner process's measurements, with `defense_zero_fraction` added
    (`tff.aggregators.add_measurements`): the mean over clients of the fraction of
    exactly-zero entries among the defended value's non-excluded tensors (what masking
    and pruning change);
  and, for a defence that clips (`Defense.clips`),
  * `defense_clip_scale`: mean over clients of the factor by which norm clipping scaled
    the value (`Defense.clip_scale`; 1.0 = not clipped);
  * `defense_clipped_fraction`: the fraction of clients whose value was clipped.
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
  _check(defense, seed)
  if not defense.single_update:
    raise ValueError(
      f"{defense.name} needs the round's other clients, which one client's transform does "
      "not see: use `factory(defense, inner_agg_factory)`."
    )
  return _make_factory(defense, inner_agg_factory, seed, exclude)


def median_clipping_factory(clip_ratio: float, inner_agg_factory, exclude=None):
  """Clips each client's value to clip_ratio x the round's median client norm.

  Every client sends the global L2 norm of its (non-excluded) value; the server takes
  their median (`numpy.median`; over a uniform sample of `MAX_MEDIAN_CLIENTS` clients
  when a round has more) and broadcasts clip_ratio x median as the round's bound; each
  client then scales its value by min(1, bound / norm). With clip_ratio 1 the clients
  above the median are clipped to it. Measurements as in `defense_factory`. This is
  the TFF form of the `clipping_median` defence (`tf_dlg.defenses.clipping`).

  Args:
    clip_ratio: In (0, 1].
    inner_agg_factory: The aggregation after clipping (weighted or unweighted).
    exclude: Optional flat list of bools over the value's tensors (BatchNorm entries).
  """
  return _make_factory(clipping.MedianClipping(clip_ratio, exclude), inner_agg_factory, 0)


def factory(defense: base.Defense, inner_agg_factory, seed: int = 0):
  """The `tff.aggregators` factory that trains with `defense` before `inner_agg_factory`.

  The client transform itself (`defense_factory`), or, for a defence that needs the
  round's clients (`clipping_median`), the factory of that defence; deterministic ones
  ignore `seed`.
  """
  _check(defense, seed)
  if isinstance(defense, clipping.MedianClipping):
    return _make_factory(defense, inner_agg_factory, 0)
  if not defense.single_update:
    raise ValueError(f"{defense.name} needs the round's clients and has no TFF factory here.")
  return _make_factory(defense, inner_agg_factory, seed)


def dp_fedavg_aggregator(noise_multiplier: float, clients_per_round: int, zeroing: bool = True):
  """`tff.learning.dp_aggregator`: DP-FedAvg's unweighted aggregation factory."""
  check_number("noise_multiplier", noise_multiplier, 0.0, float("inf"), high_open=True)
  return tff.learning.dp_aggregator(noise_multiplier, clients_per_round, zeroing=zeroing)
