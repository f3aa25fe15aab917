r"""Audits a user's own Keras model: what one client of their FedAvg training leaks.

  python -m experiments.audit --model=my_model.keras --data=mnist --batch_size=32 \
      --num_clients=10 --output_dir=outputs/audit

The model's current weights are the global model the server sends; the client holds its
share of `--data` (a `tf_dlg.data` dataset name) and trains one step, and one epoch, of
`--batch_size` with `--client_optimizer` / `--client_lr`. The sweep's attackers (gallery
matching, cosine + TV reconstruction, batch label recovery) measure the leak undefended
and at every defence's frontier settings (`tf_dlg.study.audit`); each defence's weakest
protecting setting is then trained in TFF FedAvg (`--rounds`, `--cost_seeds`) beside the
undefended baseline for its accuracy cost. Writes sweep.csv,
figures/sweep.png and sweep.md, whose first line answers for the model; a rerun into the
same --output_dir resumes, and another model or configuration there is refused.
"""

from __future__ import annotations

import time

from absl import flags

# First: imports TensorFlow quietly and before absl's app.run (see experiments.cli).
from experiments import cli
from tf_dlg import data as data_lib
from tf_dlg.federated.config import FederatedConfig, field_choices
from tf_dlg.study.presets import Preset

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "The model: a .keras file (model.save(path)).")
# Not FederatedConfig's default dataset (digits, 8x8): the model the audit is most often
# given is an MNIST one.
flags.DEFINE_string("data", "mnist", f"Dataset, one of {', '.join(data_lib.DATASETS)}.")
cli.register_flag_names({"federated.dataset": "data"})
# The client's training and the cost training: `FederatedConfig` fields and defaults.
cli.define_config_flags(
  FederatedConfig,
  ("batch_size", "num_clients", "client_optimizer", "client_lr", "rounds", "clients_per_round"),
  choices={"client_optimizer": field_choices()["client_optimizer"]},
  helps={
    "batch_size": "Client batch size.",
    "num_clients": "Clients sharing the data (a client's share).",
    "client_optimizer": "Client optimizer.",
    "client_lr": "Client learning rate.",
    "rounds": "FedAvg rounds the costs train for.",
    "clients_per_round": "Clients a round samples (default: all).",
  },
)
# The sweep's attackers: `Preset` (study) fields.
cli.define_config_flags(
  Preset,
  ("sweep_gallery", "sweep_recon_iterations", "seed"),
  names={"sweep_gallery": "gallery_size", "sweep_recon_iterations": "recon_iterations"},
  helps={
    "sweep_gallery": "Images the gallery attacker ranks among.",
    "sweep_recon_iterations": "Reconstruction iterations.",
    "seed": "Seed of everything random in the run.",
  },
)
flags.DEFINE_list(
  "cost_seeds",
  ["0", "1", "2"],
  "Seeds of the cost training (paired with the baseline; empty: no cost training).",
)
flags.register_validator(
  "cost_seeds",
  lambda v: all(s.strip().isdigit() for s in v),
  message="--cost_seeds: expected integers >= 0, e.g. 0,1,2",
)
flags.DEFINE_string(
  "frontier_csv", None, "A frontier run's frontier.csv: its costs instead of training them."
)
cli.define_output_dir("outputs/audit")
flags.mark_flag_as_required("model")


def main(argv):
  del argv
  from tf_dlg.execution import runtime
  from tf_dlg.study import audit

  # TFF's own default context (imported with its optimizers) would start an unconfined
  # worker and fail to stop it at exit; the project's confined one replaces it.
  runtime.install_context()

  study = cli.config_from_flags(Preset)
  config = cli.config_from_flags(FederatedConfig, dataset=FLAGS.data, seed=study.seed)
  study = audit.Audit(
    FLAGS.output_dir,
    FLAGS.model,
    FLAGS.data,
    config,
    frontier_csv=FLAGS.frontier_csv,
    cost_seeds=[int(v) for v in FLAGS.cost_seeds],
    sweep_gallery=study.sweep_gallery,
    sweep_recon_iterations=study.sweep_recon_iterations,
  )
  cli.work_begins()
  start = time.time()
  paths = study.run()
  with open(paths["report"], encoding="utf-8") as f:
    print(f.read().split("\n\n", 2)[1])
  print(f"[audit] {paths['csv']}, {paths['report']}; {time.time() - start:.0f} s")


if __name__ == "__main__":
  cli.run(main)
