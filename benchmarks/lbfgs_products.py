"""L-BFGS history reads: y_i . s from the Gram matrices against a third product with the buffer.

  .venv/bin/python -m benchmarks.lbfgs_products [--slots=4 --history=100 --size=3072]

Each iteration of the attack's L-BFGS (`tf_dlg.attacks.lbfgs`) writes its new pair into
the [slots, 2 x history, n] buffer and needs the new inner products with every pair. This
runs the library's whole compiled step (`build_lbfgs`, XLA) on a cheap objective (an
ill-conditioned diagonal quadratic, so the history work dominates), two ways on the same
inputs in the same process: the library's (products with g and y, y_i . s from the Gram
matrices: three reads of the buffer per iteration with the direction) and `gram=False`
(y_i . s read off the buffer: four), with the loss each reaches printed beside (the two
agree step by step to float32 rounding: `tests/attacks/test_optimize.py`); the default
size is a 32x32x3 image.
"""

from __future__ import annotations

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cli  # noqa: E402
from tf_dlg.attacks import lbfgs  # noqa: E402

tf = cli.tf  # imported quietly by experiments.cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("slots", 4, "Slots of one compiled loop.", lower_bound=1)
flags.DEFINE_integer("history", 100, "L-BFGS history (pairs kept).", lower_bound=1)
flags.DEFINE_integer("size", 3072, "Unknowns per slot (32 x 32 x 3).", lower_bound=1)
flags.DEFINE_integer("steps", 100, "Iterations per compiled loop.", lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timed loops per way.", lower_bound=1)


def _quadratic(n):
  """0.5 sum_i a_i x_i^2 with a_i from 1 to 1e4: far from solved in `--steps` iterations."""
  a = tf.constant(np.logspace(0, 4, n).astype(np.float32))

  def value_fn(x, c):
    del c
    loss = 0.5 * tf.reduce_sum(a * x * x, 1)
    return loss, loss, a * x

  return value_fn


def _cpu():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main(argv):
  del argv
  S, n, m = FLAGS.slots, FLAGS.size, FLAGS.history
  x0 = tf.constant(np.random.default_rng(0).normal(size=(S, n)).astype(np.float32))
  tol, active = tf.fill([S], 1e-30), tf.ones([S], tf.bool)
  ways = {"Gram y.s (library)": True, "buffer y.s (before)": False}
  out, times = {}, {}
  for name, gram in ways.items():
    opt = lbfgs.build_lbfgs(_quadratic(n), jit_compile=True, history=m, gram=gram)
    st0 = opt.init_fn(x0, {}, tol, active)

    def run(st0=st0, opt=opt):
      return opt.chunk_fn(st0, {}, tol, FLAGS.steps, 10**9, 1, 0)

    out[name] = run()  # compile + result
    c0, t0 = _cpu(), time.perf_counter()
    for _ in range(FLAGS.repeats):
      tf.nest.map_structure(lambda t: t.numpy(), run())
    steps = FLAGS.repeats * FLAGS.steps * S
    times[name] = (1e3 * (time.perf_counter() - t0) / steps, 1e3 * (_cpu() - c0) / steps)
  a, b = (out[k] for k in ways)
  # Every step after the first pushed a real pair (the comparison covers them all).
  assert int(a["iters"][0]) == FLAGS.steps
  assert int(b["valid"].numpy().sum(1).min()) == min(FLAGS.steps - 1, m)
  # Fixed-step L-BFGS on an ill-conditioned problem amplifies rounding over 100 steps,
  # so the runs are compared by what they reach (the unit test compares them step by step).
  la, lb = a["loss"].numpy(), b["loss"].numpy()
  print(f"  final loss per slot: library {np.round(la, 3)}, before {np.round(lb, 3)}")
  print(f"slots={S} history={m} n={n} steps={FLAGS.steps} load={os.getloadavg()[0]:.1f}")
  for name, (wall, cpu) in times.items():
    print(f"  {name:22s} {wall:.3f} ms wall, {cpu:.3f} ms CPU per slot-iteration")
  (w1, c1), (w2, c2) = times.values()
  print(f"  library / before: wall {w1 / w2:.2f}x, CPU {c1 / c2:.2f}x ")


if __name__ == "__main__":
  app.run(main)
