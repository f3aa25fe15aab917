"""The sweep's attacks on one round's captured updates (see `tf_dlg.study.sweep`).

`defended_items`: one client's update of a cell, defended at every setting, with the
labels recovered from it; `match`: gallery matching of a group of them; `reconstruct`:
cosine + TV reconstruction, then identification among the gallery. Each returns, per
item, the ranks of the client's images and the non-members they were ranked against.
"""

from __future__ import annotations

import collections
import time
from typing import Sequence

import numpy as np

from tf_dlg.study.sweep_settings import LOCAL_WORK, UNDEFENDED


def label_accuracy(recovered: Sequence[int], true: Sequence[int], num_classes: int) -> float:
  """Overlap of the recovered and true label multisets, over the batch size."""
  a = np.bincount(np.asarray(recovered, np.int64), minlength=num_classes)
  b = np.bincount(np.asarray(true, np.int64), minlength=num_classes)
  return float(np.minimum(a, b).sum() / max(len(true), 1))


def recover_labels(trainable_update, shapes, num_classes: int, count: int) -> np.ndarray:
  from tf_dlg.attacks import labels as labels_lib

  ki = labels_lib.last_dense_kernel_index(shapes, num_classes)
  return labels_lib.infer_labels(trainable_update[ki], count)


def defended_items(settings, case, cell_client, capture, exclude, num_trainable, shapes):
  """One client's update of the cell captured once, then one item per defence setting."""
  import tensorflow as tf

  from tf_dlg import defenses

  s = settings
  settings = [(UNDEFENDED, None)] + list(s.sweep_defenses)
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
    # BatchNorm statistics' deltas: defences pass them through, as the training's do.
    statistics = [np.asarray(u) for u in defended[num_trainable:]]
    recovered = recover_labels(trainable, shapes, case.num_classes, len(members))
    items.append(
      dict(
        cell=cell,
        defense=name,
        param=param,
        update=trainable,
        statistics=statistics,
        members=members,
        steps=min(cell.local_steps, s.sweep_max_simulated_steps),
        captured=captured / len(settings),
        label_accuracy=label_accuracy(recovered, case.gallery_y[members], case.num_classes),
        recovered=recovered,
      )
    )
  return items


def match(settings, keras_model, weights, case, items, steps: int):
  """([(item, ranks, non-members)], seconds per item) of gallery matching `items`, whose
  candidates are simulated for `steps` steps."""
  from tf_dlg.federated import local_training

  s = settings
  t0 = time.perf_counter()
  results = local_training.match_gallery(
    keras_model,
    weights,
    [it["update"] for it in items],
    case.gallery_x,
    case.gallery_y,
    [it["members"] for it in items],
    local_training.ClientTraining(s.client_optimizer, s.client_lr, steps),
    chunk=s.sweep_chunk,
  )
  per = (time.perf_counter() - t0) / len(items)
  return [(it, res.ranks, res.non_members) for it, res in zip(items, results)], per


def reconstruct(settings, keras_model, weights, case, items, exact: bool, prior: bool = False):
  """Reconstructs each item's batch, grouped by batch shape; yields each group's
  ([(item, ranks, non-members)], seconds per item) as it ends. `exact`: the dummy's update
  runs the client's optimizer (else SGD, the update direction); `prior`: the loss adds the
  BatchNorm prior of the batch statistics the item's update carries (`batchnorm_prior`)."""
  from tf_dlg.analysis import identification
  from tf_dlg.attacks import batchnorm_prior
  from tf_dlg.federated import local_training

  s = settings
  name = s.client_optimizer if exact else "sgd"
  gallery = identification.Gallery(case.gallery_x)
  shapes = collections.OrderedDict()
  for it in items:
    shapes.setdefault((it["cell"].num_images, it["cell"].batch, it["steps"]), []).append(it)
  for (n, batch, steps), group in shapes.items():
    t0 = time.perf_counter()
    images = local_training.reconstruct(
      keras_model,
      [it["update"] for it in group],
      [it["recovered"] for it in group],
      local_training.ClientTraining(name, s.client_lr, steps, batch),
      iterations=s.sweep_recon_iterations,
      tv_weight=s.sweep_tv_weight,
      seed=s.seed,
      statistics=[
        batchnorm_prior.observed_statistics(
          keras_model, weights, it["statistics"], it["cell"].local_steps, batch
        )
        for it in group
      ]
      if prior
      else None,
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
    yield done, per
