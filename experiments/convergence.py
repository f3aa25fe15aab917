r"""Experiment 2 from the command line: FedAvg cost of each defence at its threshold.

The study itself is `tf_dlg.study.convergence` (grid, resumable run folders, tables and
figure); this file maps flags to one `Convergence` and runs it.

Example:
  python -m experiments.convergence --thresholds=/tmp/thr/thresholds.csv \
      --dataset=mnist --train_examples=2000 --seeds=0,1,2 --rounds=10 \
      --output_dir=/tmp/conv

  # The same study on Flower's simulation engine (Ray; .venv-k3, no TFF):
  .venv-k3/bin/python -m experiments.convergence --engine=flower --dataset=mnist ...
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

# Imports TensorFlow quietly, before anything uses it or absl starts (experiments.cli).
from experiments import cli
from tf_dlg import validation
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.study import beside
from tf_dlg.study.convergence import Convergence
from tf_dlg.study.defense_params import (
  defense_of,
  defense_params_from_thresholds,
  parse_defense_params,
)
from tf_dlg.study.presets import Preset

# The `FederatedConfig` fields the grid's runs share that are flags here (their defaults
# and documentation are the configuration's).
FEDERATED_FLAGS = (
  "dataset",
  "data_dir",
  "rounds",
  "num_clients",
  "alpha",
  "local_epochs",
  "batch_size",
  "client_lr",
)


def params_from_flags(f) -> Dict[str, Tuple[float, str]]:
  """{label: (parameter, provenance)} from --thresholds, --defense_params, --defenses."""
  from tf_dlg import defenses as defenses_lib

  params = {}
  if f.thresholds:
    params.update(
      defense_params_from_thresholds(
        f.thresholds, f.threshold_dataset or f.dataset, f.threshold_attack, f.thresholds_kind
      )
    )
  params.update(parse_defense_params(f.defense_params))
  if f.defenses:
    validation.check_choices(
      "defenses", f.defenses, [d for d in defenses_lib.DEFENSES if d != "none"]
    )
    unknown = sorted(set(f.defenses) - {defense_of(k) for k in params})
    if unknown:
      raise ValueError(
        f"defenses: no parameter for {unknown}: pass --thresholds or --defense_params=NAME:VALUE."
      )
    params = {k: v for k, v in params.items() if defense_of(k) in f.defenses}
  return params


def _build_count() -> int:
  from tf_dlg.federated import fedavg

  return fedavg.build_count()


def subsets_from_flags(f):
  """(train, test) subset sizes, or None for whole splits.

  --test_examples alone subsets the test split only; its default applies with
  --train_examples (the subset runs' setting), never on its own.
  """
  test = f.test_examples if f.train_examples or f["test_examples"].present else None
  return (f.train_examples, test) if f.train_examples or test else None


def main(argv):
  del argv
  from absl import flags

  f = flags.FLAGS
  if f.engine == "tff":
    cli.require_confined_worker()  # trains in TFF: exit 2 now if it cannot be confined
  # Flags, the thresholds file and every run folder are checked before any training;
  # a ValueError becomes one line and exit status 2 (experiments.cli).
  subsets = subsets_from_flags(f)
  federated = cli.config_from_flags(FederatedConfig)  # checked: errors name the flags
  conv = Convergence(
    f.output_dir,
    params_from_flags(f),
    aggregators=f.aggregators,
    partitions=f.partitions,
    seeds=[int(s) for s in f.seeds],
    subsets=subsets,
    engine=f.engine,
    **{name: getattr(federated, name) for name in FEDERATED_FLAGS},
  )
  if f.engine != "tff":
    from tf_dlg.integrations import flower_engine

    mechanism = "central" if f.engine == "flower-central-dp" else "local"
    for config in conv.configs.values():
      flower_engine.check_config(config, mechanism)  # before any data is read
  conv.prepare()
  cli.work_begins()  # checked: a ValueError from here keeps its traceback
  if f.engine != "tff":
    conv.run()
    flower_engine.shutdown()
    print(
      f"[convergence] engine: {f.engine} ({len(conv.configs)} runs, one Flower simulation on Ray)"
    )
  else:
    builds = _build_count()
    # A second process trains the grid from its front (1.2-1.3x the runs per second).
    with beside.training(conv) as child:
      conv.run()
    print(
      f"[convergence] {len(conv.configs)} runs, {child.trained} of them trained by a second "
      f"process; TFF builds in this one: {_build_count() - builds} (one per aggregator x "
      "defence and model shape it trained)"
    )
  with open(os.path.join(f.output_dir, "convergence.md"), encoding="utf-8") as md:
    print(md.read())
  print(f"[convergence] outputs in {f.output_dir}")


def define_flags():
  from absl import flags

  flags.DEFINE_string("thresholds", None, "thresholds.csv of experiments.threshold_search.")
  flags.DEFINE_string(
    "threshold_dataset", None, "Dataset whose thresholds to use (default --dataset)."
  )
  flags.DEFINE_string("threshold_attack", "idlg", "Attack whose (plain) thresholds to use.")
  flags.DEFINE_enum(
    "thresholds_kind",
    "plain",
    ["plain", "adaptive"],
    "Plain thresholds (vs --threshold_attack) or adaptive ones.",
  )
  flags.DEFINE_list("defense_params", [], "Explicit NAME:VALUE pairs (override --thresholds).")
  flags.DEFINE_list("defenses", [], "Restrict to these defences (default: all with a parameter).")
  flags.DEFINE_integer("train_examples", None, "Seeded subset of training images.", lower_bound=1)
  flags.DEFINE_integer(
    "test_examples",
    1000,
    "Seeded subset of test images (default 1000 with --train_examples; given alone, the "
    "training set stays whole).",
    lower_bound=1,
  )
  # The grid: `Preset` (study) fields and defaults.
  cli.define_config_flags(
    Preset,
    ("aggregators", "partitions"),
    helps={"aggregators": "Aggregators.", "partitions": "Client partitions."},
  )
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every cell (paired across defences).")
  cli.define_config_flags(
    FederatedConfig,
    FEDERATED_FLAGS,
    helps={
      "num_clients": "Clients (all take part every round).",
      "alpha": "Dirichlet concentration of the non-IID partition.",
    },
  )
  flags.DEFINE_enum(
    "engine",
    "tff",
    ["tff", "flower", "flower-central-dp"],
    "Federated engine: TFF, or Flower's simulation engine on Ray (no TFF; set RAY_ADDRESS "
    "to use a Ray cluster), whose `dp` defence is Flower's LocalDpMod (the TFF engine's "
    "dp) or, with flower-central-dp, Flower's central DP-FedAvg. Recorded in "
    "convergence.csv and convergence.md.",
  )
  flags.DEFINE_string("output_dir", "outputs/convergence", "Output directory.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
