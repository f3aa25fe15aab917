"""Every setting of a reproduce run, as frozen presets.

`PRESETS` holds `quick` (real MNIST, 20 real CIFAR-10 test images, 100 LFW faces, all
offline, for a 30-minute budget on 2 CPU cores), `paper` (tfds MNIST / CIFAR-10 / LFW,
Figure 5 on CIFAR-10, 5 seeds) and `adaptive` (`quick` plus the adaptive thresholds and
their convergence cost). A run changes single fields with `Preset.override` (or
`with_overrides`, which the command line uses); an unknown field is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from tf_dlg import validation
from tf_dlg.attacks.runner import AttackConfig
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.study import defense_table, sweep_settings
from tf_dlg.study.fields import SECTION, path

# SECTION: errors name a field by its path in this section, study.<field> (`path`); the
# drivers' flag generator reads it.
__all__ = ["PRESETS", "SECTION", "Preset", "path", "with_overrides"]

# Fields that hold lists: an override given as a list is stored as a tuple (frozen).
_LIST_FIELDS = (
  "datasets",
  "defenses",
  "convergence_defenses",
  "adaptive_attacks",
  "partitions",
  "adaptive_datasets",
  "aggregators",
  "dp_multipliers",
  "sweep_trained_datasets",
  "sweep_rounds",
  "sweep_batch_sizes",
  "sweep_local_work",
  "sweep_defenses",
  "sweep_attacks",
)


@dataclasses.dataclass(frozen=True)
class Preset:
  """Every setting of a reproduce run; override with `preset.override(field=value)`.

  `Preset()` is the base study configuration: its field defaults are the defaults of the
  threshold search (`tf_dlg.study.threshold_search`) and of its command line. The
  frontier (`tf_dlg.study.frontier.check`) and the threat-model sweep and audit
  (`tf_dlg.study.sweep_settings.check`) read their settings from a preset too.
  """

  name: str = "custom"
  # The threshold search: these datasets against these defences.
  datasets: Tuple[str, ...] = ("mnist", "cifar10_sample", "lfw_faces")
  defenses: Tuple[str, ...] = defense_table.PAPER_DEFENSES
  num_images: int = 8  # attacked per dataset
  # Attack optimiser iterations per restart, or {dataset: iterations}.
  iterations: Union[int, Mapping[str, int]] = 3000
  # The fraction of the tested images a dataset threshold defends, in (0, 1].
  defended_fraction: float = 1.0
  # The `fedavg_delta` threat model's local SGD steps and rate (the re-scoring's).
  local_steps: int = 3
  local_lr: float = 0.1
  convergence_dataset: str = "mnist"
  convergence_defenses: Tuple[str, ...] = defense_table.PAPER_DEFENSES
  rounds: int = FederatedConfig.rounds
  seeds: int = 3  # how many: seeds seed, seed + 1, ...
  attack: str = AttackConfig.attack
  adaptive_attacks: Tuple[str, ...] = ("ig", "masked_ig")
  adaptive: bool = False
  # The strongest attackers' search: on these datasets only (None: every dataset), and
  # their protecting settings trained in the first (aggregator, partition) cell only
  # (mean, IID) unless `adaptive_everywhere`.
  adaptive_datasets: Optional[Tuple[str, ...]] = None
  adaptive_everywhere: bool = False
  # Train a defence against its strongest attackers only where some searched setting
  # protects (False: also at the strongest setting searched, which still leaks).
  adaptive_unprotected: bool = True
  log_resolution: float = 1.5
  linear_resolution: float = 0.05
  restarts: int = 2
  train_examples: Optional[int] = None  # seeded subset of the training set
  test_examples: Optional[int] = None
  num_clients: int = FederatedConfig.num_clients
  local_epochs: int = FederatedConfig.local_epochs
  aggregators: Tuple[str, ...] = ("mean", "median")
  # The privacy-utility frontier (`tf_dlg.study.frontier`) on `convergence_dataset`.
  frontier: bool = False
  # 0 of 8 identified still allows a rate up to 0.37 (exact interval); 0 of 16, 0.21.
  frontier_images: int = 16
  # {defence: settings} replacing its row's frontier grid (`tf_dlg.study.frontier.grid`).
  frontier_grids: Optional[Mapping[str, Tuple[float, ...]]] = None
  batch_size: int = FederatedConfig.batch_size
  client_lr: float = FederatedConfig.client_lr
  partitions: Tuple[str, ...] = ("iid", "dirichlet")
  alpha: float = FederatedConfig.alpha
  seed: int = FederatedConfig.seed
  data_dir: Optional[str] = None
  leak_ssim: Optional[float] = None
  # The federated engine of every training stage: "tff", or "flower" (Flower's
  # simulation engine on Ray; `tf_dlg.integrations.flower_engine`, no TFF).
  engine: str = "tff"
  # The frontier's DP noise multipliers (None: the `dp` spec's frontier grid).
  dp_multipliers: Optional[Tuple[float, ...]] = None
  dp_delta: float = 1e-5  # the DP points' delta
  # The threat-model sweep (`tf_dlg.study.sweep`) instead of the paper's pipeline: the
  # updates of this preset's training attacked on `datasets` (those with a test split
  # trained), with the sweep's gallery of `sweep_gallery` images.
  sweep: bool = False
  sweep_gallery: int = 10_000
  # The sweep's own settings (`tf_dlg.study.sweep_settings.check` fills the None ones):
  # the datasets trained in FedAvg (None: those with a test split; the others are attacked
  # at round 0 only), the rounds attacked (None: 0, 5 and the last), the client batch sizes
  # and local work, every paper defence's frontier settings then DP's, the attacks.
  sweep_trained_datasets: Optional[Tuple[str, ...]] = None
  sweep_rounds: Optional[Tuple[int, ...]] = None
  sweep_batch_sizes: Tuple[int, ...] = (1, 4, 16, 64)
  sweep_local_work: Tuple[str, ...] = sweep_settings.LOCAL_WORK
  sweep_defenses: Tuple[Tuple[str, float], ...] = dataclasses.field(
    default_factory=sweep_settings.frontier_defenses
  )
  sweep_attacks: Tuple[str, ...] = sweep_settings.ATTACKS
  # The images of a one-epoch client (None: the training's own share, train_examples /
  # num_clients).
  sweep_epoch_examples: Optional[int] = None
  sweep_max_simulated_steps: int = 10
  # A one-step cell attacks ceil(min_images / batch) clients' updates (as the client's
  # share allows), so that no rate rests on a single image's 0-or-1.
  sweep_min_images: int = 16
  sweep_recon_max_batch: int = 4
  sweep_recon_iterations: int = 300
  sweep_recon_defended: bool = False
  sweep_tv_weight: float = 1e-4
  sweep_chunk: int = 500  # gallery candidates per pass: memory only, not in its fingerprint
  # The training's model and client optimizer (the sweep's and the audit's).
  model: str = FederatedConfig.model
  client_optimizer: str = FederatedConfig.client_optimizer
  # The audit's digest of the user's model and data ("" in a sweep: registry names).
  case_digest: str = ""

  def override(self, **fields) -> "Preset":
    """A copy with `fields` replaced; an unknown field name is a ValueError."""
    known = [f.name for f in dataclasses.fields(self)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
      raise ValueError(f"unknown preset settings {unknown}; expected some of {known}.")
    fields = {k: tuple(v) if k in _LIST_FIELDS and v is not None else v for k, v in fields.items()}
    return dataclasses.replace(self, **fields)

  def seed_list(self) -> List[int]:
    validation.check_int(path("seeds"), self.seeds, 1)
    return list(range(self.seed, self.seed + self.seeds))


# The convergence stage trains what the search measured: `clipping_ratio` is own-norm
# rescaling in both (`clipping_median`, clipping to the round's median, is training-only).
_FOUR = defense_table.PAPER_DEFENSES
PRESETS: Dict[str, Preset] = {
  # FedAvg near convergence: 6,000 seeded MNIST training images (2,000 test), 10 clients,
  # batch 64 with client Adam 0.002: half the local steps of FederatedConfig's defaults
  # (batch 32, 0.001) for the same accuracy (plain-TF grid: 0.980 / 0.971 vs 0.981 /
  # 0.971 at 15 rounds, seeds 0 / 1; in TFF, seed 1: 0.972 both, 0.67x the time).
  # 1,000 images x 8 rounds, an old setting, ended near 0.4 (a model that had not learned).
  # The strongest attackers (masked_ig, ig) are searched on MNIST only and their
  # protecting settings trained in the mean / IID cell only: on all three datasets and
  # the 2x2 grid they would double the run (see the `adaptive` preset).
  "quick": Preset(
    name="quick",
    datasets=("mnist", "cifar10_sample", "lfw_faces"),
    defenses=_FOUR,
    num_images=8,
    # Measured (8 images, undefended iDLG): MNIST converges in 181-270 L-BFGS
    # iterations, LFW faces in 204-240, so 500 is about twice the need; the CIFAR-10
    # images need 1,659-3,000 to converge, but all 8 already leak (adjusted SSIM
    # 0.90-0.98) at 1,000. Defended attacks run to the limit, so the limit sets the cost.
    iterations={"mnist": 500, "cifar10_sample": 1000, "lfw_faces": 500},
    # One start per image: a second one multiplied the MNIST masking cell's time by 4.7
    # (418 s vs 88 s at 1,000 vs 500 iterations); the paper preset uses 3.
    restarts=1,
    adaptive=True,
    adaptive_datasets=("mnist",),
    # Re-scoring every plain threshold with the adaptive attackers (8 min) does not fit.
    adaptive_attacks=(),
    # A defence no searched setting protects has no protecting setting to cost: its
    # strongest setting is not trained here (the frontier preset trains its whole range).
    adaptive_unprotected=False,
    convergence_dataset="mnist",
    convergence_defenses=_FOUR,
    rounds=15,
    seeds=3,
    train_examples=6000,
    test_examples=2000,
    num_clients=10,
    batch_size=64,
    client_lr=0.002,
  ),
  "paper": Preset(
    name="paper",
    datasets=("mnist", "cifar10", "lfw"),
    defenses=_FOUR,
    num_images=32,
    iterations=8000,
    log_resolution=1.25,
    linear_resolution=0.02,
    restarts=3,
    convergence_dataset="cifar10",
    convergence_defenses=_FOUR,
    rounds=60,
    seeds=5,
    adaptive=True,
    adaptive_everywhere=True,
  ),
}
# A preset of its own: adaptive thresholds add a second search per defence and 48 more
# FedAvg runs (4 defences x 2 x 2 x 3 seeds, ~10-15 min), past quick's 30 min x 1.5.
PRESETS["adaptive"] = dataclasses.replace(
  PRESETS["quick"],
  name="adaptive",
  adaptive_datasets=None,
  adaptive_everywhere=True,
  adaptive_unprotected=True,
  adaptive_attacks=("ig", "masked_ig"),
)

# The privacy-utility frontier: every paper defence at its frontier grid (`defense_table`) and DP
# at three noise multipliers, each attacked by its strongest attackers (16 MNIST images)
# and trained (mean / IID, 3 seeds); the search and the paper's training on MNIST only,
# in one cell. Estimated from one defence's measured share: 45-65 min on 2 cores.
PRESETS["frontier"] = dataclasses.replace(
  PRESETS["quick"],
  name="frontier",
  datasets=("mnist",),
  aggregators=("mean",),
  partitions=("iid",),
  frontier=True,
)


# The threat-model sweep: the quick preset's training (bn_cnn, client Adam 0.002, batch 64,
# one local epoch of 600 images, 15 rounds) attacked at rounds 0, 5 and 15 over client batch
# {1, 4, 16, 64} x local work {one step, one epoch}, every frontier setting, on MNIST and
# the CIFAR-10 sample (round 0 only: 20 images cannot train). A 10,000-image gallery: the
# full 70,000 costs 7x the gallery passes (see the sweep's timing in its report).
PRESETS["sweep"] = dataclasses.replace(
  PRESETS["quick"],
  name="sweep",
  datasets=("mnist", "cifar10_sample"),
  sweep=True,
)


def with_overrides(name: str, given: Mapping[str, Any]) -> Preset:
  """Preset `name` with the settings in `given` put over it.

  Without an explicit `convergence_defenses`, the preset's list follows `defenses` (the
  defences not searched are dropped); one given explicitly is checked later, never cut.
  A preset that confines the strongest attackers to its training data keeps doing so
  when `datasets` or `convergence_dataset` change.
  """
  validation.check_choice("preset", name, PRESETS)
  preset = PRESETS[name]
  given = dict(given)
  if "convergence_defenses" not in given and "defenses" in given:
    given["convergence_defenses"] = [
      d for d in preset.convergence_defenses if d in given["defenses"]
    ]
  # Likewise the strongest attackers' datasets follow `datasets`, and then the training data.
  if "adaptive_datasets" not in given and preset.adaptive_datasets is not None:
    if "datasets" in given or "convergence_dataset" in given:
      given["adaptive_datasets"] = [given.get("convergence_dataset", preset.convergence_dataset)]
  return preset.override(**given)
