r"""Experiment 2: what each defence at its threshold costs FedAvg in accuracy.

FedAvg in TFF (`tf_dlg.federated`) with no defence and with each defence at the
threshold found by `experiments.threshold_search` (read from its `thresholds.csv`, or
given with `--defense_params`), for `mean` and coordinate-wise `median` aggregation, on
IID and non-IID clients: the paper's Figure 5 as a 2x2 panel of test-accuracy curves,
plus a table of final accuracy and the drop versus no defence.

Each run lives in `runs/<aggregator>_<partition>_<defence>/` with its own
`history.csv` and checkpoint, so an interrupted experiment resumes run by run and round
by round. Runs that share an aggregator and a defence share one built TFF process.
Each run folder also holds `cell.json`: its full configuration (dataset and data source,
defence and parameter, seed, rounds, clients, alpha, epochs, batch size, model, ...). A
folder whose `cell.json` differs, or a run folder without one, is refused before any
training with an error naming the file and the differing keys: it is never reused as if
it were this configuration's result, and never overwritten.

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

import dataclasses
import json
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

# Imports TensorFlow quietly, before anything uses it or absl starts (experiments.cli).
from experiments import cli
from tf_dlg import io as io_lib
from tf_dlg import validation

FINAL_ROUNDS = 3  # "final accuracy" averages this many last rounds

CONVERGENCE_FIELDS = ("aggregator", "partition", "defense", "param", "param_source",
                      "rounds", "final_test_accuracy", "best_test_accuracy",
                      "drop_vs_none", "final_train_loss", "seconds", "history")
CELL_NAME = "cell.json"
CELL_FORMAT = "tf_dlg.convergence.cell/v1"
# Simulation settings of every run (SimulationConfig fields); keyword arguments override.
DEFAULTS = dict(dataset="digits", rounds=20, num_clients=10, alpha=0.5,
                classes_per_client=2, local_epochs=1, batch_size=10, seed=0, data_dir=None)
# Set per run by the grid, or not part of a convergence run.
_PER_RUN = ("partition", "aggregator", "defense", "defense_param", "capture_round",
            "capture_client")


class CellError(ValueError):
  """A run folder holds a run of another configuration (or of an unknown one)."""


def defense_params_from_thresholds(path: str, dataset: str,
                                   attack: str = "idlg") -> Dict[str, Tuple[float, str]]:
  """{defence: (parameter, provenance)} from a thresholds.csv for one dataset/attack.

  A defence whose threshold was not reached takes the strongest value searched, marked
  as such in the provenance. Damaged cells raise ValueError naming file, line, column.
  """
  from experiments import threshold_search  # pylint: disable=g-import-not-at-top
  out = {}
  rows = threshold_search.read_thresholds(path)
  for r in rows:
    if r["dataset"] != dataset or r["attack"] != attack:
      continue
    if r["status"] == "not_reached":
      strongest = r["search_high"] if r["stronger"] == "higher" else r["search_low"]
      out[r["defense"]] = (strongest, "strongest searched (threshold not reached)")
    elif threshold_search.attack_untested(r):
      out[r["defense"]] = (r["threshold"], f"weakest searched ({threshold_search.UNTESTED})")
    else:
      out[r["defense"]] = (r["threshold"], f"threshold ({r['status']})")
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


def cell_fingerprint(config, dataset_source: str) -> Dict[str, Any]:
  """Everything that fixes a run's numbers: its SimulationConfig and the data's source."""
  fields = dataclasses.asdict(config)
  for k in ("data_dir", "capture_round", "capture_client"):  # do not change the numbers
    fields.pop(k, None)
  fields["dataset_source"] = dataset_source
  return json.loads(io_lib.dumps(fields, sort_keys=True))


def check_cell(run_dir: str, fingerprint: Dict[str, Any]) -> bool:
  """Whether `run_dir` holds (part of) this run; CellError if it holds another one."""
  from tf_dlg.federated import simulation  # pylint: disable=g-import-not-at-top
  path = os.path.join(run_dir, CELL_NAME)
  if not os.path.exists(path):
    found = [n for n in (simulation.HISTORY_NAME, simulation.CHECKPOINT_NAME)
             if os.path.exists(os.path.join(run_dir, n))]
    if found:
      raise CellError(f"{os.path.join(run_dir, found[0])}: a run without {CELL_NAME}, so "
                      "its configuration is unknown; it is not reused. Move it away or "
                      "use another --output_dir.")
    return False
  try:
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
    if stored.get("format") != CELL_FORMAT:
      raise ValueError(f"format={stored.get('format')!r}, expected {CELL_FORMAT!r}")
    config = dict(stored["config"])
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CellError(f"{path}: not a readable convergence cell file ({e}); move it away or "
                    "use another --output_dir.") from e
  diff = sorted(k for k in set(config) | set(fingerprint) if config.get(k) != fingerprint.get(k))
  if diff:
    raise CellError(
        f"{path}: this run folder holds another configuration (differs in: " +
        ", ".join(f"{k} {config.get(k)!r} there, {fingerprint.get(k)!r} now" for k in diff)
        + "); use another --output_dir, or the flags of that run.")
  return True


def claim_cell(run_dir: str, fingerprint: Dict[str, Any]) -> None:
  """Marks `run_dir` as this configuration's (after `check_cell` passed)."""
  path = os.path.join(run_dir, CELL_NAME)
  if not os.path.exists(path):
    text = io_lib.dumps({"format": CELL_FORMAT, "config": fingerprint}, indent=1,
                        sort_keys=True)
    io_lib.atomic_write_text(path, text + "\n")


class Convergence:
  """Runs (and resumes) the convergence grid; see the module docstring.

  Args:
    output_dir: Results directory (resumed if it holds runs of this configuration).
    defense_params: {defence: (parameter, provenance)}; "none" is always added.
    aggregators: Subset of mean, median, trimmed_mean.
    partitions: e.g. ("iid", "dirichlet").
    progress: Show a progress bar.
    **config: `tf_dlg.federated.SimulationConfig` fields shared by every run (dataset,
      rounds, num_clients, alpha, local_epochs, batch_size, seed, data_dir, model, ...);
      `DEFAULTS` fills the rest.
  """

  def __init__(self, output_dir: str, defense_params: Dict[str, Tuple[float, str]],
               aggregators: Sequence[str] = ("mean", "median"),
               partitions: Sequence[str] = ("iid", "dirichlet"), progress: bool = True,
               **config):
    # pylint: disable=g-import-not-at-top
    from tf_dlg import data, defenses
    from tf_dlg.federated import fedavg, simulation
    for name, values, allowed in (("aggregators", aggregators, fedavg.AGGREGATORS),
                                  ("partitions", partitions, data.PARTITION_SCHEMES)):
      if not values:
        raise ValueError(f"{name} is empty; expected some of {', '.join(allowed)}.")
      validation.check_choices(name, values, allowed)
    known = sorted({f.name for f in dataclasses.fields(simulation.SimulationConfig)}
                   - set(_PER_RUN))
    unknown = sorted(set(config) - set(known))
    if unknown:
      raise ValueError(f"unknown simulation settings {unknown}; expected some of {known}.")
    validation.check_choices("defense_params", list(defense_params),
                             [d for d in defenses.DEFENSES if d != "none"])
    self.defense_params = {"none": (None, "no defence"), **defense_params}
    self.aggregators, self.partitions = list(aggregators), list(partitions)
    self.base = dict(DEFAULTS, **config)
    self.dataset, self.rounds, self.seed = (self.base["dataset"], self.base["rounds"],
                                            self.base["seed"])
    self.progress, self.dataset_source = progress, None
    # Every run's settings are checked now (their own one-line ValueErrors), before work.
    self.configs = {
        (a, p, d): simulation.SimulationConfig(
            partition=p, aggregator=a, defense=d, defense_param=param,
            **self.base).validate()
        for a in self.aggregators for d, (param, _) in self.defense_params.items()
        for p in self.partitions}
    self.output_dir = validation.check_output_dir("output_dir", output_dir)
    self._dataset, self.fingerprints = None, {}

  def run_dir(self, aggregator, partition, defense):
    return os.path.join(self.output_dir, "runs", f"{aggregator}_{partition}_{defense}")

  def prepare(self):
    """Loads the data and checks every run folder (CellError) before any training."""
    if self._dataset is None:
      from tf_dlg import data  # pylint: disable=g-import-not-at-top
      dataset = data.load_dataset(self.dataset, data_dir=self.base["data_dir"], seed=self.seed)
      for key, config in self.configs.items():
        config.validate(len(dataset.x_train))
        self.fingerprints[key] = cell_fingerprint(config, dataset.source)
        check_cell(self.run_dir(*key), self.fingerprints[key])
      self._dataset, self.dataset_source = dataset, dataset.source
    return self._dataset

  def run(self) -> List[Dict[str, Any]]:
    """Trains (or resumes) every run; writes the table and figure; returns the rows."""
    # pylint: disable=g-import-not-at-top
    from tqdm import tqdm

    from tf_dlg.federated import simulation
    dataset = self.prepare()
    rows = []
    bar = tqdm(total=len(self.configs), desc="convergence", unit="run",
               disable=not self.progress)
    for aggregator in self.aggregators:
      for defense in self.defense_params:
        built = None  # one TFF build per aggregator and defence
        for partition in self.partitions:
          key = (aggregator, partition, defense)
          bar.set_postfix_str("/".join(key))
          out_dir, config = self.run_dir(*key), self.configs[key]
          history_path = os.path.join(out_dir, simulation.HISTORY_NAME)
          if not os.path.exists(history_path) or len(
              simulation.read_history(history_path)) < self.rounds:
            claim_cell(out_dir, self.fingerprints[key])
            if built is None:
              built = simulation.build_for_config(config, dataset)
            simulation.run_simulation(config, out_dir, dataset=dataset, fedavg=built,
                                      progress=False)
          rows.append(self._row(key, simulation.read_history(history_path), history_path))
          bar.update(1)
    bar.close()
    for r in rows:
      none = next(x for x in rows if (x["aggregator"], x["partition"], x["defense"]) ==
                  (r["aggregator"], r["partition"], "none"))
      r["drop_vs_none"] = none["final_test_accuracy"] - r["final_test_accuracy"]
    self.write(rows)
    return rows

  def _row(self, key, history, history_path) -> Dict[str, Any]:
    aggregator, partition, defense = key
    param, provenance = self.defense_params[defense]
    return {
        "aggregator": aggregator, "partition": partition, "defense": defense,
        "param": param, "param_source": provenance, "rounds": len(history),
        # Mean of the last rounds: one round's accuracy swings by several points on
        # small non-IID runs, which would swamp the defences' effect.
        "final_test_accuracy": float(np.mean(
            [h["test_accuracy"] for h in history[-FINAL_ROUNDS:]])),
        "best_test_accuracy": max(h["test_accuracy"] for h in history),
        "final_train_loss": history[-1]["train_loss"],
        "seconds": sum(h["seconds"] for h in history),
        "history": os.path.relpath(history_path, self.output_dir)}

  def write(self, rows: List[Dict[str, Any]]) -> None:
    """convergence.csv, convergence.md and figures/convergence.png."""
    # pylint: disable=g-import-not-at-top
    from experiments import threshold_search
    from tf_dlg.analysis import figures
    threshold_search.write_csv(os.path.join(self.output_dir, "convergence.csv"),
                               CONVERGENCE_FIELDS, rows)
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
    io_lib.atomic_write_text(os.path.join(self.output_dir, "convergence.md"), text)


def params_from_flags(f) -> Dict[str, Tuple[float, str]]:
  """{defence: (parameter, provenance)} from --thresholds, --defense_params, --defenses."""
  from tf_dlg import defenses as defenses_lib  # pylint: disable=g-import-not-at-top
  params = {}
  if f.thresholds:
    params.update(defense_params_from_thresholds(f.thresholds, f.threshold_dataset or f.dataset,
                                                 f.threshold_attack))
  params.update(parse_defense_params(f.defense_params))
  if f.defenses:
    validation.check_choices("defenses", f.defenses,
                             [d for d in defenses_lib.DEFENSES if d != "none"])
    unknown = sorted(set(f.defenses) - set(params))
    if unknown:
      raise ValueError(f"defenses: no parameter for {unknown}: pass --thresholds or "
                       "--defense_params=NAME:VALUE.")
    params = {k: v for k, v in params.items() if k in f.defenses}
  return params


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  # Flags, the thresholds file and every run folder are checked before any training;
  # a ValueError becomes one line and exit status 2 (experiments.cli).
  conv = Convergence(f.output_dir, params_from_flags(f), aggregators=f.aggregators,
                     partitions=f.partitions, dataset=f.dataset, rounds=f.rounds,
                     num_clients=f.num_clients, alpha=f.alpha, local_epochs=f.local_epochs,
                     batch_size=f.batch_size, seed=f.seed, data_dir=f.data_dir)
  conv.prepare()
  conv.run()
  with open(os.path.join(f.output_dir, "convergence.md"), encoding="utf-8") as md:
    print(md.read())
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
  define_flags()
  cli.run(main)
