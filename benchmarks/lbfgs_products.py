"""L-BFGS history reads: the library's step (the buffer read three times) against the code
before (four).

  .venv/bin/python -m benchmarks.lbfgs_products [--slots=4 --history=100 --size=3072]

Each iteration of the attack's L-BFGS (`tf_dlg.attacks.lbfgs`) writes its new pair into
the [slots, 2 x history, n] buffer and takes its products with g and y; the code before
also took the product with s, for the new s's row of s_i . y_j, which the two-loop
recursion never reads (`push_pair`). This runs the library's whole compiled step
(`build_lbfgs`, XLA) on a cheap objective (an ill-conditioned diagonal quadratic, so the
history work dominates) both ways on the same inputs in the same process
(`new_row=False` / `True`), and checks the iterates equal (the diagonal s . y is summed
from another product, so to float32 rounding at most); the default size is a 32x32x3 image.
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
  ways = {"two products (library)": False, "three products (before)": True}
  out, times = {}, {}
  for name, new_row in ways.items():
    opt = lbfgs.build_lbfgs(_quadratic(n), jit_compile=True, history=m, new_row=new_row)
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
  # Only the diagonal s . y is summed another way (from S^T y): rounding at most.
  np.testing.assert_allclose(a["x"], b["x"], rtol=1e-4, atol=1e-5)
  same = "bit for bit" if np.array_equal(a["x"], b["x"]) else "to float32 rounding"
  print(f"slots={S} history={m} n={n} steps={FLAGS.steps} load={os.getloadavg()[0]:.1f}")
  for name, (wall, cpu) in times.items():
    print(f"  {name:22s} {wall:.3f} ms wall, {cpu:.3f} ms CPU per slot-iteration")
  (w1, c1), (w2, c2) = times.values()
  print(f"  library / before: wall {w1 / w2:.2f}x, CPU {c1 / c2:.2f}x (iterates equal {same})")


if __name__ == "__main__":
  app.run(main)
