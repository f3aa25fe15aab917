"""The Flower engine's server side: Flower's strategies, and one training round.

Aggregation is Flower's own: `FedAvg` (weighted by client examples), `FedMedian`,
`FedTrimmedAvg`, and for central DP `DifferentialPrivacyClientSideFixedClipping` around an
unweighted `FedAvg`.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from tf_dlg.federated.config import FederatedConfig
from tf_dlg.integrations.flower_client import (
  CONFIG_KEY,
  DATA_KEY,
  DP_KEY,
  ROUND_KEY,
  UNIT_KEY,
  WEIGHT_KEY,
)
from tf_dlg.integrations.flower_dp import numpy_seed

STRATEGIES = {"mean": "FedAvg", "median": "FedMedian", "trimmed_mean": "FedTrimmedAvg"}
# A round that waits longer than this on its clients fails (seconds).
ROUND_TIMEOUT_S = 3600.0


def train_metrics(contents, weight_key: str):
  """The round's MetricRecord: example-weighted train loss / accuracy, mean defence stats."""
  from flwr.app import MetricRecord

  metrics = [next(iter(c.metric_records.values())) for c in contents]
  weights = np.array([float(m[weight_key]) for m in metrics])
  out = {weight_key: float(weights.sum())}
  for k in ("train_loss", "train_accuracy"):
    out[k] = float(np.dot(weights, [float(m[k]) for m in metrics]) / max(weights.sum(), 1.0))
  for k in ("zero_fraction", "clipped", "update_norm"):
    values = [float(m["tf_dlg." + k]) for m in metrics if "tf_dlg." + k in m]
    if values:
      out["tf_dlg." + k] = float(np.mean(values))
  return MetricRecord(out)


def _train_metrics(contents, weight_key: str):
  # Train loss and accuracy stay example-weighted whatever the strategy's weights.
  del weight_key
  return train_metrics(contents, WEIGHT_KEY)


def strategy_for(config: FederatedConfig, dp_mechanism: str = "local", defense=None):
  """Flower's own strategy of `config.aggregator`, every client every round.

  With the `dp` defence and `dp_mechanism="central"`: Flower's
  `DifferentialPrivacyClientSideFixedClipping` (noise multiplier z, clip C, n clients a
  round) around an unweighted `FedAvg` -- the mean's sensitivity is C / n only when every
  client weighs the same (TFF's `dp_aggregator` is unweighted too). z and C are those of
  `defense`, the run's Defense (default: `config.build_defense()`, for a caller that has
  none built).
  """
  from flwr.serverapp import strategy as strategies

  n = config.num_clients
  kwargs = dict(
    fraction_train=1.0,
    fraction_evaluate=0.0,  # the server evaluates (the TFF engine's rule)
    min_train_nodes=n,
    min_available_nodes=n,
    weighted_by_key=WEIGHT_KEY,
    train_metrics_aggr_fn=_train_metrics,
  )
  if config.defense == "dp" and dp_mechanism == "central":
    if defense is None:
      defense = config.build_defense()
    return strategies.DifferentialPrivacyClientSideFixedClipping(
      strategies.FedAvg(**{**kwargs, "weighted_by_key": UNIT_KEY}),
      noise_multiplier=float(defense.param),
      clipping_norm=float(defense.l2_norm_clip),
      num_sampled_clients=n,
    )
  if config.aggregator == "trimmed_mean":
    return strategies.FedTrimmedAvg(beta=float(config.trim_fraction), **kwargs)
  return getattr(strategies, STRATEGIES[config.aggregator])(**kwargs)


def aggregate(strategy, round_num: int, replies, exclude=None, seed: int = 0):
  """`strategy.aggregate_train` of the replies; (ArrayRecord, MetricRecord).

  A DP wrapper adds noise to every array the strategy it wraps returns; with `exclude`
  it aggregates the kept arrays through the wrapper and the excluded ones (BatchNorm
  statistics, which the TFF engine's `dp` leaves un-noised) through the wrapped strategy,
  and puts them back in order. The wrapper's noise comes from NumPy seeded by (seed,
  round).
  """
  from flwr.app import ArrayRecord
  from flwr.serverapp import strategy as strategies

  dp = isinstance(strategy, strategies.DifferentialPrivacyClientSideFixedClipping)
  if not dp or exclude is None or not any(exclude):
    with numpy_seed(seed, round_num, 0xD9):
      return strategy.aggregate_train(round_num, replies)
  replies = list(replies)
  full = [next(iter(m.content.array_records.items())) for m in replies]
  names = list(full[0][1].keys())
  if len(names) != len(exclude):
    raise ValueError(f"exclude has {len(exclude)} entries, the replies {len(names)} arrays.")
  parts = {}
  for side in (False, True):
    chosen = [n for n, e in zip(names, exclude) if bool(e) == side]
    for m, (key, record) in zip(replies, full):
      m.content[key] = ArrayRecord({n: record[n] for n in chosen})
    if side:  # excluded arrays: the plain mean of the wrapped strategy
      part, _ = strategy.strategy.aggregate_train(round_num, replies)
    else:
      with numpy_seed(seed, round_num, 0xD9):
        part, metrics = strategy.aggregate_train(round_num, replies)
    if part is None:
      raise RuntimeError(f"round {round_num}: Flower's {strategy!r} aggregated nothing.")
    parts.update(zip(chosen, part.to_numpy_ndarrays()))
  for m, (key, record) in zip(replies, full):
    m.content[key] = record
  return ArrayRecord([parts[n] for n in names]), metrics


def _client_of(msg) -> int:
  return int(next(iter(msg.content.metric_records.values()))["tf_dlg.client"])


def train_round(
  grid,
  strategy,
  config: FederatedConfig,
  arrays,
  round_num: int,
  data_key: str,
  *,
  dp_mechanism: str = "local",
  exclude=None,
):
  """One training round through Flower: (the server's new arrays, the round's metrics).

  Sends every client the arrays and the run (`config`, round, data key, DP mechanism),
  waits for all replies (a client that fails fails the round), and aggregates them with
  `strategy` in client order (the weighted sum is then the same every run; `aggregate`,
  `exclude`: the arrays a DP wrapper leaves un-noised).
  """
  from flwr.app import ArrayRecord, ConfigRecord

  run_config = json.dumps(dataclasses.asdict(config), sort_keys=True)
  record = ConfigRecord({CONFIG_KEY: run_config, ROUND_KEY: round_num, DATA_KEY: data_key})
  record[DP_KEY] = dp_mechanism
  messages = strategy.configure_train(round_num, ArrayRecord(list(arrays)), record, grid)
  replies = list(grid.send_and_receive(messages, timeout=ROUND_TIMEOUT_S))
  failed = [m for m in replies if m.has_error()]
  if failed or len(replies) != config.num_clients:
    reason = failed[0].error.reason if failed else "no reply"
    raise RuntimeError(
      f"round {round_num}: {len(failed) or config.num_clients - len(replies)} of "
      f"{config.num_clients} clients failed ({reason.strip().splitlines()[-1]})"
    )
  replies.sort(key=_client_of)
  aggregated, metrics = aggregate(strategy, round_num, replies, exclude, config.seed)
  return [np.asarray(a) for a in aggregated.to_numpy_ndarrays()], metrics
