"""L-BFGS history products: three matrix-vector products against one three-column product.

  .venv/bin/python -m benchmarks.lbfgs_products [--slots=4 --history=100 --size=3072]

Each iteration of the attack's L-BFGS (`tf_dlg.attacks.lbfgs`) writes its new pair
into the [slots, 2 x history, n] buffer and takes the buffer's products with g, y and s.
This times that step (push, two-loop recursion, direction) inside one XLA-compiled
loop, as the attack runs it, two ways on the same inputs in the same process: the
library's three `matvec`s, and the single product with the stacked [g, s, y] it
replaced. The results are checked equal (to float32 rounding); the default size is a
32x32x3 image.
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


def _stacked_products(pairs, g, s, y, m):
  """The replaced path: one product of the buffer with [g, s, y] (same outputs)."""
  prod = tf.linalg.matmul(pairs, tf.stack([g, s, y], axis=2))  # [S, 2m, 3]
  return prod[:, :, 0], prod[:, :, 2], prod[:, m:, 1]


def _loop(products, slots, n, m, steps):
  ok = tf.ones([slots], tf.bool)
  hdiag = tf.ones([slots])

  @tf.function(jit_compile=True, autograph=False)
  def run(st, g):
    def body(i, st, g):
      s, y = 1e-2 * g, 1.01e-2 * g + 1e-3
      hist, sg, yg = lbfgs.push_pair(st, s, y, g, ok, m, products)
      d = lbfgs.two_loop(hist, sg, yg, g, hdiag, m)
      return i + 1, dict(st, **hist), 0.999 * g + 1e-3 * d

    return tf.while_loop(lambda i, *_: i < steps, body, (0, st, g))[1:]

  return run


def _cpu():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main(argv):
  del argv
  S, n, m = FLAGS.slots, FLAGS.size, FLAGS.history
  g0 = tf.constant(np.random.default_rng(0).normal(size=(S, n)).astype(np.float32))
  st0 = lbfgs.add_history({}, g0, g0, m)
  ways = {
    "three matvecs (library)": lbfgs.matvec_products,
    "one [g, s, y] product": _stacked_products,
  }
  out, times = {}, {}
  for name, products in ways.items():
    run = _loop(products, S, n, m, FLAGS.steps)
    out[name] = run(st0, g0)  # compile + result
    c0, t0 = _cpu(), time.perf_counter()
    for _ in range(FLAGS.repeats):
      tf.nest.map_structure(lambda t: t.numpy(), run(st0, g0))
    steps = FLAGS.repeats * FLAGS.steps * S
    times[name] = (1e3 * (time.perf_counter() - t0) / steps, 1e3 * (_cpu() - c0) / steps)
  a, b = (out[k][1].numpy() for k in ways)
  np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  print(f"slots={S} history={m} n={n} steps={FLAGS.steps} load={os.getloadavg()[0]:.1f}")
  for name, (wall, cpu) in times.items():
    print(f"  {name:26s} {wall:.3f} ms wall, {cpu:.3f} ms CPU per slot-iteration")
  (w1, c1), (w2, c2) = times.values()
  print(f"  library / replaced: wall {w1 / w2:.2f}x, CPU {c1 / c2:.2f}x (results equal)")


if __name__ == "__main__":
  app.run(main)
