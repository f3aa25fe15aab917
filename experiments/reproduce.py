r"""The main job: reproduce the paper's experiments, test its claims, write a report.

Stages, each resumable (a rerun with the same --output_dir skips finished work):

1. threshold search (Experiment 1, `experiments.threshold_search`) on three datasets;
2. beyond the paper: every threshold re-attacked by adaptive attackers (cosine + TV,
   masked cosine) and on multi-step FedAvg client deltas;
3. convergence (Experiment 2, `experiments.convergence`) with each defence at its
   threshold, mean and median aggregation, IID and non-IID clients;
4. `claims.md`: each claim of the paper with our number beside it;
5. `report.md`: tables, figures, the exact command, versions, data, seeds, wall time.

Presets: `quick` (offline stand-ins digits / photos / lfw_subset, small N; about half an
hour on 2 CPU cores) and `paper` (tfds MNIST / CIFAR-10 / LFW, paper-scale N, rounds).
Flags given explicitly override the preset.

Example:
  python -m experiments.reproduce --preset=quick --output_dir=outputs/quick
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Dict, List, Sequence

# Imports TensorFlow quietly, before anything uses it or absl starts (experiments.cli).
from experiments import cli
from tf_dlg import io as io_lib
from tf_dlg import validation

PRESETS: Dict[str, Dict[str, Any]] = {
    "quick": dict(
        datasets=["digits", "photos", "lfw_subset"],
        defenses=["masking", "clipping", "value_clipping", "pruning", "noising", "dp"],
        attack="idlg", adaptive_attacks=["ig", "masked_ig"], num_images=3,
        # Undefended iDLG converges in a few hundred L-BFGS iterations on grey images
        # and in ~2,500 on colour photo crops; defended attacks run to the limit.
        iterations={"digits": 1000, "photos": 3000, "lfw_subset": 1000},
        bisection_steps=2, convergence_dataset="digits",
        convergence_defenses=["masking", "clipping", "pruning", "noising"],
        rounds=15, num_clients=10, partitions=["iid", "dirichlet"], alpha=0.5),
    "paper": dict(
        datasets=["mnist", "cifar10", "lfw"],
        defenses=["masking", "clipping", "value_clipping", "pruning", "noising", "dp"],
        attack="idlg", adaptive_attacks=["ig", "masked_ig"], num_images=16,
        iterations=8000, bisection_steps=5, convergence_dataset="mnist",
        convergence_defenses=["masking", "clipping", "pruning", "noising", "dp"],
        rounds=60, num_clients=10, partitions=["iid", "dirichlet"], alpha=0.5),
}

# "Almost no accuracy cost": a drop of at most this much final test accuracy (absolute).
ALMOST_NO_COST = 0.02


def _claim_row(claim: str, ours: str, verdict) -> List[str]:
  """`verdict`: True / False (agrees / disagrees), None (n/a) or a sentence."""
  if isinstance(verdict, str):
    return [claim, ours, verdict]
  return [claim, ours, "n/a" if verdict is None else ("agrees" if verdict else "disagrees")]


def _split_verdict(failed: bool, tested: int, untested: Sequence[str]):
  """Disagrees on any failure; no agreement from cells whose attack fails undefended."""
  from experiments.threshold_search import UNTESTED  # pylint: disable=g-import-not-at-top
  if failed:
    return False
  if not tested:
    return UNTESTED
  if untested:
    return f"inconclusive (attack fails undefended on {', '.join(untested)})"
  return True


def _threshold_claims(thresholds: List[Dict[str, Any]]) -> List[List[str]]:
  """"A threshold of X stops the attack on every dataset", per defence."""
  from experiments import threshold_search  # pylint: disable=g-import-not-at-top
  rows = []
  datasets = sorted({r["dataset"] for r in thresholds})
  for defense in sorted({r["defense"] for r in thresholds}):
    cells = [r for r in thresholds if r["defense"] == defense]
    untested = [r["dataset"] for r in cells if threshold_search.attack_untested(r)]
    tested = [r for r in cells if r["dataset"] not in untested]
    ours = ", ".join(
        f"{r['dataset']}: " + (threshold_search.UNTESTED if r["dataset"] in untested else
                               "not reached" if r["threshold"] is None else
                               f"{r['threshold']:g}") for r in cells)
    rows.append(_claim_row(
        f"A threshold of {defense} stops the attack on every dataset ({', '.join(datasets)})",
        ours, _split_verdict(any(r["status"] == "not_reached" for r in tested), len(tested),
                             untested)))
  return rows


def _cost_claims(convergence: List[Dict[str, Any]], tolerance: float) -> List[List[str]]:
  """Accuracy cost of each defence at its threshold (Figure 5's claims)."""
  from experiments.threshold_search import UNTESTED  # pylint: disable=g-import-not-at-top
  rows = []
  settings = sorted({(r["aggregator"], r["partition"]) for r in convergence})
  cheap = [r["drop_vs_none"] for r in convergence if r["defense"] in ("masking", "clipping")]
  for defense in ("masking", "clipping", "noising", "pruning"):
    d = [r for r in convergence if r["defense"] == defense]
    if not d:
      continue
    ours = "; ".join(f"{r['aggregator']}/{r['partition']}: {100 * r['drop_vs_none']:+.1f} pp"
                     for r in d)
    if defense in ("masking", "clipping"):
      claim = (f"{defense} at its threshold costs almost no accuracy (drop <= "
               f"{100 * tolerance:.0f} pp in every setting)")
      verdict = all(r["drop_vs_none"] <= tolerance for r in d)
    else:
      claim = (f"{defense} at its threshold degrades accuracy (drop > {100 * tolerance:.0f} pp "
               f"and more than masking/clipping) in most of {len(settings)} settings")
      worse = [r for r in d if r["drop_vs_none"] > tolerance and
               (not cheap or r["drop_vs_none"] > max(cheap))]
      verdict = len(worse) > len(d) / 2
    if any(UNTESTED in str(r.get("param_source")) for r in d):
      # The "threshold" is only the weakest value searched: its cost means nothing.
      verdict = "inconclusive (threshold untested: the attack fails undefended)"
    rows.append(_claim_row(claim, ours, verdict))
  return rows


def _robustness_claims(robustness: List[Dict[str, Any]]) -> List[List[str]]:
  """(ours) Each threshold against adaptive attackers and multi-step FedAvg deltas."""
  from experiments.threshold_search import UNTESTED  # pylint: disable=g-import-not-at-top
  rows = []
  for defense in sorted({r["defense"] for r in robustness}):
    rs = [r for r in robustness if r["defense"] == defense]
    broken = [r for r in rs if r["verdict"] == "broken"]
    untested = [f"{r['dataset']}/{r['attack']}/{r['update']}" for r in rs
                if r["verdict"] == UNTESTED]
    ours = (f"broken in {len(broken)} of {len(rs)} (dataset, attacker) cells" +
            (": " + ", ".join(f"{r['dataset']}/{r['attack']}/{r['update']}" for r in broken)
             if broken else ""))
    rows.append(_claim_row(f"(ours) {defense} at its threshold also stops adaptive "
                           "attackers and multi-step FedAvg deltas", ours,
                           _split_verdict(bool(broken), len(rs) - len(untested), untested)))
  return rows


def write_claims(output_dir: str, thresholds: List[Dict[str, Any]],
                 robustness: List[Dict[str, Any]], convergence: List[Dict[str, Any]],
                 tolerance: float = ALMOST_NO_COST) -> str:
  """claims.md: the paper's claims, our numbers beside them, and a verdict.

  Verdicts: agrees, disagrees, n/a, or -- where the attack already fails without a
  defence, so a defence "stopping" it shows nothing -- "untested (attack fails
  undefended)" or "inconclusive (...)"; never "agrees" on such cells.
  """
  from tf_dlg.analysis import figures  # pylint: disable=g-import-not-at-top
  rows = _threshold_claims(thresholds)
  rows += _cost_claims(convergence, tolerance) if convergence else []
  rows += _robustness_claims(robustness) if robustness else []
  text = ("# The paper's claims, tested\n\n"
          "Claims of Kim & Park (2024), *Random Gradient Masking as a Defensive Measure to "
          "Deep Leakage in Federated Learning*, with this run's numbers. Rows marked (ours) "
          "test the thresholds beyond the paper. The paper's own threshold values are not "
          "bundled with tf-dlg; compare the threshold row with its table by hand.\n\n"
          + figures.markdown_table(["claim", "our measurement", "verdict"], rows))
  return io_lib.atomic_write_text(os.path.join(output_dir, "claims.md"), text)


def _versions() -> Dict[str, str]:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version()}
  for pkg in ("tensorflow", "tensorflow-federated", "tensorflow-privacy",
              "tensorflow-probability", "tensorflow-datasets", "numpy", "scikit-image"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = "not installed"
  return out


def write_report(output_dir: str, settings: Dict[str, Any], sources: Dict[str, str],
                 stage_seconds: Dict[str, float], sections: List[str]) -> str:
  """report.md: every table and figure, with the command, versions, data and timing."""
  parts = ["# tf-dlg report\n\n",
           f"Command: `{' '.join([os.path.basename(sys.executable), '-m', 'experiments.reproduce'] + sys.argv[1:])}`\n\n",
           "## Settings\n\n```json\n" + io_lib.dumps(settings, indent=2, sort_keys=True) + "\n```\n\n",
           "## Data\n\n" + "".join(f"- `{k}`: {v}\n" for k, v in sources.items()) + "\n",
           "## Versions\n\n" + "".join(f"- {k} {v}\n" for k, v in _versions().items()) + "\n",
           "## Wall time\n\n" + "".join(f"- {k}: {v:.0f} s\n" for k, v in stage_seconds.items())
           + f"- total: {sum(stage_seconds.values()):.0f} s\n\n"]
  for rel in sections:
    path = os.path.join(output_dir, rel)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        text = f.read()
      # Demote headings one level and point image links into the section's folder.
      text = "\n".join(("#" + line) if line.startswith("#") else line
                       for line in text.splitlines())
      prefix = os.path.dirname(rel)
      if prefix:
        text = text.replace("](figures/", f"]({prefix}/figures/")
      parts.append(text + "\n\n")
  return io_lib.atomic_write_text(os.path.join(output_dir, "report.md"), "".join(parts))


def check_settings(output_dir: str, settings: Dict[str, Any], progress: bool = True):
  """Checks every setting before any work; returns the ThresholdSearch to run.

  Each stage's own constructor checks its settings, and the convergence stage is built
  once with stand-in parameters for that purpose (its real ones come from the search).
  """
  # pylint: disable=g-import-not-at-top
  from experiments import threshold_search
  from tf_dlg import defenses
  from tf_dlg.attacks import runner
  validation.check_output_dir("output_dir", output_dir)
  validation.check_choices("adaptive_attacks", settings["adaptive_attacks"], runner.ATTACKS)
  # A defence that is not searched has no threshold to train with: refuse, never drop it.
  validation.check_choices("convergence_defenses", settings["convergence_defenses"],
                           settings["defenses"])
  validation.check_choice("convergence_dataset", settings["convergence_dataset"],
                          settings["datasets"])
  stand_in = {d: (defenses.PARAMETER_SEARCH[d][0], "") for d in settings["convergence_defenses"]}
  _convergence(output_dir, settings, stand_in, progress)
  # Last: it opens (creates) the search's results file, which fixes its configuration.
  return threshold_search.ThresholdSearch(
      os.path.join(output_dir, "thresholds"), settings["datasets"], [settings["attack"]],
      settings["defenses"], num_images=settings["num_images"],
      iterations=settings["iterations"], leak_ssim=settings.get("leak_ssim"),
      bisection_steps=settings["bisection_steps"], seed=settings["seed"],
      data_dir=settings.get("data_dir"), progress=progress)


def _convergence(output_dir: str, settings: Dict[str, Any], params, progress: bool):
  from experiments import convergence as convergence_lib  # pylint: disable=g-import-not-at-top
  return convergence_lib.Convergence(
      os.path.join(output_dir, "convergence"), params, aggregators=("mean", "median"),
      partitions=settings["partitions"], progress=progress,
      dataset=settings["convergence_dataset"], rounds=settings["rounds"],
      num_clients=settings["num_clients"], alpha=settings["alpha"], seed=settings["seed"],
      data_dir=settings.get("data_dir"))


def run(output_dir: str, settings: Dict[str, Any], progress: bool = True) -> Dict[str, str]:
  """Runs all stages with `settings` (a preset, possibly overridden); returns paths."""
  from experiments import convergence as convergence_lib  # pylint: disable=g-import-not-at-top
  search = check_settings(output_dir, settings, progress)
  stage_seconds = {}

  t = time.perf_counter()
  rows = search.run()
  stage_seconds["threshold search"] = time.perf_counter() - t

  t = time.perf_counter()
  robustness = search.rescore(rows, attacks=settings["adaptive_attacks"],
                              delta_attack=settings["attack"])
  stage_seconds["adaptive re-scoring"] = time.perf_counter() - t

  t = time.perf_counter()
  params = convergence_lib.defense_params_from_thresholds(
      os.path.join(search.output_dir, "thresholds.csv"), settings["convergence_dataset"],
      settings["attack"])
  params = {k: v for k, v in params.items() if k in settings["convergence_defenses"]}
  conv = _convergence(output_dir, settings, params, progress)
  conv_rows = conv.run()
  stage_seconds["convergence"] = time.perf_counter() - t

  claims = write_claims(output_dir, rows, robustness, conv_rows)
  sources = {d: search.case(d)[0].source for d in settings["datasets"]}
  sources.setdefault(settings["convergence_dataset"], conv.dataset_source)
  report = write_report(output_dir, settings, sources, stage_seconds,
                        ["thresholds/thresholds.md", "thresholds/robustness.md",
                         "convergence/convergence.md", "claims.md"])
  _write_figure_index(output_dir)
  return {"report": report, "claims": claims}


def _write_figure_index(output_dir: str) -> None:
  """figures/ at the top level links every figure, so users find them in one place."""
  import shutil  # pylint: disable=g-import-not-at-top
  top = os.path.join(output_dir, "figures")
  os.makedirs(top, exist_ok=True)
  for sub in ("thresholds", "convergence"):
    src = os.path.join(output_dir, sub, "figures")
    if os.path.isdir(src):
      for name in sorted(os.listdir(src)):
        shutil.copyfile(os.path.join(src, name), os.path.join(top, name))


def settings_from_flags(flags_obj) -> Dict[str, Any]:
  """The preset's settings with the flags given explicitly put over them."""
  validation.check_choice("preset", flags_obj.preset, PRESETS)
  settings = dict(PRESETS[flags_obj.preset])
  settings["preset"] = flags_obj.preset
  settings["seed"] = flags_obj.seed
  settings["data_dir"] = flags_obj.data_dir
  settings["leak_ssim"] = flags_obj.leak_ssim
  for name in ("datasets", "defenses", "convergence_defenses", "partitions",
               "adaptive_attacks"):
    value = getattr(flags_obj, name)
    if value:
      settings[name] = list(value)
  for name in ("num_images", "iterations", "bisection_steps", "rounds", "num_clients",
               "convergence_dataset", "attack"):
    value = getattr(flags_obj, name)
    if value is not None:
      settings[name] = value
  if not flags_obj.convergence_defenses:
    # The preset's list follows --defenses; one given explicitly is checked, never cut.
    settings["convergence_defenses"] = [d for d in settings["convergence_defenses"]
                                        if d in settings["defenses"]]
  return settings


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  # Every flag is checked before any stage starts (run -> check_settings); a ValueError
  # becomes one line and exit status 2 (experiments.cli).
  settings = settings_from_flags(flags.FLAGS)
  start = time.time()
  paths = run(flags.FLAGS.output_dir, settings)
  with open(paths["claims"], encoding="utf-8") as f:
    print(f.read())
  print(f"[reproduce] report: {paths['report']}  ({time.time() - start:.0f} s)")


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("preset", "quick", f"One of {', '.join(PRESETS)}.")
  flags.DEFINE_string("output_dir", "outputs/quick", "Output directory (resumed if present).")
  flags.DEFINE_integer("seed", 0, "Seed of everything.")
  flags.DEFINE_string("data_dir", None, "tfds data directory (paper preset).")
  flags.DEFINE_float("leak_ssim", None, "Adjusted-SSIM leak bar (default metrics.DEFAULT_LEAK_SSIM).")
  flags.DEFINE_list("datasets", None, "Override the preset's datasets.")
  flags.DEFINE_list("defenses", None, "Override the preset's defences.")
  flags.DEFINE_list("convergence_defenses", None, "Defences trained in FedAvg.")
  flags.DEFINE_list("partitions", None, "Client partitions of the convergence runs.")
  flags.DEFINE_list("adaptive_attacks", None, "Attacks that re-score the thresholds.")
  flags.DEFINE_string("attack", None, "Attack of the threshold search.")
  flags.DEFINE_integer("num_images", None, "Images per dataset.")
  flags.DEFINE_integer("iterations", None, "Attack iterations.")
  flags.DEFINE_integer("bisection_steps", None, "Bisection steps.")
  flags.DEFINE_integer("rounds", None, "FedAvg rounds.")
  flags.DEFINE_integer("num_clients", None, "FedAvg clients.")
  flags.DEFINE_string("convergence_dataset", None, "Dataset of the FedAvg runs.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
