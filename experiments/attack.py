"""Runs one gradient-inversion attack on an offline (or tfds) image and scores it.

  python -m experiments.attack --dataset=lfw_subset --index=3 --attack=idlg \
      --output_dir=outputs/attack

The client holds `--batch` images starting at `--index` of the training split, computes
its update on the DLG LeNet (`--update=gradient`, or a `--local_steps`-step FedAvg delta),
applies `--defense` (`tf_dlg.defenses.get_defense(name, param)`), and the attacker
reconstructs the images from the defended update. Writes `attack.json` (metrics, timing,
provenance) and `attack.png` (leaked | best brightness-adjusted | original).
"""

from __future__ import annotations

import os
import time

from absl import flags

# First: imports TensorFlow quietly and before absl's app.run (see experiments.cli).
from experiments import cli
from tf_dlg import data as data_lib
from tf_dlg import models as models_lib
from tf_dlg import validation
from tf_dlg.attacks.optimize import OPTIMIZERS
from tf_dlg.attacks.runner import ATTACKS, DEFAULT_ITERATIONS
from tf_dlg.attacks.threat_model import UPDATE_KINDS

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "lfw_subset", f"One of {', '.join(data_lib.DATASETS)}.")
flags.DEFINE_integer(
  "index", 0, "Index of the (first) attacked image in the training split.", lower_bound=0
)
flags.DEFINE_enum("attack", "idlg", list(ATTACKS), "Attack.")
flags.DEFINE_integer(
  "iterations", DEFAULT_ITERATIONS, "Maximum optimiser iterations.", lower_bound=1
)
flags.DEFINE_integer(
  "restarts",
  1,
  "Differently seeded starts: the lowest-numbered converged one wins, else the smallest "
  "matching distance (never the ground truth).",
  lower_bound=1,
  upper_bound=64,
)
cli.define_output_dir("outputs/attack")
flags.DEFINE_integer("seed", 0, "Seed of the attacker's dummy initialisation and the defence.")
flags.DEFINE_string("defense", "none", "Defence name from tf_dlg.defenses (none = undefended).")
flags.DEFINE_float("defense_param", None, "Defence strength parameter.")
flags.DEFINE_enum("update", "gradient", list(UPDATE_KINDS), "What the server observes.")
flags.DEFINE_integer("local_steps", 1, "Local SGD steps of a fedavg_delta update.", lower_bound=1)
flags.DEFINE_float("client_lr", 0.1, "Client learning rate of a fedavg_delta update.")
flags.DEFINE_integer("batch", 1, "Images behind the update (client batch size).", lower_bound=1)
flags.DEFINE_integer("local_batch_size", None, "Local SGD batch size (default: --batch).")
flags.DEFINE_enum("optimizer", "lbfgs", list(OPTIMIZERS), "Attack optimiser.")
flags.DEFINE_enum("model", "lenet", list(models_lib.MODELS), "Attacked model.")
flags.DEFINE_integer("model_seed", 0, "Seed of the model's weights.")
flags.DEFINE_float("tolerance", None, "Stop distance (default: the objective's).")
flags.DEFINE_float("tv_weight", None, "Total-variation weight (ig, masked_ig).")
flags.DEFINE_float(
  "leak_threshold",
  None,
  "Adjusted-SSIM bar of the leak verdict (default tf_dlg.metrics.DEFAULT_LEAK_SSIM).",
)
cli.define_data_dir()
flags.DEFINE_bool(
  "jit",
  None,
  "XLA-compile the attack loop (default: only when the work "
  "repays the compilation: restarts, or more than 2,000 iterations).",
)
flags.DEFINE_bool(
  "tensorboard",
  True,
  "Write reconstruction progress (distance, SSIM, images) to OUTPUT_DIR/tensorboard.",
)


def _check_flags():
  """Every flag before any work (ValueError -> one line, exit 2)."""
  validation.check_choice("--dataset", FLAGS.dataset, data_lib.DATASETS)
  if FLAGS.update == "gradient" and FLAGS.local_steps != 1:
    raise ValueError(f"--local_steps={FLAGS.local_steps} needs --update=fedavg_delta.")
  validation.check_number("--client_lr", FLAGS.client_lr, 0.0, float("inf"), low_open=True)
  if FLAGS.leak_threshold is not None:  # an adjusted-SSIM bar: outside [0, 1] it decides nothing
    validation.check_number("--leak_threshold", FLAGS.leak_threshold, 0.0, 1.0)
  if FLAGS.local_batch_size is not None:
    validation.check_int("--local_batch_size", FLAGS.local_batch_size, 1, FLAGS.batch)
  if FLAGS.defense in (None, "", "none"):
    if FLAGS.defense_param is not None:
      raise ValueError(
        f"--defense_param={FLAGS.defense_param} given with --defense=none; "
        "name a defence or drop the parameter."
      )
    defense = None
  else:
    from tf_dlg import defenses

    try:
      defense = defenses.get_defense(FLAGS.defense, FLAGS.defense_param)
    except (KeyError, TypeError) as e:
      raise ValueError(
        f"--defense={FLAGS.defense!r} --defense_param={FLAGS.defense_param!r}: {e}"
      ) from e
  validation.check_output_dir("--output_dir", FLAGS.output_dir)
  for name in ("attack.json", "attack.png"):
    path = os.path.join(FLAGS.output_dir, name)
    if os.path.exists(path) and not os.access(path, os.W_OK):
      raise ValueError(f"--output_dir={FLAGS.output_dir!r}: {name} exists and is read-only.")
  return defense


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


def _observe(ds, defense, meta):
  """The attacked model and the client's (defended) update of the chosen images."""
  from tf_dlg.attacks import threat_model

  images = ds.x_train[FLAGS.index : FLAGS.index + FLAGS.batch]
  labels = ds.y_train[FLAGS.index : FLAGS.index + FLAGS.batch]
  if FLAGS.model == "lenet":  # the attacked LeNet's head has >= ATTACK_MIN_CLASSES outputs
    model = models_lib.attack_lenet(ds.input_shape, ds.num_classes, seed=FLAGS.model_seed)
  else:
    model = models_lib.build_model(
      FLAGS.model, ds.input_shape, ds.num_classes, seed=FLAGS.model_seed
    )
  if FLAGS.update == "gradient":
    return model, threat_model.observe_gradient(
      model, images, labels, defense=defense, seed=FLAGS.seed, model_name=FLAGS.model, metadata=meta
    )
  return model, threat_model.observe_fedavg_delta(
    model,
    images,
    labels,
    FLAGS.local_steps,
    FLAGS.client_lr,
    batch_size=FLAGS.local_batch_size or FLAGS.batch,
    defense=defense,
    seed=FLAGS.seed,
    model_name=FLAGS.model,
    metadata=meta,
  )


def _attack(model, observed):
  from tf_dlg.attacks import runner

  config = runner.AttackConfig(
    attack=FLAGS.attack,
    iterations=FLAGS.iterations,
    seed=FLAGS.seed,
    optimizer=FLAGS.optimizer,
    tolerance=FLAGS.tolerance,
    tv_weight=FLAGS.tv_weight,
    restarts=FLAGS.restarts,
    jit_compile=FLAGS.jit,
  )
  hook = None
  if FLAGS.tensorboard:
    from tf_dlg.attacks import summaries

    hook = summaries.TensorBoardHook(os.path.join(FLAGS.output_dir, "tensorboard"))
  try:
    return runner.run_attacks(
      model, [observed], config=config, hook=hook, progress=FLAGS.iterations >= 500
    )[0]
  finally:
    if hook is not None:
      hook.close()


def _record(ds, defense, result, rows, threshold, timing):
  import numpy as np

  from tf_dlg import metrics

  mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
  return {
    "dataset": ds.name,
    "dataset_source": ds.source,
    "index": FLAGS.index,
    "batch": FLAGS.batch,
    "attack": FLAGS.attack,
    "optimizer": FLAGS.optimizer,
    "update": FLAGS.update,
    "local_steps": FLAGS.local_steps,
    "defense": FLAGS.defense if defense is None else defense.name,
    "defense_param": FLAGS.defense_param,
    "defense_config": None if defense is None else defense.get_config(),
    "model": FLAGS.model,
    "model_seed": FLAGS.model_seed,
    "seed": FLAGS.seed,
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
    "max_iterations": FLAGS.iterations,
    "restarts": FLAGS.restarts,
    "restart": result.restart,
    "restart_distances": result.restart_distances,
    "restart_status": result.restart_status,
    "timing": timing,
    "png": os.path.abspath(os.path.join(FLAGS.output_dir, "attack.png")),
  }


def main(argv):
  del argv
  from tf_dlg import io as io_lib
  from tf_dlg import metrics

  timing = {"startup": time.time() - _process_start()}
  defense = _check_flags()
  t = time.perf_counter()
  ds = data_lib.load_dataset(FLAGS.dataset, data_dir=FLAGS.data_dir)
  n = len(ds.x_train)
  if FLAGS.batch > n:
    raise ValueError(
      f"--batch={FLAGS.batch} must be an integer in [1, {n}]: --dataset={FLAGS.dataset} "
      f"has {n} training images."
    )
  if FLAGS.index > n - FLAGS.batch:
    raise ValueError(
      f"--index={FLAGS.index} is out of range for --dataset={FLAGS.dataset} "
      f"with --batch={FLAGS.batch}: expected 0..{n - FLAGS.batch} "
      f"({n} training images)."
    )
  timing["data"] = time.perf_counter() - t
  t = time.perf_counter()
  meta = {"dataset": ds.name, "dataset_source": ds.source, "index": FLAGS.index}
  model, observed = _observe(ds, defense, meta)
  timing["observe"] = time.perf_counter() - t
  t = time.perf_counter()
  result = _attack(model, observed)
  timing["attack"] = time.perf_counter() - t
  t = time.perf_counter()
  threshold = metrics.DEFAULT_LEAK_SSIM if FLAGS.leak_threshold is None else FLAGS.leak_threshold
  rows = metrics.score_images(
    observed.true_images, result.images, observed.true_labels, result.labels, threshold
  )
  record = _record(ds, defense, result, rows, threshold, timing)
  save_figure(
    record["png"],
    [r["leaked_image"] for r in rows],
    [r["adjusted_image"] for r in rows],
    [r["original_image"] for r in rows],
    title=(
      f"{FLAGS.attack} on {ds.name}[{FLAGS.index}] defence={record['defense']}: "
      f"SSIM {record['ssim']:.3f}, adjusted {record['adjusted_ssim']:.3f}"
    ),
  )
  timing["score_and_write"] = time.perf_counter() - t
  timing["total"] = time.time() - _process_start()
  path = os.path.join(FLAGS.output_dir, "attack.json")
  io_lib.atomic_write_text(path, io_lib.dumps(record, indent=2))
  print(f"[attack] {FLAGS.attack} on {ds.name}[{FLAGS.index}] ({ds.source})")
  print(
    f"[attack] defence={record['defense']} status={result.status} iterations="
    f"{result.iterations} restart={result.restart} seconds={timing['attack']:.1f}"
  )
  print(
    f"[attack] SSIM={record['ssim']:.3f} adjusted={record['adjusted_ssim']:.3f} "
    f"PSNR={record['psnr']:.1f} label_correct={record['label_correct']} "
    f"leaked={record['leaked']}"
  )
  print("[attack] wall " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()))
  print(f"[attack] wrote {os.path.abspath(path)} and {record['png']}")


def _process_start() -> float:
  import psutil

  return psutil.Process().create_time()


if __name__ == "__main__":
  cli.run(main)
