"""The sweep's case (model, data, user): the gallery and the client's images in it, the
cells attacked, the FedAvg training whose global model the client receives, and the
update TFF's client work sends.

`load_case` draws the client's images (client 0's share of the training data, or a
seeded half of an untrained dataset) and the gallery's seeded non-members; `cells` lists
the (round, batch size, local work) settings attacked; `train` runs the training once,
resumably, to every attacked round; `capture_update` is one client's update as TFF
computes it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import shutil
from typing import Any, Dict, List, Tuple

import numpy as np

from tf_dlg.study import sweep_settings
from tf_dlg.study.fields import path
from tf_dlg.study.presets import Preset


@dataclasses.dataclass
class Case:
  """One dataset's case: the gallery, the client's images in it, the training data."""

  name: str
  source: str
  train: Any  # the ImageDataset the FedAvg trains on (None: not trained)
  gallery_x: np.ndarray
  gallery_y: np.ndarray
  client: np.ndarray  # gallery indices of the client's images, in draw order
  num_classes: int
  input_shape: tuple


def load_case(settings: Preset, name: str) -> Case:
  """The gallery holds the client's images first, then seeded non-members."""
  from tf_dlg import data as data_lib
  from tf_dlg.study import convergence, matching

  dataset = data_lib.load_dataset(name, seed=settings.seed)
  trained = name in settings.sweep_trained_datasets
  rng = np.random.default_rng([settings.seed, 0x5EE9])
  if trained:
    if dataset.x_test is None:
      raise ValueError(
        f"{path('sweep_trained_datasets')}: {name!r} has no test split to train and "
        f"evaluate on; list it in {path('datasets')} only (attacked at round 0)."
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


def gallery_case(settings, name, source, x, y, num_classes: int, client_size: int) -> Case:
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
  room = max(settings.sweep_gallery - len(client_x), 0)
  pick = rng.choice(len(others_x), min(room, len(others_x)), replace=False) if room else []
  pick = np.sort(np.asarray(pick, np.int64))
  gallery_x = np.concatenate([client_x, others_x[pick]]).astype(np.float32)
  gallery_y = np.concatenate([client_y, others_y[pick]]).astype(np.int64)
  return Case(
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


def cells(settings: Preset, pool: Dict[str, int]) -> Tuple[List[Cell], List[str]]:
  """(cells to run, one line per cell that cannot run and why) of a checked sweep preset
  (`sweep_settings.check`); `pool`: client images."""
  out, skipped = [], []
  for name in settings.datasets:
    trained = name in settings.sweep_trained_datasets
    rounds = settings.sweep_rounds if trained else (0,)
    if not trained and any(r != 0 for r in settings.sweep_rounds):
      skipped.append(
        f"{name}: rounds {[r for r in settings.sweep_rounds if r != 0]} not run (not trained: "
        "too few images for FedAvg); round 0 only"
      )
    for r in rounds:
      for work in settings.sweep_local_work:
        for b in settings.sweep_batch_sizes:
          n = b if work == "step" else min(sweep_settings.epoch_size(settings), pool[name])
          if b > pool[name] or b > n:
            if r == rounds[0]:
              skipped.append(
                f"{name}: batch {b}, {work} not run (the client holds {pool[name]} images)"
              )
            continue
          clients = 1
          if work == "step":
            clients = max(1, min(-(-settings.sweep_min_images // b), pool[name] // b))
          out.append(Cell(name, int(r), int(b), work, int(n), clients))
  return out, skipped


def train(settings: Preset, case: Case, out_dir: str, progress: bool):
  """{round: (FedAvg bundle, server state, test accuracy or None)} of the case's training.

  Each round's run is its own resumable `run_simulation` folder; a later round starts
  from a copy of the previous one's checkpoint, so the training runs once in all.
  """
  from tf_dlg.federated import simulation
  from tf_dlg.study import run_store

  states = {}
  base = sweep_settings.training_config(settings, case.name, 1)
  if case.train is None:
    fa = simulation.build_for_config(base, _as_dataset(case))
    states[0] = (fa, fa.initialize(), None)
    return states
  previous = None
  for r in sorted(settings.sweep_rounds):
    if r == 0:
      fa = simulation.build_for_config(base, case.train)
      state = fa.initialize()
      # The untrained model's accuracy, as the training's history measures every round's.
      evaluator = simulation.evaluator_for(fa)
      fa.assign_to_keras(fa.process.get_model_weights(state), evaluator.model)
      states[0] = (fa, state, evaluator(case.train.x_test, case.train.y_test)[1])
      continue
    config = sweep_settings.training_config(settings, case.name, r)
    run_dir = os.path.join(out_dir, "training", f"{case.name}_round{r}")
    fingerprint = run_store.cell_fingerprint(config, case.train.source)
    fingerprint.pop("rounds")
    if not run_store.check_cell(run_dir, fingerprint):  # refuses another run's folder
      os.makedirs(run_dir, exist_ok=True)
      # Claimed before the copy: a kill in between leaves a claimed folder to resume.
      run_store.claim_cell(run_dir, fingerprint)
      if previous is not None:
        for name in (simulation.CHECKPOINT_NAME, simulation.HISTORY_NAME):
          shutil.copy(os.path.join(previous, name), os.path.join(run_dir, name))
    result = simulation.run_simulation(config, run_dir, dataset=case.train, progress=progress)
    states[r] = (result.fedavg, result.server_state, result.final.get("test_accuracy"))
    previous = run_dir
  return states


def _as_dataset(case: Case):
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
