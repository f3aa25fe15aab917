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

import json
import os
import time

from absl import app, flags

from tf_dlg.attacks.optimize import OPTIMIZERS
from tf_dlg.attacks.runner import ATTACKS, DEFAULT_ITERATIONS
from tf_dlg.attacks.threat_model import UPDATE_KINDS
from tf_dlg import data as data_lib
from tf_dlg import models as models_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "lfw_subset", f"One of {', '.join(data_lib.DATASETS)}.")
flags.DEFINE_integer("index", 0, "Index of the (first) attacked image in the training split.")
flags.DEFINE_enum("attack", "idlg", list(ATTACKS), "Attack.")
flags.DEFINE_integer("iterations", DEFAULT_ITERATIONS, "Maximum optimiser iterations.")
flags.DEFINE_string("output_dir", "outputs/attack", "Where attack.json / attack.png go.")
flags.DEFINE_integer("seed", 0, "Seed of the attacker's dummy initialisation and the defence.")
flags.DEFINE_string("defense", "none", "Defence name from tf_dlg.defenses (none = undefended).")
flags.DEFINE_float("defense_param", None, "Defence strength parameter.")
flags.DEFINE_enum("update", "gradient", list(UPDATE_KINDS), "What the server observes.")
flags.DEFINE_integer("local_steps", 1, "Local SGD steps of a fedavg_delta update.")
flags.DEFINE_float("client_lr", 0.1, "Client learning rate of a fedavg_delta update.")
flags.DEFINE_integer("batch", 1, "Images behind the update (client batch size).")
flags.DEFINE_integer("local_batch_size", None, "Local SGD batch size (default: --batch).")
flags.DEFINE_enum("optimizer", "lbfgs", list(OPTIMIZERS), "Attack optimiser.")
flags.DEFINE_enum("model", "lenet", list(models_lib.MODELS), "Attacked model.")
flags.DEFINE_integer("model_seed", 0, "Seed of the model's weights.")
flags.DEFINE_float("tolerance", None, "Stop distance (default: the objective's).")
flags.DEFINE_float("tv_weight", None, "Total-variation weight (ig, masked_ig).")
flags.DEFINE_float("leak_threshold", None, "Adjusted-SSIM bar of the leak verdict "
                   "(default tf_dlg.metrics.DEFAULT_LEAK_SSIM).")
flags.DEFINE_string("data_dir", None, "tfds data directory (tfds datasets only).")
flags.DEFINE_bool("jit", True, "XLA-compile the attack loop.")


def _fail(message):
  raise app.UsageError(message)


def _load_defense(name, param):
  if name in (None, "", "none") and param is None:
    return None
  try:
    from tf_dlg import defenses  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    _fail(f"--defense={name!r} needs tf_dlg.defenses, which is not importable: {e}")
  try:
    return defenses.get_defense(name, param)
  except (ValueError, KeyError, TypeError) as e:
    _fail(f"--defense={name!r} --defense_param={param!r}: {e}")


def save_figure(path, leaked, adjusted, original, title=""):
  """leaked | best brightness-adjusted | original, one row per image."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = len(original)
  fig, axes = plt.subplots(rows, 3, figsize=(6, 2.1 * rows + 0.4), squeeze=False)
  for r in range(rows):
    for c, (img, name) in enumerate(((leaked[r], "leaked"), (adjusted[r], "brightness-adjusted"),
                                     (original[r], "original"))):
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


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tf_dlg import metrics  # pylint: disable=g-import-not-at-top
  from tf_dlg.attacks import run_attacks, threat_model  # pylint: disable=g-import-not-at-top

  if FLAGS.dataset not in data_lib.DATASETS:
    _fail(f"--dataset={FLAGS.dataset!r} is unknown; expected one of "
          f"{', '.join(data_lib.DATASETS)} (offline: {', '.join(data_lib.OFFLINE_DATASETS)}).")
  if FLAGS.iterations < 1:
    _fail(f"--iterations={FLAGS.iterations} must be >= 1.")
  if FLAGS.batch < 1:
    _fail(f"--batch={FLAGS.batch} must be >= 1.")
  if FLAGS.local_steps < 1:
    _fail(f"--local_steps={FLAGS.local_steps} must be >= 1.")
  if FLAGS.update == "gradient" and FLAGS.local_steps != 1:
    _fail(f"--local_steps={FLAGS.local_steps} needs --update=fedavg_delta.")
  if FLAGS.client_lr <= 0:
    _fail(f"--client_lr={FLAGS.client_lr} must be > 0.")
  defense = _load_defense(FLAGS.defense, FLAGS.defense_param)
  try:
    ds = data_lib.load_dataset(FLAGS.dataset, data_dir=FLAGS.data_dir)
  except data_lib.DatasetUnavailableError as e:
    _fail(str(e))
  n = len(ds.x_train)
  if not 0 <= FLAGS.index <= n - FLAGS.batch:
    _fail(f"--index={FLAGS.index} is out of range for --dataset={FLAGS.dataset} with "
          f"--batch={FLAGS.batch}: expected 0..{n - FLAGS.batch} ({n} training images).")
  local_bs = FLAGS.local_batch_size or FLAGS.batch
  if not 1 <= local_bs <= FLAGS.batch:
    _fail(f"--local_batch_size={local_bs} must be in 1..{FLAGS.batch} (--batch).")

  images = ds.x_train[FLAGS.index:FLAGS.index + FLAGS.batch]
  labels = ds.y_train[FLAGS.index:FLAGS.index + FLAGS.batch]
  if FLAGS.model == "lenet":  # the attacked LeNet's head has >= ATTACK_MIN_CLASSES outputs
    model = models_lib.attack_lenet(ds.input_shape, ds.num_classes, seed=FLAGS.model_seed)
  else:
    model = models_lib.build_model(FLAGS.model, ds.input_shape, ds.num_classes,
                                   seed=FLAGS.model_seed)
  meta = {"dataset": ds.name, "dataset_source": ds.source, "index": FLAGS.index}
  if FLAGS.update == "gradient":
    observed = threat_model.observe_gradient(model, images, labels, defense=defense,
                                             seed=FLAGS.seed, model_name=FLAGS.model,
                                             metadata=meta)
  else:
    observed = threat_model.observe_fedavg_delta(
        model, images, labels, FLAGS.local_steps, FLAGS.client_lr, batch_size=local_bs,
        defense=defense, seed=FLAGS.seed, model_name=FLAGS.model, metadata=meta)

  t0 = time.perf_counter()
  result = run_attacks(model, [observed], attack=FLAGS.attack, iterations=FLAGS.iterations,
                       seed=FLAGS.seed, optimizer=FLAGS.optimizer, tolerance=FLAGS.tolerance,
                       tv_weight=FLAGS.tv_weight, jit_compile=FLAGS.jit,
                       progress=FLAGS.iterations >= 500)[0]
  seconds = time.perf_counter() - t0
  threshold = (metrics.DEFAULT_LEAK_SSIM if FLAGS.leak_threshold is None
               else FLAGS.leak_threshold)
  rows = metrics.score_images(images, result.images, labels, result.labels, threshold)
  mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  png = os.path.join(FLAGS.output_dir, "attack.png")
  record = {
      "dataset": ds.name, "dataset_source": ds.source, "index": FLAGS.index,
      "batch": FLAGS.batch, "attack": FLAGS.attack, "optimizer": FLAGS.optimizer,
      "update": FLAGS.update, "local_steps": FLAGS.local_steps,
      "defense": FLAGS.defense if defense is None else defense.name,
      "defense_param": FLAGS.defense_param,
      "defense_config": None if defense is None else defense.get_config(),
      "model": FLAGS.model, "model_seed": FLAGS.model_seed, "seed": FLAGS.seed,
      "ssim": mean("ssim"), "adjusted_ssim": mean("adjusted_ssim"), "psnr": mean("psnr"),
      "mse": mean("mse"), "per_image_ssim": [r["ssim"] for r in rows],
      "label_correct": rows[0]["label_correct"], "label_accuracy": rows[0]["label_accuracy"],
      "true_labels": [int(v) for v in labels], "recovered_labels": [int(v) for v in result.labels],
      "leaked": metrics.leaked(mean("adjusted_ssim"), threshold), "leak_threshold": threshold,
      "status": result.status, "distance": result.distance, "seconds": seconds,
      "iterations": result.iterations, "max_iterations": FLAGS.iterations,
      "png": os.path.abspath(png),
  }
  with open(os.path.join(FLAGS.output_dir, "attack.json"), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, default=str)
  save_figure(png, [r["leaked_image"] for r in rows], [r["adjusted_image"] for r in rows],
              [r["original_image"] for r in rows],
              title=(f"{FLAGS.attack} on {ds.name}[{FLAGS.index}] defence={record['defense']}: "
                     f"SSIM {record['ssim']:.3f}, adjusted {record['adjusted_ssim']:.3f}"))
  print(f"[attack] {FLAGS.attack} on {ds.name}[{FLAGS.index}] ({ds.source})")
  print(f"[attack] defence={record['defense']} status={result.status} "
        f"iterations={result.iterations} seconds={seconds:.1f}")
  print(f"[attack] SSIM={record['ssim']:.3f} adjusted={record['adjusted_ssim']:.3f} "
        f"PSNR={record['psnr']:.1f} label_correct={record['label_correct']} "
        f"leaked={record['leaked']}")
  print(f"[attack] wrote {os.path.abspath(os.path.join(FLAGS.output_dir, 'attack.json'))}")
  print(f"[attack] figure {os.path.abspath(png)}")


if __name__ == "__main__":
  app.run(main)
