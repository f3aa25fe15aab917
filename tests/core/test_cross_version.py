"""The core on the pinned stack (TF 2.14, Keras 2) and on today's (TF 2.21, Keras 3).

Runs in both environments (`.venv` and `.venv-k3`, see bazel_free_scripts/test.sh):
- an undefended iDLG attack recovers a real digit;
- every measurable defence gives, on a fixed update, the statistics recorded on TF 2.14
  in `defense_stats_tf2_14.json` (zero fraction, norms, a checksum of the values):
  the same masks, prunings, noise draws and clippings on either TensorFlow. Pruning's
  zero fraction and the clipped norms are also checked against their definitions.
Regenerate the record on the pinned stack with `.venv/bin/python tests/core/test_cross_version.py`.
"""

import json
import math
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import defenses, metrics, models
from tf_dlg.attacks import AttackConfig, observe_gradient, run_attacks

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "defense_stats_tf2_14.json")
SHAPES = [(5, 5, 1, 12), (12,), (588, 10), (10,)]
# (defence, parameter, seed, exclude): seeds as ints and as [2] pairs.
CASES = [
  ("masking", 0.3, 0, None),
  ("masking", 0.9, [1, 2], None),
  ("masking", 0.5, 4, [False, True, False, True]),
  ("pruning", 0.6, 0, None),
  ("pruning", 0.25, 0, [True, False, False, False]),
  ("noising", 0.01, 0, None),
  ("noising", 0.05, [3, 9], None),
  ("noising_ratio", 0.5, 5, None),
  ("clipping", 1.0, 0, None),
  ("clipping_ratio", 0.25, 0, None),
  ("value_clipping", 0.02, 0, None),
]


def _update():
  """A fixed update from a formula, not a generator, so it is the same under any NumPy."""
  out, start = [], 0
  for shape in SHAPES:
    n = int(np.prod(shape))
    i = np.arange(start, start + n, dtype=np.float64)
    out.append((0.05 * np.sin(0.7311 * i) * np.cos(0.013 * i)).astype(np.float32).reshape(shape))
    start += n
  return out


def _key(name, param, seed, exclude):
  return f"{name}:{param}:{seed}:{'' if exclude is None else ''.join('1' if e else '0' for e in exclude)}"


def _stats(name, param, seed, exclude):
  update = _update()
  out = [t.numpy() for t in defenses.get_defense(name, param, exclude=exclude)(update, seed)]
  flat = np.concatenate([t.ravel() for t in out]).astype(np.float64)
  weights = np.cos(0.37 * np.arange(flat.size))
  return {
    "zero_fraction": float(np.mean(flat == 0)),
    "norm": float(np.linalg.norm(flat)),
    "checksum": float(np.dot(flat, weights)),
    "first_kernel_zeros": int(np.sum(out[0] == 0)),
  }


@pytest.mark.parametrize("case", CASES, ids=[_key(*c) for c in CASES])
def test_defence_statistics_match_the_tf_2_14_record(case):
  with open(RECORD) as f:
    record = json.load(f)
  assert record["tensorflow"].startswith("2.14"), record["tensorflow"]
  expected = record["stats"][_key(*case)]
  got = _stats(*case)
  assert got["zero_fraction"] == expected["zero_fraction"]
  assert got["first_kernel_zeros"] == expected["first_kernel_zeros"]
  assert got["norm"] == pytest.approx(expected["norm"], rel=1e-5)
  assert got["checksum"] == pytest.approx(expected["checksum"], rel=1e-4, abs=1e-6)


def test_pruning_and_clipping_by_their_definitions():
  update = _update()
  n = sum(t.size for t in update)
  norm = math.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in update))
  assert _stats("pruning", 0.6, 0, None)["zero_fraction"] == pytest.approx(0.6, abs=1.0 / n)
  assert _stats("clipping", 1.0, 0, None)["norm"] == pytest.approx(min(1.0, norm), rel=1e-6)
  assert _stats("clipping_ratio", 0.25, 0, None)["norm"] == pytest.approx(0.25 * norm, rel=1e-5)
  assert norm > 1.0  # so clipping at 1.0 acts


def test_idlg_recovers_a_real_digit(digits):
  model = models.lenet(digits.input_shape, digits.num_classes, seed=0)
  obs = [observe_gradient(model, digits.x_train[3:4], digits.y_train[3:4])]
  result = run_attacks(model, obs, AttackConfig(attack="idlg", iterations=1500, seed=0))[0]
  row = metrics.score(result)
  print("keras", tf.keras.__version__ if hasattr(tf.keras, "__version__") else "?", row["ssim"])
  assert row["ssim"] >= 0.9 and row["label_correct"], row


if __name__ == "__main__":
  stats = {_key(*c): _stats(*c) for c in CASES}
  json.dump({"tensorflow": tf.__version__, "stats": stats}, sys.stdout, indent=1, sort_keys=True)
