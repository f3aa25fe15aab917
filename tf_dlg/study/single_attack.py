"""One gradient-inversion attack on one client's images, scored and written to a folder.

The client holds `batch` images starting at `index` of the dataset's training split,
computes its update on the attacked model (`update="gradient"`, or a `local_steps`-step
FedAvg delta), applies `defense` (`tf_dlg.defenses.get_defense(name, param)`), and the
attacker reconstructs the images from the defended update. `run` writes `attack.json`
(metrics, timing, provenance) and `attack.png` (leaked | best brightness-adjusted |
original) and returns the record it wrote:

  run("outputs/attack", AttackConfig(attack="idlg", iterations=4000), dataset="digits", index=3)

The attack is an `AttackConfig` (its errors name `attack.<field>`); the client and the
scoring are plain keyword arguments (`DEFAULTS`; errors name them).
"""

from __future__ import annotations

import os
import time
import types
from typing import Any, Callable, Dict, Optional

from tf_dlg import data as data_lib
from tf_dlg import io as io_lib
from tf_dlg import metrics, validation
from tf_dlg import models as models_lib
from tf_dlg.attacks.runner import AttackConfig
from tf_dlg.attacks.threat_model import UPDATE_KINDS
from tf_dlg.federated.config import FederatedConfig

OUTPUT_FILES = ("attack.json", "attack.png")


# The attacked client and the scoring: `run`'s and `check`'s plain keyword arguments and
# their defaults (the command line's flags of the same names). The attack is an
# `AttackConfig`; an error names an argument here by its name, a field there by its path.
DEFAULTS = dict(
  dataset="lfw_subset",
  data_dir=None,
  index=0,  # first attacked image of the training split
  batch=1,  # images behind the update (client batch size)
  model="lenet",
  model_seed=0,
  defense=FederatedConfig.defense,
  defense_param=None,
  update="gradient",
  local_steps=1,  # local SGD steps of a fedavg_delta update
  client_lr=0.1,
  local_batch_size=None,  # default: batch
  leak_threshold=None,  # default metrics.DEFAULT_LEAK_SSIM
  tensorboard=True,  # reconstruction progress in OUTPUT_DIR/tensorboard
)


def _arguments(attack: Optional[AttackConfig], client) -> types.SimpleNamespace:
  """The client's arguments over `DEFAULTS`, and the attack (`config`)."""
  unknown = sorted(set(client) - set(DEFAULTS))
  if unknown:
    raise TypeError(f"unknown arguments {unknown}; expected some of {sorted(DEFAULTS)}.")
  return types.SimpleNamespace(**{**DEFAULTS, **client}, config=attack or AttackConfig())


def _check_choices(s) -> None:
  validation.check_choice("dataset", s.dataset, data_lib.DATASETS)
  validation.check_choice("update", s.update, UPDATE_KINDS)
  validation.check_choice("model", s.model, models_lib.MODELS)
  validation.check_int("index", s.index, 0)
  validation.check_int("batch", s.batch, 1)
  validation.check_int("local_steps", s.local_steps, 1)


def _defense(s):
  """The Defense of the arguments, or None for an undefended update."""
  if s.defense in (None, "", "none"):
    if s.defense_param is not None:
      raise ValueError(
        f"defense_param={s.defense_param} given with defense=none; "
        "name a defence or drop the parameter."
      )
    return None
  from tf_dlg import defenses

  try:
    defenses.check_param(s.defense, s.defense_param, at="defense_param")
    return defenses.get_defense(s.defense, s.defense_param)
  except (KeyError, TypeError) as e:
    raise ValueError(f"defense={s.defense!r} defense_param={s.defense_param!r}: {e}") from e


def _check(output_dir: str, s):
  _check_choices(s)
  if s.update == "gradient" and s.local_steps != 1:
    raise ValueError(f"local_steps={s.local_steps} needs update=fedavg_delta.")
  validation.check_number("client_lr", s.client_lr, 0.0, float("inf"), low_open=True)
  if s.leak_threshold is not None:  # an adjusted-SSIM bar: outside [0, 1] it decides nothing
    validation.check_number("leak_threshold", s.leak_threshold, 0.0, 1.0)
  if s.local_batch_size is not None:
    validation.check_int("local_batch_size", s.local_batch_size, 1, s.batch)
  defense = _defense(s)
  validation.check_output_dir("output_dir", output_dir)
  for name in OUTPUT_FILES:
    path = os.path.join(output_dir, name)
    if os.path.exists(path) and not os.access(path, os.W_OK):
      raise ValueError(f"output_dir={output_dir!r}: {name} exists and is read-only.")
  return defense


def check(output_dir: str, attack: Optional[AttackConfig] = None, **client):
  """Every argument before any work; returns the Defense (None: undefended).

  `attack` was checked as it was built; `client`: keyword arguments of `DEFAULTS`.
  """
  return _check(output_dir, _arguments(attack, client))


def save_figure(path, leaked, adjusted, original, title=""):
  """leaked | best brightness-adjusted | original, one row per image."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = len(original)
  fig, axes = plt.subplots(rows, 3, figsize=(6, 2.1 * rows + 0.4), squeeze=False)
  for r in range(rows):
    for c, (img, name) in enumerate(
      ((leaked[r], "leaked"), (adjusted[r], "brightness-adjusted"), (original[r], "original"))
    ):
      ax = axes[r, c]
      img = img[..., 0] if img.shape[-1] == 1 else img
      ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(name, fontsize=9)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _load(s):
  """The dataset, with `index` and `batch` checked against its training split."""
  ds = data_lib.load_dataset(s.dataset, data_dir=s.data_dir)
  n = len(ds.x_train)
  if s.batch > n:
    raise ValueError(
      f"batch={s.batch} must be an integer in [1, {n}]: dataset={s.dataset} "
      f"has {n} training images."
    )
  if s.index > n - s.batch:
    raise ValueError(
      f"index={s.index} is out of range for dataset={s.dataset} "
      f"with batch={s.batch}: expected 0..{n - s.batch} "
      f"({n} training images)."
    )
  return ds


def _observe(s, ds, defense):
  """The attacked model and the client's (defended) update of the chosen images."""
  from tf_dlg.attacks import threat_model

  images = ds.x_train[s.index : s.index + s.batch]
  labels = ds.y_train[s.index : s.index + s.batch]
  meta = {"dataset": ds.name, "dataset_source": ds.source, "index": s.index}
  if s.model == "lenet":  # the attacked LeNet's head has >= ATTACK_MIN_CLASSES outputs
    model = models_lib.attack_lenet(ds.input_shape, ds.num_classes, seed=s.model_seed)
  else:
    model = models_lib.build_model(s.model, ds.input_shape, ds.num_classes, seed=s.model_seed)
  described = dict(defense=defense, seed=s.config.seed, model_name=s.model, metadata=meta)
  if s.update == "gradient":
    return model, threat_model.observe_gradient(model, images, labels, **described)
  return model, threat_model.observe_fedavg_delta(
    model,
    images,
    labels,
    s.local_steps,
    s.client_lr,
    batch_size=s.local_batch_size or s.batch,
    **described,
  )


def _attack(output_dir: str, s, model, observed):
  from tf_dlg.attacks import runner

  hook = None
  if s.tensorboard:
    from tf_dlg.attacks import summaries

    hook = summaries.TensorBoardHook(os.path.join(output_dir, "tensorboard"))
  try:
    return runner.run_attacks(
      model, [observed], config=s.config, hook=hook, progress=s.config.iterations >= 500
    )[0]
  finally:
    if hook is not None:
      hook.close()


def _record(output_dir, s, ds, defense, result, rows, threshold, timing):
  import numpy as np

  mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
  return {
    "dataset": ds.name,
    "dataset_source": ds.source,
    "index": s.index,
    "batch": s.batch,
    "attack": s.config.attack,
    "optimizer": s.config.optimizer,
    "update": s.update,
    "local_steps": s.local_steps,
    "defense": s.defense if defense is None else defense.name,
    "defense_param": s.defense_param,
    "defense_config": None if defense is None else defense.get_config(),
    "model": s.model,
    "model_seed": s.model_seed,
    "seed": s.config.seed,
    "ssim": mean("ssim"),
    "adjusted_ssim": mean("adjusted_ssim"),
    "psnr": mean("psnr"),
    "mse": mean("mse"),
    "per_image_ssim": [r["ssim"] for r in rows],
    "label_correct": rows[0]["label_correct"],
    "label_accuracy": rows[0]["label_accuracy"],
    "true_labels": [int(v) for v in result.observed.true_labels],
    "recovered_labels": [int(v) for v in result.labels],
    "leaked": metrics.leaked(mean("adjusted_ssim"), threshold),
    "leak_threshold": threshold,
    "status": result.status,
    "distance": result.distance,
    "seconds": timing["attack"],
    "iterations": result.iterations,
    "max_iterations": s.config.iterations,
    "restarts": s.config.restarts,
    "restart": result.restart,
    "restart_distances": result.restart_distances,
    "restart_status": result.restart_status,
    "timing": timing,  # the caller adds the last stages' times
    "png": os.path.abspath(os.path.join(output_dir, "attack.png")),
  }


def _score(output_dir: str, s, ds, defense, result, observed, timing):
  """Scores the reconstruction and draws attack.png; returns the record."""
  threshold = metrics.DEFAULT_LEAK_SSIM if s.leak_threshold is None else s.leak_threshold
  rows = metrics.score_images(
    observed.true_images, result.images, observed.true_labels, result.labels, threshold
  )
  record = _record(output_dir, s, ds, defense, result, rows, threshold, timing)
  save_figure(
    record["png"],
    [r["leaked_image"] for r in rows],
    [r["adjusted_image"] for r in rows],
    [r["original_image"] for r in rows],
    title=(
      f"{s.config.attack} on {ds.name}[{s.index}] defence={record['defense']}: "
      f"SSIM {record['ssim']:.3f}, adjusted {record['adjusted_ssim']:.3f}"
    ),
  )
  return record


def run(
  output_dir: str,
  attack: Optional[AttackConfig] = None,
  *,
  started: Optional[float] = None,
  checked: Optional[Callable[[], None]] = None,
  **client,
) -> Dict[str, Any]:
  """Checks, attacks, scores and writes; returns the record written to attack.json.

  `attack`: the attack (None: `AttackConfig()`); `client`: keyword arguments of
  `DEFAULTS` (the attacked client and the scoring). `started`: when the work began
  (`time.time()`; default now): the record's timing counts "startup" and "total" from it.
  `checked`: called once every argument is checked and the image loaded, before the
  attack (a driver takes its run lock there, so a bad value never locks a folder).
  """
  started = time.time() if started is None else started
  timing = {"startup": time.time() - started}
  s = _arguments(attack, client)
  defense = _check(output_dir, s)
  t = time.perf_counter()
  ds = _load(s)
  timing["data"] = time.perf_counter() - t
  if checked is not None:
    checked()
  t = time.perf_counter()
  model, observed = _observe(s, ds, defense)
  timing["observe"] = time.perf_counter() - t
  t = time.perf_counter()
  result = _attack(output_dir, s, model, observed)
  timing["attack"] = time.perf_counter() - t
  t = time.perf_counter()
  record = _score(output_dir, s, ds, defense, result, observed, timing)
  timing["score_and_write"] = time.perf_counter() - t
  timing["total"] = time.time() - started
  io_lib.atomic_write_text(os.path.join(output_dir, "attack.json"), io_lib.dumps(record, indent=2))
  return record
