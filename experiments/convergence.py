r"""Experiment 2: what each defence at its threshold costs FedAvg in accuracy.

FedAvg in TFF (`tf_dlg.federated`) with no defence and with each defence at the
threshold found by `experiments.threshold_search` (read from its `thresholds.csv`, or
given with `--defense_params`), for `mean` and coordinate-wise `median` aggregation, on
IID and non-IID clients: the paper's Figure 5 as a 2x2 panel of test-accuracy curves,
plus a table of final accuracy and the drop versus no defence.

Each run lives in `runs/<aggregator>_<partition>_<defence>/` with its own
`history.csv` and checkpoint, so an interrupted experiment resumes run by run and round
by round. Runs that share an aggregator and a defence share one built TFF process.

Note on transferring thresholds: clipping norms and noise standard deviations are
absolute, found on single-image gradients of the attack model; a FedAvg client update of
the training model has another scale. We apply them as given (as the paper does) and
report each run's parameter beside it.

Outputs: runs/*/history.csv, convergence.csv, convergence.md, figures/convergence.png.

Example:
  python -m experiments.convergence --thresholds=/tmp/thr/thresholds.csv \
      --dataset=digits --rounds=20 --output_dir=/tmp/conv
"""

from __future__ import annotations

# TensorFlow must be imported before absl's app.run starts main(): importing it first
# inside main() breaks Keras layer building (Flatten sees a None shape).
import tensorflow as tf  # noqa: F401  pylint: disable=unused-import

import csv
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

FINAL_ROUNDS = 3  # "final accuracy" averages this many last rounds

CONVERGENCE_FIELDS = ("aggregator", "partition", "defense", "param", "param_source",
                      "rounds", "final_test_accuracy", "best_test_accuracy",
                      "drop_vs_none", "final_train_loss", "seconds", "history")


def defense_params_from_thresholds(path: str, dataset: str,
                                   attack: str = "idlg") -> Dict[str, Tuple[float, str]]:
  """{defence: (parameter, provenance)} from a thresholds.csv for one dataset/attack.

  A defence whose threshold was not reached takes the strongest value searched, marked
  as such in the provenance.
  """
  from experiments import threshold_search  # pylint: disable=g-import-not-at-top
  out = {}
  rows = threshold_search.read_thresholds(path)
  for r in rows:
    if r["dataset"] != dataset or r["attack"] != attack:
      continue
    if r["status"] == "not_reached":
      strongest = r["search_high"] if r["stronger"] == "higher" else r["search_low"]
      out[r["defense"]] = (float(strongest), "strongest searched (threshold not reached)")
    else:
      out[r["defense"]] = (float(r["threshold"]), f"threshold ({r['status']})")
  if not out:
    available = sorted({(r["dataset"], r["attack"]) for r in rows})
    raise ValueError(f"{path} has no thresholds for dataset={dataset!r}, attack={attack!r}; "
                     f"it has {available}.")
  return out


def parse_defense_params(items: Sequence[str]) -> Dict[str, Tuple[float, str]]:
  """`["masking:0.6", "clipping:1.0"]` -> {defence: (value, "given")}."""
  out = {}
  for item in items:
    name, sep, value = item.partition(":")
    try:
      if not sep:
        raise ValueError
      out[name.strip()] = (float(value), "given")
    except ValueError:
      raise ValueError(f"--defense_params entry {item!r} must look like NAME:VALUE, "
                       "e.g. masking:0.6") from None
  return out


class Convergence:
  """Runs (and resumes) the convergence grid; see the module docstring.

  Args:
    output_dir: Results directory (resumed if it holds runs).
    defense_params: {defence: (parameter, provenance)}; "none" is always added.
    dataset: Dataset of the federated runs.
    aggregators: Subset of mean, median, trimmed_mean.
    partitions: e.g. ("iid", "dirichlet").
    rounds, num_clients, seed, ...: `tf_dlg.federated.SimulationConfig` fields.
  """

  def __init__(self, output_dir: str, defense_params: Dict[str, Tuple[float, str]],
               dataset: str = "digits", aggregators: Sequence[str] = ("mean", "median"),
               partitions: Sequence[str] = ("iid", "dirichlet"), rounds: int = 20,
               num_clients: int = 10, alpha: float = 0.5, classes_per_client: int = 2,
               local_epochs: int = 1, batch_size: int = 10, seed: int = 0,
               data_dir: Optional[str] = None, progress: bool = True, **config_overrides):
    # pylint: disable=g-import-not-at-top
    from tf_dlg import data, defenses
    from tf_dlg.federated import fedavg
    for a in aggregators:
      if a not in fedavg.AGGREGATORS:
        raise ValueError(f"Unknown aggregator {a!r}; expected one of {', '.join(fedavg.AGGREGATORS)}.")
    for p in partitions:
      if p not in data.PARTITION_SCHEMES:
        raise ValueError(f"Unknown partition {p!r}; expected one of {', '.join(data.PARTITION_SCHEMES)}.")
    for name, (value, _) in defense_params.items():
      defenses.get_defense(name, value)  # validates name and range up front
    self.output_dir = output_dir
    self.defense_params = {"none": (None, "no defence"), **defense_params}
    self.dataset, self.aggregators, self.partitions = dataset, list(aggregators), list(partitions)
    self.rounds, self.seed, self.data_dir, self.progress = rounds, seed, data_dir, progress
    self.base = dict(dataset=dataset, num_clients=num_clients, alpha=alpha,
                     classes_per_client=classes_per_client, local_epochs=local_epochs,
                     batch_size=batch_size, seed=seed, rounds=rounds, data_dir=data_dir,
                     **config_overrides)

  def run_dir(self, aggregator, partition, defense):
    return os.path.join(self.output_dir, "runs", f"{aggregator}_{partition}_{defense}")

  def run(self) -> List[Dict[str, Any]]:
    # pylint: disable=g-import-not-at-top
    from tqdm import tqdm
    from tf_dlg import data
    from tf_dlg.federated import simulation
    dataset = data.load_dataset(self.dataset, data_dir=self.data_dir, seed=self.seed)
    self.dataset_source = dataset.source
    cells = [(a, d) for a in self.aggregators for d in self.defense_params]
    rows = []
    bar = tqdm(total=len(cells) * len(self.partitions), desc="convergence", unit="run",
               disable=not self.progress)
    for aggregator, defense in cells:
      param, provenance = self.defense_params[defense]
      built = None
      for partition in self.partitions:
        bar.set_postfix_str(f"{aggregator}/{partition}/{defense}")
        config = simulation.SimulationConfig(
            partition=partition, aggregator=aggregator, defense=defense,
            defense_param=param, **self.base).validate(len(dataset.x_train))
        out_dir = self.run_dir(aggregator, partition, defense)
        history_path = os.path.join(out_dir, simulation.HISTORY_NAME)
        done = os.path.exists(history_path) and len(
            simulation.read_history(history_path)) >= self.rounds
        start = time.perf_counter()
        if not done:
          if built is None:
            built = simulation.build_for_config(config, dataset)
          simulation.run_simulation(config, out_dir, dataset=dataset, fedavg=built,
                                    progress=False)
        history = simulation.read_history(history_path)
        rows.append({
            "aggregator": aggregator, "partition": partition, "defense": defense,
            "param": param, "param_source": provenance, "rounds": len(history),
            # Mean of the last rounds: one round's accuracy swings by several points
            # on small non-IID runs, which would swamp the defences' effect.
            "final_test_accuracy": float(np.mean(
                [h["test_accuracy"] for h in history[-FINAL_ROUNDS:]])),
            "best_test_accuracy": max(h["test_accuracy"] for h in history),
            "final_train_loss": history[-1]["train_loss"],
            "seconds": sum(h["seconds"] for h in history),
            "history": os.path.relpath(history_path, self.output_dir)})
        bar.update(1)
        del start
    bar.close()
    for r in rows:
      none = next(x for x in rows if (x["aggregator"], x["partition"], x["defense"]) ==
                  (r["aggregator"], r["partition"], "none"))
      r["drop_vs_none"] = none["final_test_accuracy"] - r["final_test_accuracy"]
    self.write(rows)
    return rows

  def write(self, rows: List[Dict[str, Any]]) -> None:
    from tf_dlg.analysis import figures  # pylint: disable=g-import-not-at-top
    with open(os.path.join(self.output_dir, "convergence.csv"), "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=CONVERGENCE_FIELDS)
      w.writeheader()
      for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CONVERGENCE_FIELDS})
    curves = figures.read_curves({
        (r["aggregator"], r["partition"],
         r["defense"] if r["param"] is None else f"{r['defense']} {r['param']:g}"):
        os.path.join(self.output_dir, r["history"]) for r in rows})
    figures.accuracy_panel(
        curves, os.path.join(self.output_dir, "figures", "convergence.png"),
        title=f"FedAvg test accuracy with each defence at its threshold ({self.dataset})",
        footer=f"data: {self.dataset_source}",
        panel_order=[(a, p) for a in self.aggregators for p in self.partitions])
    table = [[r["aggregator"], r["partition"], r["defense"], r["param"], r["param_source"],
              r["final_test_accuracy"], r["best_test_accuracy"],
              f"{100 * r['drop_vs_none']:+.1f} pp"] for r in rows]
    text = (f"# Convergence with defences at their thresholds\n\n"
            f"FedAvg on `{self.dataset}` ({self.dataset_source}), "
            f"{self.base['num_clients']} clients, {self.rounds} rounds, seed {self.seed}.\n\n"
            + figures.markdown_table(
                ["aggregator", "clients", "defence", "parameter", "from",
                 f"final acc. (last {FINAL_ROUNDS} rounds)",
                 "best acc.", "drop vs none"], table)
            + "\n![convergence](figures/convergence.png)\n")
    with open(os.path.join(self.output_dir, "convergence.md"), "w") as f:
      f.write(text)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  params = {}
  if f.thresholds:
    params.update(defense_params_from_thresholds(f.thresholds, f.threshold_dataset or f.dataset,
                                                 f.threshold_attack))
  params.update(parse_defense_params(f.defense_params))
  if f.defenses:
    unknown = set(f.defenses) - set(params)
    if unknown:
      raise ValueError(f"No parameter for defences {sorted(unknown)}: pass --thresholds or "
                       "--defense_params=NAME:VALUE.")
    params = {k: v for k, v in params.items() if k in f.defenses}
  conv = Convergence(f.output_dir, params, dataset=f.dataset, aggregators=f.aggregators,
                     partitions=f.partitions, rounds=f.rounds, num_clients=f.num_clients,
                     alpha=f.alpha, local_epochs=f.local_epochs, batch_size=f.batch_size,
                     seed=f.seed, data_dir=f.data_dir)
  conv.run()
  print(open(os.path.join(f.output_dir, "convergence.md")).read())
  print(f"[convergence] outputs in {f.output_dir}")


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("thresholds", None, "thresholds.csv of experiments.threshold_search.")
  flags.DEFINE_string("threshold_dataset", None, "Dataset whose thresholds to use (default --dataset).")
  flags.DEFINE_string("threshold_attack", "idlg", "Attack whose thresholds to use.")
  flags.DEFINE_list("defense_params", [], "Explicit NAME:VALUE pairs (override --thresholds).")
  flags.DEFINE_list("defenses", [], "Restrict to these defences (default: all with a parameter).")
  flags.DEFINE_string("dataset", "digits", "Federated dataset.")
  flags.DEFINE_list("aggregators", ["mean", "median"], "Aggregators.")
  flags.DEFINE_list("partitions", ["iid", "dirichlet"], "Client partitions.")
  flags.DEFINE_integer("rounds", 20, "FedAvg rounds.")
  flags.DEFINE_integer("num_clients", 10, "Clients (all take part every round).")
  flags.DEFINE_float("alpha", 0.5, "Dirichlet concentration of the non-IID partition.")
  flags.DEFINE_integer("local_epochs", 1, "Local epochs per round.")
  flags.DEFINE_integer("batch_size", 10, "Local batch size.")
  flags.DEFINE_string("output_dir", "outputs/convergence", "Output directory.")
  flags.DEFINE_integer("seed", 0, "Seed.")
  flags.DEFINE_string("data_dir", None, "tfds data directory.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
