"""Client partitions: which training examples each federated client holds.

Deterministic per seed: IID, Dirichlet(alpha) over labels, and k-classes-per-client
shards.
"""

from __future__ import annotations

import collections
import math
from typing import List

import numpy as np

from tf_dlg import validation

PARTITION_SCHEMES = ("iid", "dirichlet", "shards")


def partition(
  labels: np.ndarray,
  num_clients: int,
  scheme: str = "iid",
  *,
  alpha: float = 0.5,
  classes_per_client: int = 2,
  seed: int = 0,
  min_size: int = 1,
) -> List[np.ndarray]:
  """Splits example indices among clients.

  Args:
    labels: Integer labels [N].
    num_clients: Number of clients, in [1, N].
    scheme: `iid` (shuffled, sizes differ by at most one), `dirichlet` (per class,
      client shares drawn from Dirichlet(alpha); small alpha = skewed labels) or `shards`
      (each client holds exactly `classes_per_client` classes, each class split evenly
      among the clients holding it).
    alpha: Dirichlet concentration, > 0 (`dirichlet` only).
    classes_per_client: k in [1, num_classes] (`shards` only).
    seed: Same seed, same split.
    min_size: `dirichlet` redraws until every client has at least this many examples.

  Returns:
    A list of `num_clients` sorted int64 index arrays that together cover every example
    exactly once (`shards` covers every example whose class some client holds).
  """
  labels = np.asarray(labels).astype(np.int64)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}.")
  n = labels.size
  validation.check_int("num_clients", num_clients, 1, n)
  validation.check_choice("scheme", scheme, PARTITION_SCHEMES)
  rng = np.random.default_rng(seed)
  if scheme == "iid":
    parts = np.array_split(rng.permutation(n), num_clients)
  elif scheme == "dirichlet":
    parts = _dirichlet_parts(labels, num_clients, alpha, min_size, rng)
  else:
    parts = _shard_parts(labels, num_clients, classes_per_client, rng)
  return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet_parts(labels, num_clients, alpha, min_size, rng):
  """Per class, client shares from Dirichlet(alpha); redrawn until all have min_size."""
  n = labels.size
  # NumPy's sampler slows steeply below alpha ~1e-6 and never returns from ~1e-10 on (in C,
  # deaf to SIGTERM); at 1e-3 each class already goes ~99 % to one client, so nothing
  # smaller is worth that risk.
  validation.check_number("alpha", alpha, 1e-3, math.inf, high_open=True, dtype="float64")
  if min_size * num_clients > n:
    raise ValueError(f"min_size={min_size} x num_clients={num_clients} exceeds {n} examples.")
  for _ in range(1000):
    buckets = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
      idx = rng.permutation(np.flatnonzero(labels == c))
      shares = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
      for client, chunk in enumerate(np.split(idx, cuts)):
        buckets[client].extend(chunk.tolist())
    if min(len(b) for b in buckets) >= min_size:
      return buckets
  raise ValueError(
    f"Could not draw a Dirichlet(alpha={alpha}) split giving each of "
    f"{num_clients} clients >= {min_size} examples; raise alpha or lower "
    f"num_clients."
  )


def _shard_parts(labels, num_clients, classes_per_client, rng):
  """Each client holds exactly k classes; each class split evenly among its holders."""
  classes = np.unique(labels)
  k = validation.check_int("classes_per_client", classes_per_client, 1, len(classes))
  order = rng.permutation(classes)
  # Round-robin over a shuffled class order: client i holds k consecutive classes, so
  # each client has k distinct classes and every class is held when clients*k >= C.
  holders = collections.defaultdict(list)
  for client in range(num_clients):
    for j in range(k):
      holders[order[(client * k + j) % len(order)]].append(client)
  buckets = [[] for _ in range(num_clients)]
  for c, owners in holders.items():
    idx = rng.permutation(np.flatnonzero(labels == c))
    if len(idx) < len(owners):
      raise ValueError(
        f"Class {c} has {len(idx)} examples, fewer than the {len(owners)} "
        f"clients that must hold it; lower num_clients or classes_per_client."
      )
    for client, chunk in zip(owners, np.array_split(idx, len(owners))):
      buckets[client].extend(chunk.tolist())
  return buckets
