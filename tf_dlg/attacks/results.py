"""What an attack run hands back: `AttackResult` per observation, `Snapshot`s to hooks."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np

from tf_dlg.attacks.threat_model import ObservedUpdate


@dataclasses.dataclass
class AttackResult:
  """One reconstruction (the winning restart's).

  Attributes:
    images: [N, H, W, C] reconstruction clipped to [0, 1] (`raw_images` unclipped).
    labels: [N] recovered labels (inferred, or argmax of DLG's soft label).
    status: `converged` (distance below tolerance), `max_iterations`, `stalled`
      (optimiser stopped moving above the tolerance) or `failed` (non-finite loss).
    distance: final matching distance of the objective.
    iterations: optimiser iterations the winning restart ran.
    seconds: wall time of its group divided by the group's observation count.
    batch_size: slots of the compiled loop (lane) it ran in.
    seed: restart 0's seed; restart: index of the winning restart (the lowest-numbered
      converged one, else the one with the smallest distance).
    restart_distances / restart_iterations / restart_status: per restart (None for a
      restart that never started because a sibling had converged).
  """

  attack: str
  images: np.ndarray
  raw_images: np.ndarray
  labels: np.ndarray
  status: str
  distance: float
  iterations: int
  seconds: float
  batch_size: int
  seed: int
  observed: ObservedUpdate = dataclasses.field(repr=False, default=None)
  restart: int = 0
  restart_distances: List[Optional[float]] = dataclasses.field(default_factory=list)
  restart_iterations: List[Optional[int]] = dataclasses.field(default_factory=list)
  restart_status: List[Optional[str]] = dataclasses.field(default_factory=list)

  @property
  def failed(self) -> bool:
    return self.status == "failed"


@dataclasses.dataclass
class Snapshot:
  """Progress of one running attack after a chunk (what a `hook` receives)."""

  index: int
  restart: int
  iterations: int
  distance: float
  images: np.ndarray
  observed: ObservedUpdate = dataclasses.field(repr=False, default=None)
