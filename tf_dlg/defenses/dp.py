"""Differential-privacy baselines, built from tensorflow-privacy, dp-accounting and TFF.

* `DPGaussian(noise_multiplier, l2_norm_clip)`: the DP-SGD step on one client update
  (the single-gradient attack setting): tensorflow-privacy's `GaussianSumQuery` clips
  the update to `l2_norm_clip` and sets the noise scale `noise_multiplier *
  l2_norm_clip`. The noise itself is drawn with a stateless op from the defence's seed
  (the query's own `tf.random.normal` is stateful), so results are reproducible.
* `dp_sgd_epsilon(...)`: epsilon of such steps from dp-accounting's RDP accountant.
* `dp_fedavg_aggregator(...)` / `dp_fedavg_epsilon(...)`: DP-FedAvg with
  `tff.learning.dp_aggregator` (adaptive clipping, Gaussian noise at the server) and its
  epsilon for given rounds, clients per round and total clients. The rounds sample a
  fixed-size set of clients without replacement (`simulation.sample_clients`), so the
  epsilon is dp-accounting's `SampledWithoutReplacementDpEvent` (RDP accountant,
  replace-one neighbours), not the Poisson-sampled one.
"""

from __future__ import annotations

from tf_dlg import validation
from tf_dlg.defenses import base, clipping, noising


class DPGaussian(base.Defense):
  """DP-SGD's clip-and-noise on one update; param = noise multiplier >= 0."""

  name = "dp"
  param_name = "noise_multiplier"
  clips = True

  def __init__(self, noise_multiplier: float, exclude=None, l2_norm_clip: float = 1.0):
    super().__init__(
      base.check_number("dp noise_multiplier", noise_multiplier, 0.0, float("inf"), high_open=True),
      exclude,
    )
    self.l2_norm_clip = base.check_number(
      "dp l2_norm_clip", l2_norm_clip, 0.0, float("inf"), low_open=True, high_open=True
    )

  def _apply(self, tensors, seed):
    # Imported here: a `dp` configuration builds without tensorflow-privacy (the Flower
    # engine trains it with Flower's own DP, in the environment without the TFF stack).
    import tensorflow_privacy

    query = tensorflow_privacy.GaussianSumQuery(
      l2_norm_clip=self.l2_norm_clip, stddev=self.param * self.l2_norm_clip
    )
    params = query.derive_sample_params(query.initial_global_state())
    clipped = query.preprocess_record(params, list(tensors))
    # The query's stddev as a Python float (its state holds a tensor, which `float()`
    # cannot read inside `tf.function` / TFF computations).
    return noising.add_noise(clipped, self.param * self.l2_norm_clip, seed)

  def clip_scale(self, update):
    return clipping.clip_scale(self.kept_tensors(update), self.l2_norm_clip)

  def get_config(self):
    return dict(super().get_config(), l2_norm_clip=self.l2_norm_clip)


SPEC = base.DefenseSpec(
  name="dp",
  cls=DPGaussian,
  search=base.SearchRange(1e-4, 10.0, "log", "higher"),
  # Noise has no adaptive answer: the better of cosine and Euclidean matching, and
  # gallery matching (the attacker the identification criterion assumes).
  strongest_attackers=("ig", "idlg", "gallery_match"),
  family="dp",
  # Noise multipliers (clip 1.0): over 15 full-participation rounds, epsilon ~3.3e5, ~3.4e3, ~65
  # (replace-one neighbours: see dp_fedavg_epsilon).
  frontier=(0.01, 0.1, 1.0),
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


def dp_fedavg_aggregator(noise_multiplier: float, clients_per_round: int, zeroing: bool = True):
  """`tff.learning.dp_aggregator`: DP-FedAvg's unweighted aggregation factory."""
  import tensorflow_federated as tff

  base.check_number("noise_multiplier", noise_multiplier, 0.0, float("inf"), high_open=True)
  return tff.learning.dp_aggregator(noise_multiplier, clients_per_round, zeroing=zeroing)
