"""What fixes a threat-model sweep's numbers: a `Preset`'s sweep fields, checked before any work.

The settings of `tf_dlg.study.sweep` (and of `tf_dlg.study.audit`) are a
`tf_dlg.study.presets.Preset`'s (the `sweep` preset's: the quick preset's training): the
datasets, client batch sizes and local work attacked (`sweep_*`), the rounds, the defences
at their frontier settings, the attacks, and the FedAvg training (`rounds`,
`train_examples`, `num_clients`, `batch_size`, `client_optimizer`, ...). `check(preset)`
fills the derived ones and checks them; `fingerprint` is what the sweep's rows.jsonl stores.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from tf_dlg import validation
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.study.fields import path

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


# The rounds a preset's sweep attacks besides the training's last (`Preset.sweep_rounds`
# None); those at or past the last are dropped.
ROUNDS_BEFORE_LAST = (0, 5)
# The sweep's fingerprint, as its rows.jsonl stores it: {stored name: `Preset` field}. The
# stored names are those of the sweep's own settings before they were `Preset` fields, so
# a sweep started then resumes.
FINGERPRINT = {
  "datasets": "datasets",
  "trained_datasets": "sweep_trained_datasets",
  "batch_sizes": "sweep_batch_sizes",
  "local_work": "sweep_local_work",
  "rounds": "sweep_rounds",
  "defenses": "sweep_defenses",
  "attacks": "sweep_attacks",
  "gallery_size": "sweep_gallery",
  "epoch_examples": "sweep_epoch_examples",
  "max_simulated_steps": "sweep_max_simulated_steps",
  "min_images": "sweep_min_images",
  "recon_max_batch": "sweep_recon_max_batch",
  "recon_iterations": "sweep_recon_iterations",
  "recon_defended": "sweep_recon_defended",
  "tv_weight": "sweep_tv_weight",
  "model": "model",
  "training_rounds": "rounds",
  "train_examples": "train_examples",
  "test_examples": "test_examples",
  "num_clients": "num_clients",
  "batch_size": "batch_size",
  "local_epochs": "local_epochs",
  "client_optimizer": "client_optimizer",
  "client_lr": "client_lr",
  "seed": "seed",
  "case_digest": "case_digest",
}


def filled(preset):
  """The preset with the sweep's derived settings filled in: `sweep_trained_datasets`
  (None: the datasets with a test split), `sweep_rounds` (None: `ROUNDS_BEFORE_LAST` below
  the training's last round, and that round, `rounds`), `test_examples` (None:
  `train_examples`)."""
  fill = {}
  if preset.sweep_trained_datasets is None:
    fill["sweep_trained_datasets"] = tuple(d for d in preset.datasets if d not in NO_TEST_SPLIT)
  if preset.sweep_rounds is None:
    last = preset.rounds
    fill["sweep_rounds"] = tuple(sorted({r for r in ROUNDS_BEFORE_LAST if r < last} | {last}))
  if preset.test_examples is None:
    fill["test_examples"] = preset.train_examples
  return preset.override(**fill)


def check(preset):
  """The sweep's preset (`filled`), checked: one ValueError naming the bad value (by its
  path, `study.<field>`) and the allowed range; no data loaded."""
  from tf_dlg import data as data_lib
  from tf_dlg import defenses, federated, models

  p = filled(preset)

  user = (USER_DATA,) if p.model == USER_MODEL else ()  # an audit's own arrays
  validation.check_choices(path("datasets"), p.datasets, data_lib.DATASETS + user)
  validation.check_choices(path("sweep_trained_datasets"), p.sweep_trained_datasets, p.datasets)
  validation.check_choices(path("sweep_local_work"), p.sweep_local_work, LOCAL_WORK)
  validation.check_choices(path("sweep_attacks"), p.sweep_attacks, ATTACKS)
  validation.check_choice(path("model"), p.model, (*models.MODELS, USER_MODEL))
  validation.check_choice(path("client_optimizer"), p.client_optimizer, federated.OPTIMIZERS)
  for field in (
    "datasets",
    "sweep_batch_sizes",
    "sweep_local_work",
    "sweep_rounds",
    "sweep_attacks",
  ):
    if not getattr(p, field):
      raise ValueError(f"{path(field)} is empty; give at least one value.")
  for b in p.sweep_batch_sizes:
    validation.check_int(path("sweep_batch_sizes"), b, 1, 4096)
  validation.check_int(path("rounds"), p.rounds, 1)
  for r in p.sweep_rounds:
    validation.check_int(path("sweep_rounds"), r, 0, p.rounds)
  validation.check_int(path("sweep_gallery"), p.sweep_gallery, 2)
  validation.check_int(path("sweep_max_simulated_steps"), p.sweep_max_simulated_steps, 1)
  validation.check_int(path("sweep_recon_max_batch"), p.sweep_recon_max_batch, 1, 64)
  validation.check_int(path("sweep_min_images"), p.sweep_min_images, 1, 4096)
  validation.check_int(path("sweep_recon_iterations"), p.sweep_recon_iterations, 1)
  validation.check_number(path("sweep_tv_weight"), p.sweep_tv_weight, 0, float("inf"))
  validation.check_int(path("sweep_chunk"), p.sweep_chunk, 1, 100_000)
  validation.check_int(path("num_clients"), p.num_clients, 1)
  validation.check_int(path("train_examples"), p.train_examples, p.num_clients)
  validation.check_int(path("test_examples"), p.test_examples, 1)
  validation.check_int(path("batch_size"), p.batch_size, 1)
  validation.check_int(path("local_epochs"), p.local_epochs, 1)
  validation.check_int(path("seed"), p.seed, 0)
  validation.check_number(
    path("client_lr"), p.client_lr, 0, float("inf"), low_open=True, high_open=True
  )
  if p.sweep_epoch_examples is not None:
    validation.check_int(path("sweep_epoch_examples"), p.sweep_epoch_examples, 1, share(p))
  for d in p.sweep_defenses:
    if not (isinstance(d, (tuple, list)) and len(d) == 2):
      raise ValueError(f"{path('sweep_defenses')} entry {d!r} must be a (name, parameter) pair.")
    if d[0] == UNDEFENDED:
      raise ValueError(
        f"{path('sweep_defenses')} lists defended settings; the undefended row is always run."
      )
    defenses.get_defense(d[0], d[1])  # its own ValueError names the range
  return p


def share(preset) -> int:
  """Training images per client (the training's own one-epoch client)."""
  return preset.train_examples // preset.num_clients


def epoch_size(preset) -> int:
  """The images of a one-epoch client (`sweep_epoch_examples`; None: `share`)."""
  epoch = preset.sweep_epoch_examples
  return share(preset) if epoch is None else int(epoch)


def training_config(preset, dataset: str, rounds: int):
  """The FedAvg training the sweep attacks, to `rounds` (at least 1)."""
  return FederatedConfig(
    dataset=dataset,
    model=preset.model,
    num_clients=preset.num_clients,
    rounds=max(int(rounds), 1),
    batch_size=preset.batch_size,
    local_epochs=preset.local_epochs,
    client_optimizer=preset.client_optimizer,
    client_lr=preset.client_lr,
    seed=preset.seed,
  )


def fingerprint(preset) -> Dict[str, Any]:
  """What fixes a (checked) sweep's numbers, by the stored names (`FINGERPRINT`); the chunk
  size is memory only."""
  fields = {name: getattr(preset, field) for name, field in FINGERPRINT.items()}
  fields["defenses"] = [list(d) for d in preset.sweep_defenses]
  return fields
