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
from tf_dlg.study.presets import Preset

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "The model: a .keras file (model.save(path)).")
flags.DEFINE_string("data", "mnist", f"Dataset, one of {', '.join(data_lib.DATASETS)}.")
flags.DEFINE_integer("batch_size", 32, "Client batch size.", lower_bound=1)
flags.DEFINE_integer(
  "num_clients", 10, "Clients sharing the data (a client's share).", lower_bound=1
)
flags.DEFINE_enum("client_optimizer", "adam", ["sgd", "sgdm", "adam"], "Client optimizer.")
flags.DEFINE_float("client_lr", 0.001, "Client learning rate.")
flags.DEFINE_integer(
  "gallery_size", Preset.sweep_gallery, "Images the gallery attacker ranks among.", lower_bound=2
)
flags.DEFINE_integer(
  "recon_iterations", Preset.sweep_recon_iterations, "Reconstruction iterations.", lower_bound=1
)
flags.DEFINE_integer("rounds", 20, "FedAvg rounds the costs train for.", lower_bound=1)
flags.DEFINE_integer(
  "clients_per_round", None, "Clients a round samples (default: all).", lower_bound=1
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
cli.define_seed()
flags.mark_flag_as_required("model")


def main(argv):
  del argv
  from tf_dlg.execution import runtime
  from tf_dlg.federated.config import FederatedConfig
  from tf_dlg.study import audit

  # TFF's own default context (imported with its optimizers) would start an unconfined
  # worker and fail to stop it at exit; the project's confined one replaces it.
  runtime.install_context()

  config = FederatedConfig(
    dataset=FLAGS.data,
    batch_size=FLAGS.batch_size,
    num_clients=FLAGS.num_clients,
    client_optimizer=FLAGS.client_optimizer,
    client_lr=FLAGS.client_lr,
    rounds=FLAGS.rounds,
    clients_per_round=FLAGS.clients_per_round,
    seed=FLAGS.seed,
  )
  study = audit.Audit(
    FLAGS.output_dir,
    FLAGS.model,
    FLAGS.data,
    config,
    frontier_csv=FLAGS.frontier_csv,
    cost_seeds=[int(v) for v in FLAGS.cost_seeds],
    sweep_gallery=FLAGS.gallery_size,
    sweep_recon_iterations=FLAGS.recon_iterations,
  )
  cli.work_begins()
  start = time.time()
  paths = study.run()
  with open(paths["report"], encoding="utf-8") as f:
    print(f.read().split("\n\n", 2)[1])
  print(f"[audit] {paths['csv']}, {paths['report']}; {time.time() - start:.0f} s")


if __name__ == "__main__":
  cli.run(main)
