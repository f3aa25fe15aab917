"""The Flower client mod (`tf_dlg.integrations.flower.DefenseMod`), in process, no network.

A `ClientApp` fits a tiny Keras model on real digits from the arrays it receives and
replies with its new arrays; the mod between them defends the update. The tests read
the defence off what leaves the client: the masked fraction of `sent - received`, the
clipped norm, the metrics the mod adds, and the seeding across rounds.
"""

import math
import time

import numpy as np
import pytest
import tensorflow as tf
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.clientapp import ClientApp

from tf_dlg import defenses
from tf_dlg.integrations import flower

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model():
  tf.keras.utils.set_random_seed(0)
  inputs = tf.keras.Input((28, 28, 1))
  h = tf.keras.layers.Flatten()(inputs)
  h = tf.keras.layers.Dense(16, activation="tanh")(h)
  return tf.keras.Model(inputs, tf.keras.layers.Dense(10)(h))


@pytest.fixture(scope="module")
def client(digits):
  """`(app_for(mod), model)`: a ClientApp whose train step fits `model` on 100 digits."""
  model = _model()
  model.compile(optimizer=tf.keras.optimizers.SGD(0.5), loss=LOSS)
  x, y = digits.x_train[:100], digits.y_train[:100]

  def app_for(mod):
    app = ClientApp(mods=[mod])

    @app.train()
    def train(msg, context):
      model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
      model.fit(x, y, batch_size=50, epochs=1, verbose=0, shuffle=False)
      content = RecordDict(
        {"arrays": ArrayRecord(model.get_weights()), "metrics": MetricRecord({"n": len(x)})}
      )
      return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
      return Message(RecordDict({"metrics": MetricRecord({"loss": 1.0})}), reply_to=msg)

    return app

  return app_for, model, x


def _message(arrays, message_type="train", group_id="1", extra=None):
  md = Metadata(
    run_id=1,
    message_id=f"m-{group_id}",
    src_node_id=0,
    dst_node_id=7,
    reply_to_message_id="",
    group_id=group_id,
    created_at=time.time(),
    ttl=3600.0,
    message_type=message_type,
  )
  content = {"arrays": ArrayRecord(arrays), "config": ConfigRecord({"lr": 0.5})}
  content.update(extra or {})
  return Message(RecordDict(content), metadata=md)


def _context():
  return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _send(app, received, **kwargs):
  reply = app(_message(received, **kwargs), _context())
  assert not reply.has_error(), reply.error
  return reply.content["arrays"].to_numpy_ndarrays(), dict(reply.content["metrics"])


def test_masking_mod_sends_a_masked_update_and_reports_it(client):
  app_for, model, x = client
  received = _model().get_weights()
  plain, plain_metrics = _send(app_for(lambda m, c, nxt: nxt(m, c)), received)
  assert "tf_dlg.zero_fraction" not in plain_metrics
  rate = 0.5
  sent, metrics = _send(app_for(flower.DefenseMod(defenses.get_defense("masking", rate))), received)
  update = [s - r for s, r in zip(sent, received)]
  trained = [p - r for p, r in zip(plain, received)]
  moved = np.concatenate([t.ravel() != 0 for t in trained])  # blank pixels never move
  zero = np.concatenate([u.ravel() == 0 for u in update])
  assert moved.sum() > 5000
  assert abs(zero[moved].mean() - rate) <= 4 * math.sqrt(rate * (1 - rate) / moved.sum())
  # Where the mask keeps an entry, it is the trained update itself.
  kept = np.concatenate([u.ravel() for u in update]) != 0
  np.testing.assert_allclose(
    np.concatenate([u.ravel() for u in update])[kept],
    np.concatenate([t.ravel() for t in trained])[kept],
    rtol=1e-5,
    atol=1e-7,
  )
  assert metrics["n"] == len(x)
  assert metrics["tf_dlg.zero_fraction"] == pytest.approx(zero.mean(), abs=1e-6)
  assert metrics["tf_dlg.clip_scale"] == 1.0 and metrics["tf_dlg.clipped"] == 0
  norm = math.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in trained))
  assert metrics["tf_dlg.update_norm"] == pytest.approx(norm, rel=1e-4)


def test_clipping_mod_bounds_the_update_norm(client):
  app_for, _, _ = client
  received = _model().get_weights()
  bound = 0.01
  sent, metrics = _send(
    app_for(flower.DefenseMod(defenses.get_defense("clipping", bound))), received
  )
  norm = math.sqrt(
    sum(float(np.sum((s - r).astype(np.float64) ** 2)) for s, r in zip(sent, received))
  )
  assert norm == pytest.approx(bound, rel=1e-4)
  assert metrics["tf_dlg.clipped"] == 1
  assert metrics["tf_dlg.clip_scale"] == pytest.approx(
    bound / metrics["tf_dlg.update_norm"], rel=1e-4
  )


def test_seeds_differ_across_rounds_and_repeat_within_one(client):
  app_for, _, _ = client
  app = app_for(flower.DefenseMod(defenses.get_defense("masking", 0.5), seed=3))
  received = _model().get_weights()
  first, _ = _send(app, received, group_id="1")
  again, _ = _send(app, received, group_id="1")
  other, _ = _send(app, received, group_id="2")
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  kernel = (
    [f == r for f, r in zip(first, received)][0],
    [o == r for o, r in zip(other, received)][0],
  )
  assert 0.2 < np.mean(kernel[0] != kernel[1]) < 0.6


def test_exclude_and_unchanged_non_float_arrays_pass_through(client):
  app_for, _, _ = client
  received = _model().get_weights()
  mod = flower.DefenseMod(defenses.get_defense("masking", 0.9), exclude=[False, True, False, True])
  sent, _ = _send(app_for(mod), received)
  assert np.all(sent[1] != received[1]) and np.all(sent[3] != received[3])  # biases, as trained
  assert np.mean(sent[0] == received[0]) > 0.85
  arrays, _ = flower.DefenseMod(defenses.get_defense("masking", 0.5)).defend(
    [np.zeros(3, np.float32), np.arange(3)], [np.ones(3, np.float32), np.arange(3)], [0, 1]
  )
  np.testing.assert_array_equal(arrays[1], [0, 1, 2])
  with pytest.raises(ValueError, match="exclude has 4 entries but the record has 2 arrays"):
    mod.defend([np.zeros(3, np.float32)] * 2, [np.ones(3, np.float32)] * 2, [0, 1])


def test_other_messages_and_bad_records(client):
  app_for, _, _ = client
  app = app_for(flower.DefenseMod(defenses.get_defense("masking", 0.5)))
  received = _model().get_weights()
  reply = app(_message(received, message_type="evaluate"), _context())
  assert dict(reply.content["metrics"]) == {"loss": 1.0}
  two = {"more": ArrayRecord({"w": Array(np.zeros(2, np.float32))})}
  reply = app(_message(received, extra=two), _context())
  assert (
    reply.has_error() and "exactly one ArrayRecord in the message, found 2" in reply.error.reason
  )
  with pytest.raises(ValueError, match=r"seed=-1 must be an int in \[0, 2\*\*63\)"):
    flower.DefenseMod(defenses.get_defense("masking", 0.5), seed=-1)
  with pytest.raises(TypeError, match="defense must be a tf_dlg.defenses.Defense"):
    flower.DefenseMod("masking")
