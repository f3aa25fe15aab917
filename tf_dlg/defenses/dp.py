"""Differential-privacy baselines, built from tensorflow-privacy, dp-accounting and TFF.

* `DPGaussian(noise_multiplier, l2_norm_clip)`: the DP-SGD step on one client update
  (the single-gradient attack setting), a `base.Chain` of two steps: tensorflow-privacy's
  `GaussianSumQuery` clips the update to `l2_norm_clip`, then Gaussian noise of standard
  deviation `noise_multiplier * l2_norm_clip` is added (`noising.Noising`). The noise is
  drawn with a stateless op from the defence's seed (the query's own `tf.random.normal`
  is stateful), so results are reproducible.
* `dp_sgd_epsilon(...)`: epsilon of such steps from dp-accounting's RDP accountant.
* `dp_fedavg_epsilon(...)`: the epsilon of DP-FedAvg
  (`tf_dlg.federated.defense_aggregator.dp_fedavg_aggregator`: `tff.learning.dp_aggregator`,
  adaptive clipping, Gaussian noise at the server) for given rounds, clients per round and
  total clients. The rounds sample a
  fixed-size set of clients without replacement (`simulation.sample_clients`), so the
  epsilon is dp-accounting's `SampledWithoutReplacementDpEvent` (RDP accountant,
  replace-one neighbours), not the Poisson-sampled one.
"""

from __future__ import annotations

import functools

from tf_dlg import validation
from tf_dlg.defenses import base, clipping, noising


class QueryClipping(base.Defense):
  """tensorflow-privacy's clipping of one record to its global L2 norm `l2_norm_clip`.

  `GaussianSumQuery.preprocess_record`: the clipping step of `DPGaussian`, kept as the
  library's own rather than `clipping.Clipping` so that the DP baseline is the DP-SGD step.
  """

  name = "dp_clip"
  param_name = "l2_norm_clip"
  clips = True

  @staticmethod
  def check(l2_norm_clip):
    return base.check_number(
      "dp l2_norm_clip", l2_norm_clip, 0.0, float("inf"), low_open=True, high_open=True
    )

  def _apply(self, tensors, param, seed):
    import tensorflow_privacy

    query = tensorflow_privacy.GaussianSumQuery(l2_norm_clip=param, stddev=0.0)
    params = query.derive_sample_params(query.initial_global_state())
    return query.preprocess_record(params, list(tensors))

  def _clip_scale(self, tensors, param):
    return clipping.clip_scale(tensors, param)


def _constant(value, param):
  del param
  return value


def _times(factor, param):
  return param * factor


class DPGaussian(base.Chain):
  """DP-SGD's clip-and-noise on one update; param = noise multiplier >= 0."""

  name = "dp"
  param_name = "noise_multiplier"
  clips = True
  draws = True
  option_names = ("l2_norm_clip",)

  def __init__(self, noise_multiplier: float, exclude=None, l2_norm_clip: float = 1.0):
    type(self).check(noise_multiplier)  # the parameter's error before the option's
    clip = QueryClipping.check(l2_norm_clip)
    # The clip step's bound is C whatever z; the noise step's stddev is z x C, a Python
    # float or (TFF) a float64 tensor. Partials, not lambdas, so that the defence pickles.
    steps = (
      (QueryClipping(clip), functools.partial(_constant, clip)),
      (noising.Noising(0.0), functools.partial(_times, clip)),
    )
    super().__init__(noise_multiplier, exclude, steps)
    self.l2_norm_clip = clip

  @staticmethod
  def check(noise_multiplier):
    return base.check_number(
      "dp noise_multiplier", noise_multiplier, 0.0, float("inf"), high_open=True
    )


def dp_sgd_epsilon(
  noise_multiplier: float, steps: int, sampling_probability: float = 1.0, delta: float = 1e-5
) -> float:
  """Epsilon (RDP accountant) of `steps` Poisson-sampled Gaussian mechanism steps."""
  import dp_accounting

  base.check_number(
    "noise_multiplier", noise_multiplier, 0.0, float("inf"), low_open=True, high_open=True
  )
  base.check_number("sampling_probability", sampling_probability, 0.0, 1.0, low_open=True)
  base.check_number("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
  validation.check_int("steps", steps, 1)
  event = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(
      sampling_probability, dp_accounting.GaussianDpEvent(noise_multiplier)
    ),
    steps,
  )
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(event)
  return float(accountant.get_epsilon(delta))


def dp_fedavg_epsilon(
  noise_multiplier: float,
  clients_per_round: int,
  total_clients: int,
  rounds: int,
  delta: float = 1e-5,
) -> float:
  """Client-level epsilon of DP-FedAvg whose rounds each draw `clients_per_round` of
  `total_clients` without replacement (as `simulation.sample_clients` does).

  dp-accounting's RDP accountant supports that sampling only for replace-one neighbours
  (one client's data swapped for another's). Swapping one client's update clipped to C for
  another moves the sum by up to 2 C, while the noise is `noise_multiplier` x C: the
  Gaussian event's multiplier, relative to that sensitivity, is `noise_multiplier / 2`.
  """
  import dp_accounting

  base.check_number(
    "noise_multiplier", noise_multiplier, 0.0, float("inf"), low_open=True, high_open=True
  )
  total_clients = validation.check_int("total_clients", total_clients, 1)
  validation.check_int("clients_per_round", clients_per_round, 1, total_clients)
  validation.check_int("rounds", rounds, 1)
  base.check_number("delta", delta, 0.0, 1.0, low_open=True, high_open=True)
  event = dp_accounting.SampledWithoutReplacementDpEvent(
    total_clients, clients_per_round, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
  )
  accountant = dp_accounting.rdp.RdpAccountant(
    neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
  )
  accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
  return float(accountant.get_epsilon(delta))
