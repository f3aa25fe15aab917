r"""Experiment 1: the weakest setting of each defence that stops the attack.

For each dataset, `--num_images` training images are attacked one at a time (batch size 1,
the DLG/iDLG setting) through the reference LeNet. Each defence's parameter is searched by
bisection (`tf_dlg.analysis.threshold`) between the ends of its range
(`tf_dlg.defenses.PARAMETER_SEARCH`); a setting *defends* when at least
`--defended_fraction` of the images score a brightness-adjusted SSIM below `--leak_ssim`.
All images of one evaluation are attacked together as one batch. A reconstruction that
cannot be scored (non-finite) counts as leaked, never as defended, with a warning.
Every flag is checked before the first attack (one-line error, exit status 2).

Outputs in `--output_dir`:
  points.jsonl     every evaluated (dataset, attack, defence, parameter): per-image scores.
                   Written as it goes; a rerun skips finished points.
  recon/*.npz      leaked and brightness-adjusted images of every point.
  thresholds.csv   per dataset x attack x defence: threshold, fraction defended there,
                   SSIM / adjusted SSIM at the threshold and one step weaker, and whether
                   the attack leaks without a defence (`attack_works_undefended`): if it
                   does not, the threshold is "untested (attack fails undefended)".
  thresholds.md    the paper's table shape (defences x datasets), plus details.
  figures/grid_<dataset>_<attack>_<defence>.png
                   leaked | best brightness-adjusted | original for no defence, one step
                   below the threshold and at it (the paper's Figures 2-4).

Example:
  python -m experiments.threshold_search --datasets=digits,lfw_subset,photos \
      --defenses=masking,clipping,pruning,noising --num_images=4 --output_dir=/tmp/thr
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

# Imports TensorFlow quietly, before anything uses it or absl starts (experiments.cli).
from experiments import cli
from experiments import results as results_lib
from tf_dlg import io as io_lib
from tf_dlg import validation

DEFAULT_DEFENSES = ("masking", "clipping", "value_clipping", "pruning", "noising", "dp")
THRESHOLD_FIELDS = (
    "dataset", "dataset_source", "attack", "defense", "status", "threshold",
    "fraction_defended", "ssim_at_threshold", "adjusted_ssim_at_threshold", "weaker_param",
    "fraction_defended_weaker", "ssim_weaker", "adjusted_ssim_weaker", "points_evaluated",
    "search_low", "search_high", "search_scale", "stronger", "attack_works_undefended",
    "undefended_adjusted_ssim")
# Columns added later: a thresholds.csv without them still reads (as unknown).
OPTIONAL_FIELDS = ("attack_works_undefended", "undefended_adjusted_ssim")
NUMERIC_FIELDS = ("threshold", "fraction_defended", "ssim_at_threshold",
                  "adjusted_ssim_at_threshold", "weaker_param", "fraction_defended_weaker",
                  "ssim_weaker", "adjusted_ssim_weaker", "points_evaluated", "search_low",
                  "search_high", "undefended_adjusted_ssim")
_FINITE_FIELDS = ("threshold", "weaker_param", "search_low", "search_high")
STATUSES = ("found", "at_weakest", "not_reached")


UPDATE_KINDS = ("gradient", "fedavg_delta")
RECON_FORMAT = "tf_dlg.threshold_search.recon/v1"
# What a threshold means when the attack already fails without a defence.
UNTESTED = "untested (attack fails undefended)"


def point_key(dataset: str, attack: str, defense: str, param: Optional[float],
              update: str = "gradient") -> str:
  key = f"{dataset}|{attack}|{defense}|{'-' if param is None else repr(float(param))}"
  return key if update == "gradient" else f"{key}|{update}"


SEARCH_DEFAULTS = dict(num_images=4, iterations=3000, leak_ssim=None, defended_fraction=1.0,
                       bisection_steps=4, seed=0, local_steps=3, local_lr=0.1)


def _check_cover(datasets, attacks, defenses) -> None:
  """Every dataset / attack / defence name is known, and none of the lists is empty."""
  # pylint: disable=g-import-not-at-top
  from tf_dlg import data
  from tf_dlg import defenses as defenses_lib
  from tf_dlg.attacks import runner
  for name, values, allowed in (("datasets", datasets, data.DATASETS),
                                ("attacks", attacks, runner.ATTACKS),
                                ("defenses", defenses, defenses_lib.PARAMETER_SEARCH)):
    if not values:
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


class ThresholdSearch:
  """Runs (and resumes) the threshold search; see the module docstring.

  Args:
    output_dir: Where results go; an existing run there is resumed.
    datasets, attacks, defenses: What to cover.
    data_dir: tfds data directory for mnist / cifar10 / lfw.
    progress: Show progress bars.
    **settings: Any of `SEARCH_DEFAULTS` (which fills the rest); unknown names raise:
      num_images: Images attacked per dataset (training images 0..num_images-1 of a
        seeded permutation, so every defence sees the same images).
      iterations: Attack optimiser iterations, or {dataset: iterations}.
      leak_ssim: Adjusted-SSIM bar at or above which an image counts as leaked.
      defended_fraction: Fraction of images that must be defended for a setting to defend.
      bisection_steps: Steps after the two ends of each range.
      seed: Seeds image choice, model weights, defence randomness and attack init.
      local_steps, local_lr: The `fedavg_delta` threat model's local SGD steps and rate.
  """

  def __init__(self, output_dir: str, datasets: Sequence[str], attacks: Sequence[str],
               defenses: Sequence[str], data_dir: Optional[str] = None,
               progress: bool = True, **settings):
    from tf_dlg import metrics  # pylint: disable=g-import-not-at-top
    _check_cover(datasets, attacks, defenses)
    unknown = sorted(set(settings) - set(SEARCH_DEFAULTS))
    if unknown:
      raise ValueError(f"unknown settings {unknown}; expected some of {list(SEARCH_DEFAULTS)}.")
    st, v = dict(SEARCH_DEFAULTS, **settings), validation
    self.num_images = v.check_int("num_images", st["num_images"], 1)
    self.defended_fraction = v.check_number("defended_fraction", st["defended_fraction"], 0,
                                            1, low_open=True)
    self.leak_ssim = v.check_number(
        "leak_ssim", metrics.DEFAULT_LEAK_SSIM if st["leak_ssim"] is None else st["leak_ssim"],
        0, 1, low_open=True)
    self.bisection_steps = v.check_int("bisection_steps", st["bisection_steps"], 0)
    self.seed = v.check_int("seed", st["seed"], 0)
    self.local_steps = v.check_int("local_steps", st["local_steps"], 1)
    self.local_lr = v.check_number("local_lr", st["local_lr"], 0, math.inf, low_open=True)
    self.output_dir = v.check_output_dir("output_dir", output_dir)
    self.datasets, self.attacks, self.defenses = list(datasets), list(attacks), list(defenses)
    self.iterations = _iterations_per_dataset(st["iterations"], self.datasets)
    self.data_dir, self.progress = data_dir, progress
    self.config = dict(num_images=self.num_images, iterations=self.iterations,
                       leak_ssim=self.leak_ssim, defended_fraction=self.defended_fraction,
                       seed=self.seed, model="attack_lenet",
                       local_steps=self.local_steps,
                       local_lr=self.local_lr)
    os.makedirs(os.path.join(output_dir, "recon"), exist_ok=True)
    self.log = results_lib.ResultsLog(os.path.join(output_dir, "points.jsonl"),
                                      "threshold_search", self.config)
    self._cases: Dict[str, Any] = {}

  # ------------------------------------------------------------------ the case
  def case(self, dataset: str):
    """(dataset object, model, images, labels) of one dataset, built once."""
    if dataset not in self._cases:
      # pylint: disable=g-import-not-at-top
      from tf_dlg import data, models
      ds = data.load_dataset(dataset, data_dir=self.data_dir, seed=self.seed)
      if self.num_images > len(ds.x_train):
        raise ValueError(f"num_images={self.num_images} exceeds the {len(ds.x_train)} "
                         f"training images of {dataset!r}.")
      idx = np.random.default_rng(self.seed).permutation(len(ds.x_train))[:self.num_images]
      model = models.attack_lenet(ds.input_shape, ds.num_classes, seed=self.seed)
      self._cases[dataset] = (ds, model, ds.x_train[idx], ds.y_train[idx], idx)
    return self._cases[dataset]

  # ------------------------------------------------------------------ one point
  def evaluate(self, dataset: str, attack: str, defense: str, param: Optional[float],
               update: str = "gradient") -> Dict[str, Any]:
    """Attacks every image under `defense(param)`; cached in points.jsonl.

    `update` is what the client sends: its single-image `gradient` (the paper's setting)
    or a `fedavg_delta` of `local_steps` local SGD steps on that image (the multi-step
    FedAvg threat model; the attacker knows steps and learning rate).
    """
    if update not in UPDATE_KINDS:
      raise ValueError(f"update={update!r} must be one of {', '.join(UPDATE_KINDS)}.")
    key = point_key(dataset, attack, defense, param, update)
    if key in self.log:
      return self.log.get(key)
    # pylint: disable=g-import-not-at-top
    from tf_dlg import defenses as defenses_lib
    from tf_dlg.attacks import runner
    ds, model, images, labels, idx = self.case(dataset)
    defence = None if defense == "none" else defenses_lib.get_defense(defense, param)
    start = time.perf_counter()
    observed = [self._observe(model, images[i:i + 1], labels[i:i + 1], defence, update, i,
                              {"dataset": dataset, "index": int(idx[i])})
                for i in range(len(images))]
    attacked = runner.run_attacks(model, observed, attack=attack,
                                  iterations=self.iterations[dataset], seed=self.seed)
    per_image, leaked, adjusted = self._score(attacked, idx)
    unmeasured = [p["index"] for p in per_image if not math.isfinite(p["adjusted_ssim"])]
    if unmeasured:
      warnings.warn(f"{key}: images {unmeasured} have non-finite reconstructions; they "
                    "count as leaked, never as defended.", RuntimeWarning, stacklevel=2)
    recon = os.path.join("recon", hashlib.sha1(key.encode()).hexdigest()[:16] + ".npz")
    io_lib.save_npz(os.path.join(self.output_dir, recon),
                    {"format": RECON_FORMAT, "key": key},
                    {"leaked": np.stack(leaked), "adjusted": np.stack(adjusted),
                     "original": images})
    frac = float(np.mean([not p["leaked"] for p in per_image]))
    return self.log.add(key, {
        "dataset": dataset, "dataset_source": ds.source, "attack": attack,
        "defense": defense, "param": param, "update": update,
        "defense_config": None if defence is None else defence.get_config(),
        "fraction_defended": frac, "defended": frac >= self.defended_fraction - 1e-9,
        "unmeasured_images": unmeasured,
        "median_ssim": float(np.median([p["ssim"] for p in per_image])),
        "median_adjusted_ssim": float(np.median([p["adjusted_ssim"] for p in per_image])),
        "max_adjusted_ssim": float(np.max([p["adjusted_ssim"] for p in per_image])),
        "images": per_image, "recon": recon, "seconds": time.perf_counter() - start})

  def _observe(self, model, image, label, defence, update, i, meta):
    """What the attacker sees of image `i`: its defended gradient or FedAvg delta."""
    from tf_dlg.attacks import threat_model  # pylint: disable=g-import-not-at-top
    seed = self.seed * 100_003 + i
    if update == "gradient":
      return threat_model.observe_gradient(model, image, label, defense=defence, seed=seed,
                                           metadata=meta)
    return threat_model.observe_fedavg_delta(
        model, image, label, local_steps=self.local_steps, learning_rate=self.local_lr,
        defense=defence, seed=seed, metadata=meta)

  def _score(self, attacked, idx):
    """(per-image score dicts, leaked images, adjusted images) of one evaluation."""
    from tf_dlg import metrics  # pylint: disable=g-import-not-at-top
    per_image, leaked, adjusted = [], [], []
    for i, res in enumerate(attacked):
      score = metrics.score(res, threshold=self.leak_ssim, keep_images=True)
      leaked.append(score["leaked_image"])
      adjusted.append(score["adjusted_image"])
      per_image.append({
          "index": int(idx[i]), "status": res.status, "iterations": int(res.iterations),
          "ssim": float(score["ssim"]), "adjusted_ssim": float(score["adjusted_ssim"]),
          "psnr": float(score["psnr"]), "mse": float(score["mse"]),
          "label_correct": bool(score["label_correct"]), "leaked": bool(score["leaked"])})
    return per_image, leaked, adjusted

  # ------------------------------------------------------------------ the search
  def run(self) -> List[Dict[str, Any]]:
    """Searches every cell; writes thresholds.csv/md and grids; returns the rows."""
    # pylint: disable=g-import-not-at-top
    from tqdm import tqdm

    from tf_dlg import defenses as defenses_lib
    from tf_dlg.analysis import threshold as threshold_lib
    cells = [(d, a, f) for d in self.datasets for a in self.attacks for f in self.defenses]
    rows = []
    bar = tqdm(cells, desc="threshold search", unit="cell", disable=not self.progress)
    for dataset, attack, defense in bar:
      bar.set_postfix_str(f"{dataset}/{attack}/{defense}")
      base = self.evaluate(dataset, attack, "none", None)
      space = threshold_lib.SearchSpace(*defenses_lib.PARAMETER_SEARCH[defense])
      res = threshold_lib.find_threshold(
          lambda p, d=dataset, a=attack, f=defense: self.evaluate(d, a, f, p), space,
          steps=self.bisection_steps)
      at, weaker = res.outcome(res.threshold), res.outcome(res.weaker)
      rows.append({
          "dataset": dataset, "dataset_source": self.case(dataset)[0].source,
          "attack": attack, "defense": defense, "status": res.status,
          "threshold": res.threshold,
          "fraction_defended": at and at["fraction_defended"],
          "ssim_at_threshold": at and at["median_ssim"],
          "adjusted_ssim_at_threshold": at and at["median_adjusted_ssim"],
          "weaker_param": res.weaker,
          "fraction_defended_weaker": weaker and weaker["fraction_defended"],
          "ssim_weaker": weaker and weaker["median_ssim"],
          "adjusted_ssim_weaker": weaker and weaker["median_adjusted_ssim"],
          "points_evaluated": len(res.points), "search_low": space.low,
          "search_high": space.high, "search_scale": space.scale,
          "stronger": space.stronger,
          # Without a leak to stop, "the weakest setting defends" means nothing.
          "attack_works_undefended": not base["defended"],
          "undefended_adjusted_ssim": base["median_adjusted_ssim"]})
    bar.close()
    self.write_tables(rows)
    self.write_grids(rows)
    return rows

  # ------------------------------------------------------------------ beyond the paper
  def rescore(self, rows: List[Dict[str, Any]], attacks: Sequence[str] = ("ig", "masked_ig"),
              delta_attack: str = "idlg") -> List[Dict[str, Any]]:
    """Re-attacks every threshold with stronger attackers; writes robustness.csv/md.

    Each found threshold (first attack's search) is attacked again by the adaptive
    `attacks` on the single-image gradient, and by `delta_attack` on a multi-step FedAvg
    delta of the same image. The same attacks without a defence are run too: a threshold
    that "holds" only counts if that attacker recovers the undefended images.
    """
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    plan = [(a, "gradient") for a in attacks] + [(delta_attack, "fedavg_delta")]
    todo = [(r, a, u) for r in rows if r["threshold"] is not None for a, u in plan]
    out = []
    for r, attack, update in tqdm(todo, desc="adaptive re-scoring", unit="cell",
                                  disable=not self.progress):
      base = self.evaluate(r["dataset"], attack, "none", None, update)
      at = self.evaluate(r["dataset"], attack, r["defense"], r["threshold"], update)
      attack_works = base["fraction_defended"] < 1.0
      out.append({
          "dataset": r["dataset"], "defense": r["defense"], "threshold": r["threshold"],
          "searched_with": r["attack"], "attack": attack, "update": update,
          "undefended_adjusted_ssim": base["median_adjusted_ssim"],
          "undefended_leak_fraction": 1.0 - base["fraction_defended"],
          "fraction_defended": at["fraction_defended"],
          "adjusted_ssim": at["median_adjusted_ssim"],
          "max_adjusted_ssim": at["max_adjusted_ssim"],
          "verdict": ("broken" if not at["defended"] else
                      "holds" if attack_works else "untested (attack fails undefended)")})
    self.write_robustness(out)
    return out

  def write_robustness(self, out: List[Dict[str, Any]]) -> None:
    from tf_dlg.analysis import figures  # pylint: disable=g-import-not-at-top
    fields = list(out[0]) if out else ["dataset"]
    write_csv(os.path.join(self.output_dir, "robustness.csv"), fields, out)
    text = ("# Do the thresholds hold against stronger attackers?\n\n"
            f"Each threshold is attacked again by adaptive attackers on the single-image "
            f"gradient, and by `idlg` on a {self.local_steps}-step FedAvg client delta "
            f"(learning rate {self.local_lr}). *broken*: some image leaks (adjusted SSIM >= "
            f"{self.leak_ssim}) at the threshold. A verdict of *holds* needs the same attacker "
            "to recover undefended images.\n\n")
    text += figures.markdown_table(
        ["dataset", "defence", "threshold", "attack", "update", "undefended adj. SSIM",
         "defended", "adj. SSIM", "max adj. SSIM", "verdict"],
        [[o["dataset"], o["defense"], o["threshold"], o["attack"], o["update"],
          o["undefended_adjusted_ssim"], o["fraction_defended"], o["adjusted_ssim"],
          o["max_adjusted_ssim"], o["verdict"]] for o in out])
    io_lib.atomic_write_text(os.path.join(self.output_dir, "robustness.md"), text)

  # ------------------------------------------------------------------ outputs
  def write_tables(self, rows: List[Dict[str, Any]]) -> None:
    from tf_dlg.analysis import figures  # pylint: disable=g-import-not-at-top
    write_csv(os.path.join(self.output_dir, "thresholds.csv"), THRESHOLD_FIELDS, rows)
    lines = ["# Defence thresholds against gradient inversion\n",
             f"A setting *defends* when at least {self.defended_fraction:.0%} of "
             f"{self.num_images} images per dataset score a brightness-adjusted SSIM below "
             f"{self.leak_ssim} (attack iterations {self.iterations}, seed {self.seed}).\n"]
    for attack in self.attacks:
      header = ["defence"] + self.datasets
      table = []
      for defense in self.defenses:
        row = [defense]
        for dataset in self.datasets:
          r = next(x for x in rows if (x["dataset"], x["attack"], x["defense"]) ==
                   (dataset, attack, defense))
          row.append(format_threshold(r))
        table.append(row)
      lines.append(f"\n## Attack `{attack}`: threshold (fraction of images defended there)\n\n")
      lines.append(figures.markdown_table(header, table))
    lines.append("\n## Details\n\n")
    detail = ["dataset", "attack", "defence", "status", "threshold", "defended",
              "SSIM", "adj. SSIM", "one step weaker", "defended", "SSIM", "adj. SSIM",
              "points"]
    lines.append(figures.markdown_table(detail, [
        [r["dataset"], r["attack"], r["defense"], r["status"], r["threshold"],
         r["fraction_defended"], r["ssim_at_threshold"], r["adjusted_ssim_at_threshold"],
         r["weaker_param"], r["fraction_defended_weaker"], r["ssim_weaker"],
         r["adjusted_ssim_weaker"], r["points_evaluated"]] for r in rows]))
    lines.append("\nData:\n\n")
    for dataset in self.datasets:
      lines.append(f"- `{dataset}`: {self.case(dataset)[0].source}\n")
    io_lib.atomic_write_text(os.path.join(self.output_dir, "thresholds.md"), "".join(lines))

  def write_grids(self, rows: List[Dict[str, Any]]) -> List[str]:
    """The paper's Figures 2-4: no defence, one step below the threshold, at it."""
    from tf_dlg.analysis import figures  # pylint: disable=g-import-not-at-top
    paths = []
    for r in rows:
      dataset, attack, defense = r["dataset"], r["attack"], r["defense"]
      settings = [("no defence", self.log.get(point_key(dataset, attack, "none", None)))]
      if r["weaker_param"] is not None:
        settings.append((f"{defense} {r['weaker_param']:g} (weaker)",
                         self.log.get(point_key(dataset, attack, defense, r["weaker_param"]))))
      if r["threshold"] is not None:
        settings.append((f"{defense} {r['threshold']:g} (threshold)",
                         self.log.get(point_key(dataset, attack, defense, r["threshold"]))))
      grid = []
      for label, point in settings:
        _, z = io_lib.load_npz(os.path.join(self.output_dir, point["recon"]), RECON_FORMAT)
        # The image that leaked most at this setting: the figure shows the worst case.
        i = int(np.argmax([p["adjusted_ssim"] for p in point["images"]]))
        grid.append({"label": label, "leaked": z["leaked"][i], "adjusted": z["adjusted"][i],
                     "original": z["original"][i], "ssim": point["images"][i]["ssim"],
                     "adjusted_ssim": point["images"][i]["adjusted_ssim"]})
      path = os.path.join(self.output_dir, "figures", f"grid_{dataset}_{attack}_{defense}.png")
      figures.leak_grid(grid, path, title=f"{attack} vs {defense} on {dataset} ({r['status']})",
                        footer=f"data: {r['dataset_source']}")
      paths.append(path)
    return paths


def attack_untested(row: Dict[str, Any]) -> bool:
  """Whether a thresholds row's attack already failed without a defence."""
  works = row.get("attack_works_undefended")
  return works is False or works == "False"


def format_threshold(row: Dict[str, Any]) -> str:
  if attack_untested(row):
    return UNTESTED
  if row["status"] == "not_reached":
    bound = row["search_high"] if row["stronger"] == "higher" else row["search_low"]
    return f"not reached (leaks at {bound:g})"
  text = f"{row['threshold']:g} ({row['fraction_defended']:.0%})"
  return text if row["status"] == "found" else f"<= {text} (weakest tried)"


def write_csv(path: str, fields: Sequence[str], rows: Sequence[Dict[str, Any]]) -> str:
  """Atomically writes `rows` (None as an empty cell) under the header `fields`."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
  return io_lib.atomic_write_text(path, buf.getvalue())


def read_thresholds(path: str) -> List[Dict[str, Any]]:
  """Reads thresholds.csv back (numbers as floats, empty cells as None).

  Raises:
    ValueError: naming the file, line and column of a cell that is not what
      `experiments.threshold_search` writes (a number, a known status, a threshold where
      the status says one was found).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; run experiments.threshold_search first.")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = set(THRESHOLD_FIELDS) - set(OPTIONAL_FIELDS) - set(reader.fieldnames or [])
    if missing:
      raise ValueError(f"{path} is not a thresholds.csv (missing columns: {sorted(missing)}).")
    return [_threshold_row(r, f"{path}, line {reader.line_num}") for r in reader]


def _threshold_row(raw: Dict[str, str], where: str) -> Dict[str, Any]:
  """One parsed thresholds.csv row; `where` names the file and line in errors."""
  if None in raw:
    raise ValueError(f"{where}: more cells than the header has columns.")
  row: Dict[str, Any] = {}
  for k, v in raw.items():
    v = None if v is None or v.strip() == "" else v.strip()
    if k in NUMERIC_FIELDS and v is not None:
      try:
        v = float(v)
      except ValueError:
        raise ValueError(f"{where}, column {k!r}: {raw[k]!r} is not a number.") from None
      if k in _FINITE_FIELDS and not math.isfinite(v):
        raise ValueError(f"{where}, column {k!r}: {raw[k]!r} is not a finite number.")
    row[k] = v
  if row.get("status") not in STATUSES:
    raise ValueError(f"{where}, column 'status': {raw.get('status')!r} is not one of "
                     f"{', '.join(STATUSES)}.")
  need = ("threshold",) if row["status"] != "not_reached" else ("search_low", "search_high")
  for k in need + ("dataset", "attack", "defense"):
    if row.get(k) is None:
      raise ValueError(f"{where}, column {k!r}: empty, but status {row['status']!r} needs it.")
  return row


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  # The constructor checks every flag (a ValueError: one line, exit 2) before any attack.
  search = ThresholdSearch(
      f.output_dir, f.datasets, f.attacks, f.defenses, num_images=f.num_images,
      iterations=f.iterations, leak_ssim=f.leak_ssim, defended_fraction=f.defended_fraction,
      bisection_steps=f.bisection_steps, seed=f.seed, data_dir=f.data_dir)
  search.run()
  print(open(os.path.join(f.output_dir, "thresholds.md")).read())
  print(f"[threshold_search] outputs in {f.output_dir}")


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list("datasets", ["digits", "lfw_subset", "photos"], "Datasets to search.")
  flags.DEFINE_list("defenses", list(DEFAULT_DEFENSES), "Defences to search.")
  flags.DEFINE_list("attacks", ["idlg"], "Attacks (dlg, idlg, ig, masked_ig).")
  flags.DEFINE_integer("num_images", 4, "Images attacked per dataset.")
  flags.DEFINE_float("leak_ssim", None, "Adjusted-SSIM leak bar (default: metrics.DEFAULT_LEAK_SSIM).")
  flags.DEFINE_float("defended_fraction", 1.0, "Fraction of images that must be defended.")
  flags.DEFINE_integer("iterations", 3000, "Attack optimiser iterations (L-BFGS).")
  flags.DEFINE_integer("bisection_steps", 4, "Bisection steps after the two range ends.")
  flags.DEFINE_string("output_dir", "outputs/threshold_search", "Output directory.")
  flags.DEFINE_integer("seed", 0, "Seed.")
  flags.DEFINE_string("data_dir", None, "tfds data directory (mnist, cifar10, lfw).")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
