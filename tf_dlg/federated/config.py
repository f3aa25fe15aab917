"""The one federated configuration: `FederatedConfig`.

A frozen dataclass with one set of defaults, checked once when it is built (every
field, no data loaded: one line naming the value and its allowed range). The drivers
build it from flags, the studies compose it from their presets (`dataclasses.replace`
re-checks), and `tf_dlg.federated.fedavg.build_fedavg` / `simulation.run_simulation`
consume it. The one check that needs the data, that there are enough training examples
for the clients, is `validate(num_examples)`.

Importing this module imports neither TensorFlow Federated nor any data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Dict, Optional, Tuple

from tf_dlg import validation

# Errors name a field by its path in the configuration tree: `federated.batch_size`.
SECTION = "federated"


def field_choices() -> Dict[str, Tuple[str, ...]]:
  """{field: its allowed values} of the fields that name one of a list: what
  `FederatedConfig` checks, and what a driver's enum flags offer."""
  from tf_dlg import data as data_lib
  from tf_dlg import federated
  from tf_dlg import models as models_lib

  return {
    "dataset": tuple(data_lib.DATASETS),
    "partition": tuple(data_lib.PARTITION_SCHEMES),
    "model": tuple(models_lib.MODELS),
    "aggregator": tuple(federated.AGGREGATORS),
    "malicious_mode": tuple(federated.MALICIOUS_MODES),
    "client_optimizer": tuple(federated.OPTIMIZERS),
    "server_optimizer": tuple(federated.OPTIMIZERS),
  }


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
  """Everything that defines a federated run (the flags of `experiments/federated.py`).

  The training defaults (1 local epoch of batch 32, client Adam 1e-3, BN momentum 0.9,
  server SGD 1.0) are the ones at which `bn_cnn` FedAvg learns MNIST to >= 0.97 in 20
  rounds, found with `benchmarks.plain_fedavg --grid` (the README's table).

  Attributes:
    dataset: `tf_dlg.data` dataset name.
    data_dir: tfds data directory (tfds datasets only; must exist).
    partition: How training examples go to clients.
    alpha: Dirichlet concentration (partition=dirichlet).
    classes_per_client: Classes per client (partition=shards).
    num_clients: Number of clients.
    clients_per_round: Clients a round samples (None: all).
    rounds: FedAvg rounds.
    model: `tf_dlg.models` name; `bn_cnn` (BatchNorm CNN) by default.
    bn_momentum: Momentum of the BatchNorm moving statistics, or None to keep the
      model's. A client takes only a few local steps per round, so with Keras' 0.99 the
      statistics it sends barely move from the server's.
    aggregator: `mean` (weighted by examples), `median` or `trimmed_mean` (unweighted,
      coordinate-wise).
    trim_fraction: Fraction trimmed from each side (aggregator=trimmed_mean).
    defense: A `tf_dlg.defenses` name applied on every client before aggregation
      (`tf_dlg.federated.defense_aggregator`).
    defense_param: The defence's strength parameter.
    malicious_clients: Number of Byzantine clients.
    malicious_mode: Byzantine update: scaled delta, or noise of the delta's RMS x scale.
    malicious_scale: Byzantine factor.
    local_epochs: Local epochs per round.
    batch_size: Local batch size.
    client_optimizer: Client optimiser: `sgd`, `sgdm` or `adam`.
    client_lr: Client learning rate.
    server_optimizer: Server optimiser: `sgd`, `sgdm` or `adam`.
    server_lr: Server learning rate.
    seed: Seeds the model, sampling, shuffling and Byzantine clients.
    capture_round: 1-based round whose client update is saved (None: none).
    capture_client: Which client of `capture_round` is saved (None: the first sampled).
  """

  dataset: str = "digits"
  data_dir: Optional[str] = None
  partition: str = "iid"
  alpha: float = 0.5
  classes_per_client: int = 2
  num_clients: int = 10
  clients_per_round: Optional[int] = None
  rounds: int = 20
  model: str = "bn_cnn"
  bn_momentum: Optional[float] = 0.9
  aggregator: str = "mean"
  trim_fraction: float = 0.1
  defense: str = "none"
  defense_param: Optional[float] = None
  malicious_clients: int = 0
  malicious_mode: str = "scale"
  malicious_scale: float = 1000.0
  local_epochs: int = 1
  batch_size: int = 32
  client_optimizer: str = "adam"
  client_lr: float = 0.001
  server_optimizer: str = "sgd"
  server_lr: float = 1.0
  seed: int = 0
  capture_round: Optional[int] = None
  capture_client: Optional[int] = None

  # Fields that do not change the trajectory (may differ on resume).
  _NOT_FINGERPRINTED = ("rounds", "capture_round", "capture_client", "data_dir")

  def __post_init__(self):
    self._check_fields()

  def validate(self, num_examples: Optional[int] = None) -> "FederatedConfig":
    """Checks what needs the data (enough training examples for the clients)."""
    if num_examples is not None:
      validation.check_int(f"{SECTION}.num_clients", self.num_clients, 1, num_examples)
    return self

  def _check_fields(self) -> None:
    """ValueError naming the bad value and the allowed range."""
    for name, allowed in field_choices().items():
      validation.check_choice(f"{SECTION}.{name}", getattr(self, name), allowed)
    validation.check_int(f"{SECTION}.num_clients", self.num_clients, 1)
    if self.clients_per_round is not None:
      validation.check_int(
        f"{SECTION}.clients_per_round", self.clients_per_round, 1, self.num_clients
      )
    for name in ("rounds", "local_epochs", "batch_size", "classes_per_client"):
      validation.check_int(f"{SECTION}.{name}", getattr(self, name), 1)
    validation.check_int(f"{SECTION}.seed", self.seed, 0)
    self._check_malicious()
    inf = float("inf")
    for name in ("alpha", "malicious_scale", "client_lr", "server_lr"):
      validation.check_number(
        f"{SECTION}.{name}", getattr(self, name), 0, inf, low_open=True, high_open=True
      )
    validation.check_number(f"{SECTION}.trim_fraction", self.trim_fraction, 0, 0.5, high_open=True)
    if self.bn_momentum is not None:
      validation.check_number(f"{SECTION}.bn_momentum", self.bn_momentum, 0, 1, high_open=True)
    self._check_defense()
    self._check_capture()

  def _check_defense(self) -> None:
    from tf_dlg import defenses

    if self.defense == "none" and self.defense_param is not None:
      raise ValueError(
        f"{SECTION}.defense_param={self.defense_param!r} is set but {SECTION}.defense="
        f"{self.defense!r}; set a defence or drop the parameter."
      )
    # Its own ValueError (a value out of range names the defence's parameter).
    defenses.check_param(self.defense, self.defense_param, at=f"{SECTION}.defense_param")

  def _check_capture(self) -> None:
    if self.capture_round is not None:
      validation.check_int(f"{SECTION}.capture_round", self.capture_round, 1, self.rounds)
    if self.capture_client is not None:
      validation.check_int(
        f"{SECTION}.capture_client", self.capture_client, 0, self.num_clients - 1
      )
      if self.capture_round is None:
        raise ValueError(
          f"{SECTION}.capture_client is set but {SECTION}.capture_round is not; set both."
        )

  def _check_malicious(self) -> None:
    """Every round needs an honest client: an all-Byzantine round trains on garbage.

    Whether a seeded sampling happens to draw an all-Byzantine round is luck of the
    seed and the number of rounds; the rule here does not depend on either, and costs
    nothing however many rounds a run has: a round samples more clients than there
    are Byzantine ones.
    """
    m = validation.check_int(f"{SECTION}.malicious_clients", self.malicious_clients, 0)
    if m >= self.num_clients:
      raise ValueError(
        f"{SECTION}.malicious_clients={m} must be an integer in "
        f"[0, {self.num_clients - 1}] ({SECTION}.num_clients - 1): every client "
        "malicious leaves nothing to learn from."
      )
    k = self.clients_per_round or self.num_clients
    if m and k <= m:
      raise ValueError(
        f"{SECTION}.malicious_clients={m} with {SECTION}.clients_per_round={k}: a round could "
        f"sample only malicious clients; use {SECTION}.malicious_clients in [0, {k - 1}] or "
        f"{SECTION}.clients_per_round in [{m + 1}, {self.num_clients}]."
      )

  def fingerprint(self) -> str:
    fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self._NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]

  def build_defense(self, exclude=None):
    """The configured `tf_dlg.defenses.Defense` (None for `none`); a run builds it once."""
    if self.defense == "none":
      return None
    from tf_dlg import defenses

    return defenses.get_defense(self.defense, self.defense_param, exclude=exclude)
