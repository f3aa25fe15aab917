r"""Seconds per FedAvg round in TFF (mean, median, trimmed mean) next to two floors.

  python -m benchmarks.round_speed [--rounds=5] [--dataset=digits|mnist]
      [--train_examples=N] [--local_epochs=1] [--batch_size=32] [--num_clients=10]

IID clients, every client every round, bn_cnn, client Adam; local epochs and batch size
default to `FederatedConfig`'s. Two floors: `plain_loop` is the same clients' same local
steps in one process without TFF -- a `tf.function` step per batch, a fresh optimizer
per client, NumPy weighted averaging (`benchmarks.plain_fedavg`) -- the compute a round
cannot avoid; `keras_fit` is one Keras `model.fit` over all training examples for the
same epochs and batch size (the same number of steps done centrally).

Each repetition times one plain-loop round and then one TFF round of every aggregator,
in turn, on the same clients' data (built beforehand), after one warm-up round each
(tracing, shipping the computation): load that drifts on a shared machine hits all of
them alike. Each figure is the median over `--rounds` repetitions. It prints the TFF
builds the benchmark made (one per aggregator: seeds and defence parameters are runtime
inputs, `tf_dlg.federated.fedavg.build_fedavg(reuse=True)`) and their seconds, and the
load average: on a shared machine the ratios are the informative part.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import numpy as np
from absl import flags

from benchmarks import plain_fedavg

# First: imports TensorFlow quietly and before absl's app.run (see experiments.cli).
from experiments import cli
from tf_dlg import data as data_lib
from tf_dlg import models
from tf_dlg.execution import runtime
from tf_dlg.federated import fedavg as fedavg_lib
from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig

FLAGS = flags.FLAGS
AGGREGATORS = ("mean", "median", "trimmed_mean")
DATASETS = ("digits", "mnist")


def define_flags():
  """The benchmark's flags (defined on demand, so drivers can share one process)."""
  defaults = FederatedConfig()
  flags.DEFINE_integer("rounds", 5, "Timed repetitions per configuration.", lower_bound=1)
  flags.DEFINE_enum("dataset", "digits", list(DATASETS), "Training data.")
  flags.DEFINE_integer(
    "train_examples",
    None,
    "A seeded subset of this many training images (default: all).",
    lower_bound=10,
  )
  flags.DEFINE_integer(
    "local_epochs", defaults.local_epochs, "Local epochs per round (= Keras epochs).", lower_bound=1
  )
  flags.DEFINE_integer("batch_size", defaults.batch_size, "Batch size.", lower_bound=1)
  flags.DEFINE_integer("num_clients", 10, "Clients.", lower_bound=1)
  flags.DEFINE_string("workers", "", "Optional TFF worker addresses host:port[,...].")


def load(name: str, train_examples):
  """The dataset, cut to a seeded subset of `train_examples` training images."""
  dataset = data_lib.load_dataset(name)
  n = len(dataset.x_train)
  if train_examples is None or train_examples >= n:
    return dataset
  idx = np.sort(np.random.default_rng(0).choice(n, train_examples, replace=False))
  return dataclasses.replace(
    dataset,
    x_train=dataset.x_train[idx],
    y_train=dataset.y_train[idx],
    source=f"{dataset.source}; seeded subset of {train_examples} training images",
  )


def keras_floor(dataset, config, repeats):
  """Seconds of `fit` over all training examples for `local_epochs` epochs."""
  import tensorflow as tf  # already imported, quietly, by experiments.cli

  model = models.build_model(config.model, dataset.input_shape, dataset.num_classes)
  for layer, _ in models.batchnorm_variables(model):
    layer.momentum = config.bn_momentum
  model.compile(
    optimizer=tf.keras.optimizers.Adam(config.client_lr),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
  )
  ds = tf.data.Dataset.from_tensor_slices((dataset.x_train, dataset.y_train))
  ds = ds.shuffle(len(dataset.x_train), seed=0).batch(config.batch_size)
  model.fit(ds, epochs=1, verbose=0)  # warm-up: tracing
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    model.fit(ds, epochs=config.local_epochs, verbose=0)
    times.append(time.perf_counter() - t0)
  return times


def plain_round_fn(dataset, config, parts):
  """A no-arg function running one plain-TF FedAvg round (round 1 traces the step)."""
  setting = plain_fedavg.Setting(
    model=config.model,
    num_clients=config.num_clients,
    local_epochs=config.local_epochs,
    batch_size=config.batch_size,
    client_optimizer=config.client_optimizer,
    client_lr=config.client_lr,
    bn_momentum=config.bn_momentum,
  )
  clients = [(dataset.x_train[p], dataset.y_train[p]) for p in parts]
  model, opt, step = plain_fedavg.build(setting, dataset.input_shape, dataset.num_classes)
  counter = iter(range(1, 1_000_000))
  return lambda: plain_fedavg.fedavg_round(model, opt, step, clients, setting, next(counter))


def tff_round_fn(dataset, config, parts):
  """A no-arg function running one TFF round of `config` (data built beforehand)."""
  fa = sim.build_for_config(config, dataset)
  ids = list(range(config.num_clients))
  # Also builds a Keras model eagerly, which gives back Keras' functional models the
  # eager base class that building in TFF's graph swapped (the plain loop's model).
  box = {"state": fa.initialize(), "round": 0}

  def one_round():
    box["round"] += 1
    data = sim.client_data(config, dataset, parts, ids, box["round"])
    t0 = time.perf_counter()
    box["state"] = fa.process.next(box["state"], data).state
    return time.perf_counter() - t0

  return one_round


def interleaved(fns, repeats):
  """{name: seconds per repetition}: one warm-up each, then every fn in turn per repetition."""
  times = {name: [] for name in fns}
  for r in range(repeats + 1):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      inner = fn()
      if r:  # repetition 0 traces and ships the computations
        times[name].append(inner if isinstance(inner, float) else time.perf_counter() - t0)
  return times


def _load_average() -> str:
  return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv):
  del argv
  dataset = load(FLAGS.dataset, FLAGS.train_examples)
  workers = runtime.parse_workers(FLAGS.workers)
  base = FederatedConfig(
    dataset=FLAGS.dataset,
    num_clients=FLAGS.num_clients,
    local_epochs=FLAGS.local_epochs,
    batch_size=FLAGS.batch_size,
  )
  print(f"data: {dataset.source}")
  print(
    f"{FLAGS.num_clients} IID clients, {len(dataset.x_train)} training examples, "
    f"{FLAGS.local_epochs} local epochs, batch {FLAGS.batch_size}, "
    f"{FLAGS.rounds} timed repeats; load average before: {_load_average()} "
    f"on {os.cpu_count()} CPUs"
  )
  parts = data_lib.partition(dataset.y_train, FLAGS.num_clients, "iid", seed=0)
  results = {"keras_fit": keras_floor(dataset, base, FLAGS.rounds)}
  fns = {"plain_loop": plain_round_fn(dataset, base, parts)}
  builds, t0 = fedavg_lib.build_count(), time.perf_counter()
  with runtime.execution_target(workers):
    for aggregator in AGGREGATORS:
      config = dataclasses.replace(base, aggregator=aggregator)
      fns[aggregator] = tff_round_fn(dataset, config, parts)
    build_seconds = time.perf_counter() - t0
    results.update(interleaved(fns, FLAGS.rounds))
  report(results, fedavg_lib.build_count() - builds, build_seconds)


def report(results, builds: int, build_seconds: float) -> None:
  """The table of seconds and the ratios against their goals."""
  med = {k: statistics.median(v) for k, v in results.items()}
  print(f"{'':14s}{'median s':>10s}{'min s':>9s}{'max s':>9s}")
  for k, v in results.items():
    print(f"{k:14s}{med[k]:10.3f}{min(v):9.3f}{max(v):9.3f}")
  print(f"TFF builds:           {builds} ({len(AGGREGATORS)} aggregators; {build_seconds:.1f} s)")
  print(f"mean / plain loop:    {med['mean'] / med['plain_loop']:.2f}  (goal <= 1.5)")
  print(f"mean / keras fit:     {med['mean'] / med['keras_fit']:.2f}")
  print(f"median / mean:        {med['median'] / med['mean']:.2f}  (goal <= 1.3)")
  print(f"trimmed_mean / mean:  {med['trimmed_mean'] / med['mean']:.2f}")
  print(f"load average after: {_load_average()}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
