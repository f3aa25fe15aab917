"""The smallest valid pipeline run (one seed, image, round and client) finishes.

A whole pipeline trains with TFF, so this module runs on the pinned stack only
(tests/conftest.py); the one-seed reporting it relies on is tested on both stacks in
test_probe_one_seed.py.
"""

import re

import pytest

from tf_dlg.study import presets

NO = "n=1: no interval"


@pytest.mark.slow  # a whole pipeline run: 65 s on 2 busy cores
def test_one_seed_one_image_one_round_one_client_pipeline_finishes(tmp_path):
  """The smallest valid run: report.md and report.html, point estimates, no infinities."""
  from tf_dlg.study import pipeline

  settings = presets.with_overrides(
    "quick", dict(datasets=["digits"], convergence_dataset="digits")
  ).override(
    defenses=["masking"],
    convergence_defenses=["masking"],
    num_images=1,
    iterations={"digits": 30},
    restarts=1,
    log_resolution=1000.0,
    adaptive=False,
    adaptive_attacks=[],
    rounds=1,
    num_clients=1,
    seeds=1,
    train_examples=40,
    test_examples=20,
    partitions=["iid"],
    aggregators=["mean"],
  )
  paths = pipeline.run(str(tmp_path), settings, progress=False)
  md = open(paths["report"], encoding="utf-8").read()
  assert open(paths["html"], encoding="utf-8").read().startswith("<!")
  assert NO in md and not re.search(r"[-+]?\binf\b", md), md
