"""Probe defects of the defences: float16 updates, numpy bools as parameters, empty updates."""

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import defenses
from tf_dlg.defenses import base
from tf_dlg.integrations import keras as defenses_keras


def _half(n=4000, scale=100.0, seed=0):
  return np.random.default_rng(seed).normal(size=n).astype(np.float16) * np.float16(scale)


def test_noising_ratio_on_float16_is_finite_and_scaled_by_the_true_rms():
  u = _half()
  ratio = 0.5
  out = defenses.get_defense("noising_ratio", ratio)([tf.constant(u)], 0)[0].numpy()
  assert out.dtype == np.float16 and np.all(np.isfinite(out))
  rms = np.sqrt(np.mean(u.astype(np.float64) ** 2))  # ~100: its square sum overflows float16
  noise = out.astype(np.float64) - u.astype(np.float64)
  assert np.std(noise) == pytest.approx(ratio * rms, rel=0.05)
  assert float(base.global_norm([tf.constant(u)])) == pytest.approx(
    np.linalg.norm(u.astype(np.float64)), rel=1e-3
  )


def test_rescaled_masking_on_float16_is_exact_or_refused_never_inf():
  u = np.linspace(-3, 3, 1000).astype(np.float16)
  rate = 0.9999  # kept entries x 1e4: up to 3e4, inside float16's 65504
  out = defenses.get_defense("masking", rate, rescale=True)([tf.constant(u)], 1)[0].numpy()
  kept = out != 0
  np.testing.assert_allclose(
    out[kept].astype(np.float64), u[kept].astype(np.float64) / (1 - rate), rtol=2e-3
  )
  with pytest.raises(tf.errors.InvalidArgumentError, match="overflows its dtype float16"):
    defenses.get_defense("masking", 0.9999, rescale=True)([tf.constant(_half())], 0)


@pytest.mark.parametrize("value", [np.True_, np.False_])
def test_numpy_bools_are_not_defence_parameters(value):
  with pytest.raises(
    ValueError, match=r"rate=(np\.)?(True|False)_? must be a number in \[0\.0, 1\.0\)"
  ):
    defenses.get_defense("masking", value)
  with pytest.raises(ValueError, match="must be a number"):
    defenses.get_defense("noising", value)


def test_an_empty_update_has_zero_fraction_zero_not_nan():
  assert float(base.zero_fraction([tf.zeros([0], tf.float32)])) == 0.0
  assert float(base.zero_fraction([tf.zeros([0, 3]), tf.constant([0.0, 1.0])])) == 0.5
  before, after = [np.zeros((0, 4), np.float32)], [np.zeros((0, 4), np.float32)]
  _, stats = defenses_keras.defend_weights_delta(
    before, after, defenses.get_defense("masking", 0.5)
  )
  assert stats["zero_fraction"] == 0.0 and stats["norm"] == 0.0
