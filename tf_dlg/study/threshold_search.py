"""The threshold search: each image's threshold, and each dataset's, with intervals.

See `experiments/threshold_search.py` for the method, outputs and the thresholds.csv
columns; this module is the library the command line calls.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from tf_dlg import validation
from tf_dlg.study import (
  cell_search,
  defense_table,
  matching,
  point_evaluator,
  robustness,
  search_writers,
)
from tf_dlg.study import results as results_lib
from tf_dlg.study.fields import path
from tf_dlg.study.presets import Preset
from tf_dlg.study.search_case import SearchCases

# Read from each defence's row (`tf_dlg.study.defense_table`): its strongest attackers,
# and {defence: (the other unit's name, statistic of the undefended update it scales by)}.
STRONGEST_ATTACKER = defense_table.STRONGEST_ATTACKERS
RELATIVE_OF = point_evaluator.RELATIVE_OF
ABSOLUTE_OF = point_evaluator.ABSOLUTE_OF

# The settings a search takes; their defaults are the study's (`Preset`'s field defaults).
SETTINGS = (
  "num_images",
  "iterations",
  "leak_ssim",
  "defended_fraction",
  "log_resolution",
  "linear_resolution",
  "restarts",
  "adaptive",
  "adaptive_datasets",
  "seed",
  "local_steps",
  "local_lr",
)


def _check_cover(datasets, attacks, defenses, adaptive) -> None:
  """Every dataset / attack / defence name is known, and no needed list is empty."""
  from tf_dlg import data
  from tf_dlg.attacks import runner

  for name, values, allowed in (
    (path("datasets"), datasets, data.DATASETS),
    ("attacks", attacks, (*runner.ATTACKS, matching.NAME)),
    (path("defenses"), defenses, defense_table.PARAMETER_SEARCH),
  ):
    if not values and not (name == "attacks" and adaptive):
      raise ValueError(f"{name} is empty; expected some of {', '.join(allowed)}.")
    validation.check_choices(name, values, allowed)


def _iterations_per_dataset(iterations, datasets) -> Dict[str, int]:
  """One number for every dataset, or {dataset: iterations}.

  Colour photos need several times the L-BFGS iterations of grey images to converge
  undefended, hence the per-dataset form.
  """
  if isinstance(iterations, dict):
    missing = sorted(set(datasets) - set(iterations))
    if missing:
      raise ValueError(f"{path('iterations')} has no entry for datasets {missing}.")
    return {
      d: validation.check_int(f"{path('iterations')}[{d}]", iterations[d], 1) for d in datasets
    }
  return {d: validation.check_int(path("iterations"), iterations, 1) for d in datasets}


def _check_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
  """The settings, checked, with `Preset`'s defaults filling the rest."""
  from tf_dlg import metrics

  unknown = sorted(set(settings) - set(SETTINGS))
  if unknown:
    raise ValueError(f"unknown settings {unknown}; expected some of {list(SETTINGS)}.")
  base = Preset()
  st, v = {n: settings.get(n, getattr(base, n)) for n in SETTINGS}, validation
  inf = math.inf
  out = dict(
    num_images=v.check_int(path("num_images"), st["num_images"], 1),
    defended_fraction=v.check_number(
      path("defended_fraction"), st["defended_fraction"], 0, 1, low_open=True
    ),
    leak_ssim=v.check_number(
      path("leak_ssim"),
      metrics.DEFAULT_LEAK_SSIM if st["leak_ssim"] is None else st["leak_ssim"],
      0,
      1,
      low_open=True,
    ),
    log_resolution=v.check_number(
      path("log_resolution"), st["log_resolution"], 1, inf, low_open=True, high_open=True
    ),
    linear_resolution=v.check_number(
      path("linear_resolution"), st["linear_resolution"], 0, 1, low_open=True
    ),
    restarts=v.check_int(path("restarts"), st["restarts"], 1, 64),
    seed=v.check_int(path("seed"), st["seed"], 0),
    local_steps=v.check_int(path("local_steps"), st["local_steps"], 1),
    local_lr=v.check_number(path("local_lr"), st["local_lr"], 0, inf, low_open=True),
    adaptive=bool(st["adaptive"]),
    adaptive_datasets=st["adaptive_datasets"],
    iterations=st["iterations"],
  )
  return out


class ThresholdSearch:
  """Runs (and resumes) the threshold search; see the module docstring.

  Args:
    output_dir: Where results go; an existing run there is resumed.
    datasets, attacks, defenses: What to cover (`attacks` may be empty with adaptive).
    data_dir: tfds data directory for mnist / cifar10 / lfw.
    progress: Show progress bars.
    **settings: Any of `SETTINGS` (`Preset`'s defaults fill the rest); unknown names raise:
      num_images: Images attacked per dataset (training images 0..num_images-1 of a
        seeded permutation, so every defence sees the same images).
      iterations: Attack optimiser iterations per restart, or {dataset: iterations}.
      leak_ssim: Adjusted-SSIM bar at or above which an image counts as leaked.
      defended_fraction: Fraction of the tested images the dataset threshold defends.
      log_resolution, linear_resolution: Per-image bracket width at which bisection
        stops: a factor (log scales), a difference (linear scales).
      restarts: Seeded starts per attack (the best distance wins).
      adaptive: Also search each defence against `STRONGEST_ATTACKER`.
      adaptive_datasets: The datasets of that search (None: every dataset); the
        strongest attackers cost several times iDLG, so a budget may confine them.
      seed: Seeds image choice, model weights, defence randomness and attack init.
      local_steps, local_lr: The `fedavg_delta` threat model's local SGD steps and rate.
  """

  def __init__(
    self,
    output_dir: str,
    datasets: Sequence[str],
    attacks: Sequence[str],
    defenses: Sequence[str],
    data_dir: Optional[str] = None,
    progress: bool = True,
    **settings,
  ):
    st = _check_settings(settings)
    _check_cover(datasets, attacks, defenses, st["adaptive"])
    for name in (
      "num_images",
      "defended_fraction",
      "leak_ssim",
      "log_resolution",
      "linear_resolution",
      "restarts",
      "seed",
      "local_steps",
      "local_lr",
      "adaptive",
    ):
      setattr(self, name, st[name])
    self.output_dir = validation.check_output_dir("output_dir", output_dir)
    self.datasets, self.attacks, self.defenses = list(datasets), list(attacks), list(defenses)
    self.iterations = _iterations_per_dataset(st["iterations"], self.datasets)
    adaptive_datasets = st["adaptive_datasets"]
    if adaptive_datasets is None:
      adaptive_datasets = self.datasets
    validation.check_choices(path("adaptive_datasets"), adaptive_datasets, self.datasets)
    self.adaptive_datasets = [d for d in self.datasets if d in adaptive_datasets]
    self.data_dir, self.progress = data_dir, progress
    # What fixes a point's scores (resolutions and the fraction only decide which
    # points are asked for, so changing them reuses the points).
    self.config = dict(
      num_images=self.num_images,
      iterations=self.iterations,
      leak_ssim=self.leak_ssim,
      seed=self.seed,
      restarts=self.restarts,
      model="attack_lenet",
      local_steps=self.local_steps,
      local_lr=self.local_lr,
      # v3: every point also carries its identification (rank of the original among
      # the dataset's images); points of v2 lack it, so their files are refused.
      points="per_image/v3",
      identification=dict(similarity=point_evaluator.IDENTIFY_SIMILARITY, gallery="x_train+x_test"),
    )
    os.makedirs(os.path.join(output_dir, "recon"), exist_ok=True)
    self.log = results_lib.ResultsLog(
      os.path.join(output_dir, "points.jsonl"), "threshold_search", self.config
    )
    self.cases = SearchCases(self.num_images, self.seed, data_dir)
    self.evaluator = point_evaluator.PointEvaluator(self.output_dir, self.log, self.cases, self)
    self.attack_calls = self.evaluator.attack_calls  # (dataset, attack, defence, n)

  def resolution(self, scale: str) -> float:
    return self.log_resolution if scale == "log" else self.linear_resolution

  def cells(self) -> List[Tuple[str, str, Tuple[str, ...], str]]:
    """(dataset, kind, attackers, defence) of every search, plain ones first."""
    out = [
      (d, "plain", (a,), f) for d in self.datasets for a in self.attacks for f in self.defenses
    ]
    if self.adaptive:
      out += [
        (d, "adaptive", STRONGEST_ATTACKER[f], f)
        for d in self.adaptive_datasets
        for f in self.defenses
      ]
    return out

  def search_cell(
    self, dataset: str, kind: str, attackers: Sequence[str], defense: str
  ) -> cell_search.SearchedCell:
    """One cell's per-image bisection under both leak criteria (`cell_search.search_cell`)."""
    return cell_search.search_cell(
      self.evaluator, self.resolution, dataset, kind, attackers, defense
    )

  def run(self, on_cell: Optional[Callable[[], None]] = None) -> List[Dict[str, Any]]:
    """Searches every cell; writes thresholds.csv/md, strip plots and grids; returns rows.

    thresholds.csv grows a row as each cell finishes, and then `on_cell()` is called: a
    caller can start work that needs a threshold (training at it) while the rest of the
    search runs. A cell's row does not change once written.
    """
    from tqdm import tqdm

    cells = []
    bar = tqdm(self.cells(), desc="threshold search", unit="cell", disable=not self.progress)
    for dataset, kind, attackers, defense in bar:
      bar.set_postfix_str(f"{dataset}/{'+'.join(attackers)}/{defense}")
      cells.append(self.search_cell(dataset, kind, attackers, defense))
      if on_cell is not None:
        search_writers.write_csv(self.output_dir, [c.row.to_dict() for c in cells])
        on_cell()
    bar.close()
    rows = [c.row.to_dict() for c in cells]
    search_writers.write_tables(self, rows)
    search_writers.write_strip_plots(self.output_dir, rows, self.defenses)
    search_writers.write_grids(self.output_dir, cells, self.log, self.cases)
    self.release()
    return rows

  # The cached evaluator answers what callers ask of the search.
  def case(self, dataset: str):
    """(dataset object, model, images, labels, dataset indices) of one dataset."""
    return self.cases.case(dataset)

  def evaluate(
    self, dataset: str, attack: str, defense: str, param: Optional[float], update: str = "gradient"
  ) -> Dict[str, Any]:
    """`PointEvaluator.evaluate`: every image under one setting, summarised."""
    return self.evaluator.evaluate(dataset, attack, defense, param, update)

  def update_stats(self, dataset: str):
    """`PointEvaluator.update_stats`: per image, norm and RMS of its undefended gradient."""
    return self.evaluator.update_stats(dataset)

  def equivalents(self, dataset: str, defense: str, value: Optional[float]):
    """`PointEvaluator.equivalents`: (absolute, relative) equivalents of `value`."""
    return self.evaluator.equivalents(dataset, defense, value)

  def measures(self, dataset: str, attackers: Sequence[str], defense: str, param):
    """`PointEvaluator.measures`: `matching.MEASURES` at `defense(param)`."""
    return self.evaluator.measures(dataset, attackers, defense, param)

  def release(self) -> None:
    """Removes the gallery matcher's candidate cache (a rerun rebuilds it once)."""
    self.evaluator.release()

  def rescore(
    self,
    rows: List[Dict[str, Any]],
    attacks: Sequence[str] = ("ig", "masked_ig"),
    delta_attack: str = "idlg",
  ) -> List[Dict[str, Any]]:
    """`robustness.rescore`: re-attacks every plain threshold; writes robustness.csv/md."""
    return robustness.rescore(self.evaluator, rows, attacks, delta_attack, self.progress)
