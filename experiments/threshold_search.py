r"""Experiment 1: each image's threshold, and each dataset's, with intervals.

For each dataset, `--num_images` training images are attacked one at a time (batch size 1,
the DLG/iDLG setting) through the reference LeNet. For each (dataset, attack, defence)
every image gets its own threshold by bisection (`tf_dlg.analysis.threshold`) between
the ends of the defence's range (`tf_dlg.study.defense_table.PARAMETER_SEARCH`), down to
`--log_resolution` (a factor) on log scales and `--linear_resolution` on linear ones.
At each bisection step the images still bisecting are attacked together in one
`run_attacks` call, each with `--restarts` differently seeded starts, so "defended"
means the defence held, not that one start got stuck. Two leak criteria, each with its
own per-image and dataset thresholds from the same attacked points (the second bisection
attacks only the settings the first did not): an image *leaks* when its brightness-adjusted
SSIM reaches `--leak_ssim` (the paper's bar), or when it is *identified*: among all images
of its dataset (x_train then x_test), ranked by brightness-tolerant correlation with the
reconstruction (`tf_dlg.analysis.identification`), the attacker's first pick is its
original. A reconstruction that cannot be scored (non-finite) counts as leaked under both,
with a warning. At each dataset threshold (and undefended) every image is attacked once
more to report the top-1 identification rate there, with an exact binomial interval.

Per image: `found` (bracket: leaks one step weaker, defended at the threshold),
`at_weakest`, `not_reached` (the strongest setting leaks) or `untested` (the attack does
not recover it even undefended). The dataset threshold is the smallest setting that
defends at least `--defended_fraction` of the tested images: the k-th weakest per-image
threshold, k = ceil(fraction x tested), not_reached counting as infinitely strong, with a
95 % percentile bootstrap interval over images (`tf_dlg.analysis.intervals.bootstrap`).

`--adaptive` adds, for each defence, its threshold against its strongest attacker in
the project (`STRONGEST_ATTACKER`; with two attackers an image leaks if either leaks).
Relative defences (`clipping_ratio`, `noising_ratio`) and absolute ones (`clipping`,
`noising`) are reported in both units: the other unit's equivalent is the median over
the images of ratio x that image's undefended update L2 norm (clipping) or RMS (noise).

Outputs in `--output_dir`:
  points.jsonl     every evaluated (dataset, attack, defence, parameter, image): scores,
                   identification rank / top-1 / top-5 / pick (`tf_dlg.study.records.Point`).
                   Written as it goes; a rerun skips finished points (another
                   configuration, or points of an older format, are refused).
  recon/*.npz      leaked, brightness-adjusted and original images of every attack call.
  thresholds.csv   one row per (dataset, kind, attack, defence); schema below.
  thresholds.md    first both criteria and their top-1 rates against each defence's
                   strongest attackers (`--adaptive`), then against the plain attack (the
                   paper's reproduction); value [low, high] per defence x dataset, plain
                   vs adaptive, spread.
  figures/thresholds_<defence>.png   per-image thresholds per dataset (strip plot).
  figures/grid_<dataset>_<attack>_<defence>.png   the median-threshold image: leaked |
                   brightness-adjusted | original | the attacker's pick (the dataset image
                   ranked first, with the original's rank) for no defence, one step
                   weaker, and at its threshold (the paper's Figures 2-4).

thresholds.csv columns (read back only through `read_thresholds`):
  dataset, dataset_source; kind (`plain` | `adaptive`); attack (the attacker, or
  `ig+idlg` for two); defense; unit (the defence's parameter name); status (`found`,
  `at_weakest`, `not_reached`; `untested` rows are written as `at_weakest` with
  attack_works_undefended False, as before); threshold (empty when not_reached); low,
  high (95 % interval, clipped to the search range; interval_open: its strong end lay
  beyond it); num_images (attacked), num_tested (leak undefended), rank (k), restarts,
  seed, iterations, defended_fraction, resolution; per_image (JSON list of per-image
  thresholds, null for not_reached and untested) and per_image_status (JSON list);
  absolute_equivalent (relative defences) / relative_equivalent (absolute clipping and
  noising); attack_works_undefended, undefended_adjusted_ssim (median); search_low,
  search_high, search_scale, stronger; points_evaluated, seconds. Identification:
  id_status, id_threshold, id_low, id_high, id_interval_open, id_num_tested, id_rank,
  id_per_image, id_per_image_status, id_attack_works_undefended (as above, leak =
  identified top-1); undefended_top1, top1_at_threshold, top1_at_id_threshold (top-1
  rate over the attacked images undefended, at the adjusted-SSIM threshold, at the
  identification threshold; at the strongest setting when not reached), each with _low
  and _high (exact 95 % interval); gallery_size. Files of the older per-dataset search
  (without kind, low, high, ...) still read, as kind `plain`.

Example:
  python -m experiments.threshold_search --datasets=mnist --num_images=8 \
      --defenses=masking,clipping_ratio,pruning,noising_ratio --adaptive --output_dir=/tmp/thr
"""

from __future__ import annotations

import os
import time

# Imports TensorFlow quietly, before anything uses it or absl starts (experiments.cli).
from experiments import cli
from tf_dlg.study import threshold_search as search_lib
from tf_dlg.study.presets import Preset
from tf_dlg.study.threshold_search import ThresholdSearch

# The search's settings: `Preset` fields (the study section), their defaults and checks
# (a bad value is one line naming its flag), with their help.
HELPS = {
  "datasets": "Datasets to search.",
  "defenses": "Defences to search.",
  "adaptive": "Also search each defence against its strongest attacker (STRONGEST_ATTACKER).",
  "num_images": "Images attacked per dataset.",
  "restarts": "Seeded starts per attack, in [1, 64].",
  "log_resolution": "Per-image bracket factor on log scales (> 1).",
  "linear_resolution": "Per-image bracket width on linear scales, in (0, 1].",
  "leak_ssim": "Adjusted-SSIM leak bar (default: metrics.DEFAULT_LEAK_SSIM).",
  "defended_fraction": "Fraction of the tested images the dataset threshold must defend, "
  "in (0, 1].",
  "iterations": "Attack optimiser iterations per restart.",
  "seed": "Seed of everything random in the run.",
  "data_dir": "tfds data directory (tfds datasets only; must exist).",
}
SETTINGS = tuple(HELPS)


def main(argv):
  del argv
  from absl import flags

  f = flags.FLAGS
  study = cli.config_from_flags(Preset)
  # The constructor checks every setting (a ValueError: one line naming the flag, exit 2)
  # before any attack.
  search = ThresholdSearch(
    f.output_dir,
    study.datasets,
    f.attacks,
    study.defenses,
    data_dir=study.data_dir,
    **{name: getattr(study, name) for name in SETTINGS if name in search_lib.SETTINGS},
  )
  cli.work_begins()  # checked: a ValueError from here keeps its traceback
  start = time.perf_counter()
  search.run()
  print(open(os.path.join(f.output_dir, "thresholds.md")).read())
  print(f"[threshold_search] {time.perf_counter() - start:.0f} s; outputs in {f.output_dir}")


def define_flags():
  from tf_dlg import data
  from tf_dlg.attacks import runner
  from tf_dlg.study import defense_table

  cli.define_config_flags(
    Preset,
    SETTINGS,
    choices={"datasets": data.DATASETS, "defenses": defense_table.PARAMETER_SEARCH},
    helps=HELPS,
  )
  cli.define_enum_list("attacks", [Preset.attack], runner.ATTACKS, "Attacks of the plain search.")
  cli.define_output_dir("outputs/threshold_search")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
