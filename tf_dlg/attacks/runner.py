"""Gradient-inversion attacks on `ObservedUpdate`s, continuously batched.

`run_attacks(model, observed_updates, AttackConfig(...))` reconstructs the images
(and labels) behind every observed update. Updates that share the model architecture and
the shape of the observation (kind, number of examples, local steps, learning rate, batch
size) form a group whose attacks run on `config.slots` slots of one compiled loop: each
slot has its own weights, observed (possibly differently defended) update and seeded
dummy images, and a finished attack's slot is refilled at once from the queue (see
`optimize.run_queue`); on a CPU the slots are shared out among `lanes`, loops on
threads that pull from one queue (`optimize.run_lanes`). With `restarts=R` every
observation gets R differently seeded starts: the lowest-numbered one that converges
wins and its later siblings leave; if none converges, the smallest matching distance
wins (never the ground truth). Either way the winner does not depend on slots, lanes
or timing.

Attacks (`ATTACKS`):
  dlg        Euclidean gradient matching; image and soft label optimised jointly (L-BFGS).
  idlg       label inferred from the last dense layer (`labels.infer_labels`); image only.
  ig         Inverting Gradients: cosine + total variation, inferred labels.
  masked_ig  cosine + TV over the coordinates that are non-zero in the observation.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from tf_dlg import validation
from tf_dlg.attacks import objectives, optimize
from tf_dlg.attacks.compile_cache import CompileCache
from tf_dlg.attacks.group import GroupJob
from tf_dlg.attacks.results import AttackResult
from tf_dlg.attacks.threat_model import ObservedUpdate

ATTACKS = {
  # name: (objective, infer labels?)
  "dlg": ("euclidean", False),
  "idlg": ("euclidean", True),
  "ig": ("cosine", True),
  "masked_ig": ("masked_cosine", True),
}
DEFAULT_ITERATIONS = 4000
DEFAULT_SLOTS = 8
# Stuck attacks (e.g. saturated sigmoids: the distance does not move for thousands of
# iterations) otherwise hold a slot to the iteration limit; slow ones still gain far more
# than 1 % per 1,000 iterations (measured: digits, photos, lfw_subset).
DEFAULT_PATIENCE = 1000
# Errors name a field by its path in the configuration tree: `attack.iterations`.
SECTION = "attack"


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """Everything that decides an attack run (validated on construction).

  Attributes:
    attack: One of `ATTACKS`.
    iterations: Maximum optimiser iterations per attack (per restart).
    seed: Seed of attack i's dummy start: `seed + i`, or one seed per update. Restart 0
      uses that seed; restart r > 0 a seed derived from (seed, r). The same seed gives
      the same reconstruction alone, in a batch, or entering a slot late.
    optimizer: One of `optimize.OPTIMIZERS` (`lbfgs`, `tfp_lbfgs`, `adam`).
    optimizer_options: Options of the optimiser (e.g. `history`; Adam's
      `learning_rate`).
    tolerance: Stop distance (None: the objective's default).
    stop_rule: Stop rule of the Euclidean objectives (`objectives.STOP_RULES`):
      `relative` (distance < 1e-8 x ||observed||^2) or `capped`, the rule before it
      (distance < min(1e-8 x ||observed||^2, 1e-6)), kept for side-by-side comparisons.
      The cosine objectives are scale-invariant and keep their own tolerance.
    tv_weight: Total-variation weight of the cosine objectives (None: default).
    restarts: Differently seeded starts per observation.
    patience: An attack whose best loss has not fallen by 1 % in this many
      iterations leaves as `stalled` (its best point is kept; a restart may follow);
      0: run to `iterations`.
    slots: Attacks that advance together in the compiled loop(s), all lanes together.
    lanes: Compiled loops run side by side on threads, each with `slots // lanes`
      (at least 2) slots; None (auto): one per usable CPU core on a CPU-only machine
      (see `schedule.auto_lanes`), 1 with a GPU. Results do not depend on it.
    check_every: Most iterations per compiled chunk (refills happen between chunks).
    jit_compile: XLA-compile the loop. None (auto): XLA for more than two jobs; one or
      two start without and switch to XLA after `group.AUTO_JIT_AFTER` iterations (their
      results are then not bit-identical to an XLA run of the same seed).
    init: Dummy image start: `rand` (uniform [0, 1]) or `randn` (the reference's).
  """

  attack: str = "idlg"
  iterations: int = DEFAULT_ITERATIONS
  seed: Union[int, Tuple[int, ...]] = 0
  optimizer: str = "lbfgs"
  optimizer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  tolerance: Optional[float] = None
  stop_rule: str = "relative"
  tv_weight: Optional[float] = None
  restarts: int = 1
  patience: int = DEFAULT_PATIENCE
  slots: int = DEFAULT_SLOTS
  lanes: Optional[int] = None
  check_every: int = 50
  jit_compile: Optional[bool] = True
  init: str = "rand"

  def __post_init__(self):
    at = f"{SECTION}."  # errors name the field's path: attack.iterations
    validation.check_choice(f"{at}attack", self.attack, ATTACKS)
    validation.check_choice(f"{at}optimizer", self.optimizer, optimize.OPTIMIZERS)
    validation.check_choice(f"{at}init", self.init, ("rand", "randn"))
    validation.check_choice(f"{at}stop_rule", self.stop_rule, objectives.STOP_RULES)
    validation.check_int(f"{at}iterations", self.iterations, 1)
    validation.check_int(f"{at}restarts", self.restarts, 1, 64)
    validation.check_int(f"{at}patience", self.patience, 0)
    validation.check_int(f"{at}slots", self.slots, 1, 4096)
    if self.lanes is not None:
      validation.check_int(f"{at}lanes", self.lanes, 1, 64)
    validation.check_int(f"{at}check_every", self.check_every, 1)
    if self.tolerance is not None:
      validation.check_number(f"{at}tolerance", self.tolerance, 0.0, np.inf, low_open=True)
    if self.tv_weight is not None:
      validation.check_number(f"{at}tv_weight", self.tv_weight, 0.0, np.inf)
    allowed = optimize.OPTIMIZERS[self.optimizer].defaults
    validation.check_choices(f"{at}optimizer_options", list(self.optimizer_options), allowed)
    if not np.isscalar(self.seed):
      object.__setattr__(self, "seed", tuple(int(s) for s in self.seed))

  @property
  def infers_labels(self) -> bool:
    """Labels come from the last dense layer (`labels.infer_labels`), not the optimiser."""
    return ATTACKS[self.attack][1]

  def objective(self) -> objectives.Objective:
    return make_objective(self.attack, self.tv_weight, self.tolerance, self.stop_rule)

  def seeds(self, count: int) -> List[int]:
    """Restart-0 seed of each of `count` observations."""
    if np.isscalar(self.seed):
      return [int(self.seed) + i for i in range(count)]
    if len(self.seed) != count:
      raise ValueError(f"{SECTION}.seed: {len(self.seed)} seeds for {count} observed updates.")
    return list(self.seed)


def make_objective(
  attack: str,
  tv_weight: Optional[float] = None,
  tolerance: Optional[float] = None,
  stop_rule: str = "relative",
) -> objectives.Objective:
  """The objective of a named attack (tv_weight / tolerance / stop_rule override its
  defaults; stop_rule applies to the Euclidean objective only)."""
  if attack not in ATTACKS:
    raise ValueError(f"Unknown attack {attack!r}; expected one of {', '.join(ATTACKS)}.")
  cls = objectives.OBJECTIVES[ATTACKS[attack][0]]
  kwargs = {}
  if issubclass(cls, objectives.EuclideanMatching):
    kwargs.update(objectives.STOP_RULES[stop_rule])
  if tolerance is not None:
    kwargs["tolerance"] = tolerance
  if tv_weight is not None and issubclass(cls, objectives.CosineMatching):
    kwargs["tv_weight"] = tv_weight
  return cls(**kwargs)


CACHE = CompileCache()


def _group_key(o: ObservedUpdate):
  return (
    o.kind,
    o.model_name,
    o.input_shape,
    o.num_classes,
    o.num_examples,
    o.batch_size,
    o.local_steps,
    o.learning_rate,
  )


def run_attacks(
  model: Optional[tf.keras.Model],
  observed_updates: Sequence[ObservedUpdate],
  config: Optional[AttackConfig] = None,
  *,
  initial_images: Optional[Sequence[np.ndarray]] = None,
  progress: bool = False,
  hook: Optional[Callable] = None,
  cache: Optional[CompileCache] = None,
) -> List[AttackResult]:
  """Runs one attack per observed update; returns results in input order.

  Args:
    model: A Keras model of the observed architecture (its weights are ignored: each
      update's `model_weights` are used), or None to build `observed.model_name`.
    observed_updates: `ObservedUpdate`s (kinds `gradient` and `fedavg_delta`).
    config: The `AttackConfig` (None: `AttackConfig()`, iDLG with the defaults).
    initial_images: Optional explicit starts of restart 0, one [N, H, W, C] per update.
    progress: Show a tqdm bar of finished attacks.
    hook: Optional `hook(snapshots)` after every compiled chunk, given a list of
      `results.Snapshot`s of the running attacks (e.g. `summaries.TensorBoardHook`).
    cache: A `CompileCache` to use instead of the module's `CACHE`.
  """
  if config is None:
    config = AttackConfig()
  if not isinstance(config, AttackConfig):
    raise TypeError(f"config must be an AttackConfig, got {type(config).__name__}.")
  if cache is not None and not isinstance(cache, CompileCache):
    raise TypeError(f"cache must be a CompileCache, got {type(cache).__name__}.")
  observed_updates = list(observed_updates)
  if not observed_updates:
    return []
  seeds = config.seeds(len(observed_updates))
  groups = collections.OrderedDict()
  for i, o in enumerate(observed_updates):
    groups.setdefault(_group_key(o), []).append(i)
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=len(observed_updates), desc=f"{config.attack} attacks", unit="attack")
  results: List[Optional[AttackResult]] = [None] * len(observed_updates)
  try:
    for ids in groups.values():
      job = GroupJob(
        config,
        CACHE if cache is None else cache,  # an empty cache is falsy (__len__)
        model,
        [observed_updates[i] for i in ids],
        ids,
        [seeds[i] for i in ids],
      )
      starts = None if initial_images is None else [initial_images[i] for i in ids]
      for i, r in zip(ids, job.run(starts, bar, hook)):
        results[i] = r
  finally:
    if bar is not None:
      bar.close()
  return results
