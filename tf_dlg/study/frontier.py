"""The privacy-utility frontier: per defence and setting, who is identified and what it costs.

For each defence (by default `tf_dlg.study.defense_table.PAPER_DEFENSES`) at the settings
of its `frontier` grid (`tf_dlg.study.defense_table`, weakest to strongest), and for DP
points (the `dp` defence at several noise multipliers), two measurements on the same dataset:

* **privacy**: the top-1 identification rate against the defence's strongest attackers
  (`DefenseRow.strongest_attackers`; an image counts as identified if any of them picks
  its original among all the dataset's images), over `num_images` images, with the exact
  Clopper-Pearson interval. The attacks run through `ThresholdSearch` (its per-image run
  log in `<output_dir>/identification/`), so a rerun reuses every attacked point.
* **utility**: the accuracy cost at convergence, FedAvg with mean aggregation on IID
  clients (`Convergence`, run store in `<output_dir>/convergence/`) on the settings'
  `engine`: TFF, or Flower's simulation engine on Ray (`tf_dlg.integrations.flower_engine`,
  no TFF); final accuracy (mean of the last rounds) paired by seed with the undefended
  baseline, t intervals. Labels are `<defence>@<setting>`, so a changed grid reuses the
  settings it keeps; a run folder of the other engine is refused.

DP points: the `dp` defence is tensorflow-privacy's Gaussian query on each client's
update (clip to norm 1, Gaussian noise of multiplier x 1). Its epsilon is the worst case
for the attacked client: the attacker sees that client's clipped, noised update alone (not
the sum over the round's clients, which would carry sqrt(clients) times more noise), once
per round it takes part; `dp_fedavg_epsilon` accounts those rounds at the training's
sampling rate (clients per round / clients) with dp-accounting's RDP accountant. The
Flower engine trains them with Flower's `LocalDpMod` (`flower_engine.DP_MECHANISMS`,
"local"): the same clip and noise on each client's update, so the same epsilon.

Outputs in `output_dir` (each names the engine that trained): `frontier.csv` (one
`tf_dlg.study.frontier_points.FrontierPoint` per row, its `engine` column),
`frontier.md` (the table, `tf_dlg.study.frontier_report`) and `figures/frontier.png`;
`frontier_report.claims_row` answers "at equal protection, which defence costs least, and
does any beat DP?" from the points.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tf_dlg import defenses as defense_registry
from tf_dlg import io as io_lib
from tf_dlg import validation
from tf_dlg.attacks.runner import AttackConfig
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.study import defense_table, frontier_report, matching, presets
from tf_dlg.study.frontier_points import DP, FrontierPoint, write_frontier

FRONTIER_ENGINES = ("tff", "flower")
# What the DP points need beside the engine: the `dp` defence the attacks face
# (tensorflow-privacy's Gaussian query) and its epsilon (dp-accounting).
_DP_MODULES = ("tensorflow_privacy", "dp_accounting")
_WHOLE = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class FrontierSettings:
  """What a frontier run measures; every field is checked when it is built.

  Attributes:
    dataset: Attacked and trained on (`tf_dlg.data.DATASETS`).
    defenses: Defences with a search range; each at `grids[name]` or its row's frontier.
    grids: {defence: settings} overriding the row's frontier grid.
    dp_multipliers: Noise multipliers of the DP points (> 0); () = no DP points.
    num_images: Images attacked per setting.
    iterations, restarts: The attack optimiser's iterations and seeded starts.
    seeds: Training seeds (at least 2: the cost intervals are t intervals over them).
    rounds, num_clients, local_epochs, batch_size, client_lr: FedAvg training
      (`FederatedConfig`'s defaults unless given).
    train_examples, test_examples: A seeded subset of the dataset, or None (all).
    delta: The DP points' delta.
    seed: Seeds image choice, attack model, defence randomness and attack starts.
    data_dir: tfds data directory.
    engine: The federated engine that trains: "tff" or "flower" (Flower's simulation
      engine on Ray, no TFF; its DP points train with Flower's `LocalDpMod`).
  """

  dataset: str = "mnist"
  defenses: Tuple[str, ...] = defense_table.PAPER_DEFENSES
  grids: Optional[Dict[str, Tuple[float, ...]]] = None
  dp_multipliers: Tuple[float, ...] = defense_table.row(DP).frontier
  # 0 of 8 identified still allows a rate up to 0.37; attacks cost little beside training.
  num_images: int = 16
  iterations: int = 500
  restarts: int = AttackConfig.restarts
  seeds: Tuple[int, ...] = (0, 1, 2)
  rounds: int = 15
  num_clients: int = FederatedConfig.num_clients
  local_epochs: int = FederatedConfig.local_epochs
  batch_size: int = FederatedConfig.batch_size
  client_lr: float = FederatedConfig.client_lr
  train_examples: Optional[int] = presets.PRESETS["quick"].train_examples
  test_examples: Optional[int] = presets.PRESETS["quick"].test_examples
  delta: float = 1e-5
  seed: int = FederatedConfig.seed
  data_dir: Optional[str] = None
  engine: str = presets.Preset.engine

  def __post_init__(self):
    from tf_dlg import data

    validation.check_choice("dataset", self.dataset, data.DATASETS)
    # Not flower-central-dp: its DP noise is not what the DP points' attacker sees.
    validation.check_choice("engine", self.engine, FRONTIER_ENGINES)
    if not self.defenses and not self.dp_multipliers:
      raise ValueError("defenses and dp_multipliers are both empty: nothing to measure.")
    validation.check_choices("defenses", self.defenses, defense_table.PARAMETER_SEARCH)
    if DP in self.defenses:
      raise ValueError(f"defenses lists {DP!r}; give its noise multipliers as dp_multipliers.")
    unknown = sorted(set(self.grids or {}) - set(self.defenses))
    if unknown:
      raise ValueError(f"grids names {unknown}, which are not in defenses {self.defenses}.")
    labels = [label(d, p) for d, p in self.settings()]  # checks every grid
    if len(set(labels)) != len(labels):
      raise ValueError(f"settings repeat on the frontier: {labels}; give distinct values.")
    for z in self.dp_multipliers:
      validation.check_number("dp_multipliers", z, 0, math.inf, low_open=True, high_open=True)
    lacking = [m for m in _DP_MODULES if importlib.util.find_spec(m) is None]
    if self.dp_multipliers and lacking:
      raise ValueError(
        f"dp_multipliers={list(self.dp_multipliers)}: DP points need {' and '.join(lacking)} "
        "(the attacked update's DP and its epsilon; the `tff` extra), which this environment "
        "lacks; pass dp_multipliers=() (--dp_multipliers=) for a frontier without DP points."
      )
    seeds = [validation.check_int("seeds", s, 0) for s in self.seeds]
    if len(set(seeds)) < 2 or len(set(seeds)) != len(seeds):
      raise ValueError(f"seeds={list(self.seeds)} must be at least 2 distinct seeds.")
    for name in ("num_images", "iterations", "restarts", "rounds", "num_clients", "batch_size"):
      validation.check_int(name, getattr(self, name), 1)
    validation.check_number("client_lr", self.client_lr, 0, math.inf, low_open=True)
    validation.check_number("delta", self.delta, 0, 1, low_open=True, high_open=True)

  def grid(self, name: str) -> Tuple[float, ...]:
    """The settings of `name`, weakest first; ValueError if it has none or a bad one."""
    values = tuple((self.grids or {}).get(name) or defense_table.row(name).frontier)
    if not values:
      raise ValueError(f"defence {name!r} has no frontier grid; give grids={{{name!r}: (...)}}.")
    for v in values:
      defense_registry.get_defense(name, v)  # the defence's own range check
    return values

  def settings(self) -> List[Tuple[str, float]]:
    """Every (defence, setting) on the frontier, DP points last."""
    out = [(d, float(v)) for d in self.defenses for v in self.grid(d)]
    return out + [(DP, float(z)) for z in self.dp_multipliers]


def label(defense: str, param: float) -> str:
  """The convergence label of a frontier setting, e.g. `masking@0.99`."""
  return f"{defense}@{param:g}"


class Frontier:
  """Runs (and resumes) a frontier: identification, then training; see the module doc."""

  def __init__(self, output_dir: str, settings: FrontierSettings, progress: bool = True):
    from tf_dlg.study import convergence, threshold_search

    self.output_dir = validation.check_output_dir("output_dir", output_dir)
    self.settings, self.progress = settings, progress
    st = settings
    names = sorted({d for d, _ in st.settings()})
    self.search = threshold_search.ThresholdSearch(
      os.path.join(output_dir, "identification"),
      datasets=[st.dataset],
      attacks=(),
      defenses=names,
      data_dir=st.data_dir,
      progress=False,
      num_images=st.num_images,
      iterations=st.iterations,
      restarts=st.restarts,
      seed=st.seed,
      adaptive=True,  # attacks come from each defence's strongest attackers
    )
    self.convergence = convergence.Convergence(
      os.path.join(output_dir, "convergence"),
      {label(d, p): (p, "frontier grid") for d, p in st.settings()},
      aggregators=("mean",),
      partitions=("iid",),
      seeds=st.seeds,
      subsets=_subsets(st),
      progress=progress,
      dataset=st.dataset,
      rounds=st.rounds,
      num_clients=st.num_clients,
      local_epochs=st.local_epochs,
      batch_size=st.batch_size,
      client_lr=st.client_lr,
      data_dir=st.data_dir,
      engine=st.engine,
    )

  def identification(self) -> Dict[Tuple[str, Optional[float]], Dict[str, Any]]:
    """{(defence, setting): `matching.MEASURES`} against its strongest attackers (and
    undefended)."""
    from tqdm import tqdm

    st, out = self.settings, {}
    todo = st.settings()
    bar = tqdm(todo, desc="frontier attacks", unit="setting", disable=not self.progress)
    for defense, param in bar:
      bar.set_postfix_str(f"{defense} {param:g}")
      attackers = defense_table.row(defense).strongest_attackers
      out[(defense, param)] = self.search.measures(st.dataset, attackers, defense, param)
      out[(defense, None)] = self.search.measures(st.dataset, attackers, "none", None)
    bar.close()
    self.search.release()
    return out

  def run(self) -> List[FrontierPoint]:
    """Attacks, trains, writes frontier.csv / .md and the figure; returns the points."""
    self.convergence.prepare()  # refuses foreign run folders before any work
    rates = self.identification()
    rows = {r["label"]: r for r in self.convergence.run()}
    if self.settings.engine != "tff":
      from tf_dlg.integrations import flower_engine

      flower_engine.shutdown()  # Ray's processes end with the training
    points = [self._point(d, p, rates, rows) for d, p in self.settings.settings()]
    self.write(points)
    return points

  def _point(self, defense, param, rates, rows) -> FrontierPoint:
    st, m, r = self.settings, rates[(defense, param)], rows[label(defense, param)]
    base, dp_point = rows["none"], defense == DP
    epsilon = None
    if dp_point:
      epsilon = defense_registry.dp_fedavg_epsilon(
        param, st.num_clients, st.num_clients, st.rounds, st.delta
      )
    return FrontierPoint(
      defense=defense,
      label=label(defense, param),
      param=param,
      unit=defense_registry.DEFENSES[defense].param_name,
      attackers="+".join(defense_table.row(defense).strongest_attackers),
      dataset=st.dataset,
      num_images=m["num_images"],
      identified=_count(m["top1"], m["num_images"]),
      top1=m["top1"],
      top1_low=m["top1_low"],
      top1_high=m["top1_high"],
      undefended_identified=_count(rates[(defense, None)]["top1"], m["num_images"]),
      seeds=r["seeds"],
      rounds=int(r["rounds"]),
      final_accuracy=r["final_test_accuracy"],
      final_low=r["final_low"],
      final_high=r["final_high"],
      cost=r["cost"],
      cost_low=r["cost_low"],
      cost_high=r["cost_high"],
      baseline_accuracy=base["final_test_accuracy"],
      baseline_low=base["final_low"],
      baseline_high=base["final_high"],
      epsilon=epsilon,
      delta=st.delta if dp_point else None,
      engine=st.engine,
      **{k: m[k] for k in _MEASURED},
    )

  def write(self, points: Sequence[FrontierPoint]) -> None:
    """frontier.csv, frontier.md and figures/frontier.png."""
    from tf_dlg.analysis import frontier_figure

    write_frontier(os.path.join(self.output_dir, "frontier.csv"), points)
    source = self.convergence.dataset_source or self.settings.dataset
    io_lib.atomic_write_text(
      os.path.join(self.output_dir, "frontier.md"),
      frontier_report.frontier_markdown(points, source),
    )
    frontier_figure.plot_frontier(
      points,
      os.path.join(self.output_dir, "figures", "frontier.png"),
      title=f"Privacy-utility frontier ({self.settings.dataset}, FedAvg mean, IID)",
      footer=f"data: {source}; engine: {self.settings.engine}",
    )


def _subsets(st: FrontierSettings) -> Optional[Tuple[int, int]]:
  """Convergence's (train, test) subset; a split given as None stays whole (a subset
  larger than the split is the split)."""
  if not (st.train_examples or st.test_examples):
    return None
  return (st.train_examples or _WHOLE, st.test_examples or _WHOLE)


def _count(rate: float, n: int) -> int:
  return int(round(rate * n))


# The measures beside the top-1 rate (`matching.MEASURES` after top1 / low / high).
_MEASURED = matching.MEASURES[3:]


def run_frontier(
  output_dir: str, settings: Optional[FrontierSettings] = None, progress: bool = True, **parts
) -> List[FrontierPoint]:
  """Runs (or resumes) the frontier in `output_dir`; returns its points.

  `parts` are `FrontierSettings` fields (dataset, defenses, grids, dp_multipliers,
  num_images, iterations, seeds, rounds, train_examples, test_examples, ...) replacing
  those of `settings` (default: `FrontierSettings()`); all are checked before any work.
  """
  unknown = sorted(set(parts) - set(FRONTIER_SETTING_NAMES))
  if unknown:
    raise ValueError(
      f"unknown frontier settings {unknown}; expected some of {FRONTIER_SETTING_NAMES}."
    )
  # Built once, with `parts`: the defaults alone may not hold here (DP points' modules).
  st = FrontierSettings(**parts) if settings is None else dataclasses.replace(settings, **parts)
  return Frontier(output_dir, st, progress).run()


FRONTIER_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(FrontierSettings))
