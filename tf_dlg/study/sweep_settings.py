"""What fixes a threat-model sweep's numbers: `SweepSettings`, checked before any work.

The settings of `tf_dlg.study.sweep` (and of `tf_dlg.study.audit`): the datasets, client
batch sizes and local work attacked, the rounds, the defences at their frontier settings,
the attacks, and the FedAvg training (the quick preset's, or a preset's by
`settings_from_preset`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

from tf_dlg import validation
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.study.presets import PRESETS

# The training a sweep attacks by default: the quick preset's.
_QUICK = PRESETS["quick"]

LOCAL_WORK = ("step", "epoch")
GALLERY = "gallery_match"
# Reconstruction attacks: name -> (whether the dummy's update runs the client's optimizer,
# whether the loss adds the BatchNorm prior of the statistics the update carries).
RECONSTRUCTIONS = {
  "cosine_tv": (True, False),
  "cosine_tv_direction": (False, False),
  "cosine_tv_direction_bn": (False, True),
}
ATTACKS = (GALLERY,) + tuple(RECONSTRUCTIONS)
UNDEFENDED = "none"
CSV_FIELDS = (
  "dataset",
  "gallery_size",
  "batch",
  "local_work",
  "local_steps",
  "simulated_steps",
  "round",
  "test_accuracy",
  "attack",
  "defense",
  "param",
  "identified",
  "num_images",
  "low",
  "high",
  "auc",
  "auc_low",
  "auc_high",
  "tpr",
  "tpr_low",
  "tpr_high",
  "label_accuracy",
  "seconds",
)
EXPERIMENT = "threat_model_sweep"
# Datasets whose loader keeps every image in x_train (`tf_dlg.data`): nothing to train and
# evaluate FedAvg on, so a preset's sweep attacks them at round 0 only.
NO_TEST_SPLIT = ("cifar10_sample",)
# A model and data that no registry holds (`tf_dlg.study.audit`): named by these.
USER_MODEL = "user"
USER_DATA = "user_data"


def frontier_defenses() -> Tuple[Tuple[str, float], ...]:
  """Every paper defence at its spec's frontier settings, then DP's."""
  from tf_dlg.study import defense_table

  names = list(defense_table.PAPER_DEFENSES) + ["dp"]
  return tuple((n, float(p)) for n in names for p in defense_table.row(n).frontier)


@dataclasses.dataclass(frozen=True)
class SweepSettings:
  """Everything that fixes a sweep's numbers (checked by `check`, before any work).

  The training fields are the quick preset's (`tf_dlg.study.presets.PRESETS["quick"]`).
  `trained_datasets` are trained in FedAvg; the others (the 20-image CIFAR-10 sample has
  no training split) are attacked at round 0 only, as `sweep.md` says. `epoch_examples`:
  the images of a one-epoch client (None: the training's own share,
  train_examples / num_clients).
  """

  datasets: Tuple[str, ...] = ("mnist", "cifar10_sample")
  trained_datasets: Tuple[str, ...] = ("mnist",)
  batch_sizes: Tuple[int, ...] = (1, 4, 16, 64)
  local_work: Tuple[str, ...] = LOCAL_WORK
  rounds: Tuple[int, ...] = (0, 5, 15)
  defenses: Tuple[Tuple[str, float], ...] = dataclasses.field(default_factory=frontier_defenses)
  attacks: Tuple[str, ...] = ATTACKS
  gallery_size: int = 10_000
  epoch_examples: Optional[int] = None
  max_simulated_steps: int = 10
  # A one-step cell attacks ceil(min_images / batch) clients' updates (as the client's
  # share allows), so that no rate rests on a single image's 0-or-1.
  min_images: int = 16
  recon_max_batch: int = 4
  recon_iterations: int = 300
  recon_defended: bool = False
  tv_weight: float = 1e-4
  chunk: int = 500
  # The training (the quick preset's).
  model: str = FederatedConfig.model
  training_rounds: int = _QUICK.rounds
  train_examples: int = _QUICK.train_examples
  test_examples: int = _QUICK.test_examples
  num_clients: int = _QUICK.num_clients
  batch_size: int = _QUICK.batch_size
  local_epochs: int = _QUICK.local_epochs
  client_optimizer: str = FederatedConfig.client_optimizer
  client_lr: float = _QUICK.client_lr
  seed: int = FederatedConfig.seed
  # The audit's digest of the user's model and data ("" in a sweep: registry names).
  case_digest: str = ""

  def check(self) -> "SweepSettings":
    """One ValueError naming the bad value and the allowed range; no data loaded."""
    from tf_dlg import data as data_lib
    from tf_dlg import defenses, federated, models

    user = (USER_DATA,) if self.model == USER_MODEL else ()  # an audit's own arrays
    validation.check_choices("datasets", self.datasets, data_lib.DATASETS + user)
    validation.check_choices("trained_datasets", self.trained_datasets, self.datasets)
    validation.check_choices("local_work", self.local_work, LOCAL_WORK)
    validation.check_choices("attacks", self.attacks, ATTACKS)
    validation.check_choice("model", self.model, (*models.MODELS, USER_MODEL))
    validation.check_choice("client_optimizer", self.client_optimizer, federated.OPTIMIZERS)
    for name in ("datasets", "batch_sizes", "local_work", "rounds", "attacks"):
      if not getattr(self, name):
        raise ValueError(f"{name} is empty; give at least one value.")
    for b in self.batch_sizes:
      validation.check_int("batch_sizes", b, 1, 4096)
    validation.check_int("training_rounds", self.training_rounds, 1)
    for r in self.rounds:
      validation.check_int("rounds", r, 0, self.training_rounds)
    validation.check_int("gallery_size", self.gallery_size, 2)
    validation.check_int("max_simulated_steps", self.max_simulated_steps, 1)
    validation.check_int("recon_max_batch", self.recon_max_batch, 1, 64)
    validation.check_int("min_images", self.min_images, 1, 4096)
    validation.check_int("recon_iterations", self.recon_iterations, 1)
    validation.check_number("tv_weight", self.tv_weight, 0, float("inf"))
    validation.check_int("chunk", self.chunk, 1, 100_000)
    validation.check_int("num_clients", self.num_clients, 1)
    validation.check_int("train_examples", self.train_examples, self.num_clients)
    validation.check_int("test_examples", self.test_examples, 1)
    validation.check_int("batch_size", self.batch_size, 1)
    validation.check_int("local_epochs", self.local_epochs, 1)
    validation.check_int("seed", self.seed, 0)
    validation.check_number(
      "client_lr", self.client_lr, 0, float("inf"), low_open=True, high_open=True
    )
    if self.epoch_examples is not None:
      validation.check_int("epoch_examples", self.epoch_examples, 1, self.share)
    for d in self.defenses:
      if not (isinstance(d, (tuple, list)) and len(d) == 2):
        raise ValueError(f"defenses entry {d!r} must be a (name, parameter) pair.")
      if d[0] == UNDEFENDED:
        raise ValueError("defenses lists defended settings; the undefended row is always run.")
      defenses.get_defense(d[0], d[1])  # its own ValueError names the range
    return self

  @property
  def share(self) -> int:
    """Training images per client (the training's own one-epoch client)."""
    return self.train_examples // self.num_clients

  def epoch_size(self) -> int:
    return self.share if self.epoch_examples is None else int(self.epoch_examples)

  def training_config(self, dataset: str, rounds: int):
    from tf_dlg.federated.config import FederatedConfig

    return FederatedConfig(
      dataset=dataset,
      model=self.model,
      num_clients=self.num_clients,
      rounds=max(int(rounds), 1),
      batch_size=self.batch_size,
      local_epochs=self.local_epochs,
      client_optimizer=self.client_optimizer,
      client_lr=self.client_lr,
      seed=self.seed,
    )

  def fingerprint(self) -> Dict[str, Any]:
    fields = dataclasses.asdict(self)
    fields.pop("chunk")  # memory only: same numbers
    fields["defenses"] = [list(d) for d in self.defenses]
    return fields


def settings_from_preset(preset, rounds_at: Sequence[int] = (0, 5)) -> SweepSettings:
  """The sweep of a reproduce preset: its training, attacked at `rounds_at` and its last
  round (those past the training dropped), on its datasets (those with a test split
  trained)."""
  rounds = tuple(sorted({r for r in rounds_at if r < preset.rounds} | {preset.rounds}))
  return SweepSettings(
    datasets=tuple(preset.datasets),
    trained_datasets=tuple(d for d in preset.datasets if d not in NO_TEST_SPLIT),
    rounds=rounds,
    training_rounds=preset.rounds,
    train_examples=preset.train_examples,
    test_examples=preset.test_examples or preset.train_examples,
    num_clients=preset.num_clients,
    batch_size=preset.batch_size,
    local_epochs=preset.local_epochs,
    client_lr=preset.client_lr,
    gallery_size=preset.sweep_gallery,
    seed=preset.seed,
  ).check()
