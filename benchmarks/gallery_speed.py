"""Gallery matching: seconds to score a gallery against observed updates, and peak memory.

  python -m benchmarks.gallery_speed [--dataset=mnist] [--updates=1] [--plain_candidates=2000]

On the attack LeNet (seed 0), the dataset's whole gallery (MNIST: 70,000 images, train
then test) is scored against `--updates` observed gradients of its first training images
(masking 0.9, so the masked cosine is exercised) four ways, same inputs, one run:

* `plain`: a `tf.vectorized_map` of one image's gradient over chunks of 500 candidates
  (the straightforward per-example construction), on the first `--plain_candidates`
  candidates only (it is slow), then extrapolated per candidate;
* `batched`: `gallery.match_gallery` (weights tiled per candidate, one XLA-compiled
  backward pass per chunk, two matrix products for the scores), first call (compile
  included) and a second call;
* `cached`: the same with `cache_dir`: the first call writes every candidate's update
  to a memory map, the second reads it instead of recomputing (the threshold search's
  case: many defended updates of one model).

Both batched and plain ranks are compared on the shared candidates (they must agree).
Peak memory is the process's maximum resident set size (`resource.getrusage`), read after
the batched calls and at the end (the cache's mapped pages count once read).
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402  (imports TensorFlow quietly first)
from tf_dlg import data, defenses, models  # noqa: E402
from tf_dlg.attacks import gallery, threat_model  # noqa: E402
from tf_dlg.study import matching  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "mnist", "Dataset whose gallery is scored.")
flags.DEFINE_integer("updates", 1, "Observed updates scored in one pass.", lower_bound=1)
flags.DEFINE_integer("plain_candidates", 2000, "Candidates the plain path scores.", lower_bound=1)


def plain_scores(model, observed, images, labels, chunk: int = 500) -> np.ndarray:
  """Masked cosine by `tf.vectorized_map` over per-candidate gradients: [N, U]."""
  import tensorflow as tf

  flat = np.stack([np.concatenate([np.ravel(u) for u in o.update]) for o in observed])
  obs = tf.constant(flat, tf.float32)
  carried = tf.constant((flat != 0).astype(np.float32))

  def one(args):
    x, y = args
    with tf.GradientTape() as tape:
      logits = model(x[None], training=True)
      loss = tf.reduce_mean(
        tf.keras.losses.sparse_categorical_crossentropy(y[None], logits, from_logits=True)
      )
    g = tape.gradient(loss, model.trainable_variables)
    return tf.concat([tf.reshape(u, [-1]) for u in g], 0)

  @tf.function
  def chunk_scores(x, y):
    g = tf.vectorized_map(one, (x, y))
    dots = tf.matmul(g, obs, transpose_b=True)
    norms = tf.sqrt(tf.matmul(tf.square(g), carried, transpose_b=True))
    return dots / (norms * tf.norm(obs, axis=1)[None])

  out = [
    chunk_scores(images[s : s + chunk], labels[s : s + chunk]).numpy()
    for s in range(0, len(images), chunk)
  ]
  return np.concatenate(out)


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def main(argv):
  del argv
  ds = data.load_dataset(FLAGS.dataset)
  x, y = matching.gallery_arrays(ds)
  model = models.attack_lenet(ds.input_shape, ds.num_classes, seed=0)
  defence = defenses.get_defense("masking", 0.9)
  members = list(range(FLAGS.updates))
  observed = [
    threat_model.observe_gradient(model, x[i : i + 1], y[i : i + 1], defence, seed=i)
    for i in members
  ]
  run = lambda **kw: gallery.match_gallery(model, observed, x, y, [[i] for i in members], **kw)
  print(f"{ds.source}: {len(x)} candidates, {FLAGS.updates} observed update(s), attack LeNet")
  first, _ = _timed(run)
  second, res = _timed(run)
  # Before the cache: a memory map's pages count as resident once read.
  peak_batched = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  cache = tempfile.mkdtemp(prefix="gallery_speed_")
  try:
    write, _ = _timed(lambda: run(cache_dir=cache))
    read, cached = _timed(lambda: run(cache_dir=cache))
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  n_plain = min(FLAGS.plain_candidates, len(x))
  t_plain, plain = _timed(lambda: plain_scores(model, observed, x[:n_plain], y[:n_plain]))
  batched, _ = gallery.score_gallery(model, observed, x[:n_plain], y[:n_plain])
  agree = np.allclose(plain, batched, atol=1e-4)
  assert [r.ranks.tolist() for r in res] == [r.ranks.tolist() for r in cached]
  per = lambda seconds: seconds / len(x)
  plain_full = t_plain / n_plain * len(x)
  rows = [
    ("plain vectorized_map (extrapolated)", plain_full),
    ("batched, first call (compiles)", first),
    ("batched", second),
    ("cached, first call (writes the map)", write),
    ("cached, later calls (reads it)", read),
  ]
  print(f"{'path':40s} {'s / gallery':>12s} {'us / candidate':>15s} {'plain / path':>13s}")
  for name, seconds in rows:
    print(f"{name:40s} {seconds:12.1f} {1e6 * per(seconds):15.1f} {plain_full / seconds:13.1f}")
  print(f"plain and batched scores agree on {n_plain} candidates (atol 1e-4): {agree}")
  print(f"original ranks: {[int(r.ranks[0]) for r in res]}")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"peak resident memory: {peak_batched:.0f} MiB (batched, no cache), {peak:.0f} MiB (all)")


if __name__ == "__main__":
  cli.run(main)
