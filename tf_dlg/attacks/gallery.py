"""Gallery matching: the attacker the identification criterion assumes.

The identification criterion (`tf_dlg.analysis.identification`) counts a leak when a
reconstruction picks the client's original out of a gallery that holds it. An attacker
who holds that gallery needs no reconstruction: under the same threat model it computes
every candidate's own update on the same global model (the gradient for FedSGD; the
local SGD delta for FedAvg, knowing steps and learning rate) and names the candidate
whose update is most like the observed one.

Similarity: the cosine between the candidate's update and the observed (defended)
update, over the coordinates the observed update carries (those not exactly zero), so
masking and pruning leave the original's cosine at 1 and clipping changes nothing.
A batch update (the mean gradient of B images) is matched candidate by candidate; each
member of the batch is ranked among the candidates that are not members.

Reading top-down: `match_gallery` streams the gallery in chunks (`candidate_updates`:
per-candidate updates in one batched pass of `functional.BatchedModel`, never the whole
gallery's updates in memory), scores each chunk against all observed updates at once
(`masked_cosine_scores`: two matrix products), and ranks the members (`rank_members`).
Labels: the gallery's own (`labels="gallery"`), or, for an attacker whose gallery has
no labels, the best cosine over every label (`labels="best"`, the number of classes
times the work).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import weakref
from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_dlg import validation
from tf_dlg.attacks import functional
from tf_dlg.attacks.threat_model import ObservedUpdate

LABEL_MODES = ("gallery", "best")
DEFAULT_CHUNK = 1000
# Ties count against the attacker (as in identification.TIE_TOLERANCE): cosines within
# this of the original's are not told apart. Above float32 rounding of a cosine.
TIE_TOLERANCE = 1e-5
# Observed updates scored per gallery pass: bounds the [gallery, updates] score matrix.
MAX_UPDATES_PER_PASS = 256


@dataclasses.dataclass
class MatchResult:
  """Per observed update: how the attacker ranks the gallery.

  Attributes:
    members: The gallery indices of the update's own examples (ground truth, for scoring).
    ranks: Per member, 1 + the non-members scoring at least its cosine (ties pessimistic).
    member_scores: Per member, its cosine with the observed update.
    pick: The gallery index the attacker names (highest cosine).
    pick_score: Its cosine.
    pick_label: The label it was scored with (the gallery's, or the best one).
    non_members: Candidates ranked against (gallery size minus members).
  """

  members: np.ndarray
  ranks: np.ndarray
  member_scores: np.ndarray
  pick: int
  pick_score: float
  pick_label: int
  non_members: int

  @property
  def top1(self) -> np.ndarray:
    return self.ranks == 1


def _digest(arrays) -> str:
  h = hashlib.sha1()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(repr((a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _group_key(obs: ObservedUpdate) -> str:
  """Observations sharing a model (weights) and a threat model share candidate updates."""
  shape = (obs.kind, obs.local_steps, obs.learning_rate, obs.input_shape, obs.num_classes)
  return _digest(obs.model_weights) + repr(shape)


def candidate_updates(fmodel, weights, images, labels, obs: ObservedUpdate):
  """Each candidate's own update under `obs`'s threat model: [C, P] float32.

  The weights are tiled to one copy per candidate, so the gradient of the summed loss
  with respect to the copies is every candidate's own gradient in one backward pass.
  A FedAvg delta repeats the candidate's single-image SGD step `local_steps` times.
  """
  c = tf.shape(images)[0]
  tiled = [
    tf.tile(w[None], tf.concat([[c], tf.ones([len(w.shape)], tf.int32)], 0)) for w in weights
  ]
  x = images[:, None]
  y = tf.one_hot(labels, fmodel.num_classes)[:, None]
  if obs.kind == "gradient":
    update = functional.client_gradients(fmodel, tiled, x, y)
  else:
    update = functional.fedavg_delta(fmodel, tiled, x, y, obs.local_steps, obs.learning_rate, 1)
  return tf.concat([tf.reshape(u, [c, -1]) for u in update], axis=1)


def masked_cosine_scores(candidates, observed, carried):
  """Masked cosine [C, U] of candidates [C, P] with observed [U, P] on `carried` [U, P]."""
  dots = tf.matmul(candidates, observed, transpose_b=True)
  sq = tf.matmul(tf.square(candidates), carried, transpose_b=True)
  obs_norm = tf.norm(observed, axis=1)
  denom = tf.sqrt(tf.maximum(sq, 0.0)) * obs_norm[None, :]
  return tf.math.divide_no_nan(dots, denom)


# One compiled candidate-update function per model and threat model, reused by every call
# (weights are arguments): an XLA compilation costs seconds, a search calls hundreds of times.
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled(model, obs: ObservedUpdate, labels: str):
  """(BatchedModel, fn(weights, images, labels) -> (updates, labels used)) for `model`."""
  per_model = _COMPILED.setdefault(model, {})
  threat = dataclasses.replace(
    obs, update=[], model_weights=[], true_images=None, true_labels=None, metadata={}
  )
  key = (obs.kind, obs.local_steps, obs.learning_rate, labels)
  if key not in per_model:
    fmodel = functional.BatchedModel(model)

    def compute(weights, images, labels_in):
      if labels == "gallery":
        g = candidate_updates(fmodel, weights, images, labels_in, threat)
        return g, labels_in[:, None]
      k = fmodel.num_classes
      every = tf.repeat(images, k, axis=0)
      label = tf.tile(tf.range(k, dtype=labels_in.dtype), [tf.shape(images)[0]])
      g = candidate_updates(fmodel, weights, every, label, threat)
      return tf.reshape(g, [tf.shape(images)[0], k, -1]), tf.reshape(label, [-1, k])

    per_model[key] = (fmodel, tf.function(compute, jit_compile=True))
  return per_model[key]


class _Updates:
  """Candidate updates of one model and threat model, chunk by chunk, compiled once.

  With `cache_path` the first pass writes every candidate's update to a float32 memory
  map there (gallery x parameters x 4 bytes) and later passes read it back instead of
  recomputing: a threshold search asks the same candidates about many defended updates
  of one model, and reading the map costs a fraction of the backward passes.
  """

  def __init__(self, model, obs: ObservedUpdate, labels: str, chunk: int):
    self.fmodel, self._fn = _compiled(model, obs, labels)
    weights = self.fmodel.trainable_weights_from(obs.model_weights)
    self.weights = [tf.constant(w, tf.float32) for w in weights]
    # Every label of every candidate at once: keep the chunk's memory that of `chunk`.
    self.labels = labels
    self.chunk = chunk if labels == "gallery" else max(1, chunk // self.fmodel.num_classes)
    self.size = int(sum(np.prod(w.shape) for w in weights))

  def chunks(self, images, labels, cache_path: Optional[str] = None):
    """Yields (start, stop, updates [c, P] or [c, K, P], labels [c, 1 or K])."""
    n = len(images)
    stored = _open_cache(cache_path, (n, self.size)) if self.labels == "gallery" else None
    done = stored is not None and stored[1]
    for start in range(0, n, self.chunk):
      stop = min(start + self.chunk, n)
      if done:
        yield start, stop, np.asarray(stored[0][start:stop]), labels[start:stop, None]
        continue
      # Pad the last chunk: one compiled shape for the whole gallery.
      idx = np.minimum(np.arange(start, start + self.chunk), n - 1)
      g, lab = self._fn(
        self.weights, tf.constant(images[idx], tf.float32), tf.constant(labels[idx], tf.int64)
      )
      g, lab = g.numpy()[: stop - start], lab.numpy()[: stop - start]
      if stored is not None:
        stored[0][start:stop] = g
      yield start, stop, g, lab
    if stored is not None and not done:
      stored[0].flush()
      _mark_complete(cache_path)


def _open_cache(path: Optional[str], shape):
  """(memmap, complete?) at `path`, created when absent; None without a path."""
  if path is None:
    return None
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  complete = os.path.exists(path + ".complete") and os.path.exists(path)
  if not complete and os.path.exists(path + ".complete"):
    os.remove(path + ".complete")  # a marker without its map: never trust a rewrite
  mode = "r" if complete else "w+"
  return np.lib.format.open_memmap(
    path, mode=mode, dtype=np.float32, shape=None if complete else shape
  ), complete


def _mark_complete(path: str) -> None:
  with open(path + ".complete", "w") as f:
    f.write("ok\n")


def _flat(update: Sequence[np.ndarray]) -> np.ndarray:
  return np.concatenate([np.asarray(u, np.float32).ravel() for u in update])


def score_gallery(
  model, observed, gallery_images, gallery_labels, labels="gallery", chunk=None, cache_path=None
):
  """Masked cosine of every gallery candidate with every observed update: [N, U].

  All observations must share one model and threat model (see `match_gallery`, which
  groups them). Returns (scores [N, U] float32, labels used [N, U] int64).
  """
  updates = _Updates(model, observed[0], labels, DEFAULT_CHUNK if chunk is None else chunk)
  flat = np.stack([_flat(o.update) for o in observed])
  observed_t = tf.constant(flat)
  carried_t = tf.constant((flat != 0).astype(np.float32))
  n = len(gallery_images)
  scores = np.empty((n, len(observed)), np.float32)
  used = np.empty((n, len(observed)), np.int64)
  for start, stop, g, lab in updates.chunks(gallery_images, gallery_labels, cache_path):
    if g.ndim == 2:
      scores[start:stop] = masked_cosine_scores(tf.constant(g), observed_t, carried_t).numpy()
      used[start:stop] = lab
      continue
    k = g.shape[1]
    s = masked_cosine_scores(tf.constant(g.reshape(-1, g.shape[-1])), observed_t, carried_t).numpy()
    s = s.reshape(stop - start, k, -1)
    best = np.argmax(np.where(np.isfinite(s), s, -np.inf), axis=1)
    scores[start:stop] = np.take_along_axis(s, best[:, None], 1)[:, 0]
    used[start:stop] = np.take_along_axis(lab, best, 1)
  return scores, used


def rank_members(scores: np.ndarray, members: Sequence[int]) -> np.ndarray:
  """Per member: 1 + the non-members whose score is at least its own (minus the tolerance).

  Non-finite scores never outrank anything and a non-finite member score ranks last.
  """
  members = np.asarray(members, np.int64)
  s = np.where(np.isfinite(scores), scores, -np.inf)
  others = np.delete(s, members)
  ranks = []
  for m in members:
    own = s[m]
    ranks.append(
      len(others) + 1
      if not np.isfinite(own)
      else 1 + int(np.count_nonzero(others >= own - TIE_TOLERANCE))
    )
  return np.asarray(ranks, np.int64)


def _check(model, observed, gallery_images, gallery_labels, members, labels, chunk):
  validation.check_choice("labels", labels, LABEL_MODES)
  if chunk is not None:
    validation.check_int("chunk", chunk, 1, 1_000_000)
  images = np.asarray(gallery_images)
  glabels = np.asarray(gallery_labels)
  if images.ndim != 4 or len(images) == 0:
    raise ValueError(f"gallery_images must be [N, H, W, C] with N >= 1, got shape {images.shape}.")
  if glabels.shape != (len(images),) or not np.issubdtype(glabels.dtype, np.integer):
    raise ValueError(
      f"gallery_labels must hold one integer per gallery image ({len(images)}), got "
      f"{glabels.dtype} of shape {glabels.shape}."
    )
  if len(members) != len(observed):
    raise ValueError(f"members has {len(members)} entries for {len(observed)} observed updates.")
  for i, (obs, m) in enumerate(zip(observed, members)):
    m = np.asarray(m)
    if m.ndim != 1 or len(m) == 0 or m.min() < 0 or m.max() >= len(images):
      raise ValueError(
        f"members[{i}]={m.tolist()} must be non-empty gallery indices in [0, {len(images) - 1}]."
      )
    if tuple(obs.input_shape) != images.shape[1:]:
      raise ValueError(
        f"observed update {i} is for images {tuple(obs.input_shape)}, the gallery holds "
        f"{images.shape[1:]}."
      )
  return images, glabels


def match_gallery(
  model,
  observed: Sequence[ObservedUpdate],
  gallery_images,
  gallery_labels,
  members: Sequence[Sequence[int]],
  labels: str = "gallery",
  chunk: Optional[int] = None,
  cache_dir: Optional[str] = None,
) -> List[MatchResult]:
  """Ranks every observed update's own examples among the gallery by update similarity.

  Args:
    model: A Keras model of the observed updates' architecture (weights are taken from
      each observation's `model_weights`).
    observed: `ObservedUpdate`s (defended), any mix of models and threat models.
    gallery_images: [N, H, W, C] candidates in [0, 1]; gallery_labels: [N] integers.
    members: Per observation, the gallery indices of its own examples (for scoring only;
      the attacker's pick never reads them).
    labels: `gallery` (candidates carry their labels) or `best` (best over every label).
    chunk: Candidates per compiled pass (memory: chunk x parameters x 4 bytes, times the
      classes with `labels="best"`).
    cache_dir: Where candidate updates are kept between calls (`labels="gallery"` only):
      one float32 file per model, threat model and gallery (N x parameters x 4 bytes).
  """
  images, glabels = _check(model, observed, gallery_images, gallery_labels, members, labels, chunk)
  groups = {}
  for i, obs in enumerate(observed):
    groups.setdefault(_group_key(obs), []).append(i)
  out: List[Optional[MatchResult]] = [None] * len(observed)
  gallery_key = _digest([images, glabels]) if cache_dir else ""
  for key, rows in groups.items():
    path = None
    if cache_dir:
      path = os.path.join(
        cache_dir, hashlib.sha1((key + gallery_key).encode()).hexdigest() + ".npy"
      )
    for start in range(0, len(rows), MAX_UPDATES_PER_PASS):
      part = rows[start : start + MAX_UPDATES_PER_PASS]
      scores, used = score_gallery(
        model, [observed[i] for i in part], images, glabels, labels, chunk, path
      )
      for j, i in enumerate(part):
        out[i] = match_result(scores[:, j], used[:, j], members[i])
  return out


def match_result(scores, used, members) -> MatchResult:
  """The `MatchResult` of one observed update from every candidate's score [C] (its
  label `used` [C]) and the gallery rows holding the client's images."""
  members = np.asarray(members, np.int64)
  finite = np.where(np.isfinite(scores), scores, -np.inf)
  pick = int(np.argmax(finite))
  return MatchResult(
    members=members,
    ranks=rank_members(scores, members),
    member_scores=scores[members].astype(np.float64),
    pick=pick,
    pick_score=float(scores[pick]),
    pick_label=int(used[pick]),
    non_members=len(scores) - len(np.unique(members)),
  )
