"""FedAvg's finalizer in TFF: the server optimizer, and averaged BatchNorm statistics.

TFF's `build_apply_optimizer_finalizer` copies the server's non-trainable weights
unchanged; this one applies the server optimizer to the trainable part of the
aggregated update and sets the non-trainable weights to `server - aggregate(delta)`.
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_federated as tff


def build_finalizer(optimizer, weights_type, num_trainable: int):
  """Server optimizer on the trainable part; non-trainable = server - aggregate delta."""
  trainable_type = weights_type.trainable
  flat_type = update_type(weights_type)

  @tff.tensorflow.computation
  def init_tf():
    return optimizer.initialize(tff.types.type_to_tf_tensor_specs(trainable_type))

  opt_state_type = init_tf.type_signature.result

  @tff.tensorflow.computation(opt_state_type, weights_type, flat_type)
  @tf.function
  def next_tf(opt_state, weights, update):
    non_trainable = tf.nest.flatten(weights.non_trainable)
    update = list(update)
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(u)) for u in update])
    new_state, new_trainable = optimizer.next(
      opt_state,
      weights.trainable,
      tf.nest.pack_sequence_as(weights.trainable, update[:num_trainable]),
    )
    new_non_trainable = [w - u for w, u in zip(non_trainable, update[num_trainable:])]
    # The norm of the aggregated update of the trainable weights (what the server
    # optimizer receives), for the run's TensorBoard.
    measurements = collections.OrderedDict(
      update_non_finite=tf.cast(tf.logical_not(finite), tf.int32),
      update_norm=tf.linalg.global_norm(update[:num_trainable]),
    )
    if not finite:  # as TFF's reject_non_finite_update: keep the old model
      return opt_state, weights, measurements
    new_weights = tff.learning.models.ModelWeights(
      new_trainable, tf.nest.pack_sequence_as(weights.non_trainable, new_non_trainable)
    )
    return new_state, new_weights, measurements

  @tff.federated_computation
  def init_fn():
    return tff.federated_eval(init_tf, tff.SERVER)

  @tff.federated_computation(
    init_fn.type_signature.result,
    tff.FederatedType(weights_type, tff.SERVER),
    tff.FederatedType(flat_type, tff.SERVER),
  )
  def next_fn(state, weights, update):
    new_state, new_weights, measurements = tff.federated_map(next_tf, (state, weights, update))
    return tff.templates.MeasuredProcessOutput(new_state, new_weights, measurements)

  @tff.tensorflow.computation(opt_state_type)
  def get_hparams_fn(state):
    return optimizer.get_hparams(state)

  @tff.tensorflow.computation(opt_state_type, get_hparams_fn.type_signature.result)
  def set_hparams_fn(state, hparams):
    return optimizer.set_hparams(state, hparams)

  return tff.learning.templates.FinalizerProcess(
    init_fn, next_fn, get_hparams_fn=get_hparams_fn, set_hparams_fn=set_hparams_fn
  )


def update_type(weights_type):
  """TFF type of a client update: [trainable..., non_trainable...] as a list."""
  leaves = list(weights_type.trainable) + list(weights_type.non_trainable)
  return tff.types.to_type([t for t in leaves])
