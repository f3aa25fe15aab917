"""The threshold search: each image's threshold, and each dataset's, with intervals.

See `experiments/threshold_search.py` for the method, outputs and the thresholds.csv
columns; this module is the library the command line calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_dlg import io as io_lib
from tf_dlg import validation
from tf_dlg.study import defense_table, matching, records, tables
from tf_dlg.study import results as results_lib
from tf_dlg.study.records import RECON_FORMAT, UNTESTED, UPDATE_KINDS, point_key

DEFAULT_DATASETS = ("mnist", "cifar10_sample", "lfw_faces")
DEFAULT_DEFENSES = defense_table.PAPER_DEFENSES
# Read from each defence's row (`tf_dlg.study.defense_table`): its strongest attackers,
# and {defence: (the other unit's name, statistic of the undefended update it scales by)}.
STRONGEST_ATTACKER = defense_table.STRONGEST_ATTACKERS
RELATIVE_OF = defense_table.RELATIVE_OF
ABSOLUTE_OF = defense_table.ABSOLUTE_OF
# How a reconstruction is matched to the dataset's images (identification.SIMILARITIES).
IDENTIFY_SIMILARITY = "abs_pearson"

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
  adaptive_datasets=None,
  seed=0,
  local_steps=3,
  local_lr=0.1,
  bisection_steps=None,
)


def _check_cover(datasets, attacks, defenses, adaptive) -> None:
  """Every dataset / attack / defence name is known, and no needed list is empty."""
  from tf_dlg import data
  from tf_dlg.attacks import runner

  for name, values, allowed in (
    ("datasets", datasets, data.DATASETS),
    ("attacks", attacks, (*runner.ATTACKS, matching.NAME)),
    ("defenses", defenses, defense_table.PARAMETER_SEARCH),
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
    adaptive_datasets=st["adaptive_datasets"],
    iterations=st["iterations"],
  )
  if st["bisection_steps"] is not None:
    v.check_int("bisection_steps", st["bisection_steps"], 0)
  return out


@dataclasses.dataclass
class SearchedCell:
  """One searched (dataset, kind, attackers, defence): its row and per-image thresholds."""

  row: records.ThresholdRow
  images: List[Any]  # tf_dlg.analysis.threshold.ImageThreshold per image (adjusted SSIM)
  id_images: List[Any]  # the same under the identification criterion


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
    validation.check_choices("adaptive_datasets", adaptive_datasets, self.datasets)
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
      identification=dict(similarity=IDENTIFY_SIMILARITY, gallery="x_train+x_test"),
    )
    os.makedirs(os.path.join(output_dir, "recon"), exist_ok=True)
    self.log = results_lib.ResultsLog(
      os.path.join(output_dir, "points.jsonl"), "threshold_search", self.config
    )
    self._cases: Dict[str, Any] = {}
    self._stats: Dict[str, Dict[str, np.ndarray]] = {}
    self._galleries: Dict[Any, Any] = {}
    # The gallery matcher's candidate updates, kept between its calls (large: gallery x
    # parameters x 4 bytes; removed when the search finishes).
    self._cache_dir = os.path.join(output_dir, "gallery_cache")
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

  def gallery(self, dataset: str):
    """Every image of `dataset` (train then test: training index i is gallery index i)."""
    if dataset not in self._galleries:
      from tf_dlg.analysis import identification

      self._galleries[dataset] = identification.Gallery.from_dataset(self.case(dataset)[0])
    return self._galleries[dataset]

  def gallery_arrays(self, dataset: str):
    """(images, labels) of the gallery, for the gallery matcher (same order as `gallery`)."""
    key = ("arrays", dataset)
    if key not in self._galleries:
      self._galleries[key] = matching.gallery_arrays(self.case(dataset)[0])
    return self._galleries[key]

  def gallery_image(self, dataset: str, index: int) -> np.ndarray:
    """The image at gallery `index` (the attacker's pick), as the dataset stores it."""
    ds = self.case(dataset)[0]
    n = len(ds.x_train)
    return ds.x_train[index] if index < n else ds.x_test[index - n]

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
      meta = {"dataset": dataset, "index": int(idx[i]), "image": int(i)}
      observed.append(
        self._observe(model, images[i : i + 1], labels[i : i + 1], defence, update, i, meta)
      )
    indices = [idx[i] for _, i, _ in todo]
    if attack == matching.NAME:
      per_image, leaked, adjusted = matching.score_matches(
        model, observed, self.gallery_arrays(dataset), indices, self.leak_ssim, self._cache_dir
      )
    else:
      # One seed per image, the same at every setting: common random starts make the
      # outcome vary with the setting, not with the start.
      config = runner.AttackConfig(
        attack=attack,
        iterations=self.iterations[dataset],
        seed=tuple(self.seed * 100_003 + i for _, i, _ in todo),
        restarts=self.restarts,
      )
      attacked = runner.run_attacks(model, observed, config)
      per_image, leaked, adjusted = self._score(dataset, attacked, indices)
    self.attack_calls.append((dataset, attack, defense, len(todo)))
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
      point = records.Point(
        **score,
        dataset=dataset,
        dataset_source=source,
        attack=attack,
        defense=defense,
        param=p,
        update=update,
        image=int(i),
        defense_config=config,
        recon=recon,
        recon_row=row,
        seconds=seconds,
      )
      self.log.add(key, point.to_record())

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

  def _score(self, dataset, attacked, indices):
    """(per-image score dicts, leaked images, adjusted images) of one attack call.

    Besides the adjusted-SSIM scores, each reconstruction is identified among all images
    of its dataset (`tf_dlg.analysis.identification.defended_verdicts`): the rank of its
    original, the attacker's pick, and `id_defended` (the original is not the pick).
    """
    from tf_dlg import metrics
    from tf_dlg.analysis import identification

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
    gallery = self.gallery(dataset)
    with warnings.catch_warnings():  # `_store` warns about non-finite reconstructions
      warnings.simplefilter("ignore", RuntimeWarning)
      verdicts = identification.defended_verdicts(
        np.stack(leaked), gallery, np.asarray(indices, np.int64), IDENTIFY_SIMILARITY
      )
    for score, v in zip(per_image, verdicts):
      score.update(
        rank=v["rank"],
        top1=v["rank"] == 1 and v["pick"] >= 0,
        top5=v["rank"] <= 5 and v["pick"] >= 0,
        pick=v["pick"],
        pick_similarity=v["pick_similarity"],
        gallery_size=len(gallery),
        id_defended=v["defended"],
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
        (d, "adaptive", STRONGEST_ATTACKER[f], f)
        for d in self.adaptive_datasets
        for f in self.defenses
      ]
    return out

  def search_cell(
    self, dataset: str, kind: str, attackers: Sequence[str], defense: str
  ) -> "SearchedCell":
    """Per-image bisection of one cell under both leak criteria; its row and images.

    An image leaks at a setting if any of the attackers recovers it: adjusted SSIM at
    or above the bar (`defended` false), or identified top-1 among all the dataset's
    images (`id_defended` false). Both bisections share the attacked points.
    """
    from tf_dlg.analysis import threshold as threshold_lib

    start = time.perf_counter()
    space = threshold_lib.SearchSpace(*defense_table.PARAMETER_SEARCH[defense])
    n = self.num_images
    base = {a: self.evaluate(dataset, a, "none", None)["images"] for a in attackers}
    found = {}
    for verdict in ("defended", "id_defended"):
      leaks = [not all(base[a][i][verdict] for a in attackers) for i in range(n)]
      images = self._bisect(dataset, attackers, defense, space, verdict, leaks)
      agg = threshold_lib.dataset_threshold(images, space, self.defended_fraction, seed=self.seed)
      found[verdict] = (images, agg)
    row = self._row(dataset, kind, attackers, defense, space, found)
    undefended = [max(base[a][i]["adjusted_ssim"] for a in attackers) for i in range(n)]
    row.undefended_adjusted_ssim = float(np.median(undefended))
    row.points_evaluated = sum(len(im.points) for im in found["defended"][0])
    rates = (
      ("undefended_top1", "none", None),
      ("top1_at_threshold", defense, _rated(row.threshold, space)),
      ("top1_at_id_threshold", defense, _rated(row.id_threshold, space)),
    )
    for name, defence, value in rates:
      iv = self.top1_rate(dataset, attackers, defence, value)
      setattr(row, name, iv.estimate)
      setattr(row, f"{name}_low", iv.low)
      setattr(row, f"{name}_high", iv.high)
    setting = _protective(row, space)
    row.protective_setting = setting
    measured = self.measures(dataset, attackers, defense, setting)
    for name in matching.MEASURES:
      setattr(row, matching.column(name, "_at_protective"), measured[name])
    row.seconds = time.perf_counter() - start
    return SearchedCell(row, found["defended"][0], found["id_defended"][0])

  def _bisect(self, dataset, attackers, defense, space, verdict, leaks):
    """Per-image thresholds where `verdict` (a point's boolean field) means defended."""
    from tf_dlg.analysis import threshold as threshold_lib

    def evaluate(requests):
      recs = [self.evaluate_images(dataset, a, defense, requests) for a in attackers]
      return [all(r[j][verdict] for r in recs) for j in range(len(requests))]

    return threshold_lib.per_image_thresholds(evaluate, space, leaks, self.resolution(space.scale))

  def top1_rate(self, dataset: str, attackers: Sequence[str], defense: str, param):
    """Fraction of the images some attacker identifies top-1 at `defense(param)`.

    An `Interval` with the exact binomial interval over images; a reconstruction that
    is not finite is not identified.
    """
    from tf_dlg.analysis import identification

    requests = [(i, param) for i in range(self.num_images)]
    recs = {a: self.evaluate_images(dataset, a, defense, requests) for a in attackers}
    return identification.identification_rate(matching.identified_by(recs, list(attackers)))

  def measures(self, dataset: str, attackers: Sequence[str], defense: str, param):
    """`matching.MEASURES` at `defense(param)`: top-1 by any attacker and by each kind,
    the originals' median best rank and the membership measures."""
    requests = [(i, param) for i in range(self.num_images)]
    recs = {a: self.evaluate_images(dataset, a, defense, requests) for a in attackers}
    return matching.leak_measures(recs)

  def _row(self, dataset, kind, attackers, defense, space, found) -> records.ThresholdRow:
    ssim = _criterion(*found["defended"], space)
    absolute, relative = self.equivalents(dataset, defense, ssim["threshold"])
    ident = _criterion(*found["id_defended"], space)
    return records.ThresholdRow(
      dataset=dataset,
      dataset_source=self.case(dataset)[0].source,
      kind=kind,
      attack="+".join(attackers),
      defense=defense,
      unit=defense_table.row(defense).param_name,
      **ssim,
      num_images=len(found["defended"][0]),
      restarts=self.restarts,
      seed=self.seed,
      iterations=self.iterations[dataset],
      defended_fraction=self.defended_fraction,
      resolution=self.resolution(space.scale),
      absolute_equivalent=absolute,
      relative_equivalent=relative,
      search_low=space.low,
      search_high=space.high,
      search_scale=space.scale,
      stronger=space.stronger,
      gallery_size=len(self.gallery(dataset)),
      **{f"id_{k}": v for k, v in ident.items()},
    )

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
        self.write_csv([c.row.to_dict() for c in cells])
        on_cell()
    bar.close()
    rows = [c.row.to_dict() for c in cells]
    self.write_tables(rows)
    self.write_strip_plots(rows)
    self.write_grids(cells)
    self.release()
    return rows

  def release(self) -> None:
    """Removes the gallery matcher's candidate cache (a rerun rebuilds it once)."""
    import shutil

    shutil.rmtree(self._cache_dir, ignore_errors=True)

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
    fields = list(out[0]) if out else ["dataset"]
    records.write_csv(os.path.join(self.output_dir, "robustness.csv"), fields, out)
    text = tables.robustness_markdown(out, self)
    io_lib.atomic_write_text(os.path.join(self.output_dir, "robustness.md"), text)

  # ------------------------------------------------------------------ outputs
  def write_csv(self, rows: List[Dict[str, Any]]) -> None:
    """thresholds.csv."""
    records.write_csv(
      os.path.join(self.output_dir, "thresholds.csv"), records.THRESHOLD_FIELDS, rows
    )

  def write_tables(self, rows: List[Dict[str, Any]]) -> None:
    """thresholds.csv and thresholds.md."""
    self.write_csv(rows)
    sources = {d: self.case(d)[0].source for d in self.datasets}
    text = tables.thresholds_markdown(rows, self, sources)
    io_lib.atomic_write_text(os.path.join(self.output_dir, "thresholds.md"), text)

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

  def write_grids(self, cells: Sequence["SearchedCell"]) -> List[str]:
    """The paper's Figures 2-4 for the median-threshold image of each cell, with the
    dataset image the attacker would pick beside each reconstruction."""
    from tf_dlg.analysis import threshold_figures

    paths = []
    for cell in cells:
      r = cell.row.to_dict()
      pick = _representative(cell.images, r["search_scale"], r["stronger"])
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
      threshold_figures.leak_grid_with_pick(
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
    # The grid shows reconstructions; a gallery pick only where no reconstruction ran.
    drawn = [a for a in attackers if a != matching.NAME] or list(attackers)
    recs = [self.log.get(point_key(dataset, a, defense, param, image=image)) for a in drawn]
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
      "pick": None if rec["pick"] < 0 else self.gallery_image(dataset, rec["pick"]),
      "rank": rec["rank"],
      "top1": rec["top1"],
    }


def _criterion(images, agg, space) -> Dict[str, Any]:
  """The thresholds.csv fields of one criterion's per-image and dataset thresholds."""
  untested = agg.status == "untested"
  return dict(
    status="at_weakest" if untested else agg.status,
    threshold=space.weakest() if untested else agg.threshold,
    low=agg.low,
    high=agg.high,
    interval_open=agg.open_strong_end,
    num_tested=agg.num_tested,
    rank=agg.rank,
    per_image=json.dumps(
      [im.threshold if im.status in ("found", "at_weakest") else None for im in images]
    ),
    per_image_status=json.dumps([im.status for im in images]),
    # Without a leak to stop, "the weakest setting defends" means nothing.
    attack_works_undefended=not untested,
  )


def _rated(threshold: Optional[float], space) -> float:
  """Where a threshold's identification rate is measured: at it, or (not reached) at
  the strongest setting searched."""
  return space.strongest() if threshold is None else threshold


def _protective(row: records.ThresholdRow, space) -> float:
  """The setting that protects under both criteria: the stronger of the two thresholds,
  or the strongest searched where either criterion is not reached."""
  if "not_reached" in (row.status, row.id_status):
    return space.strongest()
  values = [v for v in (row.threshold, row.id_threshold) if v is not None]
  return max(values) if space.stronger == "higher" else min(values)


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
