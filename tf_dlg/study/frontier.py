"""The privacy-utility frontier: per defence and setting, who is identified and what it costs.

For each defence a preset trains (`convergence_defenses`, by default
`tf_dlg.study.defense_table.PAPER_DEFENSES`) at the settings of its `frontier` grid
(`tf_dlg.study.defense_table`, weakest to strongest), and for DP points (the `dp` defence
at several noise multipliers), two measurements on the same dataset:

* **privacy**: the top-1 identification rate against the defence's strongest attackers
  (`DefenseRow.strongest_attackers`; an image counts as identified if any of them picks
  its original among all the dataset's images), over `frontier_images` images, with the exact
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

import importlib.util
import math
import os
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tf_dlg import defenses as defense_registry
from tf_dlg import io as io_lib
from tf_dlg import validation
from tf_dlg.study import beside, defense_table, frontier_report, matching
from tf_dlg.study.fields import path
from tf_dlg.study.frontier_points import DP, FrontierPoint, write_frontier
from tf_dlg.study.presets import Preset

FRONTIER_ENGINES = ("tff", "flower")
# What the DP points need beside the engine: the `dp` defence the attacks face
# (tensorflow-privacy's Gaussian query) and its epsilon (dp-accounting).
_DP_MODULES = ("tensorflow_privacy", "dp_accounting")
_WHOLE = 2**31 - 1


# A frontier reads its settings from a `tf_dlg.study.presets.Preset`: it attacks and trains
# on `convergence_dataset`, `frontier_images` images per setting, the preset's attack budget
# (`iterations` for that dataset, `restarts`, `seed`) and its training (`seed_list()`,
# `rounds`, `num_clients`, `local_epochs`, `batch_size`, `client_lr`, `train_examples`,
# `test_examples`, `data_dir`, `engine`: "tff", or "flower", Flower's simulation engine on
# Ray, no TFF, whose DP points train with Flower's `LocalDpMod`). Its defences are the
# trained ones (`convergence_defenses`), each at `frontier_grids[name]` or its row's
# frontier grid; its DP points are at `dp_multipliers` (None: the `dp` row's frontier grid;
# () = no DP points), with delta `dp_delta`.


def defenses(preset: Preset) -> Tuple[str, ...]:
  """The frontier's defences: the preset's trained ones, DP aside (its points are the
  `dp_multipliers`)."""
  return tuple(d for d in preset.convergence_defenses if d != DP)


def dp_multipliers(preset: Preset) -> Tuple[float, ...]:
  """The noise multipliers of the DP points (None: the `dp` row's frontier grid)."""
  if preset.dp_multipliers is None:
    return tuple(defense_table.row(DP).frontier)
  return tuple(preset.dp_multipliers)


def iterations(preset: Preset) -> int:
  """The attack's iterations on the frontier's dataset (`convergence_dataset`)."""
  its, dataset = preset.iterations, preset.convergence_dataset
  if isinstance(its, Mapping):
    if dataset not in its:
      raise ValueError(
        f"{path('iterations')} has no entry for {path('convergence_dataset')} {dataset!r} "
        f"(it has {sorted(its)}); give one number of iterations."
      )
    its = its[dataset]
  return its


def grid(preset: Preset, name: str) -> Tuple[float, ...]:
  """The settings of `name`, weakest first; ValueError if it has none or a bad one."""
  values = tuple((preset.frontier_grids or {}).get(name) or defense_table.row(name).frontier)
  if not values:
    raise ValueError(
      f"defence {name!r} has no frontier grid; give {path('frontier_grids')}={{{name!r}: (...)}}."
    )
  for v in values:
    defense_registry.get_defense(name, v)  # the defence's own range check
  return values


def settings(preset: Preset) -> List[Tuple[str, float]]:
  """Every (defence, setting) on the frontier, DP points last."""
  out = [(d, float(v)) for d in defenses(preset) for v in grid(preset, d)]
  return out + [(DP, float(z)) for z in dp_multipliers(preset)]


def check(preset: Preset) -> Preset:
  """The preset, its frontier settings checked (one ValueError naming the field's path,
  `study.<field>`); no data loaded."""
  from tf_dlg import data

  its, names, multipliers = iterations(preset), defenses(preset), dp_multipliers(preset)
  validation.check_choice(path("convergence_dataset"), preset.convergence_dataset, data.DATASETS)
  # Not flower-central-dp: its DP noise is not what the DP points' attacker sees.
  validation.check_choice(path("engine"), preset.engine, FRONTIER_ENGINES)
  if not names and not multipliers:
    raise ValueError(
      f"{path('convergence_defenses')} and {path('dp_multipliers')} are both empty: "
      "nothing to measure."
    )
  validation.check_choices(path("convergence_defenses"), names, defense_table.PARAMETER_SEARCH)
  unknown = sorted(set(preset.frontier_grids or {}) - set(names))
  if unknown:
    raise ValueError(
      f"{path('frontier_grids')} names {unknown}, which are not in defenses {names}."
    )
  labels = [label(d, p) for d, p in settings(preset)]  # checks every grid
  if len(set(labels)) != len(labels):
    raise ValueError(f"settings repeat on the frontier: {labels}; give distinct values.")
  for z in multipliers:
    validation.check_number(path("dp_multipliers"), z, 0, math.inf, low_open=True, high_open=True)
  lacking = [m for m in _DP_MODULES if importlib.util.find_spec(m) is None]
  if multipliers and lacking:
    raise ValueError(
      f"{path('dp_multipliers')}={list(multipliers)}: DP points need "
      f"{' and '.join(lacking)} (the attacked update's DP and its epsilon; the `tff` "
      "extra), which this environment lacks; give no DP noise multipliers (empty) for a "
      "frontier without DP points."
    )
  seeds = [validation.check_int(path("seeds"), s, 0) for s in preset.seed_list()]
  if len(set(seeds)) < 2:
    raise ValueError(f"{path('seeds')}={seeds} must be at least 2 distinct seeds.")
  for name, value in (
    ("frontier_images", preset.frontier_images),
    ("iterations", its),
    ("restarts", preset.restarts),
    ("rounds", preset.rounds),
    ("num_clients", preset.num_clients),
    ("batch_size", preset.batch_size),
  ):
    validation.check_int(path(name), value, 1)
  validation.check_number(path("client_lr"), preset.client_lr, 0, math.inf, low_open=True)
  validation.check_number(path("dp_delta"), preset.dp_delta, 0, 1, low_open=True, high_open=True)
  return preset


def label(defense: str, param: float) -> str:
  """The convergence label of a frontier setting, e.g. `masking@0.99`."""
  return f"{defense}@{param:g}"


class Frontier:
  """Runs (and resumes) a preset's frontier: identification, then training; see the module
  doc."""

  def __init__(
    self, output_dir: str, preset: Preset, progress: bool = True, train_beside: bool = True
  ):
    from tf_dlg.study import convergence, threshold_search

    self.preset = p = check(preset)
    self.output_dir = validation.check_output_dir("output_dir", output_dir)
    self.progress = progress
    # With TFF, a child process trains beside the attacks (`run`); False: one process
    # (a machine short of memory: the child holds its own TensorFlow and TFF worker).
    self.train_beside = train_beside
    self.trained_beside = 0  # runs the child trained
    names = sorted({d for d, _ in settings(p)})
    self.search = threshold_search.ThresholdSearch(
      os.path.join(output_dir, "identification"),
      datasets=[p.convergence_dataset],
      attacks=(),
      defenses=names,
      data_dir=p.data_dir,
      progress=False,
      num_images=p.frontier_images,
      iterations=iterations(p),
      restarts=p.restarts,
      seed=p.seed,
      adaptive=True,  # attacks come from each defence's strongest attackers
    )
    self.convergence = convergence.Convergence(
      os.path.join(output_dir, "convergence"),
      {label(d, v): (v, "frontier grid") for d, v in settings(p)},
      aggregators=("mean",),
      partitions=("iid",),
      seeds=p.seed_list(),
      subsets=_subsets(p),
      progress=progress,
      dataset=p.convergence_dataset,
      rounds=p.rounds,
      num_clients=p.num_clients,
      local_epochs=p.local_epochs,
      batch_size=p.batch_size,
      client_lr=p.client_lr,
      data_dir=p.data_dir,
      engine=p.engine,
    )

  def identification(self) -> Dict[Tuple[str, Optional[float]], Dict[str, Any]]:
    """{(defence, setting): `matching.MEASURES`} against its strongest attackers (and
    undefended)."""
    from tqdm import tqdm

    p, out = self.preset, {}
    todo = settings(p)
    bar = tqdm(todo, desc="frontier attacks", unit="setting", disable=not self.progress)
    for defense, param in bar:
      bar.set_postfix_str(f"{defense} {param:g}")
      attackers = defense_table.row(defense).strongest_attackers
      dataset = p.convergence_dataset
      out[(defense, param)] = self.search.measures(dataset, attackers, defense, param)
      out[(defense, None)] = self.search.measures(dataset, attackers, "none", None)
    bar.close()
    self.search.release()
    return out

  def run(self) -> List[FrontierPoint]:
    """Attacks, trains, writes frontier.csv / .md and the figure; returns the points."""
    self.convergence.prepare()  # refuses foreign run folders before any work
    # Every setting is known now: with TFF a child trains the grid from its front while
    # the attacks run, then beside this process's training from the end (1.2-1.3x the
    # runs per second of one trainer, `benchmarks.shared_training`).
    enabled = self.train_beside and self.preset.engine == "tff"
    with beside.training(self.convergence, enabled=enabled) as child:
      rates = self.identification()
      rows = {r["label"]: r for r in self.convergence.run()}
    self.trained_beside = child.trained if child else 0
    if self.preset.engine != "tff":
      from tf_dlg.integrations import flower_engine

      flower_engine.shutdown()  # Ray's processes end with the training
    points = [self._point(d, p, rates, rows) for d, p in settings(self.preset)]
    self.write(points)
    return points

  def _point(self, defense, param, rates, rows) -> FrontierPoint:
    st, m, r = self.preset, rates[(defense, param)], rows[label(defense, param)]
    base, dp_point = rows["none"], defense == DP
    epsilon = None
    if dp_point:
      epsilon = defense_registry.dp_fedavg_epsilon(
        param, st.num_clients, st.num_clients, st.rounds, st.dp_delta
      )
    return FrontierPoint(
      defense=defense,
      label=label(defense, param),
      param=param,
      unit=defense_registry.DEFENSES[defense].param_name,
      attackers="+".join(defense_table.row(defense).strongest_attackers),
      dataset=st.convergence_dataset,
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
      delta=st.dp_delta if dp_point else None,
      engine=st.engine,
      **{k: m[k] for k in _MEASURED},
    )

  def write(self, points: Sequence[FrontierPoint]) -> None:
    """frontier.csv, frontier.md and figures/frontier.png."""
    from tf_dlg.analysis import frontier_figure

    write_frontier(os.path.join(self.output_dir, "frontier.csv"), points)
    source = self.convergence.dataset_source or self.preset.convergence_dataset
    io_lib.atomic_write_text(
      os.path.join(self.output_dir, "frontier.md"),
      frontier_report.frontier_markdown(points, source),
    )
    frontier_figure.plot_frontier(
      points,
      os.path.join(self.output_dir, "figures", "frontier.png"),
      title=f"Privacy-utility frontier ({self.preset.convergence_dataset}, FedAvg mean, IID)",
      footer=f"data: {source}; engine: {self.preset.engine}",
    )


def _subsets(st: Preset) -> Optional[Tuple[int, int]]:
  """Convergence's (train, test) subset; a split given as None stays whole (a subset
  larger than the split is the split)."""
  if not (st.train_examples or st.test_examples):
    return None
  return (st.train_examples or _WHOLE, st.test_examples or _WHOLE)


def _count(rate: float, n: int) -> int:
  return int(round(rate * n))


# The measures beside the top-1 rate (`matching.MEASURES` after top1 / low / high).
_MEASURED = matching.MEASURES[3:]


def run_frontier(output_dir: str, preset: Preset, progress: bool = True) -> List[FrontierPoint]:
  """Runs (or resumes) the frontier of `preset` in `output_dir`; returns its points.

  Every setting is checked (`check`) before any work.
  """
  return Frontier(output_dir, preset, progress).run()
