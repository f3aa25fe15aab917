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
import json
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from tf_dlg import validation
from tf_dlg.attacks import functional, objectives, optimize
from tf_dlg.attacks import labels as labels_lib
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
# jit_compile=None: one or two attacks start without XLA and switch to it after this many
# iterations. Measured on digits, 2 slots: XLA costs ~5 s more to start (tracing and
# compilation) and then 1.7 ms per iteration, graph mode 3.8 ms, so XLA repays itself
# after ~2,400 iterations; switching at 2,000 (ski rental) keeps easy and mid-length
# attacks (200-1,600 iterations) free of the compilation and bounds the loss on long ones.
AUTO_JIT_AFTER = 2000


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
      (see `auto_lanes`), 1 with a GPU. Results do not depend on it.
    check_every: Most iterations per compiled chunk (refills happen between chunks).
    jit_compile: XLA-compile the loop. None (auto): XLA for more than two jobs; one or
      two start without and switch to XLA after `AUTO_JIT_AFTER` iterations (their
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
    validation.check_choice("attack", self.attack, ATTACKS)
    validation.check_choice("optimizer", self.optimizer, optimize.OPTIMIZERS)
    validation.check_choice("init", self.init, ("rand", "randn"))
    validation.check_choice("stop_rule", self.stop_rule, objectives.STOP_RULES)
    validation.check_int("iterations", self.iterations, 1)
    validation.check_int("restarts", self.restarts, 1, 64)
    validation.check_int("patience", self.patience, 0)
    validation.check_int("slots", self.slots, 1, 4096)
    if self.lanes is not None:
      validation.check_int("lanes", self.lanes, 1, 64)
    validation.check_int("check_every", self.check_every, 1)
    if self.tolerance is not None:
      validation.check_number("tolerance", self.tolerance, 0.0, np.inf, low_open=True)
    if self.tv_weight is not None:
      validation.check_number("tv_weight", self.tv_weight, 0.0, np.inf)
    allowed = optimize.OPTIMIZERS[self.optimizer].defaults
    validation.check_choices("optimizer_options", list(self.optimizer_options), allowed)
    if not np.isscalar(self.seed):
      object.__setattr__(self, "seed", tuple(int(s) for s in self.seed))

  def objective(self) -> objectives.Objective:
    return make_objective(self.attack, self.tv_weight, self.tolerance, self.stop_rule)

  def seeds(self, count: int) -> List[int]:
    """Restart-0 seed of each of `count` observations."""
    if np.isscalar(self.seed):
      return [int(self.seed) + i for i in range(count)]
    if len(self.seed) != count:
      raise ValueError(f"seed: {len(self.seed)} seeds for {count} observed updates.")
    return list(self.seed)


def auto_lanes() -> int:
  """Lanes when `AttackConfig.lanes` is None: 1 with a GPU (it batches the slots
  itself), else the CPU cores this process may use (an attack's ops are too small for
  XLA to spread one loop over cores: measured on 2 cores, digits, 32 attacks on 8 slots,
  one loop used 1.1 cores; 2 lanes of 4 slots took 0.56x its wall time, same results)."""
  if tf.config.list_physical_devices("GPU"):
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, int(cores or 1))


def lane_layout(config: AttackConfig, jobs: int) -> Tuple[int, int]:
  """(lanes, slots per lane) for `jobs` attacks: never more lanes than pairs of jobs or
  of slots, never one slot unless `slots=1` is asked (XLA specialises a size-1 slot
  axis, whose rounding differs from every larger slot count, which all agree)."""
  lanes = config.lanes or auto_lanes()
  lanes = max(1, min(lanes, config.slots // 2, -(-jobs // 2)))
  if lanes == 1:
    return 1, min(config.slots, max(jobs, 2))
  return lanes, max(2, min(config.slots // lanes, -(-jobs // lanes)))


def restart_seed(seed: int, restart: int) -> int:
  """Seed of restart `restart` of an attack seeded `seed` (restart 0: `seed` itself)."""
  if restart == 0:
    return int(seed)
  mixed = np.random.SeedSequence([int(seed) % 2**63, int(restart)]).generate_state(1)
  return int(mixed[0]) % (2**31 - 1)


@dataclasses.dataclass
class AttackResult:
  """One reconstruction (the winning restart's).

  Attributes:
    images: [N, H, W, C] reconstruction clipped to [0, 1] (`raw_images` unclipped).
    labels: [N] recovered labels (inferred, or argmax of DLG's soft label).
    status: `converged` (distance below tolerance), `max_iterations`, `stalled`
      (optimiser stopped moving above the tolerance) or `failed` (non-finite loss).
    distance: final matching distance of the objective.
    iterations: optimiser iterations the winning restart ran.
    seconds: wall time of its group divided by the group's observation count.
    batch_size: slots of the compiled loop (lane) it ran in.
    seed: restart 0's seed; restart: index of the winning restart (the lowest-numbered
      converged one, else the one with the smallest distance).
    restart_distances / restart_iterations / restart_status: per restart (None for a
      restart that never started because a sibling had converged).
  """

  attack: str
  images: np.ndarray
  raw_images: np.ndarray
  labels: np.ndarray
  status: str
  distance: float
  iterations: int
  seconds: float
  batch_size: int
  seed: int
  observed: ObservedUpdate = dataclasses.field(repr=False, default=None)
  restart: int = 0
  restart_distances: List[Optional[float]] = dataclasses.field(default_factory=list)
  restart_iterations: List[Optional[int]] = dataclasses.field(default_factory=list)
  restart_status: List[Optional[str]] = dataclasses.field(default_factory=list)

  @property
  def failed(self) -> bool:
    return self.status == "failed"


@dataclasses.dataclass
class Snapshot:
  """Progress of one running attack after a chunk (what a `hook` receives)."""

  index: int
  restart: int
  iterations: int
  distance: float
  images: np.ndarray
  observed: ObservedUpdate = dataclasses.field(repr=False, default=None)


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


def architecture_key(model: tf.keras.Model) -> str:
  """What the traced attack depends on: layer types and configs, not names or weights."""
  skip = ("name", "trainable", "dtype")
  layers = [
    (
      type(layer).__name__,
      {
        k: v
        for k, v in layer.get_config().items()
        if k not in skip and not k.endswith(("initializer", "regularizer", "constraint"))
      },
    )
    for layer in model.layers
  ]
  return json.dumps(layers, sort_keys=True, default=str)


class CompileCache:
  """Batched models and compiled optimiser loops, reused across `run_attacks` calls.

  An XLA compilation costs seconds, more than a whole easy attack. Entries are keyed by
  what the traced code captures (architecture, objective, observation shape, optimiser)
  and the least recently used beyond `max_entries` are dropped; `clear()` drops all.
  """

  def __init__(self, max_entries: int = 16):
    self.max_entries = max_entries
    self._entries: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()

  def get(self, key, make: Callable[[], Any]):
    if key in self._entries:
      self._entries.move_to_end(key)
      return self._entries[key]
    value = self._entries[key] = make()
    while len(self._entries) > self.max_entries:
      self._entries.popitem(last=False)
    return value

  def batched_model(self, model: tf.keras.Model) -> functional.BatchedModel:
    return self.get(("model", architecture_key(model)), lambda: functional.BatchedModel(model))

  def clear(self):
    self._entries.clear()

  def __len__(self):
    return len(self._entries)


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


def _initial_images(seed: int, shape, init: str) -> np.ndarray:
  s = tf.constant([int(seed) % (2**31 - 1), 7], tf.int32)
  if init == "randn":  # the reference code's torch.randn
    return tf.random.stateless_normal(shape, s).numpy()
  return tf.random.stateless_uniform(shape, s).numpy()


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
      `Snapshot`s of the running attacks (e.g. `summaries.TensorBoardHook`).
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
      job = _GroupJob(
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


class _RestartQueue(optimize.JobQueue):
  """Jobs (observation, restart), restart-major: every observation's restart 0 first,
  so when observations outnumber slots the later restarts of an observation whose
  earlier one converged are dropped before they start.

  When restart r converges only restarts > r leave (queued ones are skipped, running
  ones superseded): restarts < r run on, since one of them may converge too. So the
  lowest-numbered restart that converges on its own trajectory always runs to the end
  and wins, whatever the schedule (slots, lanes, thread timing) -- a rule "first to
  converge wins" would depend on it."""

  def __init__(self, group: "_GroupJob", starts, bar):
    self.group, self.starts, self.bar = group, starts, bar
    r, n = group.config.restarts, len(group.obs)
    self.jobs = [(i, k) for k in range(r) for i in range(n)]
    self.job_of = {ik: j for j, ik in enumerate(self.jobs)}
    self.rows_done: List[Dict[int, Dict]] = [{} for _ in group.obs]
    self.cancelled = set()
    self.reported = set()
    self._next = 0

  def next(self):
    while self._next < len(self.jobs) and self._next in self.cancelled:
      self._next += 1
    if self._next >= len(self.jobs):
      return None
    self._next += 1
    return self._next - 1

  def rows(self, job):
    i, r = self.jobs[job]
    start = None if self.starts is None or r else self.starts[i]
    return self.group.start(i, r, start), self.group.consts_row(i), self.group.tol[i]

  def decided(self, i: int) -> bool:
    """Observation i's winner is known: a restart converged after all earlier ones
    ended, or every restart ended."""
    done = self.rows_done[i]
    for r in range(self.group.config.restarts):
      if r not in done:
        return False
      if done[r]["status"] == "converged":
        return True
    return True

  def finish(self, job, row):
    i, r = self.jobs[job]
    self.rows_done[i][r] = row
    if i not in self.reported and self.decided(i):
      self.reported.add(i)
      if self.bar is not None:
        self.bar.update(1)
    if row["status"] != "converged":
      return ()
    later = range(r + 1, self.group.config.restarts)
    siblings = {self.job_of[i, k] for k in later if k not in self.rows_done[i]}
    self.cancelled |= siblings
    return siblings


class _GroupJob:
  """One group of same-shaped observations: inputs, compiled loop, result packing."""

  def __init__(self, config: AttackConfig, cache: CompileCache, model, obs, ids, seeds):
    self.config, self.cache, self.obs, self.ids, self.seeds = config, cache, obs, ids, seeds
    first = obs[0]
    self.kind, self.n, self.k = first.kind, first.num_examples, first.num_classes
    self.img_shape = (self.n,) + first.input_shape
    self.img_size = int(np.prod(self.img_shape))
    self.joint = not ATTACKS[config.attack][1]
    self.objective = config.objective()
    self.fmodel = cache.batched_model(self._keras_model(model, first))
    self.weights = [self.fmodel.trainable_weights_from(o.model_weights) for o in obs]
    shapes = [tuple(s) for s in self.fmodel.trainable_shapes]
    for o in obs:
      got = [tuple(np.shape(u)) for u in o.update]
      if got != shapes:
        raise ValueError(
          f"Observed update shapes {got} do not match the model's trainable variables {shapes}."
        )
    if not self.joint:
      ki = labels_lib.last_dense_kernel_index(shapes, self.k)
      self.inferred = [labels_lib.infer_labels(o.update[ki], self.n) for o in obs]
    self.tol = [self.objective.stop_threshold(o.update) for o in obs]

  def _keras_model(self, model, first):
    if (
      model is not None
      and tuple(model.input_shape[1:]) == first.input_shape
      and int(model.output_shape[-1]) == first.num_classes
    ):
      return model
    from tf_dlg import models as models_lib

    return self.cache.get(
      ("keras", first.model_name, first.input_shape, first.num_classes),
      lambda: models_lib.build_model(first.model_name, first.input_shape, first.num_classes),
    )

  def start(self, i: int, restart: int, explicit=None) -> np.ndarray:
    """Flat starting position of restart `restart` of observation i."""
    seed = restart_seed(self.seeds[i], restart)
    if explicit is None:
      x0 = _initial_images(seed, self.img_shape, self.config.init)
    else:
      x0 = np.asarray(explicit, np.float32).reshape(self.img_shape)
    parts = [x0.reshape(-1)]
    if self.joint:
      parts.append(_initial_images(seed + 10**6, (self.n, self.k), self.config.init).reshape(-1))
    return np.concatenate(parts).astype(np.float32)

  def consts_row(self, i: int) -> Dict:
    row = {
      "weights": [np.asarray(w, np.float32) for w in self.weights[i]],
      "observed": [np.asarray(u, np.float32) for u in self.obs[i].update],
    }
    if not self.joint:
      row["labels"] = np.eye(self.k, dtype=np.float32)[self.inferred[i]]
    return row

  def value_fn(self, jit: bool):
    """(loss, distance, gradient) of flat positions [S, n] under per-slot constants."""
    fmodel = self.fmodel if jit else self.fmodel.without_xla()
    objective, joint = self.objective, self.joint
    n, k, img_size, img_shape = self.n, self.k, self.img_size, self.img_shape
    first = self.obs[0]

    def value_fn(pos, c):
      with tf.GradientTape() as tape:
        tape.watch(pos)
        b = tf.shape(pos)[0]
        x = tf.reshape(pos[:, :img_size], tf.concat([[b], img_shape], 0))
        if joint:
          y = tf.nn.softmax(tf.reshape(pos[:, img_size:], [b, n, k]), axis=-1)
        else:
          y = c["labels"]
        if first.kind == "gradient":
          update = functional.client_gradients(fmodel, c["weights"], x, y)
        else:
          update = functional.fedavg_delta(
            fmodel, c["weights"], x, y, first.local_steps, first.learning_rate, first.batch_size
          )
        dist = objective.distance(update, c["observed"])
        loss = dist + objective.regularizer(x)
      return loss, dist, tape.gradient(loss, pos)

    # A function of its own: traced once (slot axis unknown) and called by the init,
    # refill and chunk functions alike, instead of being traced into each. No AutoGraph:
    # there is no tensor-dependent Python control flow, and converting the model code
    # took 5 of the 9 s of tracing.
    return tf.function(value_fn, autograph=False)

  def jit(self) -> bool:
    """XLA from the start? Auto (None): for more than two jobs; else see `run`."""
    if self.config.jit_compile is not None:
      return bool(self.config.jit_compile)
    return len(self.obs) * self.config.restarts > 2

  def compiled(self, jit: Optional[bool] = None) -> optimize.Compiled:
    c, first = self.config, self.obs[0]
    jit = self.jit() if jit is None else jit
    iterations = c.iterations if c.optimizer == "adam" else 0
    key = (
      "compiled",
      id(self.fmodel),
      architecture_key(self.fmodel.model),
      c.attack,
      json.dumps(self.objective.get_config(), sort_keys=True),
      first.kind,
      self.n,
      self.k,
      first.local_steps,
      first.learning_rate,
      first.batch_size,
      c.optimizer,
      json.dumps(dict(c.optimizer_options), sort_keys=True),
      jit,
      iterations,
    )
    return self.cache.get(
      key,
      lambda: optimize.build(
        c.optimizer, self.value_fn(jit), c.iterations, jit, **c.optimizer_options
      ),
    )

  def run(self, starts, bar, hook) -> List[AttackResult]:
    t0 = time.perf_counter()
    queue = _RestartQueue(self, starts, bar)
    lanes, slots = lane_layout(self.config, len(queue.jobs))
    on_chunk = None if hook is None else (lambda jobs, st: hook(self.snapshots(queue, jobs, st)))
    # Auto XLA for one or two jobs: its start-up (~5 s) costs more than an easy attack
    # (~200 iterations at ~3.8 ms without it), so switch only if one runs long.
    upgrade = None
    if self.config.jit_compile is None and not self.jit():
      upgrade = (self.compiled(jit=True), AUTO_JIT_AFTER)
    optimize.run_lanes(
      self.compiled(),
      queue,
      slots,
      self.config.iterations,
      lanes,
      check_every=self.config.check_every,
      on_chunk=on_chunk,
      upgrade=upgrade,
      patience=self.config.patience,
    )
    seconds = (time.perf_counter() - t0) / len(self.obs)
    return [self.pack(i, rows, seconds, slots) for i, rows in enumerate(queue.rows_done)]

  def snapshots(self, queue, jobs, st) -> List[Snapshot]:
    best_x, dist, iters = st["best_x"].numpy(), st["best_dist"].numpy(), st["iters"].numpy()
    out = []
    for s, job in enumerate(jobs):
      if job is not None:
        i, r = queue.jobs[job]
        out.append(
          Snapshot(
            index=self.ids[i],
            restart=r,
            iterations=int(iters[s]),
            distance=float(dist[s]),
            observed=self.obs[i],
            images=best_x[s, : self.img_size].reshape(self.img_shape),
          )
        )
    return out

  def pack(
    self, i: int, rows: Dict[int, Optional[Dict]], seconds: float, slots: int
  ) -> AttackResult:
    """The lowest-numbered converged restart, else the smallest distance (ties: the
    lowest index); see `_RestartQueue` for why not the first to converge."""
    order = range(self.config.restarts)
    ran = [r for r in order if rows.get(r) is not None]
    converged = [r for r in ran if rows[r]["status"] == "converged"]
    key = lambda r: (not np.isfinite(rows[r]["distance"]), rows[r]["distance"], r)  # noqa: E731
    win = converged[0] if converged else min(ran, key=key)
    row = rows[win]
    raw = row["x"][: self.img_size].reshape(self.img_shape)
    if self.joint:
      lab = np.argmax(row["x"][self.img_size :].reshape(self.n, self.k), -1).astype(np.int64)
    else:
      lab = self.inferred[i]
    pick = lambda key: [None if rows.get(r) is None else rows[r][key] for r in order]  # noqa: E731
    return AttackResult(
      attack=self.config.attack,
      images=np.clip(raw, 0.0, 1.0),
      raw_images=raw,
      labels=lab,
      status=row["status"],
      distance=float(row["distance"]),
      iterations=int(row["iterations"]),
      seconds=seconds,
      batch_size=slots,
      seed=self.seeds[i],
      observed=self.obs[i],
      restart=win,
      restart_distances=pick("distance"),
      restart_iterations=pick("iterations"),
      restart_status=pick("status"),
    )
