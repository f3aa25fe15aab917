r"""Federated training in TFF: FedAvg with mean / median / trimmed-mean aggregation.

  python -m experiments.federated --dataset=digits --partition=iid --num_clients=10 \
      --rounds=30 --aggregator=median --malicious_clients=1 --output_dir=/tmp/fl

Writes `history.csv` (round, train/test loss and accuracy, seconds), `curve.png` (test
accuracy per round), `run.json` (flags, dataset source, malicious clients) and, with
`--capture_round`, the captured client update (`capture_round*_client*.npz`, an
`ObservedUpdate` for the attacks), and per-round TensorBoard scalars under
`tensorboard/` (`tensorboard --logdir OUTPUT_DIR`). Rerunning with the same
`--output_dir` resumes from the last finished round. `--workers=host:port[,host:port]`
runs the rounds on TFF workers started with `python -m tf_dlg.execution.worker`
(see `tf_dlg.execution.runtime`). Every flag is checked before any work; SIGTERM stops
the run like Ctrl-C (exit 130), and the local TFF worker never outlives the run.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Import TensorFlow before absl parses flags: building a Keras model inside `main` when TF
# was first imported there fails in Keras 2.14 ("SymbolicTensor has no attribute node").
import tensorflow as tf  # noqa: F401,E402  pylint: disable=unused-import,g-import-not-at-top

from tf_dlg import io as io_lib  # noqa: E402
from tf_dlg.execution import worker as worker_lib  # noqa: E402

_D = flags.DEFINE_string
_I = flags.DEFINE_integer
_F = flags.DEFINE_float

_D("dataset", "digits", "Dataset: digits, lfw_subset, photos (offline) or mnist, cifar10, lfw.")
_D("data_dir", None, "tfds data directory (tfds datasets only).")
flags.DEFINE_enum("partition", "iid", ["iid", "dirichlet", "shards"], "Client partition.")
_F("alpha", 0.5, "Dirichlet concentration (--partition=dirichlet).")
_I("classes_per_client", 2, "Classes per client (--partition=shards).")
_I("num_clients", 10, "Number of clients.")
_I("clients_per_round", 0, "Clients sampled per round (0: all).")
_I("rounds", 30, "Federated rounds.")
_D("model", "bn_cnn", "Model: bn_cnn or lenet.")
flags.DEFINE_enum("aggregator", "mean", ["mean", "median", "trimmed_mean"], "Aggregator.")
_F("trim_fraction", 0.1, "Fraction trimmed from each side (--aggregator=trimmed_mean).")
_D("defense", "none", "Client defence (tf_dlg.defenses names) or none.")
_F("defense_param", None, "Defence strength parameter.")
_I("malicious_clients", 0, "Number of Byzantine clients.")
flags.DEFINE_enum("malicious_mode", "scale", ["scale", "random"],
                  "Byzantine update: scaled delta, or noise of the delta's RMS x scale.")
_F("malicious_scale", 1000.0, "Byzantine factor.")
_I("local_epochs", 2, "Local epochs per round.")
_I("batch_size", 10, "Local batch size.")
_D("client_optimizer", "adam", "Client optimiser: sgd, sgdm, adam.")
_F("client_lr", 0.003, "Client learning rate.")
_D("server_optimizer", "sgd", "Server optimiser: sgd, sgdm, adam.")
_F("server_lr", 1.0, "Server learning rate.")
_F("bn_momentum", 0.5, "BatchNorm moving-statistics momentum (see tf_dlg.federated.fedavg).")
_I("capture_round", 0, "Round (1-based) whose client update is captured (0: none).")
_I("capture_client", -1, "Client id to capture (-1: first sampled client).")
_D("workers", "", "TFF worker addresses host:port[,host:port] (empty: local); start "
   "each with `python -m tf_dlg.execution.worker --port=PORT`.")
_D("output_dir", "/tmp/tf_dlg_federated", "Output directory (resumes if it holds a run).")
_I("seed", 0, "Seed of the partition, sampling, shuffling and model initialisation.")
flags.DEFINE_bool("overwrite", False, "Start afresh even if --output_dir holds a run.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")

FLAGS = flags.FLAGS


def config_from_flags():
  from tf_dlg.federated.simulation import SimulationConfig  # pylint: disable=g-import-not-at-top
  return SimulationConfig(
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, partition=FLAGS.partition,
      alpha=FLAGS.alpha, classes_per_client=FLAGS.classes_per_client,
      num_clients=FLAGS.num_clients, clients_per_round=FLAGS.clients_per_round or None,
      rounds=FLAGS.rounds, model=FLAGS.model, bn_momentum=FLAGS.bn_momentum,
      aggregator=FLAGS.aggregator, trim_fraction=FLAGS.trim_fraction,
      defense=FLAGS.defense, defense_param=FLAGS.defense_param,
      malicious_clients=FLAGS.malicious_clients, malicious_mode=FLAGS.malicious_mode,
      malicious_scale=FLAGS.malicious_scale, local_epochs=FLAGS.local_epochs,
      batch_size=FLAGS.batch_size, client_optimizer=FLAGS.client_optimizer,
      client_lr=FLAGS.client_lr, server_optimizer=FLAGS.server_optimizer,
      server_lr=FLAGS.server_lr, seed=FLAGS.seed,
      capture_round=FLAGS.capture_round or None,
      capture_client=None if FLAGS.capture_client < 0 else FLAGS.capture_client)


def plot_curve(history, path: str, title: str) -> str:
  """Test accuracy per round as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([h["round"] for h in history], [h["test_accuracy"] for h in history], marker="o",
          markersize=3)
  ax.set_xlabel("round")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.set_title("\n".join(textwrap.wrap(title, 95)), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # TFF logs INFO lines per model build
  # pylint: disable=g-import-not-at-top
  from tf_dlg import data as data_lib
  from tf_dlg import validation
  from tf_dlg.execution import runtime
  from tf_dlg.federated import simulation
  runtime.sigterm_as_interrupt()
  config = config_from_flags()
  config.validate()  # every flag, before the dataset loads
  workers = runtime.parse_workers(FLAGS.workers)
  validation.check_output_dir("output_dir", FLAGS.output_dir)
  dataset = data_lib.load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
  config.validate(len(dataset.x_train))
  print(f"dataset: {dataset.name} -- source: {dataset.source}", flush=True)
  result = simulation.run_simulation(config, FLAGS.output_dir, workers=workers,
                                     dataset=dataset, progress=FLAGS.progress,
                                     overwrite=FLAGS.overwrite)
  title = (f"FedAvg {config.aggregator}, {config.partition}, {config.num_clients} clients, "
           f"{config.malicious_clients} malicious, defence {config.defense}. "
           f"Data: {dataset.source}")
  curve = plot_curve(result.history, os.path.join(FLAGS.output_dir, "curve.png"), title)
  run = dict(config=dict(vars(config)), dataset_source=dataset.source,
             malicious_clients=result.malicious, resumed_from_round=result.resumed_from,
             workers=workers, capture=result.capture_path, final=result.final)
  io_lib.atomic_write_text(os.path.join(FLAGS.output_dir, "run.json"),
                           json.dumps(run, indent=2, default=str))
  final = result.final
  print(f"final round {final['round']}: test accuracy {final['test_accuracy']:.4f}, "
        f"test loss {final['test_loss']:.4f} (malicious clients {result.malicious})")
  print(f"wrote {os.path.join(FLAGS.output_dir, 'history.csv')}, {curve}"
        + (f", {result.capture_path}" if result.capture_path else ""))
  print(f"data source: {dataset.source}")


def run():
  try:
    app.run(main)
  except (ValueError, worker_lib.WorkerSetupError) as e:  # bad flags / foreign files
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the checkpoint resumes the run
    print("interrupted; rerun with the same --output_dir to resume.", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  run()
