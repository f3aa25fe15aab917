"""The capture round's output: one client's defended update as an `ObservedUpdate` file.

The attack experiments read it (`tf_dlg.attacks.threat_model.ObservedUpdate.load`) with
the model weights the client started from, its true images and labels, and the run's
defence, data and seeds in its metadata.
"""

from __future__ import annotations

import math
import os

import numpy as np

from tf_dlg.federated.rounds import round_seed


def save_capture(config, run, ids, round_num, start_weights, client_values):
  """Writes the chosen client's update as an ObservedUpdate; returns the path.

  `run` holds the simulation's fixed parts: `fa` (the FedAvg bundle), `dataset`,
  `parts` (client partitions), `bad` (Byzantine ids) and `output_dir`.
  """
  from tf_dlg.attacks.threat_model import ObservedUpdate

  fa, dataset, parts, bad = run.fa, run.dataset, run.parts, run.bad
  cid = ids[0] if config.capture_client is None else config.capture_client
  pos = ids.index(cid)
  update = [np.asarray(v[pos]) for v in client_values][: fa.num_trainable]
  keras_model = fa.keras_model_fn()
  fa.assign_to_keras(start_weights, keras_model)
  idx = parts[cid]
  steps = int(math.ceil(len(idx) * config.local_epochs / config.batch_size))
  defense = fa.defense  # the run's own, built once
  obs = ObservedUpdate(
    kind="fedavg_delta",
    update=update,
    model_weights=keras_model.get_weights(),
    model_name=config.model,
    input_shape=dataset.input_shape,
    num_classes=dataset.num_classes,
    num_examples=int(len(idx)),
    batch_size=config.batch_size,
    local_steps=steps,
    learning_rate=config.client_lr,
    defense=None if defense is None else defense.get_config(),
    metadata=dict(
      dataset=dataset.name,
      dataset_source=dataset.source,
      round=round_num,
      client=cid,
      seed=config.seed,
      aggregator=config.aggregator,
      local_epochs=config.local_epochs,
      client_optimizer=config.client_optimizer,
      bn_momentum=config.bn_momentum,
      malicious=cid in bad,
      data_seed=round_seed(config, round_num),
      shuffled=True,
      update_layout="trainable_variables",
    ),
    true_images=dataset.x_train[idx],
    true_labels=dataset.y_train[idx],
  )
  path = os.path.join(run.output_dir, f"capture_round{round_num}_client{cid}.npz")
  return obs.save(path)
