"""The threshold search's cached evaluator: one image attacked at one setting, once.

Every (dataset, attack, defence, parameter, update, image) point is attacked at most
once: its scores go to points.jsonl (`tf_dlg.study.results.ResultsLog`, which resumes a
run) and its images to an npz under recon/; a later question about it reads them back.
The uncached points of one question run in ONE attack call.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tf_dlg import io as io_lib
from tf_dlg import validation
from tf_dlg.study import defense_table, matching, records
from tf_dlg.study.records import RECON_FORMAT, UPDATE_KINDS, point_key

# {defence: (the other unit's name, statistic of the undefended update it scales by)}.
RELATIVE_OF = defense_table.RELATIVE_OF
ABSOLUTE_OF = defense_table.ABSOLUTE_OF
# How a reconstruction is matched to the dataset's images (identification.SIMILARITIES).
IDENTIFY_SIMILARITY = "abs_pearson"


# The search's settings an evaluator reads (`ThresholdSearch` holds them).
SETTINGS = (
  "iterations",
  "num_images",
  "seed",
  "leak_ssim",
  "restarts",
  "local_steps",
  "local_lr",
  "defended_fraction",
)


class PointEvaluator:
  """Evaluates (and caches) the points of the threshold search.

  Args:
    output_dir: Where recon/ and the gallery matcher's candidate cache go.
    log: The `ResultsLog` of points.jsonl.
    cases: The `SearchCases` of the attacked datasets.
    settings: The search whose `SETTINGS` it reads (`iterations`: {dataset: attack
      optimiser iterations per restart}; the others as
      `tf_dlg.study.threshold_search.ThresholdSearch` takes them).
  """

  def __init__(self, output_dir: str, log, cases, settings):
    self.output_dir, self.log, self.cases = output_dir, log, cases
    for name in SETTINGS:
      setattr(self, name, getattr(settings, name))
    # update_stats per dataset, computed once.
    self.stats: Dict[str, Dict[str, np.ndarray]] = {}
    # The gallery matcher's candidate updates, kept between its calls (large: gallery x
    # parameters x 4 bytes; removed when the search finishes).
    self._cache_dir = os.path.join(output_dir, "gallery_cache")
    self.attack_calls: List[Tuple[str, str, str, int]] = []  # (dataset, attack, defence, n)

  def update_stats(self, dataset: str) -> Dict[str, np.ndarray]:
    """Per image: L2 norm and RMS of its undefended gradient (for unit conversions)."""
    if dataset not in self.stats:
      from tf_dlg.defenses import base

      _, model, images, labels, idx = self.cases.case(dataset)
      norms, rms = [], []
      for i in range(len(images)):
        obs = self._observe(model, images[i : i + 1], labels[i : i + 1], None, "gradient", i, {})
        norms.append(float(base.global_norm(obs.update)))
        rms.append(float(base.root_mean_square(obs.update)))
      self.stats[dataset] = {"norm": np.array(norms), "rms": np.array(rms)}
    return self.stats[dataset]

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

    ds, model, images, labels, idx = self.cases.case(dataset)
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
        model,
        observed,
        self.cases.gallery_arrays(dataset),
        indices,
        self.leak_ssim,
        self._cache_dir,
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
      per_image, leaked, adjusted = score_reconstructions(
        attacked, indices, self.cases.gallery(dataset), self.leak_ssim
      )
    self.attack_calls.append((dataset, attack, defense, len(todo)))
    seconds = (time.perf_counter() - start) / len(todo)
    self.store_points(
      ds.source,
      (dataset, attack, defense, update),
      todo,
      per_image,
      configs,
      (leaked, adjusted, np.stack([images[i] for _, i, _ in todo])),
      seconds,
    )

  def store_points(self, source, cell, todo, per_image, configs, pictures, seconds):
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

  def release(self) -> None:
    """Removes the gallery matcher's candidate cache (a rerun rebuilds it once)."""
    import shutil

    shutil.rmtree(self._cache_dir, ignore_errors=True)


def score_reconstructions(attacked, indices, gallery, leak_ssim):
  """(per-image score dicts, leaked images, adjusted images) of one attack call.

  Besides the adjusted-SSIM scores, each reconstruction is identified among all images
  of its dataset (`tf_dlg.analysis.identification.defended_verdicts`): the rank of its
  original, the attacker's pick, and `id_defended` (the original is not the pick).
  """
  from tf_dlg import metrics
  from tf_dlg.analysis import identification

  per_image, leaked, adjusted = [], [], []
  for index, res in zip(indices, attacked):
    score = metrics.score(res, threshold=leak_ssim, keep_images=True)
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
  with warnings.catch_warnings():  # `store_points` warns about non-finite reconstructions
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
