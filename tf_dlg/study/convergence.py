r"""Experiment 2: what each defence at its threshold costs FedAvg in accuracy.

FedAvg in TFF (`tf_dlg.federated`) with no defence and with each defence at the
threshold found by the threshold search (`tf_dlg.study.threshold_search`) (read from its `thresholds.csv`, or
given with `--defense_params`), for `mean` and coordinate-wise `median` aggregation, on
IID and non-IID clients, each cell with several seeds (`--seeds`): the paper's Figure 5
as a 2x2 panel of mean test-accuracy curves with a 95 % band over seeds, and a table of
final accuracy (mean of the last 3 rounds; mean [95 % t interval] over seeds) and the
cost versus no defence (the paired difference over seeds, with its t interval).

Each (cell, seed) lives in `runs/<aggregator>_<partition>_<label>/seed<k>/` with its own
`history.csv`, checkpoint and `cell.json` (its full configuration: dataset and data
source, defence and parameter, seed, rounds, clients, ...), so an interrupted experiment
resumes run by run and round by round. A folder whose `cell.json` differs (another seed
included), or a run folder without one, is refused before any training with an error
naming the file and the differing keys: it is never reused, and never overwritten.

Units. Clipping norms and noise standard deviations (`clipping`, `noising`) are absolute
and do not transfer from single-image gradients of the attack model to FedAvg deltas of
the training model (clipping at the attack's threshold is a no-op in training). The
relative units `clipping_ratio` (clip to ratio x the client update's own norm, the very
transform the threshold search measured) and `noising_ratio` (noise std = ratio x the
update's RMS) apply the same relative setting on the training model. `clipping_median`
(clip every client to ratio x the round's median client norm) exists only in training:
give it with `--defense_params=clipping_median:RATIO`. The table reports the fraction of
client updates that clipping changed (`clipped`, from each run's history). Labels `name@tag` (e.g. `masking@adaptive`) train a defence at a
second setting, such as its adaptive threshold (`--thresholds_kind=adaptive`).

Outputs: runs/*/seed*/history.csv, convergence.csv, convergence.md,
figures/convergence.png.

Example:
  python -m experiments.convergence --thresholds=/tmp/thr/thresholds.csv \
      --dataset=mnist --train_examples=2000 --seeds=0,1,2 --rounds=10 \
      --output_dir=/tmp/conv
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_dlg import validation
from tf_dlg.study import convergence_report, convergence_stats, run_store
from tf_dlg.study.defense_params import defense_of

# The federated engines: TFF (tf_dlg.federated) or Flower's simulation engine on Ray
# (tf_dlg.integrations.flower_engine, no TFF); "flower-central-dp" is the latter with the
# `dp` defence as Flower's central DP-FedAvg instead of its LocalDpMod (the TFF `dp`).
ENGINES = ("tff", "flower", "flower-central-dp")
# Set per run by the grid, or not part of a convergence run.
_PER_RUN = (
  "partition",
  "aggregator",
  "defense",
  "defense_param",
  "capture_round",
  "capture_client",
)


def shared_settings(config) -> Dict[str, Any]:
  """The fields of a `FederatedConfig` that every run of a grid shares (its `**config`):
  all but the ones the grid sets per run, and the seed."""
  return {
    f.name: getattr(config, f.name)
    for f in dataclasses.fields(config)
    if f.name not in _PER_RUN + ("seed",)
  }


def subset(dataset, train_examples, test_examples, seed: int):
  """A seeded subset of the training and test images (None keeps a split whole)."""
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in (("train", train_examples), ("test", test_examples)):
    x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
    if n and x is not None and n < len(x):
      idx = np.sort(rng.choice(len(x), int(n), replace=False))
      out.update({f"x_{split}": x[idx], f"y_{split}": y[idx]})
  if not out:
    return dataset
  source = (
    f"{dataset.source}; seeded subset (seed {seed}) of "
    f"{len(out.get('x_train', dataset.x_train))} train / "
    f"{len(out.get('x_test', dataset.x_test))} test images"
  )
  return dataclasses.replace(dataset, source=source, **out)


def _check_lists(aggregators, partitions) -> None:
  from tf_dlg import data
  from tf_dlg.federated import AGGREGATORS

  for name, values, allowed in (
    ("aggregators", aggregators, AGGREGATORS),
    ("partitions", partitions, data.PARTITION_SCHEMES),
  ):
    if not values:
      raise ValueError(f"{name} is empty; expected some of {', '.join(allowed)}.")
    validation.check_choices(name, values, allowed)


class Convergence:
  """Runs (and resumes) the convergence grid; see the module docstring.

  Args:
    output_dir: Results directory (resumed if it holds runs of this configuration).
    defense_params: {label: (parameter, provenance)}; a label is a defence name or
      `name@tag` (e.g. `masking@adaptive`) to train one defence at several settings;
      "none" is always added.
    aggregators: Subset of mean, median, trimmed_mean.
    partitions: e.g. ("iid", "dirichlet").
    seeds: The seeds every cell runs with (paired across defences).
    subsets: (train images, test images) of a seeded subset of the dataset, or None.
    progress: Show a progress bar.
    **config: `tf_dlg.federated.FederatedConfig` fields shared by every run (dataset,
      rounds, num_clients, alpha, local_epochs, batch_size, data_dir, model, ...); its
      defaults fill the rest. `engine="flower"` trains with Flower's simulation engine
      on Ray instead of TFF (`tf_dlg.integrations.flower_engine`); the engine is
      recorded in every row and in each Flower run's cell.json (runs never mix).
  """

  def __init__(
    self,
    output_dir: str,
    defense_params: Dict[str, Tuple[float, str]],
    aggregators: Sequence[str] = ("mean", "median"),
    partitions: Sequence[str] = ("iid", "dirichlet"),
    seeds: Sequence[int] = (0,),
    subsets: Optional[Tuple[int, int]] = None,
    progress: bool = True,
    **config,
  ):
    from tf_dlg import defenses
    from tf_dlg.federated.config import FederatedConfig

    _check_lists(aggregators, partitions)
    self.engine = validation.check_choice("engine", config.pop("engine", "tff"), ENGINES)
    self.seeds = [validation.check_int("seeds", s, 0) for s in seeds]
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"seeds={list(seeds)} must be distinct and at least one.")
    self.subsets = tuple(validation.check_int("subsets", n, 1) for n in subsets or ())
    known = sorted(shared_settings(FederatedConfig()))
    unknown = sorted(set(config) - set(known))
    if unknown:
      raise ValueError(f"unknown simulation settings {unknown}; expected some of {known}.")
    validation.check_choices(
      "defense_params",
      [defense_of(k) for k in defense_params],
      [d for d in defenses.DEFENSES if d != "none"],
    )
    self.defense_params = {"none": (None, "no defence"), **defense_params}
    self.aggregators, self.partitions = list(aggregators), list(partitions)
    every = [(a, p) for a in self.aggregators for p in self.partitions]
    self.cells_of = {label: every for label in self.defense_params}
    # The settings every run shares: FederatedConfig's defaults, then `config`.
    self.base = dataclasses.replace(FederatedConfig(), **config)
    self.dataset, self.rounds = self.base.dataset, self.base.rounds
    self.progress, self.dataset_source = progress, None
    # Every run's settings are checked now (their own one-line ValueErrors), before work.
    self.configs = {
      (a, p, label, s): dataclasses.replace(
        self.base,
        partition=p,
        aggregator=a,
        defense=defense_of(label),
        defense_param=param,
        seed=s,
      )
      for a in self.aggregators
      for label, (param, _) in self.defense_params.items()
      for p in self.partitions
      for s in self.seeds
    }
    self.output_dir = validation.check_output_dir("output_dir", output_dir)
    self._dataset, self.fingerprints = None, {}

  def __getstate__(self):
    # A copy in another process (`beside.training`) loads and checks the data itself.
    return dict(self.__dict__, _dataset=None, fingerprints={})

  def run_dir(self, aggregator, partition, label, seed):
    return os.path.join(self.output_dir, "runs", f"{aggregator}_{partition}_{label}", f"seed{seed}")

  def confine(self, cells_of: Dict[str, Sequence[Tuple[str, str]]]) -> "Convergence":
    """Trains each label of `cells_of` only in its (aggregator, partition) cells.

    The rest train in every cell; "none", every cost's baseline, always does.
    """
    every = [(a, p) for a in self.aggregators for p in self.partitions]
    labels = [k for k in self.defense_params if k != "none"]
    for label, cells in cells_of.items():
      validation.check_choices("cells_of", [label], labels)
      validation.check_choices(f"cells_of[{label}]", [tuple(c) for c in cells], every)
      self.cells_of[label] = [tuple(c) for c in cells]
    self.configs = {k: v for k, v in self.configs.items() if k[:2] in self.cells_of[k[2]]}
    return self

  def prepare(self):
    """Loads the data and checks every run folder (CellError) before any training."""
    if self._dataset is None:
      from tf_dlg import data

      dataset = data.load_dataset(self.dataset, data_dir=self.base.data_dir)
      if self.subsets:
        dataset = subset(dataset, *self.subsets, seed=0)
      for key, config in self.configs.items():
        config.validate(len(dataset.x_train))
        self.fingerprints[key] = run_store.cell_fingerprint(config, dataset.source)
        if self.engine != "tff":  # TFF runs' cell.json stay as they were
          self.fingerprints[key]["engine"] = self.engine
        run_store.check_cell(self.run_dir(*key), self.fingerprints[key])
      self._dataset, self.dataset_source = dataset, dataset.source
    return self._dataset

  def _finished(self, key) -> bool:
    from tf_dlg.federated import simulation

    path = os.path.join(self.run_dir(*key), simulation.HISTORY_NAME)
    return os.path.exists(path) and len(simulation.read_history(path)) >= self.rounds

  def _train(self, key):
    """Trains (or resumes) one (cell, seed) run; returns its history."""
    from tf_dlg.federated import simulation

    out_dir, config = self.run_dir(*key), self.configs[key]
    history_path = os.path.join(out_dir, simulation.HISTORY_NAME)
    if not self._finished(key):
      run_store.claim_cell(out_dir, self.fingerprints[key])
      if self.engine != "tff":
        from tf_dlg.integrations import flower_engine

        mechanism = "central" if self.engine == "flower-central-dp" else "local"
        flower_engine.run_simulation(
          config, out_dir, dataset=self._dataset, progress=False, dp_mechanism=mechanism
        )
        return simulation.read_history(history_path)
      # Seeds, defence parameters and partitions are runtime inputs: one TFF build per
      # aggregator x defence, reused across its cells (`build_fedavg(reuse=True)`).
      built = simulation.build_for_config(config, self._dataset)
      simulation.run_simulation(
        config, out_dir, dataset=self._dataset, fedavg=built, progress=False
      )
    return simulation.read_history(history_path)

  def keys(self) -> List[Tuple[str, str, str, int]]:
    """Every run's (aggregator, partition, label, seed), in training order."""
    return [
      (aggregator, partition, label, seed)
      for aggregator in self.aggregators
      for label in self.defense_params
      for seed in self.seeds
      for partition in self.partitions
      if (aggregator, partition, label, seed) in self.configs
    ]

  def train(self, stop: Optional[Callable[[], bool]] = None, from_end: bool = False) -> int:
    """Trains (or resumes) the runs not finished yet, without writing tables.

    A run another process is training is skipped (`run_store.hold`), so two processes
    can share the grid, best from opposite ends (`from_end`: in reverse order). `stop()`
    is asked before each run; True ends the loop there (a run in flight finishes).
    Returns how many runs it trained.
    """
    self.prepare()
    keys = self.keys()
    trained = 0
    for key in reversed(keys) if from_end else keys:
      if stop is not None and stop():
        break
      trained += self._train_unheld(key)
    return trained

  def _train_unheld(self, key) -> bool:
    """Trains `key` unless it is finished or another process holds it; whether it did."""
    if self._finished(key):
      return False
    with run_store.hold(self.run_dir(*key), wait=False) as held:
      if held and not self._finished(key):
        self._train(key)
        return True
    return False

  def run(self) -> List[Dict[str, Any]]:
    """Trains (or resumes) every run; writes the table and figure; returns the rows."""
    from tqdm import tqdm

    self.prepare()
    bar = tqdm(total=len(self.configs), desc="convergence", unit="run", disable=not self.progress)

    # A process beside this one (`tf_dlg.study.beside`) may train the grid from the
    # front: this one trains from the end, then waits for each run the other holds.
    finished = set()

    def show(key):  # finished runs, whichever process trained them (a finished one stays)
      finished.update(k for k in self.configs if k not in finished and self._finished(k))
      bar.n = len(finished)
      bar.set_postfix_str("/".join(map(str, key)))

    for key in reversed(self.keys()):
      show(key)
      self._train_unheld(key)
    done = {}
    for key in self.keys():
      show(key)
      with run_store.hold(self.run_dir(*key), wait=True):
        history = self._train(key)  # reads a finished run; trains one the other left
      done[key] = (key[3], history, convergence_stats.clipped_fraction(history))
    bar.n = len(self.configs)
    bar.refresh()
    cells = [
      (a, p, label)
      for a in self.aggregators
      for label in self.defense_params
      for p in self.partitions
      if (a, p) in self.cells_of[label]
    ]
    rows = [
      dict(
        aggregator=a,
        partition=p,
        engine=self.engine,
        **convergence_stats.seed_rows(
          label, *self.defense_params[label], [done[(a, p, label, s)] for s in self.seeds]
        ),
      )
      for a, p, label in cells
    ]
    bar.close()
    convergence_stats.add_costs(rows)
    histories = {cell: [done[(*cell, s)][1] for s in self.seeds] for cell in cells}
    convergence_stats.add_rounds_to_target(rows, histories, convergence_stats.TARGET_FRACTION)
    self.write(rows)
    return rows

  def write(self, rows: List[Dict[str, Any]]) -> None:
    """convergence.csv, convergence.md and figures/convergence.png."""
    from tf_dlg.federated import simulation

    histories = {
      (r["aggregator"], r["partition"], r["label"]): [
        simulation.read_history(
          os.path.join(
            self.run_dir(r["aggregator"], r["partition"], r["label"], s), simulation.HISTORY_NAME
          )
        )
        for s in self.seeds
      ]
      for r in rows
    }
    convergence_report.write_report(self, rows, convergence_stats.accuracy_curves(rows, histories))
