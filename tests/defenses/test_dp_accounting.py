"""DP numbers (`tf_dlg.defenses.dp`) against dp-accounting, published values and TFF rounds.

Epsilon is compared with dp-accounting's own RDP accountant fed the same mechanism through
another path (`compose(event, count)` instead of a self-composed event), and with values
published by others for the same settings. `dp_fedavg_aggregator` runs real TFF aggregation
rounds whose clipping and noise scale are measured against numbers computed by hand from
the DP-FedAvg papers' definitions.
"""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from tf_dlg.defenses import dp as dp_lib
from tf_dlg.execution import runtime
from tf_dlg.federated import defense_aggregator

tff = runtime.install_context()

# (q, sigma, steps, delta): DP-SGD-like (small q, many steps), DP-FedAvg-like (large q,
# few rounds), no sampling, and the tensorflow-privacy test settings below.
SETTINGS = [
  (0.01, 4.0, 10_000, 1e-5),
  (0.0025, 1.3, 6_000, 1e-5),
  (0.001, 1.0, 30_000, 1e-7),
  (0.1, 1.0, 50, 1e-5),
  (0.5, 2.0, 200, 1e-6),
  (1.0, 0.7, 2, 1e-5),
  (0.02, 0.8, 1_000, 1e-6),
]


def _reference_epsilon(q, sigma, steps, delta):
  accountant = dp_accounting.rdp.RdpAccountant()
  event = dp_accounting.GaussianDpEvent(sigma)
  if q < 1.0:
    event = dp_accounting.PoissonSampledDpEvent(q, event)
  accountant.compose(event, steps)
  return accountant.get_epsilon(delta)


@pytest.mark.parametrize("q,sigma,steps,delta", SETTINGS)
def test_dp_sgd_epsilon_is_dp_accountings_rdp_epsilon(q, sigma, steps, delta):
  # The tolerance: 1 % of dp-accounting's RDP accountant.
  want = _reference_epsilon(q, sigma, steps, delta)
  assert np.isfinite(want) and want > 0
  assert dp_lib.dp_sgd_epsilon(sigma, steps, q, delta) == pytest.approx(want, rel=0.01)


@pytest.mark.parametrize(
  "n,batch,sigma,epochs,delta,published",
  [
    # tensorflow-privacy 0.9.0, compute_dp_sgd_privacy_test.py, Test0 and Test1
    # (Poisson-sampled Gaussian, RDP accountant): q = batch / n, steps = epochs * n / batch.
    (60_000, 150, 1.3, 15, 1e-5, 0.7242234026109595),
    (100_000, 100, 1.0, 30, 1e-7, 1.4154988495444845),
  ],
)
def test_dp_sgd_epsilon_matches_tensorflow_privacy_published_values(
  n, batch, sigma, epochs, delta, published
):
  steps = math.ceil(epochs * n / batch)
  assert dp_lib.dp_sgd_epsilon(sigma, steps, batch / n, delta) == pytest.approx(published, rel=0.01)


def test_dp_sgd_epsilon_matches_tensorflow_privacy_example_privacy():
  # tensorflow-privacy 0.9.0, compute_dp_sgd_privacy_test.py,
  # test_compute_dp_sgd_example_privacy: 1.2 epochs, sigma 0.7, delta 1e-5, no
  # microbatching: q = 0.01 -> 3.2391922 (120 steps); no sampling -> 10.8602036 (2 steps).
  assert dp_lib.dp_sgd_epsilon(0.7, 120, 0.01, 1e-5) == pytest.approx(3.2391922, rel=0.01)
  assert dp_lib.dp_sgd_epsilon(0.7, 2, 1.0, 1e-5) == pytest.approx(10.8602036, rel=0.01)


def test_dp_sgd_epsilon_within_abadi_et_al_mnist_bound():
  """Abadi et al. 2016 (DP-SGD), MNIST: q = 0.01, sigma = 4, delta = 1e-5, E = 100 epochs
  (10,000 steps): the moments accountant gives epsilon = 1.26. dp-accounting converts RDP
  to (epsilon, delta) with a tighter bound, so its epsilon must not exceed 1.26; the paper's
  own conversion, eps = min over orders a of RDP(a) + log(1/delta) / (a - 1) (Mironov 2017,
  Prop. 3), on the same RDP curve must give 1.26 back."""
  eps = dp_lib.dp_sgd_epsilon(4.0, 10_000, 0.01, 1e-5)
  assert 0.5 < eps <= 1.26
  orders = np.arange(1.05, 100.0, 0.05)
  accountant = dp_accounting.rdp.RdpAccountant(list(orders))
  accountant.compose(
    dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(4.0)), 10_000
  )
  classic = np.min(np.asarray(accountant._rdp) + math.log(1e5) / (orders - 1))
  assert classic == pytest.approx(1.26, rel=0.01)


def _without_replacement_epsilon(z, k, n, rounds, delta):
  """dp-accounting fed directly: k of n clients drawn without replacement each round,
  replace-one neighbours (the only relation its RDP accountant takes for this event), so a
  client's clipped update C swapped for another moves the sum by 2 C: multiplier z / 2."""
  accountant = dp_accounting.rdp.RdpAccountant(
    neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
  )
  event = dp_accounting.SampledWithoutReplacementDpEvent(n, k, dp_accounting.GaussianDpEvent(z / 2))
  accountant.compose(event, rounds)
  return accountant.get_epsilon(delta)


@pytest.mark.parametrize("z,k,n,rounds,delta", [(1.1, 10, 1000, 50, 1e-5), (1.0, 3, 10, 15, 1e-5)])
def test_dp_fedavg_epsilon_is_sampling_without_replacement(z, k, n, rounds, delta):
  # simulation.sample_clients draws a fixed-size set without replacement, not Poisson.
  want = _without_replacement_epsilon(z, k, n, rounds, delta)
  assert dp_lib.dp_fedavg_epsilon(z, k, n, rounds, delta) == pytest.approx(want, rel=1e-6)
  # Amplification by sampling: fewer clients per round, smaller epsilon.
  assert dp_lib.dp_fedavg_epsilon(z, k, n, rounds, delta) < dp_lib.dp_fedavg_epsilon(
    z, n, n, rounds, delta
  )
  # Not the Poisson accounting the function used before (smaller: add/remove sensitivity C).
  assert want > _reference_epsilon(k / n, z, rounds, delta) * 1.5


@pytest.mark.parametrize("z", [0.1, 1.0, 4.0])
def test_dp_fedavg_epsilon_full_participation_by_hand(z):
  """Every client every round: no sampling, T Gaussian steps of multiplier z / 2 (replace-one).
  RDP(a) = T a / (2 (z/2)^2) = 2 T a / z^2 (Mironov 2017, Prop. 7); (eps, delta) by Canonne,
  Kamath & Steinke 2020 (Prop. 12): eps = min_a RDP(a) + log((a-1)/a) - (log delta + log a) /
  (a - 1). On a dense grid of orders this is at most dp-accounting's (discrete orders) value."""
  rounds, delta = 15, 1e-5
  a = np.linspace(1.001, 2000.0, 400_000)
  by_hand = np.min(
    2 * rounds * a / z**2 + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
  )
  got = dp_lib.dp_fedavg_epsilon(z, 10, 10, rounds, delta)
  assert by_hand * (1 - 1e-9) <= got <= by_hand * 1.02, (got, by_hand)


def test_dp_fedavg_epsilon_refuses_bad_values():
  for bad in (dict(rounds=0), dict(delta=0.0), dict(noise_multiplier=0.0)):
    args = dict(noise_multiplier=1.0, clients_per_round=2, total_clients=4, rounds=3, delta=1e-5)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
      dp_lib.dp_fedavg_epsilon(**dict(args, **bad))


# ----------------------------------------------------------------------------- TFF rounds

DIM = 4000
CLIENTS = 20
# tff.learning.dp_aggregator starts its adaptive clip norm at 0.1 (gaussian_adaptive's
# initial_l2_norm_clip) and zeroes clients whose max |entry| exceeds 2 x 10.0 + 1 = 21
# (_default_zeroing: initial estimate 10, multiplier 2, increment 1).
INITIAL_CLIP = 0.1
ZEROING_BOUND = 21.0


def _one_round(factory, client_values):
  process = factory.create(tff.TensorType(np.float32, [DIM]))
  out = process.next(process.initialize(), client_values)
  return np.asarray(out.result, np.float64)


def _huge_clients(seed):
  rng = np.random.default_rng(seed)
  values = rng.normal(size=(CLIENTS, DIM)) * 2.0  # norms ~ 126, max |entry| ~ 9 < 21
  return [v.astype(np.float32) for v in values]


def test_dp_fedavg_aggregator_clips_every_client_to_the_clip_norm():
  values = _huge_clients(0)
  assert min(np.linalg.norm(v) for v in values) > 10 * INITIAL_CLIP
  got = _one_round(defense_aggregator.dp_fedavg_aggregator(0.0, CLIENTS, zeroing=False), values)
  want = sum(INITIAL_CLIP * v / np.linalg.norm(v.astype(np.float64)) for v in values) / CLIENTS
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  # The mean of clipped updates is bounded by the clip norm, whatever the clients send.
  assert np.linalg.norm(got) <= INITIAL_CLIP * (1 + 1e-5)


def test_dp_fedavg_aggregator_zeroes_a_corrupted_client():
  values = _huge_clients(1)
  values[3] = np.full(DIM, 1e6, np.float32)
  got = _one_round(defense_aggregator.dp_fedavg_aggregator(0.0, CLIENTS), values)
  # The corrupted client adds nothing; the denominator stays clients_per_round.
  kept = [v for i, v in enumerate(values) if i != 3]
  want = sum(INITIAL_CLIP * v / np.linalg.norm(v.astype(np.float64)) for v in kept) / CLIENTS
  assert np.max(np.abs(values[3])) > ZEROING_BOUND > max(np.max(np.abs(v)) for v in kept)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("z", [1.0, 0.5])
def test_dp_fedavg_aggregator_noise_scale(z):
  """All-zero updates leave pure noise: N(0, (z_value x clip / clients)^2) per entry, where
  z_value = (z^-2 - (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, Thm. 1: the clip-count query
  with sigma_b = 0.05 x clients takes its share of the budget)."""
  sigma_b = 0.05 * CLIENTS
  z_value = (z**-2 - (2 * sigma_b) ** -2) ** -0.5  # 1.1547 for z = 1, 0.5164 for z = 0.5
  want_std = z_value * INITIAL_CLIP / CLIENTS
  values = [np.zeros(DIM, np.float32) for _ in range(CLIENTS)]
  got = _one_round(defense_aggregator.dp_fedavg_aggregator(z, CLIENTS, zeroing=False), values)
  # Known mean 0: DIM x s^2 / sigma^2 ~ chi-square(DIM); a 1e-6 two-sided band, about
  # +-5 % on the std at DIM = 4000, excludes z x clip / clients (15 % low for z = 1).
  lo, hi = (math.sqrt(stats.chi2.ppf(p, DIM) / DIM) for p in (0.5e-6, 1 - 0.5e-6))
  ratio = math.sqrt(np.mean(got**2)) / want_std
  assert lo < ratio < hi, (ratio, lo, hi)
  # Mean of DIM iid entries: |mean| < 5 standard errors (p ~ 6e-7).
  assert abs(np.mean(got)) < 5 * want_std / math.sqrt(DIM)
