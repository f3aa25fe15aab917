"""The multi-step FedAvg attack runs on an update captured inside a TFF round."""

import numpy as np

from tf_dlg.attacks import runner
from tf_dlg.attacks.threat_model import ObservedUpdate
from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig


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
