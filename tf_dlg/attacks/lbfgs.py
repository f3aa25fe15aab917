"""Fixed-step L-BFGS with a per-slot curvature history (PyTorch's `LBFGS` semantics).

The history lives in one [S, 2m, n] buffer per compiled loop, with the Gram matrices
s_i . y_j and y_i . y_j kept up to date, so a step reads the buffer a fixed number of
times whatever m is: three (`push_pair`'s products with g and y, then `two_loop`'s final
combination).
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from tf_dlg.attacks.slot_state import (
  RUNNING,
  Compiled,
  base_state,
  compile_step,
  keep_where,
  record,
)


def add_history(st, x, g, history: int):
  """`st` plus L-BFGS's per-slot curvature history, empty (exact zeros).

  `pairs` [S, 2m, n] holds s_i in rows 0..m-1 and y_i in rows m..2m-1 at ring positions
  (one buffer, so one matrix product reads all pairs); `sy` [S, m, m] = s_i . y_j and
  `yy` [S, m, m] = y_i . y_j are kept up to date, so a step never loops over the pairs.
  """
  s, n = tf.shape(x)[0], tf.shape(x)[1]
  square = tf.zeros([s, history, history], x.dtype)
  st.update(
    pairs=tf.zeros([s, 2 * history, n], x.dtype),
    sy=square,
    yy=square,
    valid=tf.zeros([s, history], tf.bool),
    head=tf.zeros([s], tf.int32),
    hdiag=tf.ones([s], x.dtype),
    d=tf.zeros_like(x),
    t=tf.zeros([s], x.dtype),
    gprev=g,
    first=tf.ones([s], tf.bool),
  )
  return st


def build_lbfgs(
  value_fn: Callable,
  iterations: int = 0,
  jit_compile: bool = True,
  history: int = 100,
  lr: float = 1.0,
  new_row: bool = False,
) -> Compiled:
  """Fixed-step L-BFGS (PyTorch semantics, no line search), per-slot history.

  The direction is PyTorch's two-loop recursion (`two_loop`). Every slot has its own
  ring head, reset when it enters, so its pairs sit at the same positions and are
  summed in the same order whether it ran alone, in a batch or entered a slot late.
  `new_row`: see `push_pair` (the same iterates either way).
  """
  del iterations

  def init_state(x, c, tol, active):
    loss, dist, g = value_fn(x, c)
    return add_history(base_state(x, loss, dist, g, tol, active), x, g, history)

  def step(st, c, tol):
    g, first = st["g"], st["first"]
    running = tf.equal(st["status"], RUNNING)
    # Curvature pair of the previous step; pairs with y.s <= 1e-10 are skipped (zeros).
    s = st["d"] * st["t"][:, None]
    y = g - st["gprev"]
    ys = tf.reduce_sum(y * s, 1)
    ok = (ys > 1e-10) & ~first & running
    okf = tf.cast(ok, s.dtype)[:, None]
    hist, sg, yg = push_pair(st, s * okf, y * okf, g, ok, history, new_row)
    hdiag = tf.where(ok, ys / tf.maximum(tf.reduce_sum(y * y, 1), 1e-30), st["hdiag"])
    direction = two_loop(hist, sg, yg, g, hdiag, history, solve=not jit_compile)
    d = keep_where(first, -g, -direction)
    t0 = tf.minimum(1.0, 1.0 / tf.maximum(tf.reduce_sum(tf.abs(g), 1), 1e-30)) * lr
    t = tf.where(running, tf.where(first, t0, lr * tf.ones_like(t0)), 0.0)
    x = st["x"] + t[:, None] * d
    loss, dist, g_new = value_fn(x, c)
    st = record(st, x, loss, dist, g_new, tol, running)
    still = tf.equal(st["status"], RUNNING)
    return dict(
      st,
      x=keep_where(still, x, st["best_x"]),
      loss=loss,
      dist=dist,
      g=g_new,
      gprev=g,
      d=d,
      t=t,
      hdiag=hdiag,
      first=first & ~running,
      **hist,
    )

  return compile_step(init_state, step, jit_compile)


def push_pair(st, s, y, g, ok, history, new_row=False):
  """(history with pair (s, y) written at the head, S^T g, Y^T g after it).

  The pair is written first, so the buffer is updated in place; its matrix-vector
  products with g and y then give S^T g, Y^T g, S^T y and Y^T y (two products: XLA's CPU
  dot with a stacked [g, y] reads the buffer at a quarter of the speed, and one with the
  slice `pairs[:, m:]` would copy it). Of s_i . y_j the recursion reads only i no newer
  than j (`two_loop`), so the new s's row, s . y_j for the older pairs, is never read:
  it is left zero, and its diagonal s . y comes from S^T y. `new_row=True` computes it
  with a third product over the buffer, as the code before did
  (`benchmarks.lbfgs_products`; every entry read is the same).
  """
  m, h = history, st["head"]  # h: [S]
  b = tf.shape(g)[0]
  rows = tf.stack([h, h + m], 1)[:, :, None]
  idx = tf.concat([tf.tile(tf.range(b)[:, None, None], [1, 2, 1]), rows], 2)  # [S, 2, 2]
  pairs = tf.tensor_scatter_nd_update(st["pairs"], idx, tf.stack([s, y], 1))
  pg, py = tf.linalg.matvec(pairs, g), tf.linalg.matvec(pairs, y)  # [S, 2m]: S g, Y g; S y, Y y
  at = tf.one_hot(h, m, on_value=True, off_value=False)  # [S, m]
  if new_row:
    ys = tf.linalg.matvec(pairs, s)[:, m:]  # [S, m]: Y s
  else:
    ys = tf.where(at, py[:, :m], tf.zeros_like(py[:, :m]))  # only (h, h) = s . y is read

  def put_cross(mat, row, col):  # row h <- row, column h <- col
    return tf.where(at[:, :, None], row[:, None, :], tf.where(at[:, None, :], col[:, :, None], mat))

  hist = {
    "pairs": pairs,
    "sy": put_cross(st["sy"], ys, py[:, :m]),
    "yy": put_cross(st["yy"], py[:, m:], py[:, m:]),
    "valid": tf.where(at, ok[:, None], st["valid"]),
    "head": (h + 1) % m,
  }
  return hist, pg[:, :m], pg[:, m:]


def two_loop(hist, sg, yg, g, hdiag, history, solve=False):
  """H g for L-BFGS's inverse Hessian H: PyTorch's two-loop recursion, run on Gram matrices.

  Every inner product the recursion takes with an n-vector is a combination of
  `sg` = S^T g, `yg` = Y^T g (ring order) and the maintained s_i . y_j, y_i . y_j, so both loops run over
  m-vectors (m = `history`), and the pairs are read once more, to form
  H g = hdiag g + S (alpha - beta) - hdiag Y alpha. On a CPU a batch's pairs do not fit
  in the cache; reading them 2m times, as the textbook loops over n-vectors do, cost
  several times the attack's own gradient evaluation. Skipped and empty pairs have
  rho = 0 and contribute exact zeros.

  Of s_i . y_j both loops read only the pairs where s_i is no newer than y_j (the
  diagonal and, by age, the upper triangle), which is why `push_pair` skips the new row.

  Each loop is a triangular system in the m-vector: (I + diag(rho) triu(SY, 1)) alpha =
  rho a, then (I + diag(rho) tril(SY^T, -1)) c = alpha - rho yq. `solve=True` hands both
  to `tf.linalg.triangular_solve`: without XLA, 2 x m loop iterations of small ops cost
  ~8 ms per step (measured: a 180-iteration attack ran 10 ms per iteration), which the
  one-call solve removes; under XLA the loops are cheaper than XLA CPU's solve (measured
  3x slower for one slot), so compiled runs keep them.
  """
  m = history
  head = hist["head"][:, None]  # [S, 1]
  order = (head + tf.range(m)[None]) % m  # ring position of age rank 0 (oldest) .. m-1

  def aged(v, axis=1):
    return tf.gather(v, order, axis=axis, batch_dims=1)

  sy = aged(aged(hist["sy"]), 2)  # [S, m, m]: s_i . y_j by age
  yy = aged(aged(hist["yy"]), 2)
  ys = tf.linalg.diag_part(sy)
  rho = tf.where(aged(hist["valid"]), 1.0 / tf.where(aged(hist["valid"]), ys, 1.0), 0.0)
  a, b = aged(sg), aged(yg)
  if solve:
    return _two_loop_solved(hist, (sy, yy, rho, a, b), g, hdiag, head, m)

  def backward(i, alpha):  # newest first: alpha_i = rho_i s_i . (g - sum_{j>i} alpha_j y_j)
    ai = rho[:, i] * (a[:, i] - tf.reduce_sum(sy[:, i, :] * alpha, 1))
    return i - 1, alpha + ai[:, None] * tf.one_hot(i, m, dtype=g.dtype)[None]

  alpha = tf.while_loop(lambda i, _: i >= 0, backward, (m - 1, tf.zeros_like(a)))[1]
  yq = hdiag[:, None] * (b - tf.linalg.matvec(yy, alpha))  # y_i . (hdiag q)

  def forward(i, c):  # oldest first: beta_i = rho_i y_i . r, c_j = alpha_j - beta_j
    beta = rho[:, i] * (yq[:, i] + tf.reduce_sum(sy[:, :, i] * c, 1))
    return i + 1, c + (alpha[:, i] - beta)[:, None] * tf.one_hot(i, m, dtype=g.dtype)[None]

  c = tf.while_loop(lambda i, _: i < m, forward, (0, tf.zeros_like(a)))[1]
  return _direction(hist, c, alpha, g, hdiag, head, m)


def _direction(hist, c, alpha, g, hdiag, head, m):
  """hdiag g + S c - hdiag Y alpha, with c and alpha by age, the pairs by ring position."""
  back = (tf.range(m)[None] - head) % m  # age rank of each ring position
  both = tf.concat([c, -hdiag[:, None] * alpha], 1)
  coef = tf.gather(both, tf.concat([back, back + m], 1), axis=1, batch_dims=1)
  return hdiag[:, None] * g + tf.linalg.matmul(coef[:, None, :], hist["pairs"])[:, 0, :]


def _two_loop_solved(hist, aged_terms, g, hdiag, head, m):
  """`two_loop`'s recursions as two triangular solves (same H g up to rounding)."""
  sy, yy, rho, a, b = aged_terms
  eye = tf.eye(m, dtype=g.dtype)[None]
  upper = eye + rho[:, :, None] * tf.linalg.band_part(sy, 0, -1) * (1.0 - eye)
  alpha = tf.linalg.triangular_solve(upper, (rho * a)[:, :, None], lower=False)[:, :, 0]
  yq = hdiag[:, None] * (b - tf.linalg.matvec(yy, alpha))
  syt = tf.linalg.matrix_transpose(sy)
  lower = eye + rho[:, :, None] * tf.linalg.band_part(syt, -1, 0) * (1.0 - eye)
  c = tf.linalg.triangular_solve(lower, (alpha - rho * yq)[:, :, None], lower=True)[:, :, 0]
  return _direction(hist, c, alpha, g, hdiag, head, m)
