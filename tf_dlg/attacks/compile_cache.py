"""Compiled attack code reused across `run_attacks` calls: `CompileCache`, keyed by
`architecture_key` (what a traced attack depends on, not layer names or weights)."""

from __future__ import annotations

import collections
import json
from typing import Any, Callable

import tensorflow as tf

from tf_dlg.attacks import functional


def architecture_key(model: tf.keras.Model) -> str:
  """What the traced attack depends on: layer types and configs, not names or weights."""
  skip = ("name", "trainable", "dtype")
  layers = [
    (
      type(layer).__name__,
      {
        k: v
        for k, v in layer.get_config().items()
        if k not in skip and not k.endswith(("initializer", "regularizer", "constraint"))
      },
    )
    for layer in model.layers
  ]
  return json.dumps(layers, sort_keys=True, default=str)


class CompileCache:
  """Batched models and compiled optimiser loops, reused across `run_attacks` calls.

  An XLA compilation costs seconds, more than a whole easy attack. Entries are keyed by
  what the traced code captures (architecture, objective, observation shape, optimiser)
  and the least recently used beyond `max_entries` are dropped; `clear()` drops all.
  """

  def __init__(self, max_entries: int = 16):
    self.max_entries = max_entries
    self._entries: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()

  def get(self, key, make: Callable[[], Any]):
    if key in self._entries:
      self._entries.move_to_end(key)
      return self._entries[key]
    value = self._entries[key] = make()
    while len(self._entries) > self.max_entries:
      self._entries.popitem(last=False)
    return value

  def batched_model(self, model: tf.keras.Model) -> functional.BatchedModel:
    return self.get(("model", architecture_key(model)), lambda: functional.BatchedModel(model))

  def clear(self):
    self._entries.clear()

  def __len__(self):
    return len(self._entries)
