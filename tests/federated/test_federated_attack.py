"""Attacks on updates captured inside TFF rounds: a defence applied in the round weakens the
attack (default suite); the multi-step FedAvg attack runs on a capture (`-m slow`)."""

import dataclasses

import numpy as np
import pytest

from tf_dlg.attacks import runner
from tf_dlg.attacks.threat_model import ObservedUpdate
from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig


# Slow: it checks only shapes. In the default suite the test below attacks a capture with a
# real check, test_capture_round_trips_and_is_the_clients_real_update checks a multi-step
# capture exactly, and tests/attacks/test_attack.py the multi-step delta the attack simulates.
@pytest.mark.slow
def test_multistep_attack_runs_on_a_captured_tff_update(digits, tmp_path):
  # Tiny clients (~4 examples), plain SGD as the attack's threat model assumes,
  # two local steps of batch 2: a multi-step fedavg_delta observation.
  config = FederatedConfig(
    dataset="digits",
    num_clients=360,
    clients_per_round=2,
    rounds=1,
    client_optimizer="sgd",
    client_lr=0.1,
    local_epochs=1,
    batch_size=2,
    capture_round=1,
    seed=0,
  )
  result = sim.run_simulation(config, str(tmp_path), dataset=digits, progress=False)
  obs = ObservedUpdate.load(result.capture_path)
  assert obs.kind == "fedavg_delta" and obs.local_steps == 2 and obs.batch_size == 2
  assert obs.metadata["client_optimizer"] == "sgd"

  attack_config = runner.AttackConfig(
    attack="ig", iterations=4, seed=0, optimizer="adam", check_every=2, jit_compile=False
  )
  attack = runner.run_attacks(None, [obs], attack_config)[0]
  assert attack.images.shape == obs.true_images.shape
  assert attack.labels.shape == obs.true_labels.shape
  assert np.isfinite(attack.distance) and attack.iterations >= 1
  assert attack.status != "failed"


def test_masking_applied_in_a_tff_round_weakens_the_attack_on_the_capture(digits, tmp_path):
  """A client of one image, one local SGD step (its update is lr x its gradient), captured
  inside a real TFF round: almost unmasked (rate 1e-4), the attack recovers the image; masked
  at rate 0.99 in the same build (the rate is a runtime input), the same attack from the same
  start does not. Judged by NumPy's mean squared error against the true image."""
  base = FederatedConfig(
    dataset="digits",
    model="lenet",
    num_clients=len(digits.x_train),  # one image per client
    clients_per_round=1,
    rounds=1,
    client_optimizer="sgd",
    client_lr=0.1,
    batch_size=1,
    capture_round=1,
    seed=0,
  )
  observed = []
  for rate in (1e-4, 0.99):
    config = dataclasses.replace(base, defense="masking", defense_param=rate)
    config = dataclasses.replace(config, capture_client=sim.sample_clients(config, 1)[0])
    result = sim.run_simulation(config, str(tmp_path / str(rate)), dataset=digits, progress=False)
    obs = ObservedUpdate.load(result.capture_path)
    assert obs.num_examples == 1 and obs.local_steps == 1 and obs.defense["name"] == "masking"
    flat = np.concatenate([np.ravel(u) for u in obs.update])
    assert np.mean(flat == 0) == pytest.approx(rate, abs=0.01)  # the round masked it
    observed.append(obs)
  np.testing.assert_array_equal(observed[0].true_images, observed[1].true_images)
  attack_config = runner.AttackConfig(attack="idlg", iterations=150, seed=(0, 0), jit_compile=False)
  attacked = runner.run_attacks(None, observed, attack_config)
  errors = {
    rate: float(np.mean((a.images - o.true_images) ** 2))
    for rate, a, o in zip((1e-4, 0.99), attacked, observed)
  }
  assert errors[1e-4] < 5e-3, errors  # recovered: PSNR over 23 dB (pixels in [0, 1])
  assert errors[0.99] > 20 * errors[1e-4] and errors[0.99] > 1e-2, errors
