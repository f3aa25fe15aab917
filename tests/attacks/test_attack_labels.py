"""iDLG label inference on known gradients and on real LeNet gradients."""

import numpy as np
import pytest

from tf_dlg import data, models
from tf_dlg.attacks import labels, observe_gradient


def _kernel_grad(h_list, p_list, y_list, k):
  """Mean over examples of outer(h, p - onehot(y)): a last-layer kernel gradient [in, k]."""
  g = 0
  for h, p, y in zip(h_list, p_list, y_list):
    g = g + np.outer(h, p - np.eye(k)[y])
  return g / len(h_list)


@pytest.mark.parametrize("label", range(10))
def test_single_example_rule_reads_keras_in_out_layout(label):
  rng = np.random.default_rng(label)
  h = rng.uniform(0.05, 1.0, size=64)  # sigmoid features are positive
  logits = rng.normal(0, 3, size=10)
  p = np.exp(logits) / np.exp(logits).sum()
  kernel = _kernel_grad([h], [p], [label], 10)
  assert kernel.shape == (64, 10)  # Keras [in, out]
  assert labels.infer_labels(kernel, 1).tolist() == [label]
  # The PyTorch [out, in] layout read the wrong way round is not a label rule at all.
  assert labels.infer_labels(kernel.T[:, :10], 1).shape == (1,)


@pytest.mark.parametrize("true", [[1, 1, 4], [0, 2, 5, 5], [3, 3, 3], [7, 9]])
def test_batch_extension(true):
  rng = np.random.default_rng(len(true))
  k = 10
  hs = [rng.uniform(0.4, 0.6, size=32) for _ in true]
  ps = [np.full(k, 1.0 / k) + rng.normal(0, 0.005, k) for _ in true]
  kernel = _kernel_grad(hs, ps, true, k)
  assert labels.infer_labels(kernel, len(true)).tolist() == sorted(true)


def test_rule_on_real_lenet_gradients():
  for name in ("digits", "photos"):
    ds = data.load_dataset(name)
    model = models.lenet(ds.input_shape, ds.num_classes, seed=0)
    ki = labels.last_dense_kernel_index(
      [tuple(v.shape) for v in model.trainable_variables], ds.num_classes
    )
    assert ki == len(model.trainable_variables) - 2
    for i in range(10):
      obs = observe_gradient(model, ds.x_train[i : i + 1], ds.y_train[i : i + 1])
      assert labels.infer_labels(obs.update[ki], 1)[0] == ds.y_train[i]


def test_rejects_bad_shapes():
  with pytest.raises(ValueError, match="in, classes"):
    labels.infer_labels(np.zeros(5))
  with pytest.raises(ValueError, match="No dense kernel"):
    labels.last_dense_kernel_index([(3, 3, 1, 4), (4,)], 10)
