"""FedAvg's client work in TFF: local training that sends every weight's delta.

As TFF's `model_delta_client_work`, but the update is one flat list: the deltas of the
trainable weights (Keras `trainable_variables` order) followed by those of the
non-trainable ones (BatchNorm's moving statistics), so the server can average both
(`tf_dlg.federated.fedavg`).

**Client roles.** Each client's data is `OrderedDict(batches=<tf.data of x/y batches>,
role=<one-element tf.data of ROLE_SPEC>)`. The role makes a client Byzantine inside the
TFF computation: `scale` multiplies its delta (e.g. x1000) and mode `random` replaces it
by Gaussian noise of the delta's RMS times `scale`. Malicious clients change what they
*train*, then their (honest) client software applies the defence. Honest clients have
mode 0, scale 1.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

# Per-client role, one element of the `role` sequence.
ROLE_SPEC = collections.OrderedDict(
  mode=tf.TensorSpec([], tf.int32),  # 0 honest, 1 scale, 2 random
  scale=tf.TensorSpec([], tf.float32),
  seed=tf.TensorSpec([2], tf.int64),
)
_MODE_CODES = {"honest": 0, "scale": 1, "random": 2}


def role(mode: str = "honest", scale: float = 1.0, seed: int = 0) -> tf.data.Dataset:
  """The one-element role dataset for a client (`honest`, `scale` or `random`)."""
  if mode not in _MODE_CODES:
    raise ValueError(f"role mode={mode!r} must be one of {', '.join(_MODE_CODES)}.")
  element = collections.OrderedDict(
    mode=np.int32(_MODE_CODES[mode]),
    scale=np.float32(scale),
    seed=np.asarray([seed, 0x5EED], np.int64),
  )
  return tf.data.Dataset.from_tensors(element)


def _client_update_fn(model_fn, weighting):
  """The client's local training as a `tf.function` (after TFF's model_delta_client_work)."""
  model = model_fn()

  @tf.function
  def client_update(optimizer, hparams, initial_weights, batches, roles):
    weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial_weights)
    trainable = tuple(tf.nest.flatten(weights.trainable))

    def reduce_fn(state, batch):
      num_examples, opt_state = state
      with tf.GradientTape() as tape:
        output = model.forward_pass(batch, training=True)
      grads = tape.gradient(output.loss, trainable)
      opt_state, updated = optimizer.next(opt_state, trainable, grads)
      for v, u in zip(trainable, updated):
        v.assign(u)
      num_examples += tf.shape(output.predictions, out_type=tf.int64)[0]
      return num_examples, opt_state

    specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)
    opt_state = optimizer.set_hparams(optimizer.initialize(specs), hparams)
    # A loop over the dataset's iterator, not `batches.reduce`: ops inside a tf.data
    # reduce function run without the graph runtime's scheduling, which makes local
    # training about twice as slow (TFF's `use_experimental_simulation_loop` does the same).
    state = (tf.zeros([], tf.int64), opt_state)
    for batch in iter(batches):
      state = reduce_fn(state, batch)
    num_examples, _ = state

    initial = list(tf.nest.flatten(initial_weights.trainable)) + list(
      tf.nest.flatten(initial_weights.non_trainable)
    )
    final = list(tf.nest.flatten(weights.trainable)) + list(tf.nest.flatten(weights.non_trainable))
    delta = [a - b for a, b in zip(initial, final)]  # TFF sign: initial - final

    # Byzantine behaviour (honest: mode 0, scale 1 -> unchanged).
    r = roles.reduce(
      collections.OrderedDict(
        mode=tf.constant(0), scale=tf.constant(1.0), seed=tf.zeros([2], tf.int64)
      ),
      lambda _, x: x,
    )
    is_random = tf.cast(tf.equal(r["mode"], 2), tf.float32)
    out = []
    for i, d in enumerate(delta):
      rms = tf.sqrt(tf.reduce_mean(tf.square(d)))
      noise = tf.random.stateless_normal(tf.shape(d), seed=r["seed"] + i)
      out.append(r["scale"] * ((1.0 - is_random) * d + is_random * rms * noise))

    # As TFF: a non-finite update is zeroed and gets weight 0.
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(u)) for u in out])
    out = [tf.where(finite, u, tf.zeros_like(u)) for u in out]
    if weighting == tff.learning.ClientWeighting.NUM_EXAMPLES:
      weight = tf.cast(num_examples, tf.float32)
    else:
      weight = tf.constant(1.0)
    weight = tf.where(finite, weight, 0.0)
    if not finite:
      model.reset_metrics()
    return (
      tff.learning.templates.ClientResult(update=out, update_weight=weight),
      model.report_local_unfinalized_metrics(),
    )

  return client_update


def build_client_work(model_fn, optimizer, weighting):
  """A `ClientWorkProcess` sending all weights' deltas (see the module docstring)."""
  with tf.Graph().as_default():
    model = model_fn()
    metrics_fn = tff.learning.metrics.sum_then_finalize(model.metric_finalizers())
  data_type = tff.types.to_type(
    collections.OrderedDict(
      batches=tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec)),
      role=tff.SequenceType(tff.types.tensorflow_to_type(ROLE_SPEC)),
    )
  )
  weights_type = tff.learning.models.weights_type_from_model(model)
  hparams = optimizer.get_hparams(optimizer.initialize(tf.TensorSpec([], tf.float32)))

  @tff.federated_computation
  def init_fn():
    return tff.federated_value(hparams, tff.SERVER)

  state_type = init_fn.type_signature.result.member

  @tff.tensorflow.computation(state_type, weights_type, data_type)
  def client_update(state, initial_weights, data):
    fn = _client_update_fn(model_fn, weighting)
    return fn(optimizer, state, initial_weights, data["batches"], data["role"])

  @tff.federated_computation(
    init_fn.type_signature.result,
    tff.FederatedType(weights_type, tff.CLIENTS),
    tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, data):
    result, model_outputs = tff.federated_map(
      client_update, (tff.federated_broadcast(state), weights, data)
    )
    measurements = tff.federated_zip(collections.OrderedDict(train=metrics_fn(model_outputs)))
    return tff.templates.MeasuredProcessOutput(state, result, measurements)

  @tff.tensorflow.computation(state_type)
  def get_hparams_fn(state):
    return state

  @tff.tensorflow.computation(state_type, state_type)
  def set_hparams_fn(state, new_hparams):
    del state
    return new_hparams

  return tff.learning.templates.ClientWorkProcess(
    init_fn, next_fn, get_hparams_fn=get_hparams_fn, set_hparams_fn=set_hparams_fn
  )
