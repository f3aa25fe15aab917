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
(see `tf_dlg.execution.runtime`). Every flag is checked before any work (a bad one: one
line, exit 2); SIGTERM stops the run like Ctrl-C (exit 130), and the local TFF worker
never outlives the run.
"""

from __future__ import annotations

import os
import textwrap

from absl import flags

# First: imports TensorFlow quietly and before absl's app.run (see experiments.cli).
from experiments import cli
from tf_dlg import data as data_lib
from tf_dlg import defenses
from tf_dlg import io as io_lib

FLAGS = flags.FLAGS


def define_flags():
  """The driver's flags (defined on demand, so drivers can share one process): every
  `FederatedConfig` field, with its default and documentation, and the run's own."""
  from tf_dlg.federated.config import FederatedConfig, field_choices

  cli.define_config_flags(
    FederatedConfig,
    choices={**field_choices(), "defense": list(dict.fromkeys(["none", *defenses.DEFENSES]))},
    helps={"seed": "Seed of everything random in the run."},
  )
  flags.DEFINE_string(
    "workers",
    "",
    "TFF worker addresses host:port[,host:port] (empty: local); start "
    "each with `python -m tf_dlg.execution.worker --port=PORT`.",
  )
  flags.DEFINE_float(
    "worker_timeout",
    600.0,
    "Seconds one call to a --workers worker (a round) may take before the run stops with "
    "one line (a stopped or dead worker).",
    lower_bound=1.0,
  )
  cli.define_output_dir("/tmp/tf_dlg_federated")
  flags.DEFINE_bool("overwrite", False, "Start afresh even if --output_dir holds a run.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")


def config_from_flags():
  """The `FederatedConfig` of the parsed flags (checked as it is built)."""
  from tf_dlg.federated.config import FederatedConfig

  return cli.config_from_flags(FederatedConfig)


def plot_curve(history, path: str, title: str) -> str:
  """Test accuracy per round as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  rounds = [h["round"] for h in history]
  ax.plot(rounds, [h["test_accuracy"] for h in history], marker="o", markersize=3)
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


def _report(config, dataset, result, workers) -> None:
  """Writes `curve.png` and `run.json` and prints the final round."""
  out = FLAGS.output_dir
  title = (
    f"FedAvg {config.aggregator}, {config.partition}, {config.num_clients} clients, "
    f"{config.malicious_clients} malicious, defence {config.defense}. "
    f"Data: {dataset.source}"
  )
  curve = plot_curve(result.history, os.path.join(out, "curve.png"), title)
  run = dict(
    config=dict(vars(config)),
    dataset_source=dataset.source,
    malicious_clients=result.malicious,
    resumed_from_round=result.resumed_from,
    workers=workers,
    capture=result.capture_path,
    final=result.final,
  )
  io_lib.write_json(os.path.join(out, "run.json"), run)
  final = result.final
  print(
    f"final round {final['round']}: test accuracy {final['test_accuracy']:.4f}, "
    f"test loss {final['test_loss']:.4f} (malicious clients {result.malicious})"
  )
  captured = f", {result.capture_path}" if result.capture_path else ""
  print(f"wrote {os.path.join(out, 'history.csv')}, {curve}{captured}")
  print(f"data source: {dataset.source}")


def main(argv):
  del argv
  cli.require_confined_worker()  # trains in TFF: exit 2 now if it cannot be confined
  from tf_dlg import validation
  from tf_dlg.execution import runtime
  from tf_dlg.federated import simulation

  config = config_from_flags()  # every flag, before the dataset loads
  workers = runtime.check_workers(FLAGS.workers)  # each answers, or one line now
  runtime.CALL_TIMEOUT = FLAGS.worker_timeout
  validation.check_output_dir("output_dir", FLAGS.output_dir)
  dataset = data_lib.load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
  config.validate(len(dataset.x_train))
  cli.work_begins()  # from here a ValueError is a bug: its traceback is kept
  print(f"dataset: {dataset.name} -- source: {dataset.source}", flush=True)
  result = simulation.run_simulation(
    config,
    FLAGS.output_dir,
    workers=workers,
    dataset=dataset,
    progress=FLAGS.progress,
    overwrite=FLAGS.overwrite,
  )
  _report(config, dataset, result, workers)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
