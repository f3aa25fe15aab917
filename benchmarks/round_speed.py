r"""Seconds per FedAvg round (mean, median, trimmed mean) next to a plain Keras `fit` floor.

  python -m benchmarks.round_speed [--rounds=5] [--local_epochs=2] [--batch_size=10]

Digits, 10 IID clients, every client every round, bn_cnn, client Adam. Two floors:
`plain_loop` is the same clients' same local steps in one process without TFF -- a
`tf.function` step per batch, a fresh optimizer per client, NumPy weighted averaging
(`benchmarks.plain_fedavg`) -- the compute a round cannot avoid; `keras_fit` is one Keras
`model.fit` over all training examples for the same epochs and batch size (the same
number of steps done centrally). Each figure is the median over `--rounds` timed
repetitions after one warm-up (tracing).
Prints the load average too: on a shared machine the ratios are the informative part.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

from absl import flags

from benchmarks import plain_fedavg

# First: imports TensorFlow quietly and before absl's app.run (see experiments.cli).
from experiments import cli
from tf_dlg import data as data_lib
from tf_dlg import models
from tf_dlg.execution import runtime
from tf_dlg.federated import simulation as sim

FLAGS = flags.FLAGS


def define_flags():
  """The benchmark's flags (defined on demand, so drivers can share one process)."""
  flags.DEFINE_integer(
    "rounds", 5, "Timed rounds (and Keras fits) per configuration.", lower_bound=1
  )
  flags.DEFINE_integer("local_epochs", 2, "Local epochs per round (= Keras epochs).", lower_bound=1)
  flags.DEFINE_integer("batch_size", 10, "Batch size.", lower_bound=1)
  flags.DEFINE_integer("num_clients", 10, "Clients.", lower_bound=1)
  flags.DEFINE_string("workers", "", "Optional TFF worker addresses host:port[,...].")


def keras_floor(dataset, config, repeats):
  """Median seconds of `fit` over all training examples for `local_epochs` epochs."""
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


def plain_floor(dataset, config, repeats):
  """Median seconds of one plain-TF FedAvg round over the same IID clients."""
  setting = plain_fedavg.Setting(
    model=config.model,
    num_clients=config.num_clients,
    local_epochs=config.local_epochs,
    batch_size=config.batch_size,
    client_optimizer=config.client_optimizer,
    client_lr=config.client_lr,
    bn_momentum=config.bn_momentum,
  )
  parts = data_lib.partition(dataset.y_train, config.num_clients, "iid", seed=0)
  clients = [(dataset.x_train[p], dataset.y_train[p]) for p in parts]
  model, opt, step = plain_fedavg.build(setting, dataset.input_shape, dataset.num_classes)
  times = []
  for r in range(repeats + 1):
    t0 = time.perf_counter()
    plain_fedavg.fedavg_round(model, opt, step, clients, setting, r + 1)
    if r:  # round 0 traces the step
      times.append(time.perf_counter() - t0)
  return times


def fedavg_rounds(dataset, config, repeats, workers):
  """Seconds of `process.next` per round (data built beforehand), after one warm-up."""
  fa = sim.build_for_config(config, dataset)
  parts = data_lib.partition(dataset.y_train, config.num_clients, "iid", seed=0)
  ids = list(range(config.num_clients))
  times = []
  with runtime.execution_target(workers):
    state = fa.process.initialize()
    for r in range(repeats + 1):
      client_data = sim.client_data(config, dataset, parts, ids, r + 1)
      t0 = time.perf_counter()
      state = fa.process.next(state, client_data).state
      if r:  # round 0 traces and ships the computation
        times.append(time.perf_counter() - t0)
  return times


def main(argv):
  del argv
  dataset = data_lib.load_dataset("digits")
  workers = runtime.parse_workers(FLAGS.workers)
  base = sim.SimulationConfig(
    dataset="digits",
    num_clients=FLAGS.num_clients,
    local_epochs=FLAGS.local_epochs,
    batch_size=FLAGS.batch_size,
  )
  print(f"data: {dataset.source}")
  print(
    f"{FLAGS.num_clients} IID clients, {len(dataset.x_train)} training examples, "
    f"{FLAGS.local_epochs} local epochs, batch {FLAGS.batch_size}, "
    f"{FLAGS.rounds} timed repeats; load average before: "
    f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
  )
  results = {}
  results["plain_loop"] = plain_floor(dataset, base, FLAGS.rounds)
  results["keras_fit"] = keras_floor(dataset, base, FLAGS.rounds)
  for aggregator in ("mean", "median", "trimmed_mean"):
    config = dataclasses.replace(base, aggregator=aggregator)
    results[aggregator] = fedavg_rounds(dataset, config, FLAGS.rounds, workers)
  med = {k: statistics.median(v) for k, v in results.items()}
  print(f"{'':14s}{'median s':>10s}{'min s':>9s}{'max s':>9s}")
  for k, v in results.items():
    print(f"{k:14s}{med[k]:10.3f}{min(v):9.3f}{max(v):9.3f}")
  print(f"mean / plain loop:    {med['mean'] / med['plain_loop']:.2f}  (goal <= 1.5)")
  print(f"mean / keras fit:     {med['mean'] / med['keras_fit']:.2f}")
  print(f"median / mean:        {med['median'] / med['mean']:.2f}  (goal <= 1.3)")
  print(f"trimmed_mean / mean:  {med['trimmed_mean'] / med['mean']:.2f}")
  print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
