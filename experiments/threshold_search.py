r"""Experiment 1: the weakest setting of each defence that stops the attack.

For each dataset, `--num_images` training images are attacked one at a time (batch size 1,
the DLG/iDLG setting) through the reference LeNet. Each defence's parameter is searched by
bisection (`tf_dlg.analysis.threshold`) between the ends of its range
(`tf_dlg.defenses.PARAMETER_SEARCH`); a setting *defends* when at least
`--defended_fraction` of the images score a brightness-adjusted SSIM below `--leak_ssim`.
All images of one evaluation are attacked together as one batch.

Outputs in `--output_dir`:
  points.jsonl     every evaluated (dataset, attack, defence, parameter): per-image scores.
                   Written as it goes; a rerun skips finished points.
  recon/*.npz      leaked and brightness-adjusted images of every point.
  thresholds.csv   per dataset x attack x defence: threshold, fraction defended there,
                   SSIM / adjusted SSIM at the threshold and one step weaker.
  thresholds.md    the paper's table shape (defences x datasets), plus details.
  figures/grid_<dataset>_<attack>_<defence>.png
                   leaked | best brightness-adjusted | original for no defence, one step
                   below the threshold and at it (the paper's Figures 2-4).

Example:
  python -m experiments.threshold_search --datasets=digits,lfw_subset,photos \
      --defenses=masking,clipping,pruning,noising --num_images=4 --output_dir=/tmp/thr
"""

from __future__ import annotations

# TensorFlow must be imported before absl's app.run starts main(): importing it first
# inside main() breaks Keras layer building (Flatten sees a None shape).
import tensorflow as tf  # noqa: F401  pylint: disable=unused-import

import csv
import hashlib
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from experiments import results as results_lib

DEFAULT_DEFENSES = ("masking", "clipping", "value_clipping", "pruning", "noising", "dp")
THRESHOLD_FIELDS = (
    "dataset", "dataset_source", "attack", "defense", "status", "threshold",
    "fraction_defended", "ssim_at_threshold", "adjusted_ssim_at_threshold", "weaker_param",
    "fraction_defended_weaker", "ssim_weaker", "adjusted_ssim_weaker", "points_evaluated",
    "search_low", "search_high", "search_scale", "stronger")


UPDATE_KINDS = ("gradient", "fedavg_delta")


def point_key(dataset: str, attack: str, defense: str, param: Optional[float],
              update: str = "gradient") -> str:
  key = f"{dataset}|{attack}|{defense}|{'-' if param is None else repr(float(param))}"
  return key if update == "gradient" else f"{key}|{update}"


class ThresholdSearch:
  """Runs (and resumes) the threshold search; see the module docstring.

  Args:
    output_dir: Where results go; an existing run there is resumed.
    datasets, attacks, defenses: What to cover.
    num_images: Images attacked per dataset (training images 0..num_images-1 of a seeded
      permutation, so every defence sees the same images).
    iterations: Attack optimiser iterations, or {dataset: iterations}.
    leak_ssim: Adjusted-SSIM bar at or above which an image counts as leaked.
    defended_fraction: Fraction of images that must be defended for a setting to defend.
    bisection_steps: Steps after the two ends of each range.
    seed: Seeds image choice, model weights, defence randomness and attack init.
    data_dir: tfds data directory for mnist / cifar10 / lfw.
    local_steps, local_lr: The `fedavg_delta` threat model's local SGD steps and rate.
  """

  def __init__(self, output_dir: str, datasets: Sequence[str], attacks: Sequence[str],
               defenses: Sequence[str], num_images: int = 4, iterations=3000,
               leak_ssim: Optional[float] = None, defended_fraction: float = 1.0,
               bisection_steps: int = 4, seed: int = 0, data_dir: Optional[str] = None,
               local_steps: int = 3, local_lr: float = 0.1, progress: bool = True):
    # pylint: disable=g-import-not-at-top
    from tf_dlg import data, defenses as defenses_lib, metrics
    from tf_dlg.attacks import runner
    if not datasets:
      raise ValueError("datasets is empty; expected some of " + ", ".join(data.DATASETS))
    for d in datasets:
      if d not in data.DATASETS:
        raise ValueError(f"Unknown dataset {d!r}; expected one of {', '.join(data.DATASETS)}.")
    for a in attacks:
      if a not in runner.ATTACKS:
        raise ValueError(f"Unknown attack {a!r}; expected one of {', '.join(runner.ATTACKS)}.")
    for name in defenses:
      if name not in defenses_lib.PARAMETER_SEARCH:
        raise ValueError(f"Unknown defence {name!r}; expected one of "
                         f"{', '.join(defenses_lib.PARAMETER_SEARCH)}.")
    if not isinstance(num_images, int) or num_images < 1:
      raise ValueError(f"num_images={num_images!r} must be an integer >= 1.")
    if not 0.0 < defended_fraction <= 1.0:
      raise ValueError(f"defended_fraction={defended_fraction!r} must be in (0, 1].")
    self.leak_ssim = metrics.DEFAULT_LEAK_SSIM if leak_ssim is None else float(leak_ssim)
    if not 0.0 < self.leak_ssim <= 1.0:
      raise ValueError(f"leak_ssim={leak_ssim!r} must be in (0, 1].")
    self.output_dir = output_dir
    self.datasets, self.attacks, self.defenses = list(datasets), list(attacks), list(defenses)
    # One number for every dataset, or {dataset: iterations} (colour photos need several
    # times the L-BFGS iterations of grey images to converge undefended).
    if isinstance(iterations, dict):
      missing = set(datasets) - set(iterations)
      if missing:
        raise ValueError(f"iterations has no entry for datasets {sorted(missing)}.")
      self.iterations = {d: int(iterations[d]) for d in datasets}
    else:
      self.iterations = {d: int(iterations) for d in datasets}
    for d, it in self.iterations.items():
      if it < 1:
        raise ValueError(f"iterations={it!r} for {d!r} must be an integer >= 1.")
    self.num_images = num_images
    self.defended_fraction, self.bisection_steps = float(defended_fraction), int(bisection_steps)
    self.seed, self.data_dir, self.progress = int(seed), data_dir, progress
    self.local_steps, self.local_lr = int(local_steps), float(local_lr)
    self.config = dict(num_images=num_images, iterations=self.iterations,
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
    from tf_dlg import defenses as defenses_lib, metrics
    from tf_dlg.attacks import runner, threat_model
    ds, model, images, labels, idx = self.case(dataset)
    defence = None if defense == "none" else defenses_lib.get_defense(defense, param)
    start = time.perf_counter()
    observed = []
    for i in range(len(images)):
      meta = {"dataset": dataset, "index": int(idx[i])}
      if update == "gradient":
        observed.append(threat_model.observe_gradient(
            model, images[i:i + 1], labels[i:i + 1], defense=defence,
            seed=self.seed * 100_003 + i, metadata=meta))
      else:
        observed.append(threat_model.observe_fedavg_delta(
            model, images[i:i + 1], labels[i:i + 1], local_steps=self.local_steps,
            learning_rate=self.local_lr, defense=defence, seed=self.seed * 100_003 + i,
            metadata=meta))
    attacked = runner.run_attacks(model, observed, attack=attack,
                                  iterations=self.iterations[dataset], seed=self.seed)
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
    recon = os.path.join("recon", hashlib.sha1(key.encode()).hexdigest()[:16] + ".npz")
    np.savez_compressed(os.path.join(self.output_dir, recon), leaked=np.stack(leaked),
                        adjusted=np.stack(adjusted), original=images)
    frac = float(np.mean([not p["leaked"] for p in per_image]))
    return self.log.add(key, {
        "dataset": dataset, "dataset_source": ds.source, "attack": attack,
        "defense": defense, "param": param, "update": update,
        "defense_config": None if defence is None else defence.get_config(),
        "fraction_defended": frac, "defended": frac >= self.defended_fraction - 1e-9,
        "median_ssim": float(np.median([p["ssim"] for p in per_image])),
        "median_adjusted_ssim": float(np.median([p["adjusted_ssim"] for p in per_image])),
        "max_adjusted_ssim": float(np.max([p["adjusted_ssim"] for p in per_image])),
        "images": per_image, "recon": recon, "seconds": time.perf_counter() - start})

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
      self.evaluate(dataset, attack, "none", None)
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
          "stronger": space.stronger})
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
    with open(os.path.join(self.output_dir, "robustness.csv"), "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=fields)
      w.writeheader()
      w.writerows(out)
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
    with open(os.path.join(self.output_dir, "robustness.md"), "w") as f:
      f.write(text)

  # ------------------------------------------------------------------ outputs
  def write_tables(self, rows: List[Dict[str, Any]]) -> None:
    from tf_dlg.analysis import figures  # pylint: disable=g-import-not-at-top
    with open(os.path.join(self.output_dir, "thresholds.csv"), "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=THRESHOLD_FIELDS)
      w.writeheader()
      for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in THRESHOLD_FIELDS})
    lines = [f"# Defence thresholds against gradient inversion\n",
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
    with open(os.path.join(self.output_dir, "thresholds.md"), "w") as f:
      f.write("".join(lines))

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
        with np.load(os.path.join(self.output_dir, point["recon"])) as z:
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


def format_threshold(row: Dict[str, Any]) -> str:
  if row["status"] == "not_reached":
    bound = row["search_high"] if row["stronger"] == "higher" else row["search_low"]
    return f"not reached (leaks at {bound:g})"
  text = f"{row['threshold']:g} ({row['fraction_defended']:.0%})"
  return text if row["status"] == "found" else f"<= {text} (weakest tried)"


def read_thresholds(path: str) -> List[Dict[str, Any]]:
  """Reads thresholds.csv back (numbers as floats, empty cells as None)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; run experiments.threshold_search first.")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = set(THRESHOLD_FIELDS) - set(reader.fieldnames or [])
    if missing:
      raise ValueError(f"{path} is not a thresholds.csv (missing columns: {sorted(missing)}).")
    out = []
    for r in reader:
      row = {}
      for k, v in r.items():
        if v == "":
          row[k] = None
        else:
          try:
            row[k] = float(v)
          except ValueError:
            row[k] = v
      out.append(row)
  return out


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
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
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)
