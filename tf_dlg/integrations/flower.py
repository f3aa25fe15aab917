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
(0 or 1) and `tf_dlg.update_norm` (before the defence). Non-float arrays pass through.
A reply with an error is passed on untouched; a message that breaks the one-record
rule gets an error reply, as Flower's mods give.

Seeds: each train message gets its own defence seed, a function of `seed`, the node id
and the message's group id (Flower's round) and message id, so reruns draw the same
masks and noise while clients and rounds draw different ones. Put the mod last among
mods that change the parameters, so that what it measures is what leaves the client.
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode

from tf_dlg.defenses import base
from tf_dlg.defenses import keras as defenses_keras

METRIC_PREFIX = "tf_dlg."


def message_seed(seed: int, node_id: int, msg: Message) -> np.ndarray:
  """The [2] seed of one train message: `seed` and a CRC of node, round and message id."""
  md = msg.metadata
  tag = f"{node_id}/{md.group_id}/{md.message_id}".encode()
  return np.array([seed, zlib.crc32(tag)], np.int64)


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
  """

  def __init__(self, defense: base.Defense, seed: int = 0, exclude: Optional[Sequence] = None):
    if not isinstance(defense, base.Defense):
      raise TypeError(f"defense must be a tf_dlg.defenses.Defense, got {type(defense).__name__}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
      raise ValueError(f"seed={seed!r} must be an int in [0, 2**63).")
    self.defense = defense
    self.seed = seed
    self.exclude = None if exclude is None else [bool(e) for e in exclude]

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
    seed = message_seed(self.seed, context.node_id, msg)
    arrays, stats = self.defend(received[1].to_numpy_ndarrays(), sent[1].to_numpy_ndarrays(), seed)
    out.content.array_records[sent[0]] = ArrayRecord(
      {k: Array(np.asarray(a)) for k, a in zip(sent[1].keys(), arrays)}
    )
    metrics = {METRIC_PREFIX + k: v for k, v in stats.items()}
    if out.content.metric_records:
      key, record = next(iter(out.content.metric_records.items()))
      for k, v in metrics.items():
        record[k] = v
    else:
      out.content["metrics"] = MetricRecord(metrics)
    return out

  def defend(self, received, sent, seed):
    """`(arrays to send, statistics)` for one update; non-float arrays pass through."""
    if self.exclude is not None and len(self.exclude) != len(sent):
      raise ValueError(
        f"exclude has {len(self.exclude)} entries but the record has {len(sent)} arrays."
      )
    floating = [i for i, a in enumerate(sent) if np.issubdtype(np.asarray(a).dtype, np.floating)]
    exclude = self.exclude if self.exclude is not None else self.defense.exclude
    sub_exclude = None if exclude is None else [exclude[i] for i in floating]
    defended, stats = defenses_keras.defend_weights_delta(
      [received[i] for i in floating], [sent[i] for i in floating], self.defense, seed, sub_exclude
    )
    arrays = list(sent)
    for i, a in zip(floating, defended):
      arrays[i] = a
    return arrays, {
      "zero_fraction": stats["zero_fraction"],
      "clip_scale": stats["clip_scale"],
      "clipped": int(stats["clip_scale"] < 1.0),
      "update_norm": stats["norm"],
    }
