r"""Seconds per FedAvg round of each engine (TFF, Flower) next to the plain floor.

  python -m benchmarks.round_speed [--rounds=5] [--dataset=digits|mnist]
      [--train_examples=N] [--local_epochs=1] [--batch_size=32] [--num_clients=10]
      [--engines=tff,flower]

IID clients, every client every round, bn_cnn, client Adam; local epochs and batch size
default to `FederatedConfig`'s. The engines timed are those installed: TFF's three
aggregators on `.venv` (the pinned stack), Flower's simulation engine on Ray (FedAvg,
one client actor per CPU) on `.venv-k3`.

The floor is the fastest plain implementation of the same client work in one process
(`benchmarks.plain_fedavg`: the same clients' batches, a fresh optimizer per client,
NumPy weighted averaging), the faster of two: `plain_loop`, a `tf.function` step per
batch, and `plain_epoch`, one `tf.function` call over a client's whole epoch (no Python
between batches). `keras_fit` is printed beside it: one Keras `model.fit` over all
training examples for the same epochs and batch size (the same number of steps done
centrally, without the clients' set-up and the averaging, so it may be below the floor;
the report says so). Ratios are against the floor: "mean / floor" (TFF, goal <= 1.5)
and "flower / floor" (goal <= 2.0).

Each repetition times one round of every floor and engine, in turn, on the same
clients' data (built beforehand), after one warm-up round each (tracing, shipping the
computation, starting Ray's actors): load that drifts on a shared machine hits all of
them alike. Each figure is the median over `--rounds` repetitions. It prints the TFF
builds the benchmark made and the load average: on a shared machine the ratios are
the informative part.
"""

from __future__ import annotations

import dataclasses
import importlib.util
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
from tf_dlg.federated.config import FederatedConfig

FLAGS = flags.FLAGS
AGGREGATORS = ("mean", "median", "trimmed_mean")
DATASETS = ("digits", "mnist")
FLOORS = ("plain_loop", "plain_epoch")


def installed_engines():
  """The engines this environment has: `tff` (TFF) and / or `flower` (flwr and Ray)."""
  found = importlib.util.find_spec
  engines = ["tff"] if found("tensorflow_federated") else []
  return engines + (["flower"] if found("flwr") and found("ray") else [])


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
  flags.DEFINE_list("engines", None, "Engines to time (default: those installed: tff, flower).")


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


def plain_round_fn(dataset, config, parts, whole_epoch: bool = False):
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
  model, opt, step = plain_fedavg.build(
    setting, dataset.input_shape, dataset.num_classes, whole_epoch=whole_epoch
  )
  counter = iter(range(1, 1_000_000))
  return lambda: plain_fedavg.fedavg_round(
    model, opt, step, clients, setting, next(counter), whole_epoch=whole_epoch
  )


def flower_round_fn(dataset, config):
  """A no-arg function running one Flower round (FedAvg on Ray); returns its seconds.

  The clients partition the data themselves, with `config`'s IID rule and seed (the
  same parts as the floor's); the data is in Ray's object store beforehand.
  """
  from tf_dlg.integrations import flower_client, flower_server, flower_session

  session = flower_session.session(config.num_clients).start()
  key = session.data_key(dataset)
  strategy = flower_server.strategy_for(config)
  model = flower_client.keras_model(config, dataset.input_shape, dataset.num_classes)
  box = {"arrays": [np.asarray(w) for w in model.get_weights()], "round": 0}

  def one_round():
    box["round"] += 1
    t0 = time.perf_counter()
    box["arrays"], _ = session.call(
      lambda grid: flower_server.train_round(
        grid, strategy, config, box["arrays"], box["round"], key
      )
    )
    return time.perf_counter() - t0

  return one_round


def tff_round_fn(dataset, config, parts):
  """A no-arg function running one TFF round of `config` (data built beforehand)."""
  from tf_dlg.federated import simulation as sim

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
  engines = FLAGS.engines if FLAGS.engines is not None else installed_engines()
  missing = sorted(set(engines) - set(installed_engines()))
  if missing or set(engines) - {"tff", "flower"}:
    raise cli.UsageError(
      f"--engines={','.join(engines)}: this environment has {installed_engines() or 'none'} "
      "(TFF: .venv, setup.sh; Flower and Ray: .venv-k3, setup_core.sh)."
    )
  dataset = load(FLAGS.dataset, FLAGS.train_examples)
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
    f"{FLAGS.rounds} timed repeats, engines {', '.join(engines) or 'none'}; "
    f"load average before: {_load_average()} on {os.cpu_count()} CPUs"
  )
  parts = data_lib.partition(dataset.y_train, FLAGS.num_clients, "iid", seed=0)
  results = {"keras_fit": keras_floor(dataset, base, FLAGS.rounds)}
  fns = {
    "plain_loop": plain_round_fn(dataset, base, parts),
    "plain_epoch": plain_round_fn(dataset, base, parts, whole_epoch=True),
  }
  builds, build_seconds = None, 0.0
  if "flower" in engines:
    fns["flower"] = flower_round_fn(dataset, base)
  if "tff" in engines:
    from tf_dlg.execution import runtime
    from tf_dlg.federated import fedavg as fedavg_lib

    workers = runtime.parse_workers(FLAGS.workers)
    builds, t0 = fedavg_lib.build_count(), time.perf_counter()
    with runtime.execution_target(workers):
      for aggregator in AGGREGATORS:
        config = dataclasses.replace(base, aggregator=aggregator)
        fns[aggregator] = tff_round_fn(dataset, config, parts)
      build_seconds = time.perf_counter() - t0
      results.update(interleaved(fns, FLAGS.rounds))
    builds = fedavg_lib.build_count() - builds
  else:
    results.update(interleaved(fns, FLAGS.rounds))
  if "flower" in engines:
    from tf_dlg.integrations import flower_engine

    flower_engine.shutdown()
  report(results, builds, build_seconds)


def report(results, builds, build_seconds: float) -> None:
  """The table of seconds and the ratios against the floor."""
  med = {k: statistics.median(v) for k, v in results.items()}
  print(f"{'':14s}{'median s':>10s}{'min s':>9s}{'max s':>9s}")
  for k, v in results.items():
    print(f"{k:14s}{med[k]:10.3f}{min(v):9.3f}{max(v):9.3f}")
  floor_name = min(FLOORS, key=lambda k: med[k])
  floor = med[floor_name]
  print(f"floor:                {floor:.3f} s ({floor_name}, the faster plain implementation)")
  ratio = floor / med["keras_fit"]
  print(f"floor / keras fit:    {ratio:.2f}", end="")
  if ratio > 1:
    print(
      "  (above 1: fit runs the same steps on one model; the floor also copies the "
      "global weights into each client, resets its optimizer, builds its batches and "
      "averages the clients' models)"
    )
  else:
    print()
  if builds is not None:
    print(f"TFF builds:           {builds} ({len(AGGREGATORS)} aggregators; {build_seconds:.1f} s)")
    print(f"mean / floor:         {med['mean'] / floor:.2f}  (goal <= 1.5)")
    print(f"mean / keras fit:     {med['mean'] / med['keras_fit']:.2f}")
    print(f"median / mean:        {med['median'] / med['mean']:.2f}  (goal <= 1.3)")
    print(f"trimmed_mean / mean:  {med['trimmed_mean'] / med['mean']:.2f}")
  if "flower" in med:
    print(f"flower / floor:       {med['flower'] / floor:.2f}  (goal <= 2.0)")
    print(f"flower / keras fit:   {med['flower'] / med['keras_fit']:.2f}")
  print(f"load average after: {_load_average()}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
