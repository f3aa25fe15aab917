"""Probe defects of the attack inputs: images in [0, 255], float labels, tiny images.

Images in [0, 255] were accepted and scored against a data range of 1, so a perfect copy
scored "not leaked" (adjusted SSIM 0.063); float labels were truncated; images under 7x7
were refused only by the scoring, after the attack. Each is now one ValueError up front.
"""

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import metrics, models
from tf_dlg.attacks import threat_model


@pytest.fixture(scope="module")
def model():
  return models.lenet((8, 8, 1), 3, seed=0)


def _images(n=2, side=8, seed=0):
  return np.random.default_rng(seed).random((n, side, side, 1)).astype(np.float32)


def test_metrics_refuse_originals_outside_0_1_and_score_a_copy_as_leaked():
  o = _images(1)[0]
  assert metrics.adjusted_ssim(o, o)[0] == pytest.approx(1.0)
  assert metrics.leaked(metrics.adjusted_ssim(o, o)[0])
  for fn in (metrics.ssim, metrics.adjusted_ssim, metrics.mse):
    with pytest.raises(
      ValueError, match=r"values in \[0\.\d+, 2\d\d\.\d*\]; the metrics take images in \[0, 1\]"
    ):
      fn(o * 255, o * 255)
  with pytest.raises(ValueError, match="smaller than the 7x7 SSIM window"):
    metrics.ssim(o[:5, :5], o[:5, :5])


def test_observe_refuses_8_bit_ranges_before_any_gradient(model):
  x, y = _images(), np.array([0, 2])
  with pytest.raises(
    ValueError, match=r"images have values in \[0\.\d+, 2\d\d\.\d*\]; expected \[0, 1\]"
  ):
    threat_model.observe_gradient(model, x * 255, y)
  with pytest.raises(ValueError, match=r"8-bit \(uint8\)"):
    threat_model.observe_gradient(model, (x * 255).astype(np.uint8), y)
  with pytest.raises(ValueError, match=r"images have values"):
    threat_model.observe_fedavg_delta(model, x * 255, y, local_steps=1, learning_rate=0.1)


def test_an_observation_cannot_carry_a_ground_truth_it_would_misscore(model):
  """Any ObservedUpdate (as `run_attacks` and `score_results` take) checks its truth."""
  obs = threat_model.observe_gradient(model, _images(), np.array([0, 2]))
  fields = {f: getattr(obs, f) for f in ("kind", "update", "model_weights", "model_name")}
  fields.update(input_shape=obs.input_shape, num_classes=3, num_examples=2, batch_size=2)
  with pytest.raises(ValueError, match=r"true_images have values in"):
    threat_model.ObservedUpdate(**fields, true_images=obs.true_images * 255)
  with pytest.raises(ValueError, match=r"true_labels must lie in \[0, 2\], got \[0, 7\]"):
    threat_model.ObservedUpdate(**fields, true_labels=np.array([0, 7]))


def test_float_labels_are_refused_unless_whole(model):
  x = _images()
  with pytest.raises(ValueError, match=r"labels must be whole class ids; got 1\.5"):
    threat_model.observe_gradient(model, x, np.array([0.0, 1.5]))
  obs = threat_model.observe_gradient(model, x, np.array([0.0, 2.0]))
  np.testing.assert_array_equal(obs.true_labels, [0, 2])
  assert obs.true_labels.dtype == np.int64
  # The same gradient as with integer labels: nothing was truncated or changed.
  ref = threat_model.observe_gradient(model, x, np.array([0, 2]))
  for a, b in zip(obs.update, ref.update):
    np.testing.assert_array_equal(a, b)


def test_images_under_7x7_are_refused_before_the_attack():
  small = models.lenet((5, 5, 1), 3, seed=0)
  calls = []
  real = tf.GradientTape.__enter__

  def spy(self):
    calls.append(1)
    return real(self)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tf.GradientTape, "__enter__", spy)
    with pytest.raises(ValueError, match=r"H, W >= 7 \(SSIM's window\), got \(1, 5, 5, 1\)"):
      threat_model.observe_gradient(small, _images(1, side=5), np.array([1]))
  assert not calls  # refused before the client's gradient, let alone the attack
