r"""The main job: reproduce the paper's experiments, test its claims, write one report.

Stages, each resumable (a rerun with the same --output_dir skips finished work): the
threshold search (Experiment 1), adaptive re-scoring of its thresholds, convergence
(Experiment 2) at the thresholds, `claims.md` with a verdict per claim by interval, and
`report.md` / `report.html`. The pipeline is `tf_dlg.study.pipeline`; this file maps
flags to one preset (`tf_dlg.study.presets.PRESETS`, explicit flags override single
fields, an unknown field is an error) and runs it.

Presets: `quick` (real MNIST, CIFAR-10 and LFW samples, offline), `paper` (tfds MNIST /
CIFAR-10 / LFW, Figure 5 on CIFAR-10, 5 seeds) and `adaptive` (`quick` plus the adaptive
thresholds and their convergence cost); each one's budget is explained beside it. `sweep`
runs the threat-model sweep (`tf_dlg.study.sweep`) on the quick preset's training instead
of the pipeline: sweep.csv, figures/sweep.png and sweep.md.

Example:
  python -m experiments.reproduce --preset=quick --output_dir=outputs/quick
"""

from __future__ import annotations

import os
import sys
import time

# Imports TensorFlow quietly, before anything uses it or absl starts (experiments.cli).
from experiments import cli
from tf_dlg.study import pipeline
from tf_dlg.study.presets import PRESETS, Preset, with_overrides


def command_line() -> str:
  """The command that made this run, as typed."""
  return " ".join([os.path.basename(sys.executable), "-m", "experiments.reproduce"] + sys.argv[1:])


# Flags that override a preset field of the same name when given explicitly, and their
# help (their types and checks are the `Preset` fields').
HELPS = {
  "datasets": "Override the preset's datasets.",
  "defenses": "Override the preset's defences.",
  "convergence_defenses": "Defences trained in FedAvg.",
  "partitions": "Client partitions of the convergence runs.",
  "adaptive_attacks": "Attacks that re-score the thresholds.",
  "attack": "Attack of the plain threshold search.",
  "num_images": "Images per dataset.",
  "iterations": "Attack iterations (every dataset).",
  "restarts": "Attack restarts per image.",
  "rounds": "FedAvg rounds.",
  "num_clients": "FedAvg clients.",
  "seeds": "Seeds per convergence cell.",
  "train_examples": "Seeded training subset of the FedAvg runs.",
  "convergence_dataset": "Dataset of the FedAvg runs.",
  "adaptive": "Also search adaptive thresholds and train at them.",
  "seed": "First seed of everything.",
  "data_dir": "tfds data directory (paper preset).",
  "leak_ssim": "Adjusted-SSIM leak bar (default metrics.DEFAULT_LEAK_SSIM).",
  "engine": "Federated engine of every training stage: TFF, or Flower's simulation engine "
  "on Ray (.venv-k3, no TFF; RAY_ADDRESS for a Ray cluster). Recorded in every output.",
  "dp_multipliers": "The frontier's DP noise multipliers (default: the dp spec's grid); empty "
  "for none (DP points need tensorflow-privacy and dp-accounting, absent from .venv-k3).",
  "frontier_images": "Images attacked per frontier setting.",
  "sweep_gallery": "sweep preset: gallery images (70,000 = all of MNIST).",
}
OVERRIDE_FLAGS = tuple(HELPS)


def settings_from_flags(flags_obj) -> Preset:
  """The preset with the flags given explicitly put over it (`presets.with_overrides`)."""
  given = {name: getattr(flags_obj, name) for name in OVERRIDE_FLAGS if flags_obj[name].present}
  if "dp_multipliers" in given:
    try:
      given["dp_multipliers"] = [float(z) for z in given["dp_multipliers"]]
    except ValueError:
      raise ValueError(
        f"--dp_multipliers={','.join(given['dp_multipliers'])}: expected numbers in (0, inf), "
        "comma-separated (or nothing: no DP points)."
      ) from None
  return with_overrides(flags_obj.preset, given)


def main(argv):
  del argv
  from absl import flags

  if flags.FLAGS.engine == "tff":
    cli.require_confined_worker()  # trains in TFF: exit 2 now if it cannot be confined
  # Every flag is checked before any stage starts (check_settings, again in run: cheap);
  # a ValueError until then is one line and exit status 2, after it a traceback.
  settings = settings_from_flags(flags.FLAGS)
  if settings.sweep:
    return run_sweep(flags.FLAGS.output_dir, settings)
  pipeline.check_settings(flags.FLAGS.output_dir, settings)
  cli.work_begins()
  start = time.time()
  paths = pipeline.run(flags.FLAGS.output_dir, settings, command=command_line())
  with open(paths["claims"], encoding="utf-8") as f:
    print(f.read())
  print(f"[reproduce] report: {paths['report']} ({paths['html']}); {time.time() - start:.0f} s")


def run_sweep(output_dir: str, settings: Preset) -> None:
  """The `sweep` preset: `tf_dlg.study.sweep` on the preset's training (checked first)."""
  from absl import flags

  from tf_dlg.study import sweep

  if settings.engine != "tff":
    # The sweep captures client updates from TFF's own client work (FedAvg.capture_process).
    raise ValueError(f"--engine={settings.engine}: the sweep preset runs on the tff engine only.")
  study = sweep.Sweep(output_dir, settings, frontier_csv=flags.FLAGS.frontier_csv)
  cli.work_begins()
  start = time.time()
  paths = study.run()
  with open(paths["report"], encoding="utf-8") as f:
    print(f.read().split("\n\n", 2)[1])  # the report's opening line
  print(f"[reproduce] sweep: {paths['csv']}, {paths['report']}; {time.time() - start:.0f} s")


def define_flags():
  from absl import flags

  flags.DEFINE_string("preset", "quick", f"One of {', '.join(PRESETS)}.")
  flags.DEFINE_string("output_dir", "outputs/quick", "Output directory (resumed if present).")
  # One flag per overridable `Preset` field, of its type; unset (None), the preset's value
  # holds (`settings_from_flags` takes only the flags given). The engine is read even
  # when not given: its default is the field's.
  cli.define_config_flags(
    Preset, OVERRIDE_FLAGS, choices={"engine": ("tff", "flower")}, helps=HELPS
  )
  for name in OVERRIDE_FLAGS:
    if name != "engine":
      flags.FLAGS.set_default(name, None)
  flags.DEFINE_string(
    "frontier_csv", None, "sweep preset: a frontier run's frontier.csv, for the costs it quotes."
  )


if __name__ == "__main__":
  define_flags()
  cli.run(main)
