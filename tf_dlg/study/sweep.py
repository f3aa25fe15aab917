"""The threat-model sweep: how much the update FedAvg actually sends leaks, and where.

Every other leakage number of the project attacks one image's gradient on an untrained
LeNet. The sweep attacks the update the training sends: the quick preset's FedAvg
(`bn_cnn`, client Adam, its data) is trained in TFF, and at rounds {0, 5, final} one
client's update is captured from the TFF client work itself (`FedAvg.capture_process`)
for client batch sizes {1, 4, 16, 64} and local work {one step, one epoch}, on MNIST and
the bundled CIFAR-10 sample, undefended and with each defence at its frontier settings
(each `tf_dlg.study.defense_table` row's `frontier`, and `dp`) applied by `tf_dlg.defenses.get_defense` exactly as the
clients of that training apply it (BatchNorm statistics passed through).

Case (model, data, user): the global model of a round of that training; the client's
images, a seeded draw from client 0's share of the training data; the user (client)
trains them with the training's optimizer and sends the defended delta.
Attacks (`ATTACKS`):
* `gallery_match`: the attacker holds a gallery with the client's images
  (`gallery_size` images of the dataset, the client's among them) and ranks each
  candidate by the masked cosine between the candidate's own simulated update and the
  observed one (`tf_dlg.federated.local_training.match_gallery`: the candidate alone,
  trained with the client's optimizer for the client's local steps, BatchNorm in
  training mode). Simulating a long epoch per candidate costs steps x gallery passes,
  so the simulation stops at `max_simulated_steps` (the `simulated_steps` column says
  where it did: the attacker there is weaker than the threat model allows).
* `cosine_tv`: cosine + total-variation reconstruction (Inverting Gradients'
  objective, `tf_dlg.federated.local_training.reconstruct`) of the whole batch with the
  recovered labels, its dummy update simulated through the client's optimizer exactly;
  `cosine_tv_direction`: the same with the dummy's plain update direction (SGD) as a
  surrogate. An Adam step is close to `lr * sign(gradient)`, whose derivative vanishes
  almost everywhere, so the exact simulation gives L-BFGS a flat landscape (measured on
  one MNIST image at round 0: rank 1,285 of 2,004 exact, rank 2 with the surrogate).
  A member is identified when some reconstruction of its batch picks it first among the
  whole gallery (`tf_dlg.analysis.identification.identify`). Reconstruction runs on
  batches of at most `recon_max_batch` images, undefended unless `recon_defended`.
* Batch label recovery (`tf_dlg.attacks.labels.infer_labels` on the last dense kernel of
  the defended update): `label_accuracy` is the recovered label multiset's overlap with
  the true one, per row.
Analysis: `identified` of `num_images` (the client's images ranked first among the
gallery's non-members, ties against the attacker) with an exact Clopper-Pearson
interval (`low`, `high`), and the membership AUC and TPR at 1 % FPR of the originals'
ranks (`tf_dlg.analysis.membership`).

Outputs in `output_dir`: `rows.jsonl` (`tf_dlg.study.results.ResultsLog`: appended as
each group of rows ends, resumed exactly, another configuration's file refused),
`sweep.csv` (rewritten from it after every group), `training/` (the TFF runs, resumable,
refused when another configuration's), `figures/sweep.png` and `sweep.md`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_dlg import validation

LOCAL_WORK = ("step", "epoch")
GALLERY = "gallery_match"
# Reconstruction attacks: name -> whether the dummy's update runs the client's optimizer.
RECONSTRUCTIONS = {"cosine_tv": True, "cosine_tv_direction": False}
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
  model: str = "bn_cnn"
  training_rounds: int = 15
  train_examples: int = 6000
  test_examples: int = 2000
  num_clients: int = 10
  batch_size: int = 64
  local_epochs: int = 1
  client_optimizer: str = "adam"
  client_lr: float = 0.002
  seed: int = 0
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
    validation.check_choice("model", self.model, models.MODELS + (USER_MODEL,))
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


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class _Case:
  """One dataset's case: the gallery, the client's images in it, the training data."""

  name: str
  source: str
  train: Any  # the ImageDataset the FedAvg trains on (None: not trained)
  gallery_x: np.ndarray
  gallery_y: np.ndarray
  client: np.ndarray  # gallery indices of the client's images, in draw order
  num_classes: int
  input_shape: tuple


def _load_case(settings: SweepSettings, name: str) -> _Case:
  """The gallery holds the client's images first, then seeded non-members."""
  from tf_dlg import data as data_lib
  from tf_dlg.study import convergence, matching

  dataset = data_lib.load_dataset(name, seed=settings.seed)
  trained = name in settings.trained_datasets
  rng = np.random.default_rng([settings.seed, 0x5EE9])
  if trained:
    if dataset.x_test is None:
      raise ValueError(
        f"trained_datasets: {name!r} has no test split to train and evaluate on; list it "
        "in datasets only (attacked at round 0)."
      )
    train = convergence.subset(
      dataset, settings.train_examples, settings.test_examples, settings.seed
    )
    parts = data_lib.partition(train.y_train, settings.num_clients, "iid", seed=settings.seed)
    own = np.asarray(parts[0])
    client_x, client_y = train.x_train[own], train.y_train[own]
    others_x, others_y = matching.gallery_arrays(dataset)
    # Drop the client's own images from the non-members (they are the members).
    keep = np.ones(len(others_x), bool)
    digest = {hash(x.tobytes()) for x in client_x}
    keep &= np.array([hash(x.tobytes()) not in digest for x in others_x])
    others_x, others_y = others_x[keep], others_y[keep]
  else:
    x, y = dataset.x_train, dataset.y_train.astype(np.int64)
    if dataset.x_test is not None:
      x, y = matching.gallery_arrays(dataset)
    # The client holds half: the other half are the gallery's non-members it is ranked among.
    return gallery_case(settings, name, dataset.source, x, y, dataset.num_classes, len(x) // 2)
  meta = (name, dataset.source, train, dataset.num_classes)
  return _gallery(settings, rng, meta, (client_x, client_y), (others_x, others_y))


def gallery_case(settings, name, source, x, y, num_classes: int, client_size: int) -> _Case:
  """An untrained case: the client holds a seeded `client_size` of (x, y), the rest are
  the gallery's non-members."""
  rng = np.random.default_rng([settings.seed, 0x5EE9])
  order = rng.permutation(len(x))
  own, rest = order[:client_size], np.sort(order[client_size:])
  meta = (name, source, None, num_classes)
  return _gallery(settings, rng, meta, (x[own], y[own]), (x[rest], y[rest]))


def _gallery(settings, rng, meta, client, others):
  """The gallery: the client's images (seeded order) first, then seeded non-members.

  `meta`: (name, source, training dataset or None, classes); `client` / `others`: (x, y).
  """
  name, source, train, classes = meta
  (client_x, client_y), (others_x, others_y) = client, others
  order = rng.permutation(len(client_x))
  client_x, client_y = client_x[order], client_y[order]
  room = max(settings.gallery_size - len(client_x), 0)
  pick = rng.choice(len(others_x), min(room, len(others_x)), replace=False) if room else []
  pick = np.sort(np.asarray(pick, np.int64))
  gallery_x = np.concatenate([client_x, others_x[pick]]).astype(np.float32)
  gallery_y = np.concatenate([client_y, others_y[pick]]).astype(np.int64)
  return _Case(
    name=name,
    source=source,
    train=train,
    gallery_x=gallery_x,
    gallery_y=gallery_y,
    client=np.arange(len(client_x)),
    num_classes=int(classes),
    input_shape=tuple(gallery_x.shape[1:]),
  )


@dataclasses.dataclass(frozen=True)
class Cell:
  """One attacked setting: batch size and local work of the client at one round."""

  dataset: str
  round: int
  batch: int
  local_work: str
  num_images: int  # the client's images behind one update
  clients: int = 1  # independent clients' updates attacked (images: clients x num_images)

  @property
  def local_steps(self) -> int:
    return 1 if self.local_work == "step" else int(math.ceil(self.num_images / self.batch))


def cells(settings: SweepSettings, pool: Dict[str, int]) -> Tuple[List[Cell], List[str]]:
  """(cells to run, one line per cell that cannot run and why); `pool`: client images."""
  out, skipped = [], []
  for name in settings.datasets:
    rounds = settings.rounds if name in settings.trained_datasets else (0,)
    if name not in settings.trained_datasets and any(r != 0 for r in settings.rounds):
      skipped.append(
        f"{name}: rounds {[r for r in settings.rounds if r != 0]} not run (not trained: "
        "too few images for FedAvg); round 0 only"
      )
    for r in rounds:
      for work in settings.local_work:
        for b in settings.batch_sizes:
          n = b if work == "step" else min(settings.epoch_size(), pool[name])
          if b > pool[name] or b > n:
            if r == rounds[0]:
              skipped.append(
                f"{name}: batch {b}, {work} not run (the client holds {pool[name]} images)"
              )
            continue
          clients = 1
          if work == "step":
            clients = max(1, min(-(-settings.min_images // b), pool[name] // b))
          out.append(Cell(name, int(r), int(b), work, int(n), clients))
  return out, skipped


# --------------------------------------------------------------------------- training


def _train(settings: SweepSettings, case: _Case, out_dir: str, progress: bool):
  """{round: (FedAvg bundle, server state, test accuracy or None)} of the case's training.

  Each round's run is its own resumable `run_simulation` folder; a later round starts
  from a copy of the previous one's checkpoint, so the training runs once in all.
  """
  from tf_dlg.federated import simulation
  from tf_dlg.study import convergence

  states = {}
  base = settings.training_config(case.name, 1)
  if case.train is None:
    fa = simulation.build_for_config(base, _as_dataset(case))
    states[0] = (fa, fa.initialize(), None)
    return states
  previous = None
  for r in sorted(settings.rounds):
    if r == 0:
      fa = simulation.build_for_config(base, case.train)
      state = fa.initialize()
      # The untrained model's accuracy, as the training's history measures every round's.
      evaluator = simulation.evaluator_for(fa)
      fa.assign_to_keras(fa.process.get_model_weights(state), evaluator.model)
      states[0] = (fa, state, evaluator(case.train.x_test, case.train.y_test)[1])
      continue
    config = settings.training_config(case.name, r)
    run_dir = os.path.join(out_dir, "training", f"{case.name}_round{r}")
    fingerprint = convergence.cell_fingerprint(config, case.train.source)
    fingerprint.pop("rounds")
    if not convergence.check_cell(run_dir, fingerprint):  # refuses another run's folder
      os.makedirs(run_dir, exist_ok=True)
      # Claimed before the copy: a kill in between leaves a claimed folder to resume.
      convergence.claim_cell(run_dir, fingerprint)
      if previous is not None:
        for name in (simulation.CHECKPOINT_NAME, simulation.HISTORY_NAME):
          shutil.copy(os.path.join(previous, name), os.path.join(run_dir, name))
    result = simulation.run_simulation(config, run_dir, dataset=case.train, progress=progress)
    states[r] = (result.fedavg, result.server_state, result.final.get("test_accuracy"))
    previous = run_dir
  return states


def _as_dataset(case: _Case):
  """An untrained case's images as an ImageDataset (for the TFF build's shapes only)."""
  from tf_dlg import data as data_lib

  return data_lib.ImageDataset(
    name=case.name,
    source=case.source,
    x_train=case.gallery_x,
    y_train=case.gallery_y,
    x_test=None,
    y_test=None,
    num_classes=case.num_classes,
  )


def capture_update(fa, state, images, labels, batch_size: int, seed: int) -> List[np.ndarray]:
  """The update TFF's client work sends for one client holding (images, labels).

  One epoch of `batch_size` batches (shuffled, seeded), the training's optimizer,
  BatchNorm in training mode: trainable deltas then the BatchNorm statistics' deltas.
  """
  from tf_dlg import data as data_lib
  from tf_dlg.federated import client_work, simulation

  batches = data_lib.client_datasets(
    images, labels, [np.arange(len(images))], batch_size=batch_size, shuffle=True, seed=seed
  )[0]
  client = collections.OrderedDict(batches=batches, role=client_work.role())
  out = fa.capture_process.next(state, [client])
  # The capture variant reports every client's (here undefended) update.
  values = simulation.find_metric(out.metrics, "client_values")
  return [np.asarray(v)[0] for v in values]


# --------------------------------------------------------------------------- attacks


def label_accuracy(recovered: Sequence[int], true: Sequence[int], num_classes: int) -> float:
  """Overlap of the recovered and true label multisets, over the batch size."""
  a = np.bincount(np.asarray(recovered, np.int64), minlength=num_classes)
  b = np.bincount(np.asarray(true, np.int64), minlength=num_classes)
  return float(np.minimum(a, b).sum() / max(len(true), 1))


def recover_labels(trainable_update, shapes, num_classes: int, count: int) -> np.ndarray:
  from tf_dlg.attacks import labels as labels_lib

  ki = labels_lib.last_dense_kernel_index(shapes, num_classes)
  return labels_lib.infer_labels(trainable_update[ki], count)


def leak_row(ranks: Sequence[int], non_members: int) -> Dict[str, Any]:
  """identified / interval / membership columns of one attacked update's ranks."""
  from tf_dlg.analysis import identification, membership

  ranks = np.asarray(ranks, np.int64)
  top1 = identification.identification_rate(ranks == 1)
  size = non_members + 1
  auc = membership.auc(ranks, size)
  tpr = membership.tpr_at_fpr(ranks, size)
  return dict(
    identified=int(np.sum(ranks == 1)),
    num_images=int(len(ranks)),
    low=top1.low,
    high=top1.high,
    auc=auc.estimate,
    auc_low=auc.low,
    auc_high=auc.high,
    tpr=tpr.estimate,
    tpr_low=tpr.low,
    tpr_high=tpr.high,
  )


def row_key(cell: Cell, attack: str, defense: str, param: Optional[float]) -> str:
  p = "-" if param is None else repr(float(param))
  return f"{cell.dataset}|r{cell.round}|b{cell.batch}|{cell.local_work}|{attack}|{defense}|{p}"


class Sweep:
  """The sweep of `settings` in `output_dir` (see the module docstring)."""

  def __init__(
    self,
    output_dir: str,
    settings: SweepSettings,
    progress: bool = True,
    frontier_csv: Optional[str] = None,
  ):
    """`frontier_csv`: a frontier run's frontier.csv (same training) whose accuracy costs
    the report quotes beside each protecting setting (read now: a bad file fails first)."""
    self.settings = settings.check()
    self.costs = _costs(frontier_csv) if frontier_csv else None
    validation.check_output_dir("output_dir", output_dir)
    self.output_dir = output_dir
    self.progress = progress

  def _log(self):
    from tf_dlg.study import results

    os.makedirs(self.output_dir, exist_ok=True)
    return results.ResultsLog(
      os.path.join(self.output_dir, "rows.jsonl"), EXPERIMENT, self.settings.fingerprint()
    )

  def run(self) -> Dict[str, str]:
    """Runs (or resumes) every cell; writes sweep.csv, the figure and sweep.md."""
    from tf_dlg import io as io_lib
    from tf_dlg.execution import runtime

    # The data first (a dataset that cannot serve raises here, nothing written yet), then
    # the rows: another configuration's are refused before any training.
    cases = {n: _load_case(self.settings, n) for n in self.settings.datasets}
    io_lib.lock_directory(self.output_dir)
    log = self._log()
    todo, skipped = cells(self.settings, {n: len(c.client) for n, c in cases.items()})
    for line in skipped:
      print(f"[sweep] {line}")
    runtime.install_context()
    accuracy = {}
    with runtime.execution_target(None):
      for name, case in cases.items():
        mine = [c for c in todo if c.dataset == name]
        if all(self._done(log, c) for c in mine):
          accuracy.update(self._stored_accuracy(log, mine))
          continue
        states = _train(self.settings, case, self.output_dir, self.progress)
        for r, (fa, state, acc) in states.items():
          accuracy[(name, r)] = acc
          at_round = [c for c in mine if c.round == r and not self._done(log, c)]
          if at_round:
            self._attack_round(log, case, fa, state, acc, at_round)
    return self.write(list(log), skipped)

  def _runs(self, cell: Cell, defense: str) -> List[str]:
    """The attacks that run on `cell` under `defense`."""
    s = self.settings
    recon = cell.num_images <= s.recon_max_batch and (defense == UNDEFENDED or s.recon_defended)
    return [a for a in s.attacks if a == GALLERY or recon]

  def _keys(self, cell: Cell) -> List[str]:
    settings = [(UNDEFENDED, None)] + list(self.settings.defenses)
    return [row_key(cell, a, d, p) for d, p in settings for a in self._runs(cell, d)]

  def _done(self, log, cell: Cell) -> bool:
    return all(k in log for k in self._keys(cell))

  @staticmethod
  def _stored_accuracy(log, mine):
    out = {}
    for rec in log:
      out[(rec["dataset"], rec["round"])] = rec.get("test_accuracy")
    return out

  def _attack_round(self, log, case: _Case, fa, state, acc, at_round: List[Cell]):
    """Captures every cell's update from TFF's client work at this round, then attacks."""
    from tf_dlg import models
    from tf_dlg.federated import fedavg

    s = self.settings
    # The attacker's own copy of the architecture (built eagerly, outside TFF's graphs).
    keras_model = models.build_model(s.model, case.input_shape, case.num_classes, seed=s.seed)
    fa.assign_to_keras(fa.process.get_model_weights(state), keras_model)
    exclude = fedavg.update_exclusion(keras_model)

    def capture(cell, images, labels, seed):
      return capture_update(fa, state, images, labels, cell.batch, seed)

    self.attack_cells(log, case, keras_model, exclude, fa.num_trainable, acc, at_round, capture)

  def attack_cells(self, log, case, keras_model, exclude, num_trainable, acc, pending, capture):
    """Each cell's update (`capture(cell, images, labels, seed)`: the client's whole update
    list, trainable first), defended at every setting, attacked by simulated steps."""
    from tf_dlg.federated import local_training

    s = self.settings
    keras_model = local_training.attack_model(keras_model)
    weights = keras_model.get_weights()
    shapes = [tuple(v.shape) for v in keras_model.trainable_variables]
    groups = collections.OrderedDict()
    for cell in pending:
      for client in range(cell.clients):
        for it in self._defended(case, (cell, client), capture, exclude, num_trainable, shapes):
          it["acc"] = acc
          groups.setdefault(it["steps"], []).append(it)
    for steps, every in groups.items():
      # A cell resumed after some of its rows were logged redoes only the missing ones.
      items = [it for it in every if self._missing(log, it, GALLERY)]
      if not items:
        continue
      t0 = time.perf_counter()
      results = local_training.match_gallery(
        keras_model,
        weights,
        [it["update"] for it in items],
        case.gallery_x,
        case.gallery_y,
        [it["members"] for it in items],
        local_training.ClientTraining(s.client_optimizer, s.client_lr, steps),
        chunk=s.chunk,
      )
      per = (time.perf_counter() - t0) / len(items)
      done = [(it, res.ranks, res.non_members) for it, res in zip(items, results)]
      self._add_rows(log, case, done, GALLERY, per)
    recon = [it for items in groups.values() for it in items]
    for attack, exact in RECONSTRUCTIONS.items():
      todo = [it for it in recon if self._missing(log, it, attack)]
      if todo:
        self._reconstruct(log, case, keras_model, weights, todo, attack, exact)

  def _missing(self, log, it, attack: str) -> bool:
    """Whether `attack` runs on the item's cell and setting and its row is not logged."""
    key = row_key(it["cell"], attack, it["defense"], it["param"])
    return attack in self._runs(it["cell"], it["defense"]) and key not in log

  def _defended(self, case, cell_client, capture, exclude, num_trainable, shapes):
    """One client's update of the cell captured once, then one item per defence setting."""
    import tensorflow as tf

    from tf_dlg import defenses

    s = self.settings
    settings = [(UNDEFENDED, None)] + list(s.defenses)
    items = []
    t0 = time.perf_counter()
    cell, client = cell_client
    members = case.client[client * cell.num_images : (client + 1) * cell.num_images]
    # Seeded by the cell alone: a resumed run redoes a cell with the same shuffle and noise.
    work = LOCAL_WORK.index(cell.local_work)
    key = [s.seed, cell.round, cell.batch, work, client]
    seed = int(np.random.default_rng(key).integers(2**31 - 1))
    update = capture(cell, case.gallery_x[members], case.gallery_y[members], seed)
    captured = time.perf_counter() - t0
    for di, (name, param) in enumerate(settings):
      defense = defenses.get_defense(name, param, exclude=exclude)
      defended = defense([tf.constant(u) for u in update], seed + di)
      trainable = [np.asarray(u) for u in defended[:num_trainable]]
      recovered = recover_labels(trainable, shapes, case.num_classes, len(members))
      items.append(
        dict(
          cell=cell,
          defense=name,
          param=param,
          update=trainable,
          members=members,
          steps=min(cell.local_steps, s.max_simulated_steps),
          captured=captured / len(settings),
          label_accuracy=label_accuracy(recovered, case.gallery_y[members], case.num_classes),
          recovered=recovered,
        )
      )
    return items

  def _add_rows(self, log, case, done, attack, seconds):
    """One row per (cell, setting) of `done` [(item, ranks, non-members ranked against)]:
    the images of the cell's clients together."""
    rows = collections.OrderedDict()
    for part in done:
      it = part[0]
      rows.setdefault(row_key(it["cell"], attack, it["defense"], it["param"]), []).append(part)
    for parts in rows.values():
      its = [p[0] for p in parts]
      ranks = np.concatenate([np.asarray(p[1], np.int64) for p in parts])
      non_members = parts[0][2]  # one cell: one batch size
      # Each client holds the same number of images: the mean is over images.
      merged = dict(its[0], label_accuracy=float(np.mean([it["label_accuracy"] for it in its])))
      merged["captured"] = sum(it["captured"] for it in its)
      self._add(log, case, merged, attack, ranks, non_members, seconds * len(its))
    self._write_csv(list(log))

  def _add(self, log, case, it, attack, ranks, non_members, seconds):
    cell = it["cell"]
    row = dict(
      dataset=case.name,
      dataset_source=case.source,
      gallery_size=len(case.gallery_x),
      batch=cell.batch,
      local_work=cell.local_work,
      local_steps=cell.local_steps,
      simulated_steps=it["steps"],
      round=cell.round,
      test_accuracy=it["acc"],
      attack=attack,
      defense=it["defense"],
      param=it["param"],
      label_accuracy=it["label_accuracy"],
      seconds=round(seconds + it["captured"], 3),
      ranks=[int(r) for r in ranks],
    )
    row.update(leak_row(ranks, non_members))
    log.add(row_key(cell, attack, it["defense"], it["param"]), row)

  def _reconstruct(self, log, case, keras_model, weights, items, attack, exact):
    """Reconstructs each item's batch, grouped by batch shape; one row per item."""
    from tf_dlg.analysis import identification
    from tf_dlg.federated import local_training

    s = self.settings
    name = s.client_optimizer if exact else "sgd"
    gallery = identification.Gallery(case.gallery_x)
    shapes = collections.OrderedDict()
    for it in items:
      shapes.setdefault((it["cell"].num_images, it["cell"].batch, it["steps"]), []).append(it)
    for (n, batch, steps), group in shapes.items():
      t0 = time.perf_counter()
      images = local_training.reconstruct(
        keras_model,
        weights,
        [it["update"] for it in group],
        [it["recovered"] for it in group],
        local_training.ClientTraining(name, s.client_lr, steps, batch),
        iterations=s.recon_iterations,
        tv_weight=s.tv_weight,
        seed=s.seed,
      )
      per = (time.perf_counter() - t0) / len(group)
      done = []
      for it, recs in zip(group, images):
        # Rank of each member under each reconstruction; a member's best one counts.
        members = np.asarray(it["members"])
        found = identification.identify(
          np.repeat(recs, n, axis=0), gallery, np.tile(members, n), k=(1,)
        )
        done.append((it, found.rank.reshape(n, n).min(axis=0), len(case.gallery_x) - 1))
      self._add_rows(log, case, done, attack, per)

  def _write_csv(self, rows) -> str:
    from tf_dlg.study import records

    return records.write_csv(os.path.join(self.output_dir, "sweep.csv"), CSV_FIELDS, rows)

  def wording(self) -> Dict[str, str]:
    """The report's title, subject of its first line, and case description."""
    s = self.settings
    return dict(
      title="Leakage where FedAvg trains: the threat-model sweep",
      subject="the training's own client setting",
      case=(
        f"Model: {s.model}, trained by FedAvg (TFF) for {s.training_rounds} rounds, "
        f"{s.num_clients} clients, batch {s.batch_size}, seed {s.seed}; the updates are "
        "captured from TFF's client work."
      ),
    )

  def write(self, rows, skipped: Sequence[str] = ()) -> Dict[str, str]:
    from tf_dlg import io as io_lib

    paths = {"csv": self._write_csv(rows)}
    paths["figure"] = figure(rows, os.path.join(self.output_dir, "figures", "sweep.png"))
    text = report(rows, self.settings, skipped, self.costs, **self.wording())
    paths["report"] = io_lib.atomic_write_text(os.path.join(self.output_dir, "sweep.md"), text)
    return paths


# --------------------------------------------------------------------------- outputs


def _undefended(rows):
  return [r for r in rows if r["defense"] == UNDEFENDED]


def figure(rows, path: str) -> str:
  """Undefended identification against batch size, one panel per round (matplotlib)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = _undefended(rows)
  rounds = sorted({r["round"] for r in rows})
  panels = max(len(rounds), 1)
  fig, axes = plt.subplots(1, panels, figsize=(max(4.6 * panels, 6.0), 4.0))
  axes = np.atleast_1d(axes)
  for ax, rnd in zip(axes, rounds):
    lines = collections.defaultdict(list)
    for r in rows:
      if r["round"] == rnd:
        lines[(r["dataset"], r["local_work"], r["attack"])].append(r)
    for (dataset, work, attack), pts in sorted(lines.items()):
      pts = sorted(pts, key=lambda r: r["batch"])
      x = [p["batch"] for p in pts]
      y = [p["identified"] / p["num_images"] for p in pts]
      err = [[yy - p["low"] for yy, p in zip(y, pts)], [p["high"] - yy for yy, p in zip(y, pts)]]
      gallery = pts[0]["gallery_size"]
      ax.errorbar(
        x,
        y,
        yerr=err,
        marker="o" if work == "step" else "s",
        capsize=3,
        label=f"{attack}: {dataset} ({gallery:,} gallery), {work}",
      )
    acc = next(
      (r["test_accuracy"] for r in rows if r["round"] == rnd and r.get("test_accuracy")), None
    )
    title = f"round {rnd}" + ("" if acc is None else f" (test accuracy {acc:.3f})")
    ax.set_title(title, fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("client batch size")
    ax.set_ylabel("images identified (top-1), undefended")
    ax.legend(fontsize=6)
  fig.suptitle(
    "Images identified top-1 from the update FedAvg sends, undefended (exact 95 % intervals)",
    fontsize=9,
    wrap=True,
  )
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _costs(path: str) -> Dict[Tuple[str, float], Any]:
  """{(defence, setting): FrontierPoint} of a frontier.csv."""
  from tf_dlg.study import frontier

  if not os.path.isfile(path):
    raise ValueError(f"frontier_csv={path!r} is not a file; give a frontier run's frontier.csv.")
  return {(p.defense, float(p.param)): p for p in frontier.read_frontier(path)}


def _cost(costs, name: str, param: float) -> str:
  if costs is None:
    return "cost not measured here (pass a frontier run's frontier.csv)"
  p = costs.get((name, float(param)))
  if p is None:
    return "not on the given frontier.csv"
  return (
    f"cost {100 * p.cost:+.1f} pp [{100 * p.cost_low:+.1f}, {100 * p.cost_high:+.1f}] "
    f"beside the baseline's accuracy {p.baseline_accuracy:.3f} ({p.dataset}, seeds {p.seeds})"
  )


def _fmt(r) -> str:
  return f"{r['identified']}/{r['num_images']} [{r['low']:.2f}, {r['high']:.2f}]"


def own_cell(rows, settings: SweepSettings):
  """(dataset, round, rows) at the training's own batch size and one epoch of its share,
  the last round measured on the first trained dataset; None when not swept."""
  trained = [d for d in settings.datasets if d in settings.trained_datasets]
  target = trained[0] if trained else settings.datasets[0]  # an audit trains nothing
  if settings.epoch_size() != settings.share:
    return None
  at = [
    r
    for r in rows
    if r["dataset"] == target and r["batch"] == settings.batch_size and r["local_work"] == "epoch"
  ]
  if not at:
    return None
  rnd = max(r["round"] for r in at)
  return target, rnd, [r for r in at if r["round"] == rnd]


def opening_line(
  rows, settings: SweepSettings, costs=None, subject="the training's own client setting"
) -> str:
  """At the training's own batch size and local work: how much leaks undefended, and
  each defence's weakest protecting setting there (none identified by any attacker)."""
  own = own_cell(rows, settings)
  if own is None:
    return "The training's own configuration was not in this sweep."
  target, rnd, at = own
  und = [r for r in at if r["defense"] == UNDEFENDED]
  head = (
    f"At {subject} ({target}, batch {settings.batch_size}, one "
    f"epoch of {settings.share} images = {und[0]['local_steps']} {settings.client_optimizer} "
    f"steps, round {rnd}, gallery of {und[0]['gallery_size']:,}), undefended: "
    + ", ".join(f"{r['attack']} identifies {_fmt(r)}" for r in und)
  )
  if all(r["identified"] == 0 for r in und):
    auc = ", ".join(f"{r['attack']} {r['auc']:.2f}" for r in und)
    return (
      head + "; no image identified undefended, so no setting is needed there against "
      f"top-1 identification (membership AUC {auc}: 0.5 is chance, above it members still "
      "stand out)."
    )
  parts = []
  for name in dict.fromkeys(d for d, _ in settings.defenses):
    pts = sorted(
      {r["param"] for r in at if r["defense"] == name},
      key=lambda p: settings.defenses.index((name, p)),
    )
    protects = [
      p
      for p in pts
      if all(r["identified"] == 0 for r in at if r["defense"] == name and r["param"] == p)
    ]
    if protects:
      worst = [r for r in at if r["defense"] == name and r["param"] == protects[0]]
      # 0 of n only shows protection when even its upper bound is below the undefended rate.
      leak = max(r["identified"] / r["num_images"] for r in und)
      shown = "" if max(r["high"] for r in worst) < leak else "inconclusive: "
      parts.append(
        f"{name} {protects[0]:g} ({shown}0/{worst[0]['num_images']} identified, rate at most "
        f"{max(r['high'] for r in worst):.2f}, membership AUC {max(r['auc'] for r in worst):.2f}; "
        f"{_cost(costs, name, protects[0])})"
      )
    else:
      parts.append(f"{name}: no frontier setting protects")
  return head + "; weakest protecting setting: " + "; ".join(parts) + "."


def report(
  rows,
  settings: SweepSettings,
  skipped: Sequence[str] = (),
  costs=None,
  title: str = "Leakage where FedAvg trains: the threat-model sweep",
  subject: str = "the training's own client setting",
  case: str = "",
) -> str:
  lines = [f"# {title}", "", opening_line(rows, settings, costs, subject), ""]
  sources = sorted({(r["dataset"], r.get("dataset_source", "")) for r in rows})
  lines += [
    "Attacker: gallery matching (the candidate's own update simulated with the client's "
    f"{settings.client_optimizer} (lr {settings.client_lr:g}) for the client's local steps, "
    f"capped at {settings.max_simulated_steps}; column `simulated_steps`), with the "
    "client's images ranked among the gallery's non-members. Reconstruction (cosine + TV, "
    "exact and update-direction) on batches of at most "
    f"{settings.recon_max_batch} images, "
    + ("every setting" if settings.recon_defended else "undefended only")
    + "; every other verdict names gallery matching alone. Labels recovered from the "
    "last dense layer. " + case,
    "",
    "Data: " + "; ".join(f"{d}: {s}" for d, s in sources),
    "",
  ]
  if skipped:
    lines += ["Not run:"] + [f"- {s}" for s in skipped] + [""]
  lines += [
    "| dataset | round | batch | local work (steps) | attack | identified [95 %] | "
    "AUC | TPR@1%FPR | label acc. |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in sorted(
    _undefended(rows), key=lambda r: (r["dataset"], r["round"], r["local_work"], r["batch"])
  ):
    lines.append(
      f"| {r['dataset']} | {r['round']} | {r['batch']} | {r['local_work']} ({r['local_steps']}) "
      f"| {r['attack']} | {_fmt(r)} | {r['auc']:.3f} | {r['tpr']:.2f} | {r['label_accuracy']:.2f} |"
    )
  own = own_cell(rows, settings)
  if own is not None:
    target, rnd, at = own
    lines += [
      "",
      f"Every setting at {subject} ({target}, round {rnd}, batch {settings.batch_size}, "
      "one epoch):",
      "",
      "| defence | setting | attack | identified [95 %] | AUC [95 %] | TPR@1%FPR | label acc. |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in at:
      param = "" if r["param"] is None else f"{r['param']:g}"
      lines.append(
        f"| {r['defense']} | {param} | {r['attack']} | {_fmt(r)} | {r['auc']:.3f} "
        f"[{r['auc_low']:.3f}, {r['auc_high']:.3f}] | {r['tpr']:.2f} | {r['label_accuracy']:.2f} |"
      )
  lines += ["", "![sweep](figures/sweep.png)", ""]
  return "\n".join(lines)
