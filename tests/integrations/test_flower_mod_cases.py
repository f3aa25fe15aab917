"""The Flower mod's edge cases, in process: dtypes, records, keys, errors, exclusion.

Each reply comes from a `ClientApp` whose train function returns fixed arrays (no
model), so the expected values are NumPy's: a changed int32 array must not leave
undefended, bfloat16 arrays are defended like float32 ones, excluded arrays leave bit
for bit as trained, and every broken reply gets an error reply, not a defended one.
"""

import math
import time

import ml_dtypes
import numpy as np
import pytest
from flwr.app import (
  Array,
  ArrayRecord,
  ConfigRecord,
  Context,
  Error,
  Message,
  MetricRecord,
  RecordDict,
)
from flwr.app.metadata import Metadata
from flwr.clientapp import ClientApp

from tf_dlg import defenses
from tf_dlg.integrations import flower


def _message(arrays, group_id="1"):
  md = Metadata(
    run_id=1,
    message_id=f"m-{group_id}",
    src_node_id=0,
    dst_node_id=7,
    reply_to_message_id="",
    group_id=group_id,
    created_at=time.time(),
    ttl=3600.0,
    message_type="train",
  )
  content = {"arrays": ArrayRecord(arrays), "config": ConfigRecord({"lr": 0.5})}
  return Message(RecordDict(content), metadata=md)


def _context():
  return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _app(mod, reply_fn):
  """A ClientApp whose train step replies `reply_fn(received arrays, msg)` behind `mod`."""
  app = ClientApp(mods=[mod])

  @app.train()
  def train(msg, context):
    out = reply_fn(flower.record_arrays(msg.content["arrays"]), msg)
    return out if isinstance(out, Message) else Message(out, reply_to=msg)

  return app


def _content(arrays, **records):
  return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"n": 10}), **records})


def _masking(rate=0.5, **kwargs):
  return flower.DefenseMod(defenses.get_defense("masking", rate), **kwargs)


RNG = np.random.default_rng(0)
RECEIVED = [RNG.normal(size=(40, 50)).astype(np.float32), np.arange(5, dtype=np.int32)]


def test_a_changed_int32_array_is_refused_not_sent_undefended():
  def reply(r, _):
    return _content([r[0] + 1.0, r[1] + 7])  # the int32 array carries the update

  out = _app(_masking(), reply)(_message(RECEIVED), _context())
  assert out.has_error()
  assert "array 1 has dtype int32, which cannot be defended" in out.error.reason
  # Excluded, it is sent as trained (and the float array is defended).
  out = _app(_masking(exclude=[False, True]), reply)(_message(RECEIVED), _context())
  assert not out.has_error()
  sent = out.content["arrays"].to_numpy_ndarrays()
  np.testing.assert_array_equal(sent[1], RECEIVED[1] + 7)
  assert sent[1].dtype == np.int32
  zero = np.mean(sent[0] - RECEIVED[0] == 0)
  assert out.content["metrics"]["tf_dlg.zero_fraction"] == pytest.approx(zero)
  assert 0.4 < zero < 0.6


def test_bfloat16_arrays_are_defended_in_their_dtype():
  received = [RECEIVED[0].astype(ml_dtypes.bfloat16)]
  trained = [
    (RECEIVED[0] + RNG.normal(size=(40, 50)).astype(np.float32)).astype(ml_dtypes.bfloat16)
  ]
  delta = trained[0].astype(np.float64) - received[0].astype(np.float64)

  out = _app(_masking(), lambda r, _: _content(trained))(_message(received), _context())
  assert not out.has_error(), out.error
  sent = flower.record_arrays(out.content["arrays"])
  assert sent[0].dtype == ml_dtypes.bfloat16
  update = sent[0].astype(np.float64) - received[0].astype(np.float64)
  assert 0.4 < np.mean(update == 0) < 0.6  # half of the entries masked
  kept = update != 0
  np.testing.assert_allclose(update[kept], delta[kept], rtol=0.02, atol=0.02)
  metrics = out.content["metrics"]
  assert metrics["tf_dlg.update_norm"] == pytest.approx(math.sqrt(np.sum(delta**2)), rel=1e-3)
  assert metrics["tf_dlg.zero_fraction"] == pytest.approx(np.mean(update == 0), abs=0.01)


def test_excluded_arrays_leave_bit_for_bit_as_trained():
  received = [RNG.uniform(-100, 100, size=(30, 30)).astype(np.float32)] * 2
  trained = [RNG.uniform(-1, 1, size=(30, 30)).astype(np.float32) for _ in range(2)]
  # received + (trained - received) is not trained in float32: the round trip loses bits.
  assert np.any(received[0] + (trained[1] - received[0]) != trained[1])
  mod = flower.DefenseMod(defenses.get_defense("clipping", 0.01), exclude=[False, True])
  out = _app(mod, lambda r, _: _content(trained))(_message(received), _context())
  sent = out.content["arrays"].to_numpy_ndarrays()
  np.testing.assert_array_equal(sent[1], trained[1])
  assert np.linalg.norm((sent[0] - received[0]).astype(np.float64)) == pytest.approx(0.01, rel=1e-3)


def test_a_reply_whose_keys_differ_gets_an_error_reply():
  def reply(r, _):
    return RecordDict(
      {
        "arrays": ArrayRecord({"other": Array(r[0] + 1), "1": Array(r[1])}),
        "metrics": MetricRecord({"n": 1}),
      }
    )

  out = _app(_masking(), reply)(_message(RECEIVED), _context())
  assert out.has_error() and "array keys differ from the received ones" in out.error.reason


def test_several_records_in_the_reply_get_an_error_reply():
  def two_arrays(r, _):
    return _content([r[0] + 1, r[1]], more=ArrayRecord([r[0]]))

  def two_metrics(r, _):
    return _content([r[0] + 1, r[1]], more=MetricRecord({"x": 1.0}))

  out = _app(_masking(), two_arrays)(_message(RECEIVED), _context())
  assert out.has_error() and "exactly one ArrayRecord in the reply, found 2" in out.error.reason
  out = _app(_masking(), two_metrics)(_message(RECEIVED), _context())
  assert out.has_error() and "at most one MetricRecord in the reply, found 2" in out.error.reason


def test_an_error_reply_passes_untouched():
  def failing(r, msg):
    return Message(Error(code=42, reason="out of memory on the client"), reply_to=msg)

  out = _app(_masking(), failing)(_message(RECEIVED), _context())
  assert out.has_error()
  assert (out.error.code, out.error.reason) == (42, "out of memory on the client")
  assert not out.has_content()


def test_seed_tag_gives_the_same_masks_for_the_same_tag():
  trained = [RECEIVED[0] + 1.0, RECEIVED[1]]

  def run(group, tag):
    mod = _masking(seed=5, seed_tag=lambda msg, ctx: tag)
    out = _app(mod, lambda r, _: _content(trained))(_message(RECEIVED, group_id=group), _context())
    return out.content["arrays"].to_numpy_ndarrays()[0]

  np.testing.assert_array_equal(run("1", "client3/round2"), run("2", "client3/round2"))
  assert np.mean(run("1", "client3/round2") != run("1", "client4/round2")) > 0.3
  with pytest.raises(TypeError, match="seed_tag must be callable"):
    _masking(seed_tag="round")
