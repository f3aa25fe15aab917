"""Runs one gradient-inversion attack on an offline (or tfds) image and scores it.

  python -m experiments.attack --dataset=lfw_subset --index=3 --attack=idlg \
      --output_dir=outputs/attack

The client holds `--batch` images starting at `--index` of the training split, computes
its update on the DLG LeNet (`--update=gradient`, or a `--local_steps`-step FedAvg delta),
applies `--defense` (`tf_dlg.defenses.get_defense(name, param)`), and the attacker
reconstructs the images from the defended update. Writes `attack.json` (metrics, timing,
provenance) and `attack.png` (leaked | best brightness-adjusted | original). The attack
itself is `tf_dlg.study.single_attack`; this file maps flags to its `AttackConfig` (flags
generated from its fields) and its keyword arguments.
"""

from __future__ import annotations

import os

from absl import flags

# First: imports TensorFlow quietly and before absl's app.run (see experiments.cli).
from experiments import cli
from tf_dlg import data as data_lib
from tf_dlg import models as models_lib
from tf_dlg.attacks.optimize import OPTIMIZERS
from tf_dlg.attacks.runner import ATTACKS, AttackConfig
from tf_dlg.attacks.threat_model import UPDATE_KINDS
from tf_dlg.study import single_attack

FLAGS = flags.FLAGS
CLIENT = single_attack.DEFAULTS  # the client's and the scoring's defaults, written once there
# The attack's flags: `AttackConfig`'s fields, defaults and documentation.
cli.define_config_flags(
  AttackConfig,
  (
    "attack",
    "iterations",
    "restarts",
    "seed",
    "optimizer",
    "tolerance",
    "tv_weight",
    "jit_compile",
  ),
  names={"jit_compile": "jit"},
  choices={"attack": ATTACKS, "optimizer": OPTIMIZERS},
  helps={"seed": "Seed of the attacker's dummy initialisation and the defence."},
)
# One attack in a cold process: AttackConfig's auto setting (XLA only once the iterations
# repay compiling it), as this command has always run; --jit forces XLA from the start.
FLAGS.set_default("jit", None)
flags.DEFINE_string("dataset", CLIENT["dataset"], f"One of {', '.join(data_lib.DATASETS)}.")
flags.DEFINE_integer(
  "index",
  CLIENT["index"],
  "Index of the (first) attacked image in the training split.",
  lower_bound=0,
)
cli.define_output_dir("outputs/attack")
flags.DEFINE_string(
  "defense", CLIENT["defense"], "Defence name from tf_dlg.defenses (none = undefended)."
)
flags.DEFINE_float("defense_param", CLIENT["defense_param"], "Defence strength parameter.")
flags.DEFINE_enum("update", CLIENT["update"], list(UPDATE_KINDS), "What the server observes.")
flags.DEFINE_integer(
  "local_steps", CLIENT["local_steps"], "Local SGD steps of a fedavg_delta update.", lower_bound=1
)
flags.DEFINE_float(
  "client_lr", CLIENT["client_lr"], "Client learning rate of a fedavg_delta update."
)
flags.DEFINE_integer(
  "batch", CLIENT["batch"], "Images behind the update (client batch size).", lower_bound=1
)
flags.DEFINE_integer(
  "local_batch_size", CLIENT["local_batch_size"], "Local SGD batch size (default: --batch)."
)
flags.DEFINE_enum("model", CLIENT["model"], list(models_lib.MODELS), "Attacked model.")
flags.DEFINE_integer("model_seed", CLIENT["model_seed"], "Seed of the model's weights.")
flags.DEFINE_float(
  "leak_threshold",
  CLIENT["leak_threshold"],
  "Adjusted-SSIM bar of the leak verdict (default tf_dlg.metrics.DEFAULT_LEAK_SSIM).",
)
cli.define_data_dir()
flags.DEFINE_bool(
  "tensorboard",
  CLIENT["tensorboard"],
  "Write reconstruction progress (distance, SSIM, images) to OUTPUT_DIR/tensorboard.",
)
# The client's arguments are flags of their names: their errors name the flags.
cli.register_flag_names({name: name for name in [*CLIENT, "output_dir"]})


def arguments_from_flags():
  """(the `AttackConfig`, the client's keyword arguments) of the parsed flags."""
  return cli.config_from_flags(AttackConfig), {name: FLAGS[name].value for name in CLIENT}


def main(argv):
  del argv
  started = _process_start()
  # Every flag is checked before any work (a ValueError: one line, exit 2).
  attack, client = arguments_from_flags()
  record = single_attack.run(
    FLAGS.output_dir, attack, started=started, checked=cli.work_begins, **client
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
