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

import csv
import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_dlg import io as io_lib
from tf_dlg import validation
from tf_dlg.analysis import figures

FINAL_ROUNDS = 3  # "final accuracy" averages this many last rounds
# Rounds to target (communication cost): the first round whose test accuracy reaches this
# fraction of the undefended cell's final accuracy (mean over seeds). Relative, so one
# rule serves every dataset and aggregator; the table states the target it used.
TARGET_FRACTION = 0.95

CONVERGENCE_FIELDS = (
  "aggregator",
  "partition",
  "defense",
  "label",
  "param",
  "param_source",
  "seeds",
  "rounds",
  "final_test_accuracy",
  "final_low",
  "final_high",
  "cost",
  "cost_low",
  "cost_high",
  "target_accuracy",
  "rounds_to_target",
  "rounds_low",
  "rounds_high",
  "round_cost",
  "round_cost_low",
  "round_cost_high",
  "per_seed_rounds",
  "best_test_accuracy",
  "clipped_fraction",
  "seconds",
  "per_seed",
  "engine",
)
_TEXT_FIELDS = ("aggregator", "partition", "defense", "label", "param_source", "seeds")
_TEXT_FIELDS += ("per_seed", "per_seed_rounds", "engine")
# The federated engines: TFF (tf_dlg.federated) or Flower's simulation engine on Ray
# (tf_dlg.integrations.flower_engine, no TFF); "flower-central-dp" is the latter with the
# `dp` defence as Flower's central DP-FedAvg instead of its LocalDpMod (the TFF `dp`).
ENGINES = ("tff", "flower", "flower-central-dp")
_REQUIRED = ("aggregator", "partition", "defense", "label", "param", "seeds", "per_seed")
_REQUIRED += ("final_test_accuracy", "final_low", "final_high", "cost", "cost_low", "cost_high")
CELL_NAME = "cell.json"
CELL_FORMAT = "tf_dlg.convergence.cell/v2"
# Set per run by the grid, or not part of a convergence run.
_PER_RUN = (
  "partition",
  "aggregator",
  "defense",
  "defense_param",
  "capture_round",
  "capture_client",
)


def read_convergence(path: str) -> List[Dict[str, Any]]:
  """convergence.csv as the rows `Convergence.run` returns (numbers as floats, empty None).

  Raises:
    ValueError: naming the file (and line and column) of a column that convergence.csv
      does not have, a missing one, or a cell that is not a number where one belongs.
  """
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    names = reader.fieldnames or []
    unknown = [n for n in names if n not in CONVERGENCE_FIELDS]
    missing = [n for n in _REQUIRED if n not in names]
    if unknown or missing:
      raise ValueError(
        f"{path} is not a convergence.csv (unknown columns {unknown}, missing {missing})."
      )
    rows = []
    for raw in reader:
      row = {}
      for k in names:
        v = (raw[k] or "").strip()
        if k in _TEXT_FIELDS or not v:
          row[k] = v or None
          continue
        try:
          row[k] = float(v)
        except ValueError:
          where = f"{path}, line {reader.line_num}, column {k!r}"
          raise ValueError(f"{where}: {v!r} is not a number.") from None
      rows.append(row)
  return rows


class CellError(ValueError):
  """A run folder holds a run of another configuration (or of an unknown one)."""


def defense_params_from_thresholds(
  path: str, dataset: str, attack: str = "idlg", kind: str = "plain", reached_only: bool = False
) -> Dict[str, Tuple[float, str]]:
  """{label: (parameter, provenance)} from a thresholds.csv for one dataset.

  `kind="plain"`: the thresholds against `attack`, labelled by defence name.
  `kind="adaptive"`: each defence's protecting setting against its strongest attacker
  (rows of kind `adaptive`): the stronger of its adjusted-SSIM and identification
  thresholds, where an image must pass both; labelled `<defence>@adaptive`. A defence whose threshold was not
  reached takes the strongest value searched, marked as such in the provenance, unless
  `reached_only`: then it is left out (no setting in its range protects, so there is no
  protecting setting to cost). Damaged cells raise ValueError naming file, line, column.
  """
  from tf_dlg.study import records as threshold_search

  validation.check_choice("kind", kind, ("plain", "adaptive"))
  out, unprotected = {}, set()
  rows = threshold_search.read_thresholds(path)
  for r in rows:
    if r["dataset"] != dataset or (r.get("kind") or "plain") != kind:
      continue
    if kind == "plain" and r["attack"] != attack:
      continue
    label = r["defense"] + ("@adaptive" if kind == "adaptive" else "")
    if reached_only and _not_reached(r, kind):
      unprotected.add(label)  # one attacker it does not stop is enough
      continue
    setting = _setting(r, kind)
    # Several attackers of one defence (adaptive): the setting that stops them all.
    if label in out and (setting[0] > out[label][0]) != (r["stronger"] == "higher"):
      continue
    out[label] = setting
  out = {k: v for k, v in out.items() if k not in unprotected}
  if not out and not unprotected:
    available = sorted({(r["dataset"], r.get("kind") or "plain", r["attack"]) for r in rows})
    raise ValueError(
      f"{path} has no {kind} thresholds for dataset={dataset!r}"
      + (f", attack={attack!r}" if kind == "plain" else "")
      + f"; it has (dataset, kind, attack) {available}."
    )
  return out


def _criteria(r: Dict[str, Any], kind: str) -> List[Tuple[str, str]]:
  """[(threshold column, status)] of the leak criteria a row's setting must meet."""
  criteria = [("threshold", r["status"])]
  if kind == "adaptive" and r.get("id_status") not in (None, ""):
    criteria.append(("id_threshold", r["id_status"]))
  return criteria


def _not_reached(r: Dict[str, Any], kind: str) -> bool:
  return any(status == "not_reached" for _, status in _criteria(r, kind))


def _setting(r: Dict[str, Any], kind: str) -> Tuple[float, str]:
  """(parameter, provenance) a thresholds row asks training to use."""
  from tf_dlg.study import records

  higher = r["stronger"] == "higher"
  strongest = r["search_high"] if higher else r["search_low"]
  against = f" vs {r['attack']}" if kind == "adaptive" else ""
  criteria = _criteria(r, kind)
  if _not_reached(r, kind):
    return strongest, f"strongest searched{against} (threshold not reached)"
  if records.attack_untested(r):
    return r["threshold"], f"weakest searched{against} ({records.UNTESTED})"
  values = [r[k] for k, _ in criteria if r[k] is not None]
  value = (max if higher else min)(values)
  both = " under both leak criteria" if len(values) > 1 else ""
  return value, f"{kind} threshold{against}{both} ({r['status']})"


def parse_defense_params(items: Sequence[str]) -> Dict[str, Tuple[float, str]]:
  """`["masking:0.6", "clipping:1.0"]` -> {defence: (value, "given")}; a defence named
  twice is refused (which value was meant cannot be guessed)."""
  out = {}
  for item in items:
    name, sep, value = item.partition(":")
    try:
      if not sep:
        raise ValueError
      number = float(value)
    except ValueError:
      raise ValueError(
        f"--defense_params entry {item!r} must look like NAME:VALUE, e.g. masking:0.6"
      ) from None
    if name.strip() in out:
      raise ValueError(
        f"--defense_params names {name.strip()!r} twice ({out[name.strip()][0]:g} and "
        f"{number:g}); give each defence one value."
      )
    out[name.strip()] = (number, "given")
  return out


def cell_fingerprint(config, dataset_source: str) -> Dict[str, Any]:
  """Everything that fixes a run's numbers: its FederatedConfig and the data's source."""
  fields = dataclasses.asdict(config)
  for k in ("data_dir", "capture_round", "capture_client"):  # do not change the numbers
    fields.pop(k, None)
  fields["dataset_source"] = dataset_source
  return json.loads(io_lib.dumps(fields, sort_keys=True))


def check_cell(run_dir: str, fingerprint: Dict[str, Any]) -> bool:
  """Whether `run_dir` holds (part of) this run; CellError if it holds another one."""
  from tf_dlg.federated import simulation

  path = os.path.join(run_dir, CELL_NAME)
  if not os.path.exists(path):
    found = [
      n
      for n in (simulation.HISTORY_NAME, simulation.CHECKPOINT_NAME)
      if os.path.exists(os.path.join(run_dir, n))
    ]
    if found:
      raise CellError(
        f"{os.path.join(run_dir, found[0])}: a run without {CELL_NAME}, so "
        "its configuration is unknown; it is not reused. Move it away or "
        "use another --output_dir."
      )
    return False
  try:
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
    if stored.get("format") != CELL_FORMAT:
      raise ValueError(f"format={stored.get('format')!r}, expected {CELL_FORMAT!r}")
    config = dict(stored["config"])
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CellError(
      f"{path}: not a readable convergence cell file ({e}); move it away or "
      "use another --output_dir."
    ) from e
  diff = sorted(k for k in set(config) | set(fingerprint) if config.get(k) != fingerprint.get(k))
  if diff:
    raise CellError(
      f"{path}: this run folder holds another configuration (differs in: "
      + ", ".join(f"{k} {config.get(k)!r} there, {fingerprint.get(k)!r} now" for k in diff)
      + "); use another --output_dir, or the flags of that run."
    )
  return True


def claim_cell(run_dir: str, fingerprint: Dict[str, Any]) -> None:
  """Marks `run_dir` as this configuration's (after `check_cell` passed)."""
  path = os.path.join(run_dir, CELL_NAME)
  if not os.path.exists(path):
    text = io_lib.dumps({"format": CELL_FORMAT, "config": fingerprint}, indent=1, sort_keys=True)
    io_lib.atomic_write_text(path, text + "\n")


def defense_of(label: str) -> str:
  """The registry defence of a grid label: `masking` or `masking@adaptive` -> masking."""
  return label.split("@", 1)[0]


def clipped_fraction(history: List[Dict[str, Any]]) -> Optional[float]:
  """Mean over a run's rounds of the fraction of clients clipping changed, or None.

  The history holds what the defence's TFF factory measured in each round (empty for
  a defence that does not clip).
  """
  values = [h["clipped_fraction"] for h in history if h.get("clipped_fraction") is not None]
  return float(np.mean(values)) if values else None


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


def seed_rows(label: str, param, provenance: str, runs) -> Dict[str, Any]:
  """One table row from the per-seed runs [(seed, history, clipped fraction)] of a cell."""
  from tf_dlg.analysis import intervals

  finals = [
    float(np.mean([h["test_accuracy"] for h in hist[-FINAL_ROUNDS:]])) for _, hist, _ in runs
  ]
  iv = intervals.mean_interval(finals)
  clipped = [c for _, _, c in runs if c is not None]
  return {
    "defense": defense_of(label),
    "label": label,
    "param": param,
    "param_source": provenance,
    "seeds": " ".join(str(s) for s, _, _ in runs),
    "rounds": min(len(h) for _, h, _ in runs),
    "final_test_accuracy": iv.estimate,
    "final_low": iv.low,
    "final_high": iv.high,
    "best_test_accuracy": float(np.mean([max(x["test_accuracy"] for x in h) for _, h, _ in runs])),
    "clipped_fraction": float(np.mean(clipped)) if clipped else None,
    "seconds": float(sum(x["seconds"] for _, h, _ in runs for x in h)),
    "per_seed": " ".join(f"{v:.4f}" for v in finals),
  }


def _baseline(rows: List[Dict[str, Any]], row: Dict[str, Any]) -> Dict[str, Any]:
  """The undefended ("none") row of `row`'s (aggregator, partition) cell."""
  cell = (row["aggregator"], row["partition"], "none")
  return next(x for x in rows if (x["aggregator"], x["partition"], x["label"]) == cell)


def add_costs(rows: List[Dict[str, Any]]) -> None:
  """Cost vs no defence: the paired difference (none - defended) over seeds, in place."""
  from tf_dlg.analysis import intervals

  for r in rows:
    none = _baseline(rows, r)
    iv = intervals.paired_difference(
      [float(v) for v in none["per_seed"].split()], [float(v) for v in r["per_seed"].split()]
    )
    r.update(cost=iv.estimate, cost_low=iv.low, cost_high=iv.high)


def rounds_to(history: List[Dict[str, Any]], target: float) -> Optional[int]:
  """The first round (1-based) whose test accuracy reaches `target`, or None."""
  for i, h in enumerate(history):
    if h["test_accuracy"] >= target:
      return i + 1
  return None


def add_rounds_to_target(rows: List[Dict[str, Any]], histories, fraction: float) -> None:
  """Rounds to target per row (in place), paired by seed with the undefended row.

  `histories[(aggregator, partition, label)]` is the list of per-seed histories in seed
  order. A seed that never reaches the target is censored: the row then carries no
  mean or interval (a censored run has no number of rounds), only `per_seed_rounds`
  with "-" for it, which the table prints as "not reached in k/n seeds".
  """
  from tf_dlg.analysis import intervals

  validation.check_number("target fraction", fraction, low=0.0, high=1.0, low_open=True)
  per_row = {}
  for r in rows:
    cell = (r["aggregator"], r["partition"])
    none = _baseline(rows, r)
    target = round(fraction * none["final_test_accuracy"], 4)
    rounds = [rounds_to(h, target) for h in histories[(*cell, r["label"])]]
    per_row[id(r)] = rounds
    r.update(target_accuracy=target, per_seed_rounds=" ".join(str(x or "-") for x in rounds))
    if None not in rounds:
      iv = intervals.mean_interval(rounds)
      r.update(rounds_to_target=iv.estimate, rounds_low=iv.low, rounds_high=iv.high)
  for r in rows:
    none = _baseline(rows, r)
    mine, base = per_row[id(r)], per_row[id(none)]
    if None not in mine and None not in base:
      iv = intervals.paired_difference(mine, base)  # extra rounds the defence costs
      r.update(round_cost=iv.estimate, round_cost_low=iv.low, round_cost_high=iv.high)


def format_rounds(r: Dict[str, Any]) -> str:
  """Rounds to target [95 %], or how many seeds never reached it."""
  per_seed = str(r.get("per_seed_rounds") or "").split()
  if not per_seed:
    return ""
  missed = per_seed.count("-")
  if missed:
    return f"not reached in {missed}/{len(per_seed)} seeds"
  if r.get("rounds_low") is None:
    return ""
  return figures.with_interval(
    float(r["rounds_to_target"]), float(r["rounds_low"]), float(r["rounds_high"]), "{:.1f}"
  )


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


def _table_row(r: Dict[str, Any]) -> List[Any]:
  """One row of convergence.md."""
  return [
    r["aggregator"],
    r["partition"],
    r["label"],
    r["param"],
    r["param_source"],
    figures.with_interval(r["final_test_accuracy"], r["final_low"], r["final_high"]),
    ""
    if r["label"] == "none"
    else figures.with_interval(
      100 * r["cost"], 100 * r["cost_low"], 100 * r["cost_high"], "{:+.1f}"
    ),
    f"{r['target_accuracy']:.3f}",
    format_rounds(r),
    ""
    if r["label"] == "none" or r.get("round_cost") is None
    else figures.with_interval(
      r["round_cost"], r["round_cost_low"], r["round_cost_high"], "{:+.1f}"
    ),
    "" if r["clipped_fraction"] is None else f"{r['clipped_fraction']:.2f}",
  ]


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
    known = sorted({f.name for f in dataclasses.fields(FederatedConfig)} - set(_PER_RUN) - {"seed"})
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
        self.fingerprints[key] = cell_fingerprint(config, dataset.source)
        if self.engine != "tff":  # TFF runs' cell.json stay as they were
          self.fingerprints[key]["engine"] = self.engine
        check_cell(self.run_dir(*key), self.fingerprints[key])
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
      claim_cell(out_dir, self.fingerprints[key])
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

  def train(self, stop: Optional[Callable[[], bool]] = None) -> int:
    """Trains (or resumes) the runs not finished yet, without writing tables.

    `stop()` is asked before each run; True ends the loop there (a run in flight
    finishes). Returns how many runs it trained.
    """
    self.prepare()
    trained = 0
    for key in self.keys():
      if stop is not None and stop():
        break
      if not self._finished(key):
        self._train(key)
        trained += 1
    return trained

  def run(self) -> List[Dict[str, Any]]:
    """Trains (or resumes) every run; writes the table and figure; returns the rows."""
    from tqdm import tqdm

    self.prepare()
    bar = tqdm(total=len(self.configs), desc="convergence", unit="run", disable=not self.progress)
    done = {}
    for key in self.keys():
      bar.set_postfix_str("/".join(map(str, key)))
      history = self._train(key)
      done[key] = (key[3], history, clipped_fraction(history))
      bar.update(1)
    rows = [
      dict(
        aggregator=a,
        partition=p,
        engine=self.engine,
        **seed_rows(label, param, provenance, [done[(a, p, label, s)] for s in self.seeds]),
      )
      for a in self.aggregators
      for label, (param, provenance) in self.defense_params.items()
      for p in self.partitions
      if (a, p) in self.cells_of[label]
    ]
    bar.close()
    add_costs(rows)
    histories = {
      (a, p, label): [done[(a, p, label, s)][1] for s in self.seeds]
      for a in self.aggregators
      for label in self.defense_params
      for p in self.partitions
      if (a, p) in self.cells_of[label]
    }
    add_rounds_to_target(rows, histories, TARGET_FRACTION)
    self.write(rows)
    return rows

  def _curves(self, rows):
    """{(aggregator, partition): {label: [(round, mean, low, high)]}} over seeds."""
    from tf_dlg.analysis import intervals
    from tf_dlg.federated import simulation

    curves = {}
    for r in rows:
      hists = [
        simulation.read_history(
          os.path.join(
            self.run_dir(r["aggregator"], r["partition"], r["label"], s), simulation.HISTORY_NAME
          )
        )
        for s in self.seeds
      ]
      points = []
      for i in range(min(len(h) for h in hists)):
        iv = intervals.mean_interval([h[i]["test_accuracy"] for h in hists])
        points.append((i + 1, iv.estimate, iv.low, iv.high))
      name = r["label"] if r["param"] is None else f"{r['label']} {r['param']:.3g}"
      curves.setdefault((r["aggregator"], r["partition"]), {})[name] = points
    return curves

  def write(self, rows: List[Dict[str, Any]]) -> None:
    """convergence.csv, convergence.md and figures/convergence.png."""
    from tf_dlg.analysis import figures
    from tf_dlg.study import records as threshold_search

    threshold_search.write_csv(
      os.path.join(self.output_dir, "convergence.csv"), CONVERGENCE_FIELDS, rows
    )
    seeds = ", ".join(map(str, self.seeds))
    figures.accuracy_panel(
      self._curves(rows),
      os.path.join(self.output_dir, "figures", "convergence.png"),
      title=f"FedAvg test accuracy, mean and 95 % band over seeds {seeds} ({self.dataset})"
      + (f"; {figures.NO_INTERVAL}" if len(self.seeds) == 1 else ""),
      footer=f"data: {self.dataset_source}",
      panel_order=[(a, p) for a in self.aggregators for p in self.partitions],
    )
    table = [_table_row(r) for r in rows]
    text = (
      f"# Convergence with defences at their thresholds\n\n"
      f"FedAvg on `{self.dataset}` ({self.dataset_source}), engine `{self.engine}`, "
      f"{self.base.num_clients} clients, {self.rounds} rounds, seeds {seeds} "
      f"(n={len(self.seeds)}). Final accuracy: mean of the last {FINAL_ROUNDS} rounds, "
      "mean [95 % t interval] over seeds; cost: accuracy without defence minus with "
      "it, paired by seed, in points [95 % t interval]. Rounds to target: the first "
      f"round reaching {TARGET_FRACTION:g} x the undefended cell's final accuracy "
      "(mean [95 % t interval] over seeds); extra rounds: defended minus undefended, "
      "paired by seed. Clipped: fraction of client "
      "updates that clipping changed."
      + (f" One seed: point estimates ({figures.NO_INTERVAL})." if len(self.seeds) == 1 else "")
      + "\n\n"
      + figures.markdown_table(
        [
          "aggregator",
          "clients",
          "defence",
          "parameter",
          "from",
          "final acc. [95 %]",
          "cost pp [95 %]",
          "target",
          "rounds to target [95 %]",
          "extra rounds [95 %]",
          "clipped",
        ],
        table,
      )
      + "\n![convergence](figures/convergence.png)\n"
    )
    io_lib.atomic_write_text(os.path.join(self.output_dir, "convergence.md"), text)
