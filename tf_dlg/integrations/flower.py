"""A Flower client mod that defends the update a client sends (`pip install tf-dlg[flower]`).

    from flwr.clientapp import ClientApp
    from tf_dlg.defenses import get_defense
    from tf_dlg.integrations.flower import DefenseMod

    app = ClientApp(mods=[DefenseMod(get_defense("masking", 0.5), seed=0)])

    @app.train()
    def train(msg, context):
      ...  # fit a model on the received arrays, reply with its arrays and metrics

Like Flower's own `fixedclipping_mod`, it works on train messages of the Message API
that carry one `ArrayRecord` each way (the parameters received and the ones sent
back). It defends the update -- the sent arrays minus the received ones -- with any
`tf_dlg.defenses.Defense`, replaces the reply's arrays by `received + defended update`
(keys unchanged), and adds to the reply's `MetricRecord` what the defence did:
`tf_dlg.zero_fraction`, `tf_dlg.clip_scale` (1.0 = not clipped), `tf_dlg.clipped`
(0 or 1) and `tf_dlg.update_norm` (before the defence).

Dtypes (fail closed): every floating array is defended -- NumPy's float16/32/64 and the
`ml_dtypes` floats such as bfloat16 (which Flower's `Array` carries as raw bytes and
its dtype name), each in float32 and sent back in its own dtype. An array that is not
floating (int32, bool, ...) and that the client changed cannot be defended: the reply
becomes an error reply naming it, rather than the update leaving undefended; exclude
it (`exclude=`) to send it as trained. Unchanged non-float arrays pass through.
Excluded arrays are sent exactly as trained (bit for bit).

A reply with an error is passed on untouched; a message that breaks the one-record
rule, a reply whose array keys differ from the received ones, or an update that cannot
be defended gets an error reply, as Flower's mods give.

Seeds: each train message gets its own defence seed, a function of `seed`, the node id
and the message's group id (Flower's round) and message id, so clients and rounds draw
different ones. Flower's message ids hash the creation time, so a rerun of a real
simulation draws new masks; for runs that repeat exactly, pass `seed_tag` (a function
of the message and context, e.g. the partition id and round, as
`tf_dlg.integrations.flower_engine` does). Put the mod last among mods that change the
parameters, so that what it measures is what leaves the client.
"""

from __future__ import annotations

import zlib
from typing import Callable, Optional, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode

from tf_dlg.defenses import base
from tf_dlg.integrations import keras as defenses_keras

METRIC_PREFIX = "tf_dlg."


def message_seed(seed: int, node_id: int, msg: Message, tag: Optional[str] = None) -> np.ndarray:
  """The [2] seed of one train message: `seed` and a CRC of `tag` (default: node, round, message id)."""
  if tag is None:
    md = msg.metadata
    tag = f"{node_id}/{md.group_id}/{md.message_id}"
  return np.array([seed, zlib.crc32(str(tag).encode())], np.int64)


class UndefendableUpdate(ValueError):
  """An update the mod cannot defend (the reply becomes an error reply)."""


def float_dtype(dtype) -> bool:
  """Whether `dtype` is a floating type: NumPy's, or an `ml_dtypes` one (bfloat16, ...)."""
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.floating):
    return True
  if dtype.kind != "V":
    return False
  try:
    import ml_dtypes

    ml_dtypes.finfo(dtype)
  except (ImportError, TypeError, ValueError):
    return False
  return True


def record_arrays(record: ArrayRecord) -> list:
  """The NumPy arrays of a record; `ml_dtypes` floats (raw bytes in `Array`) restored."""
  out = []
  for key in record.keys():
    item = record[key]
    a = item.numpy()
    if a.dtype.kind == "V" and item.dtype not in ("", np.dtype(a.dtype).name):
      try:
        import ml_dtypes

        a = a.view(getattr(ml_dtypes, item.dtype))
      except (ImportError, AttributeError, TypeError, ValueError):
        pass
    out.append(a)
  return out


def add_metrics(reply: Message, metrics) -> Message:
  """`reply` with `metrics` added to its MetricRecord (a new "metrics" one where it has none)."""
  if reply.content.metric_records:
    record = next(iter(reply.content.metric_records.values()))
    for k, v in metrics.items():
      record[k] = v
  else:
    reply.content["metrics"] = MetricRecord(metrics)
  return reply


def _error_reply(msg: Message, reason: str) -> Message:
  return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _single(records, what: str, side: str):
  if len(records) != 1:
    return None, f"DefenseMod expects exactly one {what} in the {side}, found {len(records)}."
  return next(iter(records.items())), None


class DefenseMod:
  """Flower client mod: `(msg, context, call_next) -> msg`, defending train replies.

  Args:
    defense: A `tf_dlg.defenses.Defense` (e.g. `get_defense("clipping", 1.0)`).
    seed: Base seed (int); see the module docstring for the per-message seed.
    exclude: Optional bools, one per array of the record, True = sent as trained (e.g.
      `batchnorm_exclusion(model, model.weights)` for a Keras model whose `weights` are
      what the client sends); default: the defence's own `exclude`.
    seed_tag: Optional `(msg, context) -> str`; the message's seed is then `seed` and a
      CRC of this tag (e.g. partition id and round, for runs that repeat exactly).
  """

  def __init__(
    self,
    defense: base.Defense,
    seed: int = 0,
    exclude: Optional[Sequence] = None,
    seed_tag: Optional[Callable] = None,
  ):
    if not isinstance(defense, base.Defense):
      raise TypeError(f"defense must be a tf_dlg.defenses.Defense, got {type(defense).__name__}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
      raise ValueError(f"seed={seed!r} must be an int in [0, 2**63).")
    self.defense = defense
    self.seed = seed
    self.exclude = None if exclude is None else [bool(e) for e in exclude]
    if seed_tag is not None and not callable(seed_tag):
      raise TypeError(f"seed_tag must be callable (msg, context) -> str, got {seed_tag!r}.")
    self.seed_tag = seed_tag

  def __call__(self, msg: Message, context, call_next) -> Message:
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
      return call_next(msg, context)
    received, reason = _single(msg.content.array_records, "ArrayRecord", "message")
    if reason:
      return _error_reply(msg, reason)
    out = call_next(msg, context)
    if out.has_error():
      return out
    sent, reason = _single(out.content.array_records, "ArrayRecord", "reply")
    if reason is None and len(out.content.metric_records) > 1:
      reason = f"DefenseMod expects at most one MetricRecord in the reply, found {len(out.content.metric_records)}."
    if reason is None and list(sent[1].keys()) != list(received[1].keys()):
      reason = "DefenseMod: the reply's array keys differ from the received ones."
    if reason:
      return _error_reply(msg, reason)
    tag = None if self.seed_tag is None else self.seed_tag(msg, context)
    seed = message_seed(self.seed, context.node_id, msg, tag)
    try:
      arrays, stats = self.defend(record_arrays(received[1]), record_arrays(sent[1]), seed)
    except UndefendableUpdate as e:
      return _error_reply(msg, f"DefenseMod: {e}")
    out.content.array_records[sent[0]] = ArrayRecord(
      {k: Array(np.asarray(a)) for k, a in zip(sent[1].keys(), arrays)}
    )
    return add_metrics(out, {METRIC_PREFIX + k: v for k, v in stats.items()})

  def defend(self, received, sent, seed):
    """`(arrays to send, statistics)` for one update (see the module docstring).

    Raises:
      UndefendableUpdate: `exclude` does not fit the record, or a non-float array that
        is not excluded changed (it cannot be defended and must not leave as trained).
    """
    received, sent = [np.asarray(a) for a in received], [np.asarray(a) for a in sent]
    if self.exclude is not None and len(self.exclude) != len(sent):
      raise UndefendableUpdate(
        f"exclude has {len(self.exclude)} entries but the record has {len(sent)} arrays."
      )
    exclude = self.exclude if self.exclude is not None else self.defense.exclude
    exclude = [False] * len(sent) if exclude is None else list(exclude)
    if len(exclude) != len(sent):
      raise UndefendableUpdate(
        f"the defence's exclude has {len(exclude)} entries but the record has {len(sent)} arrays."
      )
    floating = []
    for i, (r, a) in enumerate(zip(received, sent)):
      if r.shape != a.shape:
        raise UndefendableUpdate(f"array {i} has shape {r.shape} received but {a.shape} sent.")
      if float_dtype(a.dtype):
        floating.append(i)
      elif not exclude[i] and not np.array_equal(r, a):
        raise UndefendableUpdate(
          f"array {i} has dtype {a.dtype.name}, which cannot be defended, and the client "
          "changed it; exclude it to send it as trained, or send float arrays."
        )
    defended, stats = defenses_keras.defend_weights_delta(
      [received[i].astype(np.float32) for i in floating],
      [sent[i].astype(np.float32) for i in floating],
      self.defense,
      seed,
      [exclude[i] for i in floating],
    )
    arrays = list(sent)
    for i, a in zip(floating, defended):
      if not exclude[i]:  # excluded arrays leave exactly as trained
        arrays[i] = np.asarray(a).astype(sent[i].dtype)
    return arrays, {
      "zero_fraction": stats["zero_fraction"],
      "clip_scale": stats["clip_scale"],
      "clipped": int(stats["clip_scale"] < 1.0),
      "update_norm": stats["norm"],
    }
