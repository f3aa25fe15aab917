"""Runs one gradient-inversion attack on an offline (or tfds) image and scores it.

  python -m experiments.attack --dataset=lfw_subset --index=3 --attack=idlg \
      --output_dir=outputs/attack

The client holds `--batch` images starting at `--index` of the training split, computes
its update on the DLG LeNet (`--update=gradient`, or a `--local_steps`-step FedAvg delta),
applies `--defense` (`tf_dlg.defenses.get_defense(name, param)`), and the attacker
reconstructs the images from the defended update. Writes `attack.json` (metrics, timing,
provenance) and `attack.png` (leaked | best brightness-adjusted | original). The attack
itself is `tf_dlg.study.single_attack`; this file maps flags to its `AttackSettings`.
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags

# First: imports TensorFlow quietly and before absl's app.run (see experiments.cli).
from experiments import cli
from tf_dlg import data as data_lib
from tf_dlg import models as models_lib
from tf_dlg.attacks.optimize import OPTIMIZERS
from tf_dlg.attacks.runner import ATTACKS, DEFAULT_ITERATIONS
from tf_dlg.attacks.threat_model import UPDATE_KINDS
from tf_dlg.study import single_attack

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


def settings_from_flags() -> single_attack.AttackSettings:
  """The flags of the same names as the settings' fields."""
  names = [f.name for f in dataclasses.fields(single_attack.AttackSettings)]
  return single_attack.AttackSettings(**{name: getattr(FLAGS, name) for name in names})


def main(argv):
  del argv
  started = _process_start()
  # Every flag is checked before any work (a ValueError: one line, exit 2).
  record = single_attack.run(
    FLAGS.output_dir, settings_from_flags(), started, flag_prefix="--", checked=cli.work_begins
  )
  name, timing = f"{record['dataset']}[{record['index']}]", record["timing"]
  print(f"[attack] {record['attack']} on {name} ({record['dataset_source']})")
  print(
    f"[attack] defence={record['defense']} status={record['status']} iterations="
    f"{record['iterations']} restart={record['restart']} seconds={timing['attack']:.1f}"
  )
  print(
    f"[attack] SSIM={record['ssim']:.3f} adjusted={record['adjusted_ssim']:.3f} "
    f"PSNR={record['psnr']:.1f} label_correct={record['label_correct']} "
    f"leaked={record['leaked']}"
  )
  print("[attack] wall " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()))
  path = os.path.join(FLAGS.output_dir, "attack.json")
  print(f"[attack] wrote {os.path.abspath(path)} and {record['png']}")


def _process_start() -> float:
  import psutil

  return psutil.Process().create_time()


if __name__ == "__main__":
  cli.run(main)
