r"""Experiment 1: each image's threshold, and each dataset's, with intervals.

For each dataset, `--num_images` training images are attacked one at a time (batch size 1,
the DLG/iDLG setting) through the reference LeNet. For each (dataset, attack, defence)
every image gets its own threshold by bisection (`tf_dlg.analysis.threshold`) between
the ends of the defence's range (`tf_dlg.defenses.PARAMETER_SEARCH`), down to
`--log_resolution` (a factor) on log scales and `--linear_resolution` on linear ones.
At each bisection step the images still bisecting are attacked together in one
`run_attacks` call, each with `--restarts` differently seeded starts, so "defended"
means the defence held, not that one start got stuck. An image *leaks* at a setting
when its brightness-adjusted SSIM reaches `--leak_ssim`; a reconstruction that cannot
be scored (non-finite) counts as leaked, with a warning.

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
  points.jsonl     every evaluated (dataset, attack, defence, parameter, image): scores.
                   Written as it goes; a rerun skips finished points (another
                   configuration is refused).
  recon/*.npz      leaked, brightness-adjusted and original images of every attack call.
  thresholds.csv   one row per (dataset, kind, attack, defence); schema below.
  thresholds.md    value [low, high] per defence x dataset, plain vs adaptive, spread.
  figures/thresholds_<defence>.png   per-image thresholds per dataset (strip plot).
  figures/grid_<dataset>_<attack>_<defence>.png   the median-threshold image: leaked |
                   brightness-adjusted | original for no defence, one step weaker, and at
                   its threshold (the paper's Figures 2-4).

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
  search_high, search_scale, stronger; points_evaluated, seconds. Files of the older
  per-dataset search (without kind, low, high, ...) still read, as kind `plain`.

Example:
  python -m experiments.threshold_search --datasets=mnist --num_images=8 \
      --defenses=masking,clipping_ratio,pruning,noising_ratio --adaptive --output_dir=/tmp/thr
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

# Imports TensorFlow quietly, before anything uses it or absl starts (experiments.cli).
from experiments import cli
from experiments import results as results_lib
from tf_dlg import defenses as defense_registry
from tf_dlg import io as io_lib
from tf_dlg import validation

DEFAULT_DATASETS = ("mnist", "cifar10_sample", "lfw_faces")
DEFAULT_DEFENSES = defense_registry.PAPER_DEFENSES
# Read from each defence's spec (`tf_dlg.defenses.DefenseSpec`): its strongest attackers,
# and {defence: (the other unit's name, statistic of the undefended update it scales by)}.
STRONGEST_ATTACKER = defense_registry.STRONGEST_ATTACKERS
RELATIVE_OF = defense_registry.RELATIVE_OF
ABSOLUTE_OF = defense_registry.ABSOLUTE_OF
KINDS = ("plain", "adaptive")
THRESHOLD_FIELDS = (
  "dataset",
  "dataset_source",
  "kind",
  "attack",
  "defense",
  "unit",
  "status",
  "threshold",
  "low",
  "high",
  "interval_open",
  "num_images",
  "num_tested",
  "rank",
  "restarts",
  "seed",
  "iterations",
  "defended_fraction",
  "resolution",
  "per_image",
  "per_image_status",
  "absolute_equivalent",
  "relative_equivalent",
  "attack_works_undefended",
  "undefended_adjusted_ssim",
  "search_low",
  "search_high",
  "search_scale",
  "stronger",
  "points_evaluated",
  "seconds",
)
# What every thresholds.csv has, old (per-dataset search) or new; the rest is optional.
REQUIRED_FIELDS = (
  "dataset",
  "attack",
  "defense",
  "status",
  "threshold",
  "search_low",
  "search_high",
  "search_scale",
  "stronger",
)
OPTIONAL_FIELDS = tuple(f for f in THRESHOLD_FIELDS if f not in REQUIRED_FIELDS)
NUMERIC_FIELDS = (
  "threshold",
  "low",
  "high",
  "num_images",
  "num_tested",
  "rank",
  "restarts",
  "seed",
  "defended_fraction",
  "resolution",
  "absolute_equivalent",
  "relative_equivalent",
  "undefended_adjusted_ssim",
  "search_low",
  "search_high",
  "points_evaluated",
  "seconds",
  # older files
  "fraction_defended",
  "ssim_at_threshold",
  "adjusted_ssim_at_threshold",
  "weaker_param",
  "fraction_defended_weaker",
  "ssim_weaker",
  "adjusted_ssim_weaker",
)
_FINITE_FIELDS = ("threshold", "low", "high", "weaker_param", "search_low", "search_high")
STATUSES = ("found", "at_weakest", "not_reached")

UPDATE_KINDS = ("gradient", "fedavg_delta")
RECON_FORMAT = "tf_dlg.threshold_search.recon/v2"
# What a threshold means when the attack already fails without a defence.
UNTESTED = "untested (attack fails undefended)"
INCONCLUSIVE = "inconclusive"


def point_key(
  dataset: str,
  attack: str,
  defense: str,
  param: Optional[float],
  update: str = "gradient",
  image: Optional[int] = None,
) -> str:
  """Key of one evaluated point (of one image of the sample, when `image` is given)."""
  key = f"{dataset}|{attack}|{defense}|{'-' if param is None else repr(float(param))}"
  key = key if update == "gradient" else f"{key}|{update}"
  return key if image is None else f"{key}|image{int(image)}"


# `bisection_steps` (the older per-dataset search) is accepted and ignored: the
# resolutions decide the steps now.
SEARCH_DEFAULTS = dict(
  num_images=8,
  iterations=3000,
  leak_ssim=None,
  defended_fraction=1.0,
  log_resolution=1.5,
  linear_resolution=0.05,
  restarts=2,
  adaptive=False,
  seed=0,
  local_steps=3,
  local_lr=0.1,
  bisection_steps=None,
)


def _check_cover(datasets, attacks, defenses, adaptive) -> None:
  """Every dataset / attack / defence name is known, and no needed list is empty."""
  from tf_dlg import data
  from tf_dlg import defenses as defenses_lib
  from tf_dlg.attacks import runner

  for name, values, allowed in (
    ("datasets", datasets, data.DATASETS),
    ("attacks", attacks, runner.ATTACKS),
    ("defenses", defenses, defenses_lib.PARAMETER_SEARCH),
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
      raise ValueError(f"iterations has no entry for datasets {missing}.")
    return {d: validation.check_int(f"iterations[{d}]", iterations[d], 1) for d in datasets}
  return {d: validation.check_int("iterations", iterations, 1) for d in datasets}


def _check_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
  """The settings, checked, with `SEARCH_DEFAULTS` filling the rest."""
  from tf_dlg import metrics

  unknown = sorted(set(settings) - set(SEARCH_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown settings {unknown}; expected some of {list(SEARCH_DEFAULTS)}.")
  st, v = dict(SEARCH_DEFAULTS, **settings), validation
  inf = math.inf
  out = dict(
    num_images=v.check_int("num_images", st["num_images"], 1),
    defended_fraction=v.check_number(
      "defended_fraction", st["defended_fraction"], 0, 1, low_open=True
    ),
    leak_ssim=v.check_number(
      "leak_ssim",
      metrics.DEFAULT_LEAK_SSIM if st["leak_ssim"] is None else st["leak_ssim"],
      0,
      1,
      low_open=True,
    ),
    log_resolution=v.check_number(
      "log_resolution", st["log_resolution"], 1, inf, low_open=True, high_open=True
    ),
    linear_resolution=v.check_number(
      "linear_resolution", st["linear_resolution"], 0, 1, low_open=True
    ),
    restarts=v.check_int("restarts", st["restarts"], 1, 64),
    seed=v.check_int("seed", st["seed"], 0),
    local_steps=v.check_int("local_steps", st["local_steps"], 1),
    local_lr=v.check_number("local_lr", st["local_lr"], 0, inf, low_open=True),
    adaptive=bool(st["adaptive"]),
    iterations=st["iterations"],
  )
  if st["bisection_steps"] is not None:
    v.check_int("bisection_steps", st["bisection_steps"], 0)
  return out


class ThresholdSearch:
  """Runs (and resumes) the threshold search; see the module docstring.

  Args:
    output_dir: Where results go; an existing run there is resumed.
    datasets, attacks, defenses: What to cover (`attacks` may be empty with adaptive).
    data_dir: tfds data directory for mnist / cifar10 / lfw.
    progress: Show progress bars.
    **settings: Any of `SEARCH_DEFAULTS` (which fills the rest); unknown names raise:
      num_images: Images attacked per dataset (training images 0..num_images-1 of a
        seeded permutation, so every defence sees the same images).
      iterations: Attack optimiser iterations per restart, or {dataset: iterations}.
      leak_ssim: Adjusted-SSIM bar at or above which an image counts as leaked.
      defended_fraction: Fraction of the tested images the dataset threshold defends.
      log_resolution, linear_resolution: Per-image bracket width at which bisection
        stops: a factor (log scales), a difference (linear scales).
      restarts: Seeded starts per attack (the best distance wins).
      adaptive: Also search each defence against `STRONGEST_ATTACKER`.
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
      points="per_image/v2",
    )
    os.makedirs(os.path.join(output_dir, "recon"), exist_ok=True)
    self.log = results_lib.ResultsLog(
      os.path.join(output_dir, "points.jsonl"), "threshold_search", self.config
    )
    self._cases: Dict[str, Any] = {}
    self._stats: Dict[str, Dict[str, np.ndarray]] = {}
    self.attack_calls: List[Tuple[str, str, str, int]] = []  # (dataset, attack, defence, n)

  def resolution(self, scale: str) -> float:
    return self.log_resolution if scale == "log" else self.linear_resolution

  # ------------------------------------------------------------------ the case
  def case(self, dataset: str):
    """(dataset object, model, images, labels, dataset indices) of one dataset, built once."""
    if dataset not in self._cases:
      from tf_dlg import data, models

      ds = data.load_dataset(dataset, data_dir=self.data_dir, seed=self.seed)
      if self.num_images > len(ds.x_train):
        raise ValueError(
          f"num_images={self.num_images} exceeds the {len(ds.x_train)} "
          f"training images of {dataset!r}."
        )
      idx = np.random.default_rng(self.seed).permutation(len(ds.x_train))[: self.num_images]
      model = models.attack_lenet(ds.input_shape, ds.num_classes, seed=self.seed)
      self._cases[dataset] = (ds, model, ds.x_train[idx], ds.y_train[idx], idx)
    return self._cases[dataset]

  def update_stats(self, dataset: str) -> Dict[str, np.ndarray]:
    """Per image: L2 norm and RMS of its undefended gradient (for unit conversions)."""
    if dataset not in self._stats:
      from tf_dlg.defenses import base

      _, model, images, labels, idx = self.case(dataset)
      norms, rms = [], []
      for i in range(len(images)):
        obs = self._observe(model, images[i : i + 1], labels[i : i + 1], None, "gradient", i, {})
        norms.append(float(base.global_norm(obs.update)))
        rms.append(float(base.root_mean_square(obs.update)))
      self._stats[dataset] = {"norm": np.array(norms), "rms": np.array(rms)}
    return self._stats[dataset]

  # ------------------------------------------------------------------ points
  def evaluate_images(
    self,
    dataset: str,
    attack: str,
    defense: str,
    requests: Sequence[Tuple[int, Optional[float]]],
    update: str = "gradient",
  ) -> List[Dict[str, Any]]:
    """Per-image records of (image, param) requests; the uncached ones in ONE attack call.

    `update` is what the client sends: its single-image `gradient` (the paper's setting)
    or a `fedavg_delta` of `local_steps` local SGD steps on that image (the multi-step
    FedAvg threat model; the attacker knows steps and learning rate).
    """
    validation.check_choice("update", update, UPDATE_KINDS)
    keys = [point_key(dataset, attack, defense, p, update, i) for i, p in requests]
    todo = [(k, i, p) for k, (i, p) in zip(keys, requests) if k not in self.log]
    todo = list({k: (k, i, p) for k, i, p in todo}.values())
    if todo:
      self._attack(dataset, attack, defense, todo, update)
    return [self.log.get(k) for k in keys]

  def _attack(self, dataset, attack, defense, todo, update):
    from tf_dlg import defenses as defenses_lib
    from tf_dlg.attacks import runner

    ds, model, images, labels, idx = self.case(dataset)
    start = time.perf_counter()
    observed, configs = [], []
    for _, i, p in todo:
      defence = None if defense == "none" else defenses_lib.get_defense(defense, p)
      configs.append(None if defence is None else defence.get_config())
      meta = {"dataset": dataset, "index": int(idx[i])}
      observed.append(
        self._observe(model, images[i : i + 1], labels[i : i + 1], defence, update, i, meta)
      )
    # One seed per image, the same at every setting: common random starts make the
    # outcome vary with the setting, not with the start.
    attacked = runner.run_attacks(
      model,
      observed,
      attack=attack,
      iterations=self.iterations[dataset],
      seed=[self.seed * 100_003 + i for _, i, _ in todo],
      restarts=self.restarts,
    )
    self.attack_calls.append((dataset, attack, defense, len(todo)))
    per_image, leaked, adjusted = self._score(attacked, [idx[i] for _, i, _ in todo])
    seconds = (time.perf_counter() - start) / len(todo)
    self._store(
      ds.source,
      (dataset, attack, defense, update),
      todo,
      per_image,
      configs,
      (leaked, adjusted, np.stack([images[i] for _, i, _ in todo])),
      seconds,
    )

  def _store(self, source, cell, todo, per_image, configs, pictures, seconds):
    """Saves one attack call's images (one npz) and its per-image records (points.jsonl)."""
    dataset, attack, defense, update = cell
    leaked, adjusted, originals = pictures
    name = hashlib.sha1(todo[0][0].encode() + str(len(todo)).encode()).hexdigest()[:16]
    recon = os.path.join("recon", name + ".npz")
    io_lib.save_npz(
      os.path.join(self.output_dir, recon),
      {"format": RECON_FORMAT, "keys": [k for k, _, _ in todo]},
      {"leaked": np.stack(leaked), "adjusted": np.stack(adjusted), "original": originals},
    )
    for row, ((key, i, p), score, config) in enumerate(zip(todo, per_image, configs)):
      if not math.isfinite(score["adjusted_ssim"]):
        warnings.warn(
          f"{key}: non-finite reconstruction; it counts as leaked, never as defended.",
          RuntimeWarning,
          stacklevel=4,
        )
      self.log.add(
        key,
        dict(
          score,
          dataset=dataset,
          dataset_source=source,
          attack=attack,
          defense=defense,
          param=p,
          update=update,
          image=int(i),
          defense_config=config,
          defended=not score["leaked"],
          recon=recon,
          recon_row=row,
          seconds=seconds,
        ),
      )

  def evaluate(
    self, dataset: str, attack: str, defense: str, param: Optional[float], update: str = "gradient"
  ) -> Dict[str, Any]:
    """Every image under `defense(param)`, summarised (fraction defended, medians)."""
    recs = self.evaluate_images(
      dataset, attack, defense, [(i, param) for i in range(self.num_images)], update
    )
    frac = float(np.mean([r["defended"] for r in recs]))
    adj = [r["adjusted_ssim"] for r in recs]
    return {
      "dataset": dataset,
      "attack": attack,
      "defense": defense,
      "param": param,
      "update": update,
      "fraction_defended": frac,
      "defended": frac >= self.defended_fraction - 1e-9,
      "median_ssim": float(np.median([r["ssim"] for r in recs])),
      "median_adjusted_ssim": float(np.median(adj)),
      "max_adjusted_ssim": float(np.max(adj)),
      "images": recs,
    }

  def _observe(self, model, image, label, defence, update, i, meta):
    """What the attacker sees of image `i`: its defended gradient or FedAvg delta."""
    from tf_dlg.attacks import threat_model

    seed = self.seed * 100_003 + i
    if update == "gradient":
      return threat_model.observe_gradient(
        model, image, label, defense=defence, seed=seed, metadata=meta
      )
    return threat_model.observe_fedavg_delta(
      model,
      image,
      label,
      local_steps=self.local_steps,
      learning_rate=self.local_lr,
      defense=defence,
      seed=seed,
      metadata=meta,
    )

  def _score(self, attacked, indices):
    """(per-image score dicts, leaked images, adjusted images) of one attack call."""
    from tf_dlg import metrics

    per_image, leaked, adjusted = [], [], []
    for index, res in zip(indices, attacked):
      score = metrics.score(res, threshold=self.leak_ssim, keep_images=True)
      leaked.append(score["leaked_image"])
      adjusted.append(score["adjusted_image"])
      adj = float(score["adjusted_ssim"])
      per_image.append(
        {
          "index": int(index),
          "status": res.status,
          "iterations": int(res.iterations),
          "restart": int(res.restart),
          "ssim": float(score["ssim"]),
          "adjusted_ssim": adj,
          "psnr": float(score["psnr"]),
          "mse": float(score["mse"]),
          "label_correct": bool(score["label_correct"]),
          # NaN never defends.
          "leaked": bool(score["leaked"]) or not math.isfinite(adj),
        }
      )
    return per_image, leaked, adjusted

  # ------------------------------------------------------------------ the search
  def cells(self) -> List[Tuple[str, str, Tuple[str, ...], str]]:
    """(dataset, kind, attackers, defence) of every search, plain ones first."""
    out = [
      (d, "plain", (a,), f) for d in self.datasets for a in self.attacks for f in self.defenses
    ]
    if self.adaptive:
      out += [
        (d, "adaptive", STRONGEST_ATTACKER[f], f) for d in self.datasets for f in self.defenses
      ]
    return out

  def search_cell(
    self, dataset: str, kind: str, attackers: Sequence[str], defense: str
  ) -> Dict[str, Any]:
    """Per-image bisection of one cell; returns its thresholds.csv row."""
    from tf_dlg import defenses as defenses_lib
    from tf_dlg.analysis import threshold as threshold_lib

    start = time.perf_counter()
    space = threshold_lib.SearchSpace(*defenses_lib.PARAMETER_SEARCH[defense])
    n = self.num_images
    base = {a: self.evaluate(dataset, a, "none", None) for a in attackers}
    # An image leaks at a setting if any of the attackers recovers it.
    leaks = [any(base[a]["images"][i]["leaked"] for a in attackers) for i in range(n)]
    calls = []

    def evaluate(requests):
      calls.append(len(requests))
      recs = [self.evaluate_images(dataset, a, defense, requests) for a in attackers]
      return [all(r[j]["defended"] for r in recs) for j in range(len(requests))]

    images = threshold_lib.per_image_thresholds(
      evaluate, space, leaks, self.resolution(space.scale)
    )
    agg = threshold_lib.dataset_threshold(images, space, self.defended_fraction, seed=self.seed)
    row = self._row(dataset, kind, attackers, defense, space, images, agg)
    undefended = [max(base[a]["images"][i]["adjusted_ssim"] for a in attackers) for i in range(n)]
    row.update(
      undefended_adjusted_ssim=float(np.median(undefended)),
      points_evaluated=sum(len(im.points) for im in images),
      seconds=time.perf_counter() - start,
    )
    row["_images"] = images
    return row

  def _row(self, dataset, kind, attackers, defense, space, images, agg) -> Dict[str, Any]:
    from tf_dlg import defenses as defenses_lib

    untested = agg.status == "untested"
    status = "at_weakest" if untested else agg.status
    value = space.weakest() if untested else agg.threshold
    absolute, relative = self.equivalents(dataset, defense, value)
    return {
      "dataset": dataset,
      "dataset_source": self.case(dataset)[0].source,
      "kind": kind,
      "attack": "+".join(attackers),
      "defense": defense,
      "unit": defenses_lib.DEFENSES[defense].param_name,
      "status": status,
      "threshold": value,
      "low": agg.low,
      "high": agg.high,
      "interval_open": agg.open_strong_end,
      "num_images": len(images),
      "num_tested": agg.num_tested,
      "rank": agg.rank,
      "restarts": self.restarts,
      "seed": self.seed,
      "iterations": self.iterations[dataset],
      "defended_fraction": self.defended_fraction,
      "resolution": self.resolution(space.scale),
      "per_image": json.dumps(
        [im.threshold if im.status in ("found", "at_weakest") else None for im in images]
      ),
      "per_image_status": json.dumps([im.status for im in images]),
      "absolute_equivalent": absolute,
      "relative_equivalent": relative,
      # Without a leak to stop, "the weakest setting defends" means nothing.
      "attack_works_undefended": not untested,
      "search_low": space.low,
      "search_high": space.high,
      "search_scale": space.scale,
      "stronger": space.stronger,
    }

  def equivalents(
    self, dataset: str, defense: str, value: Optional[float]
  ) -> Tuple[Optional[float], Optional[float]]:
    """(absolute, relative) equivalents of `value`: medians over the images."""
    if value is None or (defense not in ABSOLUTE_OF and defense not in RELATIVE_OF):
      return None, None
    if defense in ABSOLUTE_OF:
      stat = self.update_stats(dataset)[ABSOLUTE_OF[defense][1]]
      return float(np.median(value * stat)), None
    stat = self.update_stats(dataset)[RELATIVE_OF[defense][1]]
    return None, float(np.median(value / stat))

  def run(self) -> List[Dict[str, Any]]:
    """Searches every cell; writes thresholds.csv/md, strip plots and grids; returns rows."""
    from tqdm import tqdm

    rows = []
    bar = tqdm(self.cells(), desc="threshold search", unit="cell", disable=not self.progress)
    for dataset, kind, attackers, defense in bar:
      bar.set_postfix_str(f"{dataset}/{'+'.join(attackers)}/{defense}")
      rows.append(self.search_cell(dataset, kind, attackers, defense))
    bar.close()
    self.write_tables(rows)
    self.write_strip_plots(rows)
    self.write_grids(rows)
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]

  # ------------------------------------------------------------------ beyond the paper
  def rescore(
    self,
    rows: List[Dict[str, Any]],
    attacks: Sequence[str] = ("ig", "masked_ig"),
    delta_attack: str = "idlg",
  ) -> List[Dict[str, Any]]:
    """Re-attacks every plain threshold with other attackers; writes robustness.csv/md.

    Each found threshold is attacked again by `attacks` on the single-image gradient,
    and by `delta_attack` on a multi-step FedAvg delta of the same image. The same
    attacks without a defence are run too: a threshold that "holds" only counts if that
    attacker recovers the undefended images.
    """
    from tqdm import tqdm

    plan = [(a, "gradient") for a in attacks] + [(delta_attack, "fedavg_delta")]
    todo = [
      (r, a, u)
      for r in rows
      if r["threshold"] is not None and r.get("kind", "plain") == "plain"
      for a, u in plan
    ]
    out = []
    for r, attack, update in tqdm(
      todo, desc="adaptive re-scoring", unit="cell", disable=not self.progress
    ):
      base = self.evaluate(r["dataset"], attack, "none", None, update)
      at = self.evaluate(r["dataset"], attack, r["defense"], r["threshold"], update)
      attack_works = base["fraction_defended"] < 1.0
      out.append(
        {
          "dataset": r["dataset"],
          "defense": r["defense"],
          "threshold": r["threshold"],
          "searched_with": r["attack"],
          "attack": attack,
          "update": update,
          "undefended_adjusted_ssim": base["median_adjusted_ssim"],
          "undefended_leak_fraction": 1.0 - base["fraction_defended"],
          "fraction_defended": at["fraction_defended"],
          "adjusted_ssim": at["median_adjusted_ssim"],
          "max_adjusted_ssim": at["max_adjusted_ssim"],
          "verdict": ("broken" if not at["defended"] else "holds" if attack_works else UNTESTED),
        }
      )
    self.write_robustness(out)
    return out

  def write_robustness(self, out: List[Dict[str, Any]]) -> None:
    from tf_dlg.analysis import figures

    fields = list(out[0]) if out else ["dataset"]
    write_csv(os.path.join(self.output_dir, "robustness.csv"), fields, out)
    text = (
      "# Do the thresholds hold against stronger attackers?\n\n"
      f"Each threshold is attacked again by adaptive attackers on the single-image "
      f"gradient, and by `idlg` on a {self.local_steps}-step FedAvg client delta "
      f"(learning rate {self.local_lr}). *broken*: fewer than "
      f"{self.defended_fraction:.0%} of the images stay below adjusted SSIM "
      f"{self.leak_ssim} at the threshold. A verdict of *holds* needs the same "
      "attacker to recover undefended images.\n\n"
    )
    text += figures.markdown_table(
      [
        "dataset",
        "defence",
        "threshold",
        "attack",
        "update",
        "undefended adj. SSIM",
        "defended",
        "adj. SSIM",
        "max adj. SSIM",
        "verdict",
      ],
      [
        [
          o["dataset"],
          o["defense"],
          o["threshold"],
          o["attack"],
          o["update"],
          o["undefended_adjusted_ssim"],
          o["fraction_defended"],
          o["adjusted_ssim"],
          o["max_adjusted_ssim"],
          o["verdict"],
        ]
        for o in out
      ],
    )
    io_lib.atomic_write_text(os.path.join(self.output_dir, "robustness.md"), text)

  # ------------------------------------------------------------------ outputs
  def write_tables(self, rows: List[Dict[str, Any]]) -> None:
    """thresholds.csv and thresholds.md."""
    from tf_dlg.analysis import figures

    write_csv(os.path.join(self.output_dir, "thresholds.csv"), THRESHOLD_FIELDS, rows)
    lines = [
      "# Defence thresholds against gradient inversion\n\n",
      f"Per image: the weakest setting at which the attack no longer recovers it "
      f"(adjusted SSIM < {self.leak_ssim}), bisected to a factor {self.log_resolution:g} "
      f"(log scales) or {self.linear_resolution:g} (linear), best of {self.restarts} "
      f"restarts, iterations {self.iterations}, seed {self.seed}. Per dataset: the "
      f"smallest setting that defends {self.defended_fraction:.0%} of the images the "
      f"attack recovers undefended, value [95 % bootstrap interval over images] "
      f"(n = tested / attacked images).\n",
    ]
    tables = [("plain", a, f"Plain threshold, attack `{a}`") for a in self.attacks]
    if self.adaptive:
      tables.append(
        ("adaptive", None, "Adaptive threshold (strongest attacker, `STRONGEST_ATTACKER`)")
      )
    for kind, attack, heading in tables:
      lines.append(f"\n## {heading}\n\n")
      table = [
        [f] + [_cell(rows, kind, attack, d, f) for d in self.datasets] for f in self.defenses
      ]
      lines.append(figures.markdown_table(["defence"] + self.datasets, table))
    lines.append(self._comparison(rows))
    lines.append("\n## Per-image spread\n\n")
    lines.append(
      figures.markdown_table(
        [
          "dataset",
          "kind",
          "attack",
          "defence",
          "unit",
          "status",
          "threshold [95 %]",
          "tested / images",
          "per image: min / median / max",
          "not reached",
          "absolute eq.",
          "relative eq.",
          "points",
          "seconds",
        ],
        [_spread_row(r) for r in rows],
      )
    )
    lines.append(
      "\nFigures: `figures/thresholds_<defence>.png` (per-image thresholds), "
      "`figures/grid_<dataset>_<attack>_<defence>.png` (median-threshold image).\n"
      "\nData:\n\n"
    )
    for dataset in self.datasets:
      lines.append(f"- `{dataset}`: {self.case(dataset)[0].source}\n")
    io_lib.atomic_write_text(os.path.join(self.output_dir, "thresholds.md"), "".join(lines))

  def _comparison(self, rows) -> str:
    """Plain vs adaptive threshold and their ratio (first plain attack), when both ran."""
    from tf_dlg.analysis import figures

    adaptive = [r for r in rows if r["kind"] == "adaptive"]
    if not adaptive or not self.attacks:
      return ""
    table = []
    for a in adaptive:
      p = next(
        (
          r
          for r in rows
          if r["kind"] == "plain"
          and r["attack"] == self.attacks[0]
          and (r["dataset"], r["defense"]) == (a["dataset"], a["defense"])
        ),
        None,
      )
      if p is None:
        continue
      ratio = ""
      if p["threshold"] and a["threshold"] and _usable(p) and _usable(a):
        ratio = f"{a['threshold'] / p['threshold']:.3g}"
      table.append(
        [
          a["dataset"],
          a["defense"],
          f"{format_threshold(p)} ({p['attack']})",
          f"{format_threshold(a)} ({a['attack']})",
          ratio,
        ]
      )
    return (
      f"\n## Plain (`{self.attacks[0]}`) vs adaptive thresholds\n\n"
      "ratio = adaptive / plain (> 1: the adaptive attacker needs a larger parameter; "
      "for clipping, where lower is stronger, < 1).\n\n"
      + figures.markdown_table(["dataset", "defence", "plain", "adaptive", "ratio"], table)
    )

  def write_strip_plots(self, rows: List[Dict[str, Any]]) -> List[str]:
    """figures/thresholds_<defence>.png: per-image thresholds per dataset and search."""
    from tf_dlg.analysis import threshold_figures

    paths = []
    for defense in self.defenses:
      cells = [r for r in rows if r["defense"] == defense]
      path = os.path.join(self.output_dir, "figures", f"thresholds_{defense}.png")
      paths.append(
        threshold_figures.threshold_strips(
          cells,
          path,
          title=f"{defense}: per-image thresholds",
          footer="data: " + "; ".join(sorted({r["dataset_source"] for r in cells})),
        )
      )
    return paths

  def write_grids(self, rows: List[Dict[str, Any]]) -> List[str]:
    """The paper's Figures 2-4 for the median-threshold image of each cell."""
    from tf_dlg.analysis import figures

    paths = []
    for r in rows:
      pick = _representative(r["_images"], r["search_scale"], r["stronger"])
      if pick is None:
        continue
      i, im = pick
      settings = [("no defence", "none", None)]
      if im.weaker is not None:
        settings.append((f"{r['defense']} {im.weaker:g} (weaker)", r["defense"], im.weaker))
      settings.append((f"{r['defense']} {im.threshold:g} (threshold)", r["defense"], im.threshold))
      grid = [
        self._grid_entry(r["dataset"], r["attack"].split("+"), f, p, i, label)
        for label, f, p in settings
      ]
      name = f"grid_{r['dataset']}_{r['attack']}_{r['defense']}.png"
      path = os.path.join(self.output_dir, "figures", name)
      figures.leak_grid(
        grid,
        path,
        title=f"{r['attack']} vs {r['defense']} on {r['dataset']}"
        f" (image {grid[0]['index']}, median threshold)",
        footer=f"data: {r['dataset_source']}",
      )
      paths.append(path)
    return paths

  def _grid_entry(self, dataset, attackers, defense, param, image, label):
    """The best attacker's reconstruction of `image` at one setting."""
    recs = [self.log.get(point_key(dataset, a, defense, param, image=image)) for a in attackers]
    rec = max((x for x in recs if x is not None), key=lambda x: _finite(x["adjusted_ssim"]))
    _, z = io_lib.load_npz(os.path.join(self.output_dir, rec["recon"]), RECON_FORMAT)
    j = rec["recon_row"]
    return {
      "label": label,
      "leaked": z["leaked"][j],
      "adjusted": z["adjusted"][j],
      "original": z["original"][j],
      "ssim": rec["ssim"],
      "index": rec["index"],
      "adjusted_ssim": rec["adjusted_ssim"],
    }


def _finite(x: float) -> float:
  return x if math.isfinite(x) else -math.inf


def _representative(images, scale, stronger):
  """(image, ImageThreshold) at the median threshold among those with one, or None."""
  from tf_dlg.analysis import threshold as threshold_lib

  found = [(i, im) for i, im in enumerate(images) if im.status in ("found", "at_weakest")]
  if not found:
    return None
  space = threshold_lib.SearchSpace(1.0, 2.0, scale, stronger)  # direction only
  order = sorted(
    found, key=lambda x: -x[1].threshold if space.stronger == "lower" else x[1].threshold
  )
  return order[(len(order) - 1) // 2]


def _cell(rows, kind, attack, dataset, defense) -> str:
  """A table cell: the threshold of one search (adaptive ones name their attacker)."""
  r = next(
    (
      x
      for x in rows
      if (x["kind"], x["dataset"], x["defense"]) == (kind, dataset, defense)
      and attack in (None, x["attack"])
    ),
    None,
  )
  if r is None:
    return "-"
  return format_threshold(r) + (f" ({r['attack']})" if attack is None else "")


def _usable(row) -> bool:
  return not attack_untested(row) and not _inconclusive(row)


def _inconclusive(row: Dict[str, Any]) -> bool:
  """The interval spans the whole search range, or most images are untested."""
  n, tested = row.get("num_images"), row.get("num_tested")
  if n and tested is not None and tested < n / 2:
    return True
  low, high = row.get("low"), row.get("high")
  if low is None or high is None:
    return False
  higher = row["stronger"] == "higher"
  weak, strong = (low, high) if higher else (high, low)
  weak_end_hit = weak == (row["search_low"] if higher else row["search_high"])
  strong_end_hit = strong == (row["search_high"] if higher else row["search_low"])
  return weak_end_hit and (strong_end_hit or row.get("interval_open") in (True, "True"))


def _spread_row(r: Dict[str, Any]) -> List[Any]:
  values = [v for v in json.loads(r["per_image"]) if v is not None]
  statuses = json.loads(r["per_image_status"])
  spread = (
    "-" if not values else f"{min(values):.3g} / {float(np.median(values)):.3g} / {max(values):.3g}"
  )
  return [
    r["dataset"],
    r["kind"],
    r["attack"],
    r["defense"],
    r["unit"],
    r["status"],
    format_threshold(r),
    f"{r['num_tested']} / {r['num_images']}",
    spread,
    statuses.count("not_reached"),
    r["absolute_equivalent"],
    r["relative_equivalent"],
    r["points_evaluated"],
    f"{r['seconds']:.0f}",
  ]


def attack_untested(row: Dict[str, Any]) -> bool:
  """Whether a thresholds row's attack already failed without a defence."""
  works = row.get("attack_works_undefended")
  return works is False or works == "False"


def format_threshold(row: Dict[str, Any]) -> str:
  """`value [low, high] (n=tested/images)`, or what stands in its place."""
  if attack_untested(row):
    return UNTESTED
  strong_end = row["search_high"] if row["stronger"] == "higher" else row["search_low"]
  if row["status"] == "not_reached":
    text = f"not reached (leaks at {strong_end:g})"
  elif row.get("low") is None:  # an older per-dataset file
    text = f"{row['threshold']:g}"
  else:
    text = f"{row['threshold']:.3g}"
  if row.get("low") is not None and row["status"] != "not_reached":
    lo, hi = f"{row['low']:.3g}", f"{row['high']:.3g}"
    if row.get("interval_open") in (True, "True"):  # resamples not reached: beyond the end
      lo, hi = (lo, f"> {hi}") if row["stronger"] == "higher" else (f"< {lo}", hi)
    text += f" [{lo}, {hi}] (n={row['num_tested']:.0f}/{row['num_images']:.0f})"
  if row["status"] == "at_weakest":
    text = f"<= {text} (weakest tried)"
  return f"{INCONCLUSIVE}: {text}" if _inconclusive(row) else text


def write_csv(path: str, fields: Sequence[str], rows: Sequence[Dict[str, Any]]) -> str:
  """Atomically writes `rows` (None as an empty cell) under the header `fields`."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
  return io_lib.atomic_write_text(path, buf.getvalue())


def read_thresholds(path: str) -> List[Dict[str, Any]]:
  """Reads thresholds.csv back (numbers as floats, empty cells as None, JSON lists parsed).

  Files without the newer columns (the per-dataset search) read with them None and
  `kind` = `plain`.

  Raises:
    ValueError: naming the file, line and column of a cell that is not what
      `experiments.threshold_search` writes (a number, a known status or kind, a JSON
      list, a threshold where the status says one was found).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; run experiments.threshold_search first.")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = set(REQUIRED_FIELDS) - set(reader.fieldnames or [])
    if missing:
      raise ValueError(f"{path} is not a thresholds.csv (missing columns: {sorted(missing)}).")
    return [_threshold_row(r, f"{path}, line {reader.line_num}") for r in reader]


def _parse_cell(k: str, v: Optional[str], where: str):
  if v is None:
    return None
  if k in NUMERIC_FIELDS:
    try:
      x = float(v)
    except ValueError:
      raise ValueError(f"{where}, column {k!r}: {v!r} is not a number.") from None
    if k in _FINITE_FIELDS and not math.isfinite(x):
      raise ValueError(f"{where}, column {k!r}: {v!r} is not a finite number.")
    return x
  if k in ("per_image", "per_image_status"):
    try:
      x = json.loads(v)
    except json.JSONDecodeError:
      raise ValueError(f"{where}, column {k!r}: {v!r} is not a JSON list.") from None
    ok = (str,) if k == "per_image_status" else (int, float, type(None))
    if not isinstance(x, list) or not all(isinstance(e, ok) and not isinstance(e, bool) for e in x):
      raise ValueError(
        f"{where}, column {k!r}: {v!r} is not a JSON list of "
        f"{'statuses' if k == 'per_image_status' else 'numbers or null'}."
      )
    return x
  return v


def _threshold_row(raw: Dict[str, str], where: str) -> Dict[str, Any]:
  """One parsed thresholds.csv row; `where` names the file and line in errors."""
  if None in raw:
    raise ValueError(f"{where}: more cells than the header has columns.")
  row: Dict[str, Any] = {k: None for k in OPTIONAL_FIELDS}
  for k, v in raw.items():
    v = None if v is None or v.strip() == "" else v.strip()
    row[k] = _parse_cell(k, v, where)
  row["kind"] = row["kind"] or "plain"
  for k, allowed in (("status", STATUSES), ("kind", KINDS)):
    if row.get(k) not in allowed:
      raise ValueError(f"{where}, column {k!r}: {raw.get(k)!r} is not one of {', '.join(allowed)}.")
  need = ("threshold",) if row["status"] != "not_reached" else ("search_low", "search_high")
  for k in need + ("dataset", "attack", "defense"):
    if row.get(k) is None:
      raise ValueError(f"{where}, column {k!r}: empty, but status {row['status']!r} needs it.")
  return row


def main(argv):
  del argv
  from absl import flags

  f = flags.FLAGS
  # The constructor checks every flag (a ValueError: one line, exit 2) before any attack.
  search = ThresholdSearch(
    f.output_dir,
    f.datasets,
    f.attacks,
    f.defenses,
    num_images=f.num_images,
    iterations=f.iterations,
    leak_ssim=f.leak_ssim,
    defended_fraction=f.defended_fraction,
    log_resolution=f.log_resolution,
    linear_resolution=f.linear_resolution,
    restarts=f.restarts,
    adaptive=f.adaptive,
    seed=f.seed,
    data_dir=f.data_dir,
  )
  start = time.perf_counter()
  search.run()
  print(open(os.path.join(f.output_dir, "thresholds.md")).read())
  print(f"[threshold_search] {time.perf_counter() - start:.0f} s; outputs in {f.output_dir}")


def define_flags():
  from absl import flags

  from tf_dlg import data, defenses
  from tf_dlg.attacks import runner

  cli.define_enum_list("datasets", DEFAULT_DATASETS, data.DATASETS, "Datasets to search.")
  cli.define_enum_list(
    "defenses", DEFAULT_DEFENSES, defenses.PARAMETER_SEARCH, "Defences to search."
  )
  cli.define_enum_list("attacks", ["idlg"], runner.ATTACKS, "Attacks of the plain search.")
  flags.DEFINE_boolean(
    "adaptive",
    False,
    "Also search each defence against its strongest attacker (STRONGEST_ATTACKER).",
  )
  flags.DEFINE_integer("num_images", 8, "Images attacked per dataset.", lower_bound=1)
  flags.DEFINE_integer("restarts", 2, "Seeded starts per attack.", lower_bound=1, upper_bound=64)
  flags.DEFINE_float(
    "log_resolution", 1.5, "Per-image bracket factor on log scales (> 1).", lower_bound=1.0
  )
  flags.DEFINE_float(
    "linear_resolution",
    0.05,
    "Per-image bracket width on linear scales.",
    lower_bound=0.0,
    upper_bound=1.0,
  )
  flags.DEFINE_float(
    "leak_ssim",
    None,
    "Adjusted-SSIM leak bar (default: metrics.DEFAULT_LEAK_SSIM).",
    lower_bound=0.0,
    upper_bound=1.0,
  )
  flags.DEFINE_float(
    "defended_fraction",
    1.0,
    "Fraction of the tested images the dataset threshold must defend.",
    lower_bound=0.0,
    upper_bound=1.0,
  )
  flags.DEFINE_integer(
    "iterations", 3000, "Attack optimiser iterations per restart.", lower_bound=1
  )
  cli.define_output_dir("outputs/threshold_search")
  cli.define_seed()
  cli.define_data_dir()


if __name__ == "__main__":
  define_flags()
  cli.run(main)
