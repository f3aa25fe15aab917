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
  `cosine_tv_direction_bn` (models with BatchNorm): `cosine_tv_direction` plus the
  BatchNorm prior (`tf_dlg.attacks.batchnorm_prior`): the batch statistics that the
  update's BatchNorm deltas carry (defences pass them through), matched by the dummy
  batch's own; on the direction surrogate, the stronger of the two reconstructions.
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

Here: the run (`Sweep`: resume, rows). Its settings: `tf_dlg.study.sweep_settings`; the
case and training: `tf_dlg.study.sweep_case`; the attacks: `tf_dlg.study.sweep_attacks`;
the figure and report: `tf_dlg.study.sweep_report`.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tf_dlg import validation
from tf_dlg.study import sweep_attacks, sweep_case, sweep_report, sweep_settings
from tf_dlg.study.presets import Preset
from tf_dlg.study.sweep_case import Case, Cell
from tf_dlg.study.sweep_settings import CSV_FIELDS, EXPERIMENT, GALLERY, RECONSTRUCTIONS, UNDEFENDED


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
  """The sweep of `settings` (a `Preset`'s sweep fields, `sweep_settings.check`ed) in
  `output_dir` (see the module docstring)."""

  def __init__(
    self,
    output_dir: str,
    settings: Preset,
    progress: bool = True,
    frontier_csv: Optional[str] = None,
  ):
    """`frontier_csv`: a frontier run's frontier.csv (same training) whose accuracy costs
    the report quotes beside each protecting setting (read now: a bad file fails first)."""
    self.settings = sweep_settings.check(settings)
    self.costs = sweep_report.read_costs(frontier_csv) if frontier_csv else None
    validation.check_output_dir("output_dir", output_dir)
    self.output_dir = output_dir
    self.progress = progress
    self.has_batchnorm = self._has_batchnorm()

  def open_log(self):
    """The sweep's rows.jsonl (another configuration's refused)."""
    from tf_dlg.study import results

    os.makedirs(self.output_dir, exist_ok=True)
    return results.ResultsLog(
      os.path.join(self.output_dir, "rows.jsonl"),
      EXPERIMENT,
      sweep_settings.fingerprint(self.settings),
    )

  def run(self) -> Dict[str, str]:
    """Runs (or resumes) every cell; writes sweep.csv, the figure and sweep.md."""
    from tf_dlg import io as io_lib
    from tf_dlg.execution import runtime

    # The data first (a dataset that cannot serve raises here, nothing written yet), then
    # the rows: another configuration's are refused before any training.
    cases = {n: sweep_case.load_case(self.settings, n) for n in self.settings.datasets}
    io_lib.lock_directory(self.output_dir)
    log = self.open_log()
    todo, skipped = sweep_case.cells(self.settings, {n: len(c.client) for n, c in cases.items()})
    for line in skipped:
      print(f"[sweep] {line}")
    runtime.install_context()
    accuracy = {}
    with runtime.execution_target(None):
      for name, case in cases.items():
        mine = [c for c in todo if c.dataset == name]
        if all(self.done(log, c) for c in mine):
          accuracy.update(self._stored_accuracy(log, mine))
          continue
        states = sweep_case.train(self.settings, case, self.output_dir, self.progress)
        for r, (fa, state, acc) in states.items():
          accuracy[(name, r)] = acc
          at_round = [c for c in mine if c.round == r and not self.done(log, c)]
          if at_round:
            self._attack_round(log, case, fa, state, acc, at_round)
    return self.write(list(log), skipped)

  def _has_batchnorm(self) -> bool:
    """Whether the trained model has BatchNorm layers, whose statistics the update carries
    (the attacker's `cosine_tv_direction_bn` runs only then). Asked before TFF's context is
    installed: Keras 2.14 cannot build a model inside it."""
    from tf_dlg import models
    from tf_dlg.attacks import batchnorm_prior

    probe = models.build_model(self.settings.model, (28, 28, 1), 10, seed=0)
    return bool(batchnorm_prior.batchnorm_layers(probe))

  def _runs(self, cell: Cell, defense: str) -> List[str]:
    """The attacks that run on `cell` under `defense`."""
    s = self.settings
    recon = cell.num_images <= s.sweep_recon_max_batch and (
      defense == UNDEFENDED or s.sweep_recon_defended
    )
    return [
      a
      for a in s.sweep_attacks
      if a == GALLERY or recon and (not RECONSTRUCTIONS[a][1] or self.has_batchnorm)
    ]

  def _keys(self, cell: Cell) -> List[str]:
    settings = [(UNDEFENDED, None)] + list(self.settings.sweep_defenses)
    return [row_key(cell, a, d, p) for d, p in settings for a in self._runs(cell, d)]

  def done(self, log, cell: Cell) -> bool:
    """Whether every row of `cell` is logged."""
    return all(k in log for k in self._keys(cell))

  @staticmethod
  def _stored_accuracy(log, mine):
    out = {}
    for rec in log:
      out[(rec["dataset"], rec["round"])] = rec.get("test_accuracy")
    return out

  def _attack_round(self, log, case: Case, fa, state, acc, at_round: List[Cell]):
    """Captures every cell's update from TFF's client work at this round, then attacks."""
    from tf_dlg.federated import fedavg

    # The attacker's own copy of the architecture (built eagerly, outside TFF's graphs).
    # `keras_model_fn`: the training's own build, BatchNorm momentum included (the
    # BatchNorm prior reads the statistics through it).
    keras_model = fa.keras_model_fn()
    fa.assign_to_keras(fa.process.get_model_weights(state), keras_model)
    exclude = fedavg.update_exclusion(keras_model)

    def capture(cell, images, labels, seed):
      return sweep_case.capture_update(fa, state, images, labels, cell.batch, seed)

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
        for it in sweep_attacks.defended_items(
          s, case, (cell, client), capture, exclude, num_trainable, shapes
        ):
          it["acc"] = acc
          groups.setdefault(it["steps"], []).append(it)
    for steps, every in groups.items():
      # A cell resumed after some of its rows were logged redoes only the missing ones.
      items = [it for it in every if self._missing(log, it, GALLERY)]
      if items:
        done, per = sweep_attacks.match(s, keras_model, weights, case, items, steps)
        self._add_rows(log, case, done, GALLERY, per)
    recon = [it for items in groups.values() for it in items]
    for attack, (exact, prior) in RECONSTRUCTIONS.items():
      todo = [it for it in recon if self._missing(log, it, attack)]
      if todo:
        runs = sweep_attacks.reconstruct(s, keras_model, weights, case, todo, exact, prior)
        for done, per in runs:
          self._add_rows(log, case, done, attack, per)

  def _missing(self, log, it, attack: str) -> bool:
    """Whether `attack` runs on the item's cell and setting and its row is not logged."""
    key = row_key(it["cell"], attack, it["defense"], it["param"])
    return attack in self._runs(it["cell"], it["defense"]) and key not in log

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
        f"Model: {s.model}, trained by FedAvg (TFF) for {s.rounds} rounds, "
        f"{s.num_clients} clients, batch {s.batch_size}, seed {s.seed}; the updates are "
        "captured from TFF's client work."
      ),
    )

  def write(self, rows, skipped: Sequence[str] = ()) -> Dict[str, str]:
    from tf_dlg import io as io_lib

    paths = {"csv": self._write_csv(rows)}
    paths["figure"] = sweep_report.figure(
      rows, os.path.join(self.output_dir, "figures", "sweep.png")
    )
    text = sweep_report.report(rows, self.settings, skipped, self.costs, **self.wording())
    paths["report"] = io_lib.atomic_write_text(os.path.join(self.output_dir, "sweep.md"), text)
    return paths
