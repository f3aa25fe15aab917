"""TensorBoard summaries of reconstruction progress (a `run_attacks` hook).

  hook = TensorBoardHook("outputs/attack/tensorboard")
  run_attacks(model, observed, config=config, hook=hook)
  hook.close()                      # then: tensorboard --logdir outputs/attack

Per attack i (restart r) after every compiled chunk: `attack_i/distance` (matching
distance of restart r at its iteration count, tag suffix `_restart_r` for r > 0),
`attack_i/ssim` against the true image when the observation carries it (scoring only:
the attack never reads it), and every `image_every` chunks the current reconstruction
`attack_i/reconstruction` (clipped to [0, 1]).
"""

from __future__ import annotations

from typing import List

import numpy as np
import tensorflow as tf


class TensorBoardHook:
  """Writes `Snapshot`s of `run_attacks` as TensorBoard scalars and images."""

  def __init__(self, logdir: str, image_every: int = 5, max_images: int = 16):
    self.writer = tf.summary.create_file_writer(logdir)
    self.image_every = max(1, int(image_every))
    self.max_images = max_images
    self._calls = 0

  def __call__(self, snapshots: List) -> None:
    from tf_dlg import metrics

    images_now = self._calls % self.image_every == 0
    self._calls += 1
    with self.writer.as_default():
      for s in snapshots:
        tag = f"attack_{s.index}" + (f"_restart_{s.restart}" if s.restart else "")
        tf.summary.scalar(f"{tag}/distance", s.distance, step=s.iterations)
        clipped = np.clip(s.images, 0.0, 1.0)
        truth = None if s.observed is None else s.observed.true_images
        if truth is not None:
          ssim = np.mean([metrics.ssim(t, c) for t, c in zip(truth, clipped)])
          tf.summary.scalar(f"{tag}/ssim", float(ssim), step=s.iterations)
        if images_now:
          tf.summary.image(
            f"{tag}/reconstruction", clipped, step=s.iterations, max_outputs=self.max_images
          )
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()
