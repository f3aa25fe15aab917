"""Audit of a user's own Keras model: the sweep's leakage measurement at their configuration.

`audit(model, data, config, output_dir)` takes the user's model (a saved `.keras` file, a
function returning a model, or a model; its current weights are the global model the
server sends), their data (a registered dataset name, or `(images, labels)` arrays in
[0, 1]) and a `FederatedConfig` (client batch size, optimizer, learning rate, clients),
and measures what one client of that training leaks, undefended and at every frontier
setting: the `tf_dlg.study.sweep` attacks on a client holding its share of the data
(images / num_clients), at one local step and at one local epoch of the configured batch
size. It writes the sweep's files (`sweep.csv`, `figures/sweep.png`, `sweep.md`) whose
first line answers for that model and configuration.

Case: the client's update is the attacker's simulation of the client's local training
(`tf_dlg.federated.local_training.local_update`: the configured optimizer, BatchNorm in
training mode, a seeded shuffle), which the sweep's tests check equal to what TFF's client
work sends, from the model's weights as given.

Costs: the weakest setting of each defence that protects at the user's own batch size and
local epoch is trained in TFF FedAvg with the user's `FederatedConfig` (rounds, clients,
optimizers, aggregator, partition), beside the undefended baseline, paired by seed
(`tf_dlg.study.convergence`, run store and tables in `<output_dir>/costs/`). The model
trained is the user's architecture from freshly seeded initial weights (registered in
`tf_dlg.models` for the run), so the cost is one of training it to convergence, as the
frontier's are. A registered dataset's test split scores it; `(images, labels)` arrays
have none, so their audit quotes no cost (or a given frontier.csv's).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from tf_dlg.study import presets, sweep, sweep_case, sweep_report, sweep_settings


def load_model(model) -> Any:
  """A Keras model from a `.keras` path, a no-argument function, or a model."""
  import tensorflow as tf

  if isinstance(model, (str, os.PathLike)):
    path = os.fspath(model)
    if not path.endswith(".keras") or not os.path.isfile(path):
      raise ValueError(f"model={path!r} must be an existing .keras file (model.save(path)).")
    model = tf.keras.models.load_model(path, compile=False)
  elif callable(model) and not isinstance(model, tf.keras.Model):
    model = model()
  if not isinstance(model, tf.keras.Model):
    raise ValueError(f"model must be a Keras model, a .keras path or a function; got {model!r}.")
  from tf_dlg.attacks import functional
  from tf_dlg.federated import local_training

  functional.BatchedModel(local_training.attack_model(model))  # one error if unsupported
  return model


def load_data(data, seed: int = 0):
  """(images, labels, name, source) of a registered dataset name or (images, labels)."""
  from tf_dlg.attacks import threat_model
  from tf_dlg.study import matching

  if isinstance(data, str):
    from tf_dlg import data as data_lib

    ds = data_lib.load_dataset(data, seed=seed)
    x, y = (ds.x_train, ds.y_train) if ds.x_test is None else matching.gallery_arrays(ds)
    return np.asarray(x, np.float32), np.asarray(y, np.int64), ds.name, ds.source
  if not (isinstance(data, (tuple, list)) and len(data) == 2):
    raise ValueError("data must be a dataset name or an (images, labels) pair of arrays.")
  x = threat_model.check_images(data[0], "data images")
  y = threat_model.check_labels(data[1], None, "data labels")
  if len(y) != len(x):
    raise ValueError(f"data has {len(x)} images but {len(y)} labels.")
  return x, y, "user_data", f"the user's arrays ({len(x)} images)"


def settings_for(config, num_images: int, **options) -> presets.Preset:
  """The sweep preset that measures `config` (one client's share of `num_images`): the
  `sweep` preset's settings with the user's training, attacked at round 0 (the model as
  given, untrained here); `options`: `Preset` fields put over it."""
  if config.num_clients < 2:
    raise ValueError(
      f"num_clients={config.num_clients} must be >= 2: one client holding all the data leaves "
      "the gallery no non-members to rank its images among."
    )
  if config.local_epochs != 1:
    raise ValueError(
      f"local_epochs={config.local_epochs}: the audit measures one local step and one local "
      "epoch; use local_epochs=1."
    )
  return presets.PRESETS["sweep"].override(
    datasets=(config.dataset,),
    sweep_trained_datasets=(),
    sweep_rounds=(0,),
    rounds=1,
    sweep_batch_sizes=(config.batch_size,),
    model=sweep_settings.USER_MODEL,
    train_examples=num_images,
    num_clients=config.num_clients,
    batch_size=config.batch_size,
    client_optimizer=config.client_optimizer,
    client_lr=config.client_lr,
    seed=config.seed,
    **options,
  )


class Audit(sweep.Sweep):
  """The sweep's attacks on the user's model as given (round 0: the model sent)."""

  def __init__(
    self,
    output_dir,
    model,
    data,
    config,
    progress=True,
    frontier_csv=None,
    cost_seeds: Optional[Sequence[int]] = (0, 1, 2),
    **options,
  ):
    from tf_dlg.federated.config import FederatedConfig

    if not isinstance(config, FederatedConfig):
      raise TypeError(f"config must be a FederatedConfig, got {type(config).__name__}.")
    self.cost_seeds = _check_cost_seeds(cost_seeds, frontier_csv)
    self.config = config
    self.model = load_model(model)
    x, y, name, source = load_data(data, config.seed)
    classes = int(self.model.output_shape[-1])
    if y.max() >= classes or tuple(self.model.input_shape[1:]) != x.shape[1:]:
      raise ValueError(
        f"the model takes {tuple(self.model.input_shape[1:])} images and {classes} classes; "
        f"the data has {x.shape[1:]} images and labels up to {int(y.max())}."
      )
    settings = settings_for(config, len(x), **options)
    # Another model or data in the same folder must be refused: both are in the fingerprint.
    digest = _digest(self.model, x, y)
    settings = settings.override(datasets=(name,), case_digest=digest)
    self.data = (x, y, name, source, classes)
    super().__init__(output_dir, settings, progress=progress, frontier_csv=frontier_csv)

  def _has_batchnorm(self) -> bool:
    # The audit simulates the client's trainable update only (`simulate_client`), so no
    # BatchNorm statistics reach its attackers.
    return False

  def wording(self) -> Dict[str, str]:
    s, name = self.settings, self.model.name
    return dict(
      title=f"Audit of {name}: what one client's update leaks",
      subject=f"your configuration ({name}, {s.num_clients} clients, {s.client_optimizer} "
      f"lr {s.client_lr:g})",
      case=(
        f"Model: {name} as given (its weights are the global model; not trained here), "
        f"{self.model.count_params():,} parameters; the client's update is the attacker's "
        "simulation of its local training (equal to TFF's client work in the sweep's tests). "
        + self._cost_wording()
      ),
    )

  def _trains_costs(self) -> bool:
    """Costs are trained here: cost seeds given (no frontier.csv) and a dataset with a
    test split (a registered one; the user's arrays have none)."""
    return self.cost_seeds is not None and self.data[2] != sweep_settings.USER_DATA

  def _cost_wording(self) -> str:
    c = self.config
    if self.costs is None:
      why = (
        "nothing leaks undefended there, or no setting protects: nothing to cost"
        if self._trains_costs()
        else "your arrays have no test split, or cost_seeds is empty; pass a frontier.csv"
      )
      return f"Accuracy costs not measured ({why})."
    base = self.costs.get(("none", None))
    if base is None:
      return "Accuracy costs: from the given frontier.csv."
    return (
      f"Accuracy costs: TFF FedAvg of {self.model.name}'s architecture from seeded initial "
      f"weights, {c.rounds} rounds, {c.aggregator} / {c.partition}, seeds {base.seeds}, at "
      "each defence's weakest protecting setting beside the undefended baseline "
      f"(accuracy {base.baseline_accuracy:.3f} on {base.dataset}'s test split; "
      "costs/convergence.md)."
    )

  def run(self) -> Dict[str, str]:
    from tf_dlg import defenses
    from tf_dlg import io as io_lib

    s = self.settings
    x, y, name, source, classes = self.data
    case = sweep_case.gallery_case(s, name, source, x, y, classes, sweep_settings.share(s))
    todo, skipped = sweep_case.cells(s, {name: len(case.client)})
    io_lib.lock_directory(self.output_dir)
    log = self.open_log()
    pending = [c for c in todo if not self.done(log, c)]
    if pending:
      model = self.model
      exclude = defenses.batchnorm_exclusion(model, model.trainable_variables)
      optimizer_name, lr = s.client_optimizer, s.client_lr
      self.attack_cells(
        log,
        case,
        model,
        exclude,
        len(model.trainable_variables),
        None,
        pending,
        lambda cell, images, labels, seed: simulate_client(
          model, images, labels, cell.batch, cell.local_steps, optimizer_name, lr, seed
        ),
      )
    rows = list(log)
    if self._trains_costs():
      self.costs = self.train_costs(rows)
    return self.write(rows, skipped)

  def train_costs(self, rows) -> Optional[Dict[Tuple[str, Optional[float]], sweep_report.Cost]]:
    """{(defence, setting): Cost} of each defence's weakest protecting setting at the
    user's own cell (`sweep_report.own_cell`), and ("none", None): the baseline; None
    where no setting protects there (nothing to cost)."""
    from tf_dlg import models
    from tf_dlg.study import convergence

    own = sweep_report.own_cell(rows, self.settings)
    at = [] if own is None else own[2]
    if all(r["identified"] == 0 for r in at if r["defense"] == sweep_settings.UNDEFENDED):
      return None  # nothing leaks undefended: no setting is needed (the first line says so)
    chosen = sweep_report.protecting_settings(at, self.settings)
    chosen = {d: p for d, p in chosen.items() if p is not None}
    if not chosen:
      return None
    # The digest names this model and data: an audit rerun in the same process finds the
    # same architecture already registered.
    name = f"{sweep_settings.USER_MODEL}_{self.settings.case_digest}"
    if name not in models.MODELS:
      models.register(name, user_builder(self.model))
    c = self.config
    study = convergence.Convergence(
      os.path.join(self.output_dir, "costs"),
      {d: (p, "weakest protecting setting in this audit") for d, p in chosen.items()},
      aggregators=(c.aggregator,),
      partitions=(c.partition,),
      seeds=self.cost_seeds,
      progress=self.progress,
      **dict(convergence.shared_settings(c), model=name),
    )
    trained = study.run()
    base = next(r for r in trained if r["label"] == "none")

    def cost(r):
      return sweep_report.Cost(
        r["cost"],
        r["cost_low"],
        r["cost_high"],
        base["final_test_accuracy"],
        c.dataset,
        r["seeds"],
      )

    out = {(r["defense"], float(r["param"])): cost(r) for r in trained if r["label"] != "none"}
    return {**out, ("none", None): cost(base)}


def _check_cost_seeds(seeds, frontier_csv) -> Optional[Tuple[int, ...]]:
  """The training seeds of the costs, or None (no training: none, or a frontier.csv given)."""
  if frontier_csv is not None or not seeds:
    return None
  seeds = tuple(int(s) for s in seeds)
  if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ValueError(
      f"cost_seeds={list(seeds)} must be at least 2 distinct seeds >= 0 (a cost's interval "
      "pairs seeds), or empty for no cost training."
    )
  return seeds


def user_builder(model):
  """A `tf_dlg.models` builder of `model`'s architecture with fresh weights from `seed`
  (drawn by the model's own initializers: a seeded initializer starts every seed alike)."""

  def build(input_shape, num_classes, seed=0):
    import tensorflow as tf

    want = (tuple(model.input_shape[1:]), int(model.output_shape[-1]))
    if (tuple(input_shape), int(num_classes)) != want:
      raise ValueError(
        f"the model takes {want[0]} images and {want[1]} classes, not {tuple(input_shape)} "
        f"and {num_classes}."
      )
    tf.keras.utils.set_random_seed(int(seed))
    return tf.keras.models.clone_model(model)

  return build


def _digest(model, x, y) -> str:
  import hashlib

  from tf_dlg.attacks import compile_cache

  h = hashlib.sha256(compile_cache.architecture_key(model).encode())
  for a in list(model.get_weights()) + [x, y]:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def simulate_client(model, images, labels, batch: int, steps: int, optimizer: str, lr, seed):
  """The client's update (trainable weights) after `steps` steps of a seeded shuffle."""
  import tensorflow as tf

  from tf_dlg.attacks import functional
  from tf_dlg.federated import fedavg, local_training

  order = np.random.default_rng(seed).permutation(len(images))
  fmodel = functional.BatchedModel(local_training.attack_model(model))
  w = [tf.constant(v)[None] for v in fmodel.trainable_weights_from(model.get_weights())]
  x = tf.constant(np.asarray(images)[order][None])
  y = tf.one_hot(np.asarray(labels, np.int64)[order][None], fmodel.num_classes)
  out = local_training.local_update(
    fmodel, w, x, y, steps, batch, fedavg.build_optimizer(optimizer, lr)
  )
  return [u[0].numpy() for u in out]


def audit(
  model: Union[str, Callable[[], Any], Any],
  data: Union[str, Tuple[Any, Any]],
  config,
  output_dir: str,
  progress: bool = True,
  frontier_csv: Optional[str] = None,
  cost_seeds: Optional[Sequence[int]] = (0, 1, 2),
  **options,
) -> Dict[str, str]:
  """Runs (or resumes) the audit; returns the paths of sweep.csv, the figure and sweep.md.

  `frontier_csv`: a frontier run's frontier.csv of the same training, for the costs
  (instead of training them). `cost_seeds`: the seeds the costs train with (empty: none).
  `options`: `Preset` fields of the sweep (e.g. `sweep_gallery`, `sweep_defenses`,
  `sweep_recon_iterations`).
  """
  return Audit(
    output_dir,
    model,
    data,
    config,
    progress=progress,
    frontier_csv=frontier_csv,
    cost_seeds=cost_seeds,
    **options,
  ).run()
