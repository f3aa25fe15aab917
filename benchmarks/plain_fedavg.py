r"""FedAvg without TFF: the compute floor of a round, and the search for settings that learn.

  .venv/bin/python -m benchmarks.plain_fedavg --grid          # the settings table
  .venv/bin/python -m benchmarks.plain_fedavg --rounds=20 --train_examples=10000 --seed=1

The same clients, the same local steps (a `tf.function` step per batch, or one over a
client's whole epoch, `whole_epoch`; a fresh client optimizer each round) and weighted averaging of every model weight -- trainable ones and
BatchNorm's moving statistics, as `tf_dlg.federated` does -- in one process with NumPy
averaging and no federation. `tf_dlg.federated` in TFF must reach the same accuracy; this
loop is how settings are searched quickly and what `benchmarks.round_speed` divides by.
Coordinate-wise median (unweighted) is the robust aggregator of the paper's Figure 5.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable, List, Sequence

import numpy as np
from absl import flags

# First: imports TensorFlow quietly and before absl's app.run (see experiments.cli).
from experiments import cli
from tf_dlg import data as data_lib
from tf_dlg import models

tf = cli.tf
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of the search: what a client trains and how much data there is."""

  model: str = "bn_cnn"
  width: int = 16
  train_examples: int = 6000
  test_examples: int = 2000
  num_clients: int = 10
  partition: str = "iid"
  aggregator: str = "mean"
  local_epochs: int = 1
  batch_size: int = 32
  client_optimizer: str = "adam"
  client_lr: float = 0.001
  bn_momentum: float = 0.9
  rounds: int = 20
  seed: int = 0


def subset(dataset, setting: Setting):
  """Seeded training and test subsets (the same rule for every setting of one seed)."""
  rng = np.random.default_rng(setting.seed)
  tr = rng.choice(len(dataset.x_train), setting.train_examples, replace=False)
  te = rng.choice(len(dataset.x_test), setting.test_examples, replace=False)
  return dataset.x_train[tr], dataset.y_train[tr], dataset.x_test[te], dataset.y_test[te]


def build(setting: Setting, input_shape, num_classes, whole_epoch: bool = False):
  """(model, optimizer, compiled local training) for `setting`.

  The training function is one `tf.function` step per batch (`step(x, y)`), or with
  `whole_epoch` one `tf.function` call over a client's whole dataset (`step(dataset)`:
  every batch of its local epochs in one graph, no Python between batches).
  """
  if setting.model in ("bn_cnn", "bn_cnn_gap"):
    head = "gap" if setting.model == "bn_cnn_gap" else "flatten"
    model = models.bn_cnn(
      input_shape, num_classes, seed=setting.seed, width=setting.width, head=head
    )
  else:
    model = models.build_model(setting.model, input_shape, num_classes, seed=setting.seed)
  for layer, _ in models.batchnorm_variables(model):
    layer.momentum = setting.bn_momentum
  if setting.client_optimizer == "adam":
    opt = tf.keras.optimizers.Adam(setting.client_lr)
  else:
    opt = tf.keras.optimizers.SGD(setting.client_lr, momentum=0.9)
  opt.build(model.trainable_variables)
  loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  if not whole_epoch:
    return model, opt, step

  @tf.function(reduce_retracing=True)
  def epoch(batches):
    # `iter`: a while loop in the graph (`for ... in batches` becomes a slower reduce).
    for x, y in iter(batches):
      with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
      grads = tape.gradient(loss, model.trainable_variables)
      opt.apply_gradients(zip(grads, model.trainable_variables))

  return model, opt, epoch


def reset_optimizer(opt) -> None:
  """A fresh client optimizer, as tff.learning builds per round: steps and moments to 0.

  Keras 3 keeps the learning rate among `opt.variables`; it stays.
  """
  for v in opt.variables:
    if "learning_rate" not in (getattr(v, "path", None) or v.name):
      v.assign(tf.zeros_like(v))


def local_batches(x, y, setting: Setting, round_num: int, client: int):
  ds = tf.data.Dataset.from_tensor_slices((x, y))
  ds = ds.shuffle(len(x), seed=setting.seed * 1_000_003 + round_num * 1009 + client)
  return ds.repeat(setting.local_epochs).batch(setting.batch_size)


def aggregate(client_weights: List[List[np.ndarray]], sizes: Sequence[int], aggregator: str):
  """Example-weighted mean, or the unweighted coordinate-wise median, of whole models."""
  by_variable = [np.stack(ws) for ws in zip(*client_weights)]
  if aggregator == "median":
    return [np.median(w, axis=0) for w in by_variable]
  p = np.asarray(sizes, np.float64) / np.sum(sizes)
  return [np.tensordot(p, w, axes=1).astype(w.dtype) for w in by_variable]


def fedavg_round(
  model, opt, step: Callable, clients, setting: Setting, round_num: int, whole_epoch=False
):
  """One round: every client trains from the global weights; the server aggregates.

  `whole_epoch`: `step` is `build(..., whole_epoch=True)`'s, one call per client.
  """
  start = model.get_weights()
  weights, sizes = [], []
  for c, (x, y) in enumerate(clients):
    model.set_weights(start)
    reset_optimizer(opt)
    if whole_epoch:
      step(local_batches(x, y, setting, round_num, c))
    else:
      for bx, by in local_batches(x, y, setting, round_num, c):
        step(bx, by)
    weights.append(model.get_weights())
    sizes.append(len(x))
  model.set_weights(aggregate(weights, sizes, setting.aggregator))


def accuracy(model, x, y) -> float:
  logits = model.predict(x, batch_size=500, verbose=0)
  return float(np.mean(np.argmax(logits, axis=1) == y))


def run(dataset, setting: Setting, log: Callable[[str], None] = print):
  """Test accuracy after each round, and seconds per round, of one setting."""
  x, y, xt, yt = subset(dataset, setting)
  parts = data_lib.partition(y, setting.num_clients, setting.partition, seed=setting.seed)
  clients = [(x[p], y[p]) for p in parts]
  model, opt, step = build(setting, dataset.input_shape, dataset.num_classes)
  history, seconds = [], []
  for r in range(1, setting.rounds + 1):
    t0 = time.perf_counter()
    fedavg_round(model, opt, step, clients, setting, r)
    seconds.append(time.perf_counter() - t0)
    history.append(accuracy(model, xt, yt))
    log(f"  round {r:3d}  test accuracy {history[-1]:.4f}  {seconds[-1]:.2f} s")
  return history, seconds


# The search that picked tf_dlg's federated defaults, one change at a time from the old
# defaults (first row) -- see the README's table.
GRID = (
  dict(model="bn_cnn_gap", train_examples=1000, batch_size=10, client_lr=0.003, bn_momentum=0.5),
  dict(model="bn_cnn_gap"),
  dict(),
  dict(client_optimizer="sgd", client_lr=0.05),
  dict(batch_size=64, client_lr=0.002),
  dict(local_epochs=2),
  dict(train_examples=10000),
  dict(partition="dirichlet"),
  dict(aggregator="median"),
  dict(partition="dirichlet", aggregator="median"),
)


def define_flags():
  flags.DEFINE_bool("grid", False, "Run the settings table (GRID) instead of one setting.")
  flags.DEFINE_integer("rounds", 20, "Rounds.", lower_bound=1, upper_bound=10_000)
  flags.DEFINE_integer("train_examples", 6000, "Training images.", lower_bound=10)
  flags.DEFINE_integer("local_epochs", 1, "Local epochs.", lower_bound=1, upper_bound=100)
  flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1, upper_bound=10_000)
  flags.DEFINE_enum("partition", "iid", ["iid", "dirichlet"], "Client partition.")
  flags.DEFINE_enum("aggregator", "mean", ["mean", "median"], "Aggregator.")
  flags.DEFINE_list("seeds", ["0"], "Seeds (each a run).")


def main(argv):
  del argv
  seeds = [int(s) for s in FLAGS.seeds]
  for s in seeds:
    if s < 0:
      raise cli.UsageError(f"--seeds: {s} is negative; expected integers >= 0.")
  dataset = data_lib.load_dataset("mnist")
  print(f"data: {dataset.source}")
  base = Setting(
    rounds=FLAGS.rounds,
    train_examples=FLAGS.train_examples,
    local_epochs=FLAGS.local_epochs,
    batch_size=FLAGS.batch_size,
    partition=FLAGS.partition,
    aggregator=FLAGS.aggregator,
  )
  rows = GRID if FLAGS.grid else (dict(),)
  for change in rows:
    for seed in seeds:
      setting = dataclasses.replace(base, seed=seed, **change)
      history, seconds = run(dataset, setting, log=lambda s: None)
      final = float(np.mean(history[-3:]))
      print(
        json.dumps(change or "base"),
        f"seed {seed}: round 5 {history[min(4, len(history) - 1)]:.3f}, "
        f"final (mean of last 3) {final:.4f}, {np.median(seconds):.2f} s/round",
        flush=True,
      )


if __name__ == "__main__":
  define_flags()
  cli.run(main)
