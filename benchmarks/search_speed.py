"""One threshold-search cell's bisection: the two leak criteria one after the other (the
search before), against both in lockstep (the library's `cell_search.bisect_criteria`).

  .venv/bin/python -m benchmarks.search_speed [--dataset=cifar10_sample --defense=masking]

A cell bisects every image under two criteria (adjusted SSIM, identification). One after
the other, each step is one attack call of the images still bisecting under that
criterion, often a few; in lockstep a step of both is one call, a point both ask is
attacked once, and the call's images share one wave of slots. Each way runs on its own
fresh search (its own points cache) with the same images, seeds and attack budget, after
every slot shape either meets is compiled; the table prints attack calls, images
attacked, wall and CPU seconds and the ratio, and the run fails unless both ways find the
same per-image points and thresholds (a point's outcome does not depend on its batch).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from experiments import cli  # noqa: E402
from tf_dlg.analysis import threshold  # noqa: E402
from tf_dlg.attacks import runner  # noqa: E402
from tf_dlg.study import cell_search, defense_table  # noqa: E402
from tf_dlg.study.presets import PRESETS  # noqa: E402
from tf_dlg.study.threshold_search import ThresholdSearch  # noqa: E402

FLAGS = flags.FLAGS
QUICK = PRESETS["quick"]
flags.DEFINE_string("dataset", "cifar10_sample", "Dataset of the cell.")
flags.DEFINE_string("defense", "masking", "Defence of the cell.")
flags.DEFINE_string("attack", "idlg", "Attack of the cell.")
flags.DEFINE_integer("num_images", QUICK.num_images, "Images of the cell.", lower_bound=1)
flags.DEFINE_integer(
  "iterations", 0, "Attack iterations (0: the quick preset's for the dataset).", lower_bound=0
)
flags.DEFINE_integer("seed", QUICK.seed, "Seed of images, model and attack starts.")


def _cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _search(output_dir: str) -> ThresholdSearch:
  iterations = FLAGS.iterations or QUICK.iterations[FLAGS.dataset]
  return ThresholdSearch(
    output_dir,
    [FLAGS.dataset],
    [FLAGS.attack],
    [FLAGS.defense],
    num_images=FLAGS.num_images,
    iterations=iterations,
    restarts=QUICK.restarts,
    seed=FLAGS.seed,
    progress=False,
  )


def _warm(search: ThresholdSearch) -> None:
  """Compiles every slot shape either way meets: a lane of 2 up to num_images slots (a
  lockstep call of 2 x num_images images on two lanes; compiled code does not depend on
  the lane count), so neither way is timed compiling."""
  from tf_dlg.attacks import threat_model

  _, model, images, labels, _ = search.case(FLAGS.dataset)
  observed = [
    threat_model.observe_gradient(model, images[i : i + 1], labels[i : i + 1], seed=i)
    for i in range(FLAGS.num_images)
  ]
  config = runner.AttackConfig(attack=FLAGS.attack, iterations=2, seed=0, lanes=1)
  for size in range(2, max(FLAGS.num_images, runner.DEFAULT_SLOTS // 2) + 1):
    warm = dataclasses.replace(config, slots=size)
    runner.run_attacks(model, (observed * 3)[: size + 1], warm)


def _way(search: ThresholdSearch, together: bool):
  """(per-criterion images, calls, images attacked, wall s, CPU s) of one way."""
  space = threshold.SearchSpace(*defense_table.PARAMETER_SEARCH[FLAGS.defense])
  base = search.evaluate(FLAGS.dataset, FLAGS.attack, "none", None)["images"]
  leaks = {v: [not im[v] for im in base] for v in cell_search.VERDICTS}
  cell = (FLAGS.dataset, (FLAGS.attack,), FLAGS.defense)
  calls0 = len(search.attack_calls)
  t0, cpu0 = time.perf_counter(), _cpu_seconds()
  if together:
    found = dict(
      cell_search.bisect_criteria(search.evaluator, search.resolution, cell, space, leaks)
    )
  else:
    found = {}
    for v in cell_search.VERDICTS:

      def evaluate(requests, v=v):
        recs = search.evaluator.evaluate_images(
          FLAGS.dataset, FLAGS.attack, FLAGS.defense, requests
        )
        return [r[v] for r in recs]

      found[v] = threshold.per_image_thresholds(
        evaluate, space, leaks[v], search.resolution(space.scale)
      )
  wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
  calls = search.attack_calls[calls0:]
  return found, len(calls), sum(c[3] for c in calls), wall, cpu


def _same(a, b) -> bool:
  return all(
    [(im.status, im.threshold, im.points) for im in a[v]]
    == [(im.status, im.threshold, im.points) for im in b[v]]
    for v in cell_search.VERDICTS
  )


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    plain, lock = _search(os.path.join(tmp, "plain")), _search(os.path.join(tmp, "lockstep"))
    source = plain.case(FLAGS.dataset)[0].source
    _warm(plain)
    rows = [("one criterion after the other", _way(plain, False))]
    rows.append(("both in lockstep (library)", _way(lock, True)))
  base_wall = rows[0][1][3]
  print(
    f"\nOne cell's bisection: {FLAGS.dataset} ({source}), {FLAGS.attack} vs {FLAGS.defense}, "
    f"{FLAGS.num_images} images, seed {FLAGS.seed}; compilation excluded.\n"
  )
  print("| way | attack calls | images attacked | wall s | CPU s | wall vs before |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, (_, calls, images, wall, cpu) in rows:
    print(f"| {name} | {calls} | {images} | {wall:.1f} | {cpu:.1f} | {wall / base_wall:.2f}x |")
  if not _same(rows[0][1][0], rows[1][1][0]):
    raise SystemExit("the two ways found different per-image points or thresholds")
  print("\nper-image points and thresholds: equal under both criteria")


if __name__ == "__main__":
  cli.run(main)
