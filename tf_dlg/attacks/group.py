"""One group of same-shaped observations on one compiled optimiser loop (`GroupJob`):
its inputs (weights, observed updates, inferred labels, seeded starts), the traced
matching objective, the cached compiled loop, and packing each observation's winning
restart into an `AttackResult`."""

from __future__ import annotations

import json
import time
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from tf_dlg.attacks import functional, optimize, schedule
from tf_dlg.attacks import labels as labels_lib
from tf_dlg.attacks.compile_cache import CompileCache, architecture_key
from tf_dlg.attacks.results import AttackResult, Snapshot

# jit_compile=None: one or two attacks start without XLA and switch to it after this many
# iterations. Measured on digits, 2 slots: XLA costs ~5 s more to start (tracing and
# compilation) and then 1.7 ms per iteration, graph mode 3.8 ms, so XLA repays itself
# after ~2,400 iterations; switching at 2,000 (ski rental) keeps easy and mid-length
# attacks (200-1,600 iterations) free of the compilation and bounds the loss on long ones.
AUTO_JIT_AFTER = 2000


def initial_images(seed: int, shape, init: str) -> np.ndarray:
  s = tf.constant([int(seed) % (2**31 - 1), 7], tf.int32)
  if init == "randn":  # the reference code's torch.randn
    return tf.random.stateless_normal(shape, s).numpy()
  return tf.random.stateless_uniform(shape, s).numpy()


class GroupJob:
  """One group of same-shaped observations: inputs, compiled loop, result packing.

  `config` is the run's `runner.AttackConfig` (read, never imported here: the runner
  builds groups, so this module sits below it).
  """

  def __init__(self, config, cache: CompileCache, model, obs, ids, seeds):
    self.config, self.cache, self.obs, self.ids, self.seeds = config, cache, obs, ids, seeds
    first = obs[0]
    self.kind, self.n, self.k = first.kind, first.num_examples, first.num_classes
    self.img_shape = (self.n,) + first.input_shape
    self.img_size = int(np.prod(self.img_shape))
    self.joint = not config.infers_labels
    self.objective = config.objective()
    self.fmodel = cache.batched_model(self._keras_model(model, first))
    self.weights = [self.fmodel.trainable_weights_from(o.model_weights) for o in obs]
    shapes = [tuple(s) for s in self.fmodel.trainable_shapes]
    for o in obs:
      got = [tuple(np.shape(u)) for u in o.update]
      if got != shapes:
        raise ValueError(
          f"Observed update shapes {got} do not match the model's trainable variables {shapes}."
        )
    if not self.joint:
      ki = labels_lib.last_dense_kernel_index(shapes, self.k)
      self.inferred = [labels_lib.infer_labels(o.update[ki], self.n) for o in obs]
    self.tol = [self.objective.stop_threshold(o.update) for o in obs]

  def _keras_model(self, model, first):
    if (
      model is not None
      and tuple(model.input_shape[1:]) == first.input_shape
      and int(model.output_shape[-1]) == first.num_classes
    ):
      return model
    from tf_dlg import models as models_lib

    return self.cache.get(
      ("keras", first.model_name, first.input_shape, first.num_classes),
      lambda: models_lib.build_model(first.model_name, first.input_shape, first.num_classes),
    )

  def start(self, i: int, restart: int, explicit=None) -> np.ndarray:
    """Flat starting position of restart `restart` of observation i."""
    seed = schedule.restart_seed(self.seeds[i], restart)
    if explicit is None:
      x0 = initial_images(seed, self.img_shape, self.config.init)
    else:
      x0 = np.asarray(explicit, np.float32).reshape(self.img_shape)
    parts = [x0.reshape(-1)]
    if self.joint:
      parts.append(initial_images(seed + 10**6, (self.n, self.k), self.config.init).reshape(-1))
    return np.concatenate(parts).astype(np.float32)

  def consts_row(self, i: int) -> Dict:
    row = {
      "weights": [np.asarray(w, np.float32) for w in self.weights[i]],
      "observed": [np.asarray(u, np.float32) for u in self.obs[i].update],
    }
    if not self.joint:
      row["labels"] = np.eye(self.k, dtype=np.float32)[self.inferred[i]]
    return row

  def value_fn(self, jit: bool):
    """(loss, distance, gradient) of flat positions [S, n] under per-slot constants."""
    fmodel = self.fmodel if jit else self.fmodel.without_xla()
    objective, joint = self.objective, self.joint
    n, k, img_size, img_shape = self.n, self.k, self.img_size, self.img_shape
    first = self.obs[0]

    def value_fn(pos, c):
      with tf.GradientTape() as tape:
        tape.watch(pos)
        b = tf.shape(pos)[0]
        x = tf.reshape(pos[:, :img_size], tf.concat([[b], img_shape], 0))
        if joint:
          y = tf.nn.softmax(tf.reshape(pos[:, img_size:], [b, n, k]), axis=-1)
        else:
          y = c["labels"]
        if first.kind == "gradient":
          update = functional.client_gradients(fmodel, c["weights"], x, y)
        else:
          update = functional.fedavg_delta(
            fmodel, c["weights"], x, y, first.local_steps, first.learning_rate, first.batch_size
          )
        dist = objective.distance(update, c["observed"])
        loss = dist + objective.regularizer(x)
      return loss, dist, tape.gradient(loss, pos)

    # A function of its own: traced once (slot axis unknown) and called by the init,
    # refill and chunk functions alike, instead of being traced into each. No AutoGraph:
    # there is no tensor-dependent Python control flow, and converting the model code
    # took 5 of the 9 s of tracing.
    return tf.function(value_fn, autograph=False)

  def jit(self) -> bool:
    """XLA from the start? Auto (None): for more than two jobs; else see `run`."""
    if self.config.jit_compile is not None:
      return bool(self.config.jit_compile)
    return len(self.obs) * self.config.restarts > 2

  def compiled(self, jit: Optional[bool] = None) -> optimize.Compiled:
    c, first = self.config, self.obs[0]
    jit = self.jit() if jit is None else jit
    iterations = c.iterations if c.optimizer == "adam" else 0
    key = (
      "compiled",
      id(self.fmodel),
      architecture_key(self.fmodel.model),
      c.attack,
      json.dumps(self.objective.get_config(), sort_keys=True),
      first.kind,
      self.n,
      self.k,
      first.local_steps,
      first.learning_rate,
      first.batch_size,
      c.optimizer,
      json.dumps(dict(c.optimizer_options), sort_keys=True),
      jit,
      iterations,
    )
    return self.cache.get(
      key,
      lambda: optimize.build(
        c.optimizer, self.value_fn(jit), c.iterations, jit, **c.optimizer_options
      ),
    )

  def run(self, starts, bar, hook) -> List[AttackResult]:
    t0 = time.perf_counter()
    queue = schedule.RestartQueue(self, starts, bar)
    lanes, slots = schedule.lane_layout(self.config, len(queue.jobs))
    on_chunk = None if hook is None else (lambda jobs, st: hook(self.snapshots(queue, jobs, st)))
    # Auto XLA for one or two jobs: its start-up (~5 s) costs more than an easy attack
    # (~200 iterations at ~3.8 ms without it), so switch only if one runs long.
    upgrade = None
    if self.config.jit_compile is None and not self.jit():
      upgrade = (self.compiled(jit=True), AUTO_JIT_AFTER)
    optimize.run_lanes(
      self.compiled(),
      queue,
      slots,
      self.config.iterations,
      lanes,
      check_every=self.config.check_every,
      on_chunk=on_chunk,
      upgrade=upgrade,
      patience=self.config.patience,
    )
    seconds = (time.perf_counter() - t0) / len(self.obs)
    return [self.pack(i, rows, seconds, slots) for i, rows in enumerate(queue.rows_done)]

  def snapshots(self, queue, jobs, st) -> List[Snapshot]:
    best_x, dist, iters = st["best_x"].numpy(), st["best_dist"].numpy(), st["iters"].numpy()
    out = []
    for s, job in enumerate(jobs):
      if job is not None:
        i, r = queue.jobs[job]
        out.append(
          Snapshot(
            index=self.ids[i],
            restart=r,
            iterations=int(iters[s]),
            distance=float(dist[s]),
            observed=self.obs[i],
            images=best_x[s, : self.img_size].reshape(self.img_shape),
          )
        )
    return out

  def pack(
    self, i: int, rows: Dict[int, Optional[Dict]], seconds: float, slots: int
  ) -> AttackResult:
    """The lowest-numbered converged restart, else the smallest distance (ties: the
    lowest index); see `schedule.RestartQueue` for why not the first to converge."""
    order = range(self.config.restarts)
    ran = [r for r in order if rows.get(r) is not None]
    converged = [r for r in ran if rows[r]["status"] == "converged"]
    key = lambda r: (not np.isfinite(rows[r]["distance"]), rows[r]["distance"], r)  # noqa: E731
    win = converged[0] if converged else min(ran, key=key)
    row = rows[win]
    raw = row["x"][: self.img_size].reshape(self.img_shape)
    if self.joint:
      lab = np.argmax(row["x"][self.img_size :].reshape(self.n, self.k), -1).astype(np.int64)
    else:
      lab = self.inferred[i]
    pick = lambda key: [None if rows.get(r) is None else rows[r][key] for r in order]  # noqa: E731
    return AttackResult(
      attack=self.config.attack,
      images=np.clip(raw, 0.0, 1.0),
      raw_images=raw,
      labels=lab,
      status=row["status"],
      distance=float(row["distance"]),
      iterations=int(row["iterations"]),
      seconds=seconds,
      batch_size=slots,
      seed=self.seeds[i],
      observed=self.obs[i],
      restart=win,
      restart_distances=pick("distance"),
      restart_iterations=pick("iterations"),
      restart_status=pick("status"),
    )
