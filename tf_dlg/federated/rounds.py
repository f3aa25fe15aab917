"""Who trains in each round of a federated run, and on what.

Every draw is seeded by the run's seed and the round, so a resumed run (and the Flower
engine) samples the same clients, shuffles their data the same way and gives the same
Byzantine clients the same noise.
"""

from __future__ import annotations

import collections
from typing import List

import numpy as np

from tf_dlg.federated.config import FederatedConfig


def client_partitions(config: FederatedConfig, labels) -> List[np.ndarray]:
  """The run's client partitions of `labels` (its scheme, alpha, k and seed); both engines'."""
  from tf_dlg import data as data_lib

  return data_lib.partition(
    labels,
    config.num_clients,
    config.partition,
    alpha=config.alpha,
    classes_per_client=config.classes_per_client,
    seed=config.seed,
  )


def sample_clients(config: FederatedConfig, round_num: int) -> List[int]:
  """The sorted client ids of a 1-based round (seeded by (seed, round))."""
  k = config.clients_per_round or config.num_clients
  if k >= config.num_clients:
    return list(range(config.num_clients))
  rng = np.random.default_rng([config.seed, round_num, 0xC11E])
  return sorted(int(c) for c in rng.choice(config.num_clients, size=k, replace=False))


def malicious_ids(config: FederatedConfig) -> List[int]:
  """The fixed, seeded set of Byzantine client ids."""
  rng = np.random.default_rng([config.seed, 0xBAD])
  return sorted(int(c) for c in rng.permutation(config.num_clients)[: config.malicious_clients])


def round_seed(config: FederatedConfig, round_num: int) -> int:
  return int(np.random.default_rng([config.seed, round_num, 0xDA7A]).integers(2**31 - 1))


def client_data(config, dataset, parts, ids, round_num, bad=()):
  """Per-client `OrderedDict(batches=, role=)` of round `round_num` for the TFF process.

  Args:
    config: The run's `FederatedConfig`.
    dataset: Its `ImageDataset`.
    parts: Client partitions (indices into the training set), one per client id.
    ids: The round's client ids (`sample_clients`).
    round_num: The 1-based round (seeds the shuffling and Byzantine noise).
    bad: Byzantine client ids (`malicious_ids`).
  """
  from tf_dlg import data as data_lib
  from tf_dlg.federated import client_work

  batches = data_lib.client_datasets(
    dataset.x_train,
    dataset.y_train,
    [parts[i] for i in ids],
    batch_size=config.batch_size,
    epochs=config.local_epochs,
    shuffle=True,
    seed=round_seed(config, round_num),
  )
  out = []
  for cid, ds in zip(ids, batches):
    if cid in bad:
      r = client_work.role(
        config.malicious_mode,
        config.malicious_scale,
        seed=config.seed * 100003 + round_num * 1009 + cid,
      )
    else:
      r = client_work.role()
    out.append(collections.OrderedDict(batches=ds, role=r))
  return out
