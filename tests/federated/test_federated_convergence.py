"""Accuracy of FedAvg on digits (10 clients, IID, no defence) and under a Byzantine client.

Settings: `FederatedConfig` defaults (bn_cnn, client Adam 3e-3, 2 local epochs of batch
10, server SGD 1.0, BN momentum 0.5), seed 0. Observed on the project machine: mean
first reaches >= 90 % test accuracy at round 21 and ends at ~94 % after 30; median
tracks it within about a point.

Default suite: 6-round runs (the trends). Five rounds gave mean 0.70 in one run and 0.55 in
another (a CI run at load ~15: the TFF worker's client order is not fixed), below the 0.6
bar; six keep the margin. `-m slow`: the issue's 30-round criteria.
"""

import pytest

from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig

ROUNDS_TO_90 = 30  # the stated bound: mean FedAvg reaches >= 90 % within 30 rounds


@pytest.fixture(scope="module")
def runner(digits, tmp_path_factory):
  """run(aggregator, malicious, rounds) -> history; one build per aggregator, cached runs."""
  built, done = {}, {}
  root = tmp_path_factory.mktemp("convergence")

  def run(aggregator, malicious=0, rounds=6):
    key = (aggregator, malicious, rounds)
    if key not in done:
      config = FederatedConfig(
        dataset="digits",
        num_clients=10,
        rounds=rounds,
        aggregator=aggregator,
        malicious_clients=malicious,
        malicious_scale=1000.0,
        seed=0,
      )
      if aggregator not in built:
        built[aggregator] = sim.build_for_config(config, digits)
      result = sim.run_simulation(
        config,
        str(root / "_".join(map(str, key))),
        dataset=digits,
        fedavg=built[aggregator],
        progress=False,
      )
      done[key] = [h["test_accuracy"] for h in result.history]
      print(
        f"\n{aggregator} malicious={malicious}: {[round(a, 3) for a in done[key]]}"
      )  # shown with -s
    return done[key]

  return run


# --------------------------------------------------------------------------- default (short)


def test_short_clean_mean_learns(runner):
  acc = runner("mean")
  assert max(acc) >= 0.6, acc
  assert acc[-1] > acc[0], acc


def test_short_one_malicious_client_breaks_mean_not_median_or_trimmed_mean(runner):
  clean = max(runner("mean"))
  mean_bad = runner("mean", malicious=1)
  median_bad = runner("median", malicious=1)
  trimmed_bad = runner("trimmed_mean", malicious=1)
  assert mean_bad[-1] <= 0.2, mean_bad  # collapsed (10 classes: chance 0.1)
  assert max(median_bad) >= clean - 0.1, (median_bad, clean)
  assert max(trimmed_bad) >= clean - 0.1, (trimmed_bad, clean)


# --------------------------------------------------------------------------- the bar


@pytest.mark.slow
def test_mean_reaches_90_percent_within_bound(runner):
  acc = runner("mean", rounds=ROUNDS_TO_90)
  assert max(acc) >= 0.90, acc


@pytest.mark.slow
def test_median_within_3_points_of_mean(runner):
  mean = runner("mean", rounds=ROUNDS_TO_90)
  median = runner("median", rounds=ROUNDS_TO_90)
  assert max(median) >= max(mean) - 0.03, (median, mean)
  # And at the end, averaged over the last 3 rounds (the curves are noisy).
  assert sum(median[-3:]) / 3 >= sum(mean[-3:]) / 3 - 0.03, (median, mean)


@pytest.mark.slow
def test_one_malicious_client_x1000(runner):
  clean = runner("mean", rounds=ROUNDS_TO_90)
  mean_bad = runner("mean", malicious=1, rounds=ROUNDS_TO_90)
  assert max(mean_bad[-5:]) <= 0.2, mean_bad
  for aggregator in ("median", "trimmed_mean"):
    bad = runner(aggregator, malicious=1, rounds=ROUNDS_TO_90)
    assert max(bad) >= max(clean) - 0.05, (aggregator, bad, clean)
    assert sum(bad[-3:]) / 3 >= sum(clean[-3:]) / 3 - 0.05, (aggregator, bad, clean)
