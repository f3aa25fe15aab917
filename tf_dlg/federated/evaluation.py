"""The server model's test loss and accuracy, in inference mode, once per round."""

from __future__ import annotations

import collections

import numpy as np


class Evaluator:
  """Test loss and accuracy of server weights, in inference mode.

  One Keras model and one traced function per architecture, reused by every run of a
  process: Keras' `evaluate` re-traces for each new model and re-wraps the data on every
  call, which cost about as much as the evaluation itself. The loss is the mean
  sparse cross-entropy over all test examples, as `evaluate` reports it.
  """

  CHUNK = 1000  # examples per call: bounded memory on a full test split

  def __init__(self, keras_model):
    import tensorflow as tf

    self.model = keras_model

    def sums(x, y):
      logits = keras_model(x, training=False)
      loss = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
      hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float64)
      return tf.reduce_sum(tf.cast(loss, tf.float64)), tf.reduce_sum(hits)

    self._sums = tf.function(sums)

  def __call__(self, x, y):
    """(loss, accuracy) of the model's current weights on (x, y)."""
    loss = hits = 0.0
    y = np.asarray(y, np.int64)
    for i in range(0, len(x), self.CHUNK):
      a, b = self._sums(x[i : i + self.CHUNK], y[i : i + self.CHUNK])
      loss, hits = loss + float(a), hits + float(b)
    return loss / len(x), hits / len(x)


_EVALUATORS: "collections.OrderedDict[tuple, Evaluator]" = collections.OrderedDict()


def evaluator_for(fa) -> Evaluator:
  """The process's `Evaluator` of `fa`'s architecture (built on first use)."""
  key = (fa.model_name, tuple(fa.input_shape), fa.num_classes)
  if key not in _EVALUATORS:
    _EVALUATORS[key] = Evaluator(fa.keras_model_fn())
    while len(_EVALUATORS) > 4:
      _EVALUATORS.popitem(last=False)
  return _EVALUATORS[key]


def evaluate_server(fa, state, evaluator: Evaluator, dataset):
  """(test_loss, test_accuracy) of the server model (trainable and BatchNorm weights)."""
  fa.assign_to_keras(fa.process.get_model_weights(state), evaluator.model)
  return evaluator(dataset.x_test, dataset.y_test)
