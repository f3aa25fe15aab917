"""One TFF build serves many runs: seeds and defence parameters are runtime inputs.

A build reused for another seed and defence parameter (`FedAvg.for_config`, what
`build_fedavg(reuse=True)` returns) must train exactly as a fresh build of that
configuration: the same test accuracy and loss every round.
"""

import dataclasses

import numpy as np
import pytest

from tf_dlg.execution import runtime
from tf_dlg.federated import fedavg as fedavg_lib
from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig

tff = runtime.install_context()

# Two runs that differ in the model seed and the defence parameter only.
RUN_A = FederatedConfig(
  dataset="digits", num_clients=4, rounds=2, defense="masking", defense_param=0.2, seed=0
)
RUN_B = dataclasses.replace(RUN_A, defense_param=0.7, seed=1)


def _curve(config, fa, digits, out):
  history = sim.run_simulation(config, str(out), dataset=digits, fedavg=fa, progress=False).history
  return np.array([[h["test_accuracy"], h["test_loss"], h["train_loss"]] for h in history])


@pytest.fixture(scope="module")
def fresh(digits):
  """A fresh build of each run (no reuse)."""
  return {
    c.seed: fedavg_lib.build_fedavg(digits.input_shape, digits.num_classes, c)
    for c in (RUN_A, RUN_B)
  }


def test_a_reused_build_trains_as_a_fresh_one(fresh, digits, tmp_path):
  curves = {}
  for config, other in ((RUN_A, RUN_B), (RUN_B, RUN_A)):
    want = _curve(config, fresh[config.seed], digits, tmp_path / f"fresh{config.seed}")
    reused = fresh[other.seed].for_config(config)
    assert reused.process is fresh[other.seed].process
    got = _curve(config, reused, digits, tmp_path / f"reused{config.seed}")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    curves[config.seed] = want
  # The seed and parameter matter: the two runs differ.
  assert np.max(np.abs(curves[0] - curves[1])) > 1e-3


def test_build_fedavg_reuses_by_build_key(fresh, digits):
  count = fedavg_lib.build_count()
  again = fedavg_lib.build_fedavg(
    digits.input_shape, digits.num_classes, RUN_B, reuse=True, partition="dirichlet", rounds=5
  )
  assert fedavg_lib.build_count() == count  # a view, no new build
  assert again.config.partition == "dirichlet" and again.defense.param == 0.7
  key = fedavg_lib.build_key(digits.input_shape, digits.num_classes, RUN_A)
  for baked in (dict(aggregator="median"), dict(defense="pruning"), dict(model="lenet")):
    other = dataclasses.replace(RUN_A, **baked)
    assert fedavg_lib.build_key(digits.input_shape, digits.num_classes, other) != key
  assert fedavg_lib.build_key((16, 16, 1), digits.num_classes, RUN_A) != key


def test_for_config_refuses_a_setting_baked_into_the_build(fresh):
  with pytest.raises(ValueError, match="baked into the TFF computation"):
    fresh[0].for_config(dataclasses.replace(RUN_A, client_lr=0.01))
