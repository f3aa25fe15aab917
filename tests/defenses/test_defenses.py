"""Property tests of the defences (`tf_dlg.defenses`): they check numbers, not shapes.

No TFF here (see `tests/federated/test_federated_defense_aggregator.py`; Keras:
`tests/integrations/test_keras.py`);
everything is eager or `tf.function` TensorFlow.
Tolerances for random defences are 4 standard deviations of the statistic, so a correct
implementation fails one of these checks with probability well below 1e-4 -- and the
seeds are fixed, so the tests are deterministic anyway.
"""

import math
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from defense_cases import PARAMS, RANDOM
from scipy import stats

from tf_dlg import defenses, models
from tf_dlg.defenses import clipping as clipping_lib
from tf_dlg.defenses import dp as dp_lib
from tf_dlg.defenses import masking as masking_lib

# A representative parameter for every defence (the TFF and Keras tests use the same).


def _update(seed=0, shapes=((30, 40), (40,), (5, 5, 3, 8), (1,)), scale=1.0):
  """A random update with no zero entries (so zeros come from the defence only)."""
  rng = np.random.default_rng(seed)
  out = []
  for s in shapes:
    a = rng.normal(size=s) * scale
    a[a == 0] = 1e-3
    out.append(tf.constant(a, tf.float32))
  return out


def _np(ts):
  return [np.asarray(t) for t in ts]


def _zeros(t):
  return int(np.sum(np.asarray(t) == 0))


def _flat(ts):
  return np.concatenate([np.asarray(t).ravel() for t in ts])


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("rate", [0.001, 0.05, 0.3, 0.5, 0.9, 0.99])
def test_masking_zeroes_the_requested_fraction(rate):
  update = _update(shapes=((200, 100), (50, 20), (100,)))
  n = sum(int(tf.size(t)) for t in update)
  for seed in (0, 1, 2):
    out = defenses.get_defense("masking", rate)(update, seed)
    frac = sum(_zeros(t) for t in out) / n
    sigma = math.sqrt(rate * (1 - rate) / n)
    assert abs(frac - rate) <= 4 * sigma + 1e-12, (rate, seed, frac)
    # Kept entries are untouched (no rescale by default).
    for t, o in zip(_np(update), _np(out)):
      kept = o != 0
      np.testing.assert_array_equal(o[kept], t[kept])
    # Each tensor on its own is also masked at the rate (no tensor skipped).
    big = out[0]
    sigma_big = math.sqrt(rate * (1 - rate) / int(tf.size(big)))
    assert abs(_zeros(big) / int(tf.size(big)) - rate) <= 4 * sigma_big + 1e-12


def test_masking_rate_zero_is_identity_and_zero_fraction_measures_it():
  update = _update()
  out = defenses.get_defense("masking", 0.0)(update, 3)
  for a, b in zip(_np(update), _np(out)):
    np.testing.assert_array_equal(a, b)
  assert float(defenses.zero_fraction(out)) == 0.0
  masked = defenses.get_defense("masking", 0.5)(update, 3)
  n = sum(int(tf.size(t)) for t in update)
  assert float(defenses.zero_fraction(masked)) == pytest.approx(
    sum(_zeros(t) for t in masked) / n, abs=1e-7
  )


def test_masking_same_seed_same_mask_different_seed_different_mask():
  update = _update()
  d = defenses.get_defense("masking", 0.5)
  a, b, c = d(update, 7), d(update, 7), d(update, 8)
  for x, y in zip(_np(a), _np(b)):
    np.testing.assert_array_equal(x, y)
  mask_a, mask_c = _flat(a) == 0, _flat(c) == 0
  # Independent masks at rate 0.5 disagree on about half the entries.
  n = mask_a.size
  assert abs(np.mean(mask_a != mask_c) - 0.5) <= 4 * math.sqrt(0.25 / n)
  # An int seed s is the shape-[2] seed [s, 0x5EED]; any other [2] seed is another mask.
  for x, y in zip(_np(a), _np(d(update, tf.constant([7, 0x5EED], tf.int64)))):
    np.testing.assert_array_equal(x, y)
  assert np.any(_flat(d(update, tf.constant([7, 1], tf.int64))) != _flat(a))
  # Two equal-shaped tensors in one update get different masks.
  twins = d([tf.ones([100, 100]), tf.ones([100, 100])], 0)
  assert np.mean(np.asarray(twins[0]) != np.asarray(twins[1])) > 0.4


@pytest.mark.parametrize("rate", [0.2, 0.75])
def test_masking_rescale_keeps_the_mean(rate):
  value = 0.37
  update = [tf.fill([400, 250], value)]  # n = 1e5
  out = np.asarray(defenses.get_defense("masking", rate, rescale=True)(update, 11)[0])
  kept = out != 0
  np.testing.assert_allclose(out[kept], value / (1 - rate), rtol=1e-6)
  # E[out] = value; std of the sample mean = value * sqrt(rate / (1 - rate) / n).
  n = out.size
  assert abs(out.mean() - value) <= 4 * value * math.sqrt(rate / (1 - rate) / n)
  # Without rescale, the mean shrinks by (1 - rate).
  plain = np.asarray(defenses.get_defense("masking", rate)(update, 11)[0])
  assert abs(plain.mean() - value * (1 - rate)) <= 4 * value * math.sqrt(rate * (1 - rate) / n)
  assert defenses.get_defense("masking", rate, rescale=True).get_config() == {
    "name": "masking",
    "rate": rate,
    "rescale": True,
  }


def _bn_model():
  return models.bn_cnn((28, 28, 1), 10, seed=0, width=8)


def _fedavg_layout(model):
  """`tf_dlg.federated.fedavg.update_variables` (without importing TFF here)."""
  return list(model.trainable_variables) + list(model.non_trainable_variables)


def test_batchnorm_exclusion_finds_bn_variables_by_layer_type():
  model = _bn_model()
  variables = _fedavg_layout(model)
  exclude = defenses.batchnorm_exclusion(model, variables)
  bn_refs = {v.ref() for _, v in models.batchnorm_variables(model)}
  assert len(bn_refs) == 8  # 2 layers x (gamma, beta, moving mean, moving variance)
  assert exclude == [v.ref() in bn_refs for v in variables]
  # The FedAvg layout: BN gamma/beta among the trainable, then only BN statistics.
  n_trainable = len(model.trainable_variables)
  assert sum(exclude[:n_trainable]) == 4 and all(exclude[n_trainable:])
  # mask_gamma_beta: gamma/beta are masked, the moving statistics never are.
  exclude_gb = defenses.batchnorm_exclusion(model, variables, mask_gamma_beta=True)
  assert exclude_gb == [not v.trainable and v.ref() in bn_refs for v in variables]

  # By type, not by name: a BN layer with a misleading name, a Dense named like BN.
  inputs = tf.keras.Input((4,))
  h = tf.keras.layers.Dense(3, name="batch_normalization")(inputs)
  h = tf.keras.layers.BatchNormalization(name="dense_2")(h)
  odd = tf.keras.Model(inputs, h)
  assert defenses.batchnorm_exclusion(odd, odd.weights) == [False, False, True, True, True, True]


@pytest.mark.parametrize("mask_gamma_beta", [False, True])
def test_masking_never_touches_batchnorm_entries(mask_gamma_beta):
  model = _bn_model()
  variables = _fedavg_layout(model)
  exclude = defenses.batchnorm_exclusion(model, variables, mask_gamma_beta=mask_gamma_beta)
  update = _update(seed=5, shapes=[v.shape for v in variables])
  rate = 0.6
  out = defenses.get_defense("masking", rate, exclude=exclude)(update, 1)
  masked_entries = kept_entries = 0
  for v, ex, u, o in zip(variables, exclude, _np(update), _np(out)):
    if ex:
      np.testing.assert_array_equal(o, u, err_msg=v.name)  # bit-identical
    else:
      masked_entries += _zeros(o)
      kept_entries += o.size
  assert abs(masked_entries / kept_entries - rate) <= 4 * math.sqrt(
    rate * (1 - rate) / kept_entries
  )
  if mask_gamma_beta:  # gamma/beta (8 entries per channel pair) do get masked somewhere
    gb = [o for v, o in zip(variables, _np(out)) if v.trainable and "bn" in v.name and o.ndim == 1]
    assert sum(_zeros(o) for o in gb) > 0


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("norm", [0.01, 1.0, 25.0])
def test_clipping_bounds_the_global_norm_and_keeps_the_direction(norm):
  update = _update(scale=3.0)
  raw_norm = float(tf.linalg.global_norm(update))
  assert raw_norm > 25.0
  out = defenses.get_defense("clipping", norm)(update, 0)
  out_norm = float(tf.linalg.global_norm(out))
  assert out_norm <= norm * (1 + 1e-6)
  assert out_norm == pytest.approx(norm, rel=1e-5)
  # One common scale factor: direction preserved.
  np.testing.assert_allclose(_flat(out), _flat(update) * (norm / raw_norm), rtol=1e-5, atol=1e-9)


def test_clipping_below_the_bound_is_unchanged():
  update = _update(scale=0.01)
  raw_norm = float(tf.linalg.global_norm(update))
  for norm in (raw_norm * 1.0001, raw_norm * 10, 1e4):
    out = defenses.get_defense("clipping", norm)(update, 0)
    np.testing.assert_allclose(_flat(out), _flat(update), rtol=1e-6)


def test_clipping_norm_ignores_excluded_tensors():
  update = [tf.fill([10], 10.0), tf.fill([10], 1000.0)]
  out = defenses.get_defense("clipping", 1.0, exclude=[False, True])(update, 0)
  assert float(tf.norm(out[0])) == pytest.approx(1.0, rel=1e-6)
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(update[1]))


@pytest.mark.parametrize("ratio", [1e-3, 0.25, 1.0])
@pytest.mark.parametrize("scale", [0.01, 3.0])
def test_relative_clipping_clips_to_exactly_ratio_times_the_own_norm(ratio, scale):
  update = _update(scale=scale)
  raw_norm = float(tf.linalg.global_norm(update))
  d = defenses.get_defense("clipping_ratio", ratio)
  out = d(update, 0)
  assert float(tf.linalg.global_norm(out)) == pytest.approx(ratio * raw_norm, rel=1e-6)
  np.testing.assert_allclose(_flat(out), _flat(update) * np.float32(ratio), rtol=1e-6)
  assert float(d.clip_scale(update)) == pytest.approx(ratio)
  # The same as absolute clipping at ratio x this update's norm.
  absolute = defenses.get_defense("clipping", ratio * raw_norm)(update, 0)
  np.testing.assert_allclose(_flat(out), _flat(absolute), rtol=1e-5)
  assert d.get_config() == {"name": "clipping_ratio", "clip_ratio": ratio}


def test_relative_clipping_ignores_excluded_tensors_and_zero_updates():
  update = [tf.fill([10], 10.0), tf.fill([10], 1000.0)]
  d = defenses.get_defense("clipping_ratio", 0.1, exclude=[False, True])
  out = d(update, 0)
  assert float(tf.norm(out[0])) == pytest.approx(0.1 * float(tf.norm(update[0])), rel=1e-6)
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(update[1]))
  zero = [tf.zeros([4]), tf.zeros([3])]
  np.testing.assert_array_equal(_flat(d(zero, 0)), 0.0)
  assert float(d.clip_scale(zero)) == 1.0  # nothing to clip: not counted as clipped


def test_clip_scale_says_whether_and_how_much_clipping_acted():
  update = _update(scale=3.0)
  raw_norm = float(tf.linalg.global_norm(update))
  assert float(clipping_lib.clip_scale(update, raw_norm / 4)) == pytest.approx(0.25, rel=1e-5)
  assert float(clipping_lib.clip_scale(update, raw_norm * 2)) == 1.0
  clip = defenses.get_defense("clipping", raw_norm / 4)
  assert float(clip.clip_scale(update)) == pytest.approx(0.25, rel=1e-5)
  out_norm = float(tf.linalg.global_norm(clip(update, 0)))
  assert out_norm == pytest.approx(float(clip.clip_scale(update)) * raw_norm, rel=1e-5)
  dp = defenses.get_defense("dp", 1.0, l2_norm_clip=raw_norm / 2)
  assert float(dp.clip_scale(update)) == pytest.approx(0.5, rel=1e-5)
  for name in ("masking", "noising", "pruning", "value_clipping", "noising_ratio"):
    assert float(defenses.get_defense(name, PARAMS[name]).clip_scale(update)) == 1.0
  # Inside tf.function too (the TFF aggregator calls it in a graph).
  assert float(tf.function(clip.clip_scale)(update)) == pytest.approx(0.25, rel=1e-5)


@pytest.mark.parametrize("bound", [1e-4, 0.1, 1.0])
def test_value_clipping_bounds_every_entry(bound):
  update = _update(scale=0.5)
  out = _flat(defenses.get_defense("value_clipping", bound)(update, 0))
  raw = _flat(update)
  bound32 = np.float32(bound)  # the bound as the float32 the update is in
  assert np.max(np.abs(out)) <= bound32
  inside = np.abs(raw) <= bound32
  np.testing.assert_array_equal(out[inside], raw[inside])
  np.testing.assert_allclose(out[~inside], np.sign(raw[~inside]) * bound32, rtol=0)
  assert clipping_lib.clip_by_value([tf.constant([-3.0, 0.5, 3.0])], 1.0)[0].numpy().tolist() == [
    -1.0,
    0.5,
    1.0,
  ]


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.29, 0.3, 0.5, 0.9, 0.99])
def test_pruning_per_tensor_sparsity_is_exact_and_keeps_the_largest(rate):
  update = _update(seed=2, shapes=((10,), (100,), (7, 13), (3,)))
  out = defenses.get_defense("pruning", rate)(update, 0)
  for t, o in zip(_np(update), _np(out)):
    k = math.floor(round(rate * t.size, 6))  # floor(rate * size), 0.29 * 100 -> 29
    assert _zeros(o) == k, (rate, t.shape)
    kept = o != 0
    np.testing.assert_array_equal(o[kept], t[kept])
    if 0 < k < t.size:
      assert np.min(np.abs(t[kept])) >= np.max(np.abs(t[~kept]))
  assert defenses.get_defense("pruning", rate).get_config()["scope"] == "per_tensor"


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.97])
def test_pruning_global_sparsity_is_exact_and_ranks_across_tensors(rate):
  # The second tensor is 100x larger: global pruning empties the first one first.
  update = [
    tf.constant(np.random.default_rng(0).uniform(1, 2, 500), tf.float32),
    tf.constant(np.random.default_rng(1).uniform(100, 200, 500), tf.float32),
  ]
  out = defenses.get_defense("pruning", rate, scope="global")(update, 0)
  k = math.floor(round(rate * 1000, 6))
  assert sum(_zeros(o) for o in out) == k
  raw, flat = _flat(update), _flat(out)
  kept = flat != 0
  assert np.min(np.abs(raw[kept])) >= np.max(np.abs(raw[~kept]))
  assert _zeros(out[0]) == min(k, 500) and _zeros(out[1]) == max(0, k - 500)
  # Per tensor, the same rate leaves each tensor with its own largest entries.
  per = defenses.get_defense("pruning", rate)(update, 0)
  assert _zeros(per[0]) == _zeros(per[1]) == math.floor(round(rate * 500, 6))


def test_pruning_ties_never_keep_more():
  out = defenses.get_defense("pruning", 0.5)([tf.ones([11])], 0)[0]
  assert _zeros(out) == 5


# ----------------------------------------------------------------------------- noising


def _check_mean_std(x, std, what):
  n = x.size
  assert abs(x.mean()) <= 4 * std / math.sqrt(n), what
  # std of the sample std ~ std * sqrt((kurtosis - 1) / (4 n)); kurtosis <= 6 here.
  assert abs(x.std() - std) <= 4 * std * math.sqrt(5 / (4 * n)), what


@pytest.mark.parametrize("stddev", [1e-3, 0.1, 2.0])
def test_gaussian_noise_mean_and_std(stddev):
  zero = [tf.zeros([300, 200]), tf.zeros([40000])]
  out = defenses.get_defense("noising", stddev)(zero, 4)
  x = _flat(out)
  _check_mean_std(x, stddev, "gaussian")
  # Gaussian tails: |x| > 3 sigma in ~0.27% of entries.
  assert abs(np.mean(np.abs(x) > 3 * stddev) - 0.0027) < 0.001
  # Noise is added to the update, independent of it.
  update = _update()
  noisy = defenses.get_defense("noising", stddev)(update, 4)
  _check_mean_std(_flat(noisy) - _flat(update), stddev, "added")


def test_laplacian_noise_mean_std_and_shape():
  stddev = 0.5
  out = defenses.get_defense("noising", stddev, distribution="laplacian")([tf.zeros([500, 200])], 9)
  x = _flat(out)
  _check_mean_std(x, stddev, "laplacian")
  b = stddev / math.sqrt(2)  # Laplace scale: E|x| = b, kurtosis 6
  assert abs(np.mean(np.abs(x)) - b) <= 4 * b / math.sqrt(x.size)
  kurtosis = np.mean(x**4) / np.mean(x**2) ** 2
  assert 5.5 < kurtosis < 6.5
  g = _flat(defenses.get_defense("noising", stddev)([tf.zeros([500, 200])], 9))
  assert 2.8 < np.mean(g**4) / np.mean(g**2) ** 2 < 3.2


def test_noise_is_seeded_and_zero_stddev_is_identity():
  update = _update()
  d = defenses.get_defense("noising", 0.1)
  np.testing.assert_array_equal(_flat(d(update, 1)), _flat(d(update, 1)))
  assert np.all(_flat(d(update, 1)) != _flat(d(update, 2)))
  np.testing.assert_array_equal(
    _flat(defenses.get_defense("noising", 0.0)(update, 1)), _flat(update)
  )


@pytest.mark.parametrize("ratio", [0.01, 0.5, 3.0])
@pytest.mark.parametrize("distribution", ["gaussian", "laplacian"])
def test_noise_to_signal_ratio_gives_the_asked_rms_ratio(ratio, distribution):
  # Two tensors of different scales: the RMS is taken over the whole update.
  update = _update(seed=5, shapes=((400, 300), (60000,)))
  update[1] = update[1] * 7.0
  d = defenses.get_defense("noising_ratio", ratio, distribution=distribution)
  noise = _flat(d(update, 11)) - _flat(update)
  signal_rms = math.sqrt(np.mean(_flat(update).astype(np.float64) ** 2))
  n = noise.size
  measured = math.sqrt(np.mean(noise.astype(np.float64) ** 2)) / signal_rms
  # Relative std of a sample RMS: sqrt((kurtosis - 1) / (4 n)), kurtosis <= 6; 4 sigma.
  assert abs(measured / ratio - 1) <= 4 * math.sqrt(5 / (4 * n)), measured
  assert abs(noise.mean()) <= 4 * ratio * signal_rms / math.sqrt(n)
  # Scale-free: the same ratio on a 1000x smaller update gives 1000x smaller noise.
  small = [t / 1000.0 for t in update]
  np.testing.assert_allclose(
    _flat(d(small, 11)) - _flat(small), noise / 1000.0, rtol=1e-3, atol=1e-6 * ratio * signal_rms
  )


def test_noise_ratio_ignores_excluded_tensors_and_zero_is_identity():
  update = [tf.ones([20000]), tf.fill([100], 1000.0)]
  d = defenses.get_defense("noising_ratio", 0.5, exclude=[False, True])
  out = d(update, 1)
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(update[1]))
  assert np.std(np.asarray(out[0])) == pytest.approx(0.5, rel=0.05)  # RMS of kept = 1
  np.testing.assert_array_equal(
    _flat(defenses.get_defense("noising_ratio", 0.0)(update, 1)), _flat(update)
  )


# ----------------------------------------------------------------------------- DP


@pytest.mark.parametrize("noise_multiplier,clip", [(0.5, 1.0), (2.0, 0.1)])
def test_dp_clips_then_adds_noise_of_multiplier_times_clip(noise_multiplier, clip):
  raw = np.random.default_rng(0).normal(size=(400, 250))
  update = [tf.constant(raw, tf.float32)]
  d = defenses.get_defense("dp", noise_multiplier, l2_norm_clip=clip)
  out = d(update, 5)
  # Clipping by hand: the update's norm is ~316 > clip, so it is scaled to norm `clip`.
  clipped = raw * clip / np.linalg.norm(raw)
  noise = _flat(out).astype(np.float64) - clipped.ravel()
  _check_mean_std(noise, noise_multiplier * clip, "dp noise")
  # Gaussian, not just the right std: Kolmogorov-Smirnov against N(0, (z x clip)^2), p > 1e-4.
  assert stats.kstest(noise / (noise_multiplier * clip), "norm").pvalue > 1e-4
  # Noise does not depend on the update; the seed decides it.
  other = d([tf.constant(raw * 3.0, tf.float32)], 5)
  np.testing.assert_allclose(_flat(other) - clipped.ravel(), noise, atol=1e-5)
  assert not np.allclose(_flat(d(update, 6)), _flat(out))
  # Multiplier 0: pure clipping, equal to the hand-clipped update.
  zero = defenses.get_defense("dp", 0.0, l2_norm_clip=clip)(update, 5)
  np.testing.assert_allclose(_flat(zero), clipped.ravel(), rtol=1e-5, atol=1e-7)
  assert d.get_config() == {
    "name": "dp",
    "noise_multiplier": noise_multiplier,
    "l2_norm_clip": clip,
  }


def test_dp_is_a_chain_of_the_privacy_query_clip_then_the_noising_transform():
  """dp = tensorflow-privacy's clip, then `noising` at stddev z x C with the chain's seed."""
  raw = np.random.default_rng(1).normal(size=(30, 20))
  update = [tf.constant(raw, tf.float32)]
  d = defenses.get_defense("dp", 0.7, l2_norm_clip=0.5)
  assert isinstance(d, defenses.Chain)
  assert [type(step).__name__ for step, _ in d.steps] == ["QueryClipping", "Noising"]
  clipped = (raw * 0.5 / np.linalg.norm(raw)).astype(np.float32)
  noised = defenses.get_defense("noising", 0.7 * 0.5)([tf.constant(clipped)], 9)
  np.testing.assert_allclose(_flat(d(update, 9)), _flat(noised), rtol=1e-5, atol=1e-6)
  # The noise multiplier passed in as TFF passes it (a float64 tensor): the same draw.
  at_tensor = d.apply(update, tf.constant(0.7, tf.float64), 9)
  np.testing.assert_allclose(_flat(at_tensor), _flat(noised), rtol=1e-5, atol=1e-6)
  assert float(d.clip_scale(update)) == pytest.approx(0.5 / np.linalg.norm(raw), rel=1e-5)
  again = pickle.loads(pickle.dumps(d))  # the chain's steps pickle (no lambdas)
  np.testing.assert_array_equal(_flat(again(update, 9)), _flat(d(update, 9)))


def test_dp_epsilon_accounting_is_monotone():
  # Directions and argument checks; the values themselves: tests/defenses/test_dp_accounting.py.
  eps = [dp_lib.dp_sgd_epsilon(z, 100, 0.01) for z in (0.7, 1.0, 2.0, 4.0)]
  assert all(np.isfinite(eps)) and eps == sorted(eps, reverse=True) and eps[-1] < eps[0] / 4
  steps = [dp_lib.dp_sgd_epsilon(1.0, s, 0.01) for s in (10, 100, 1000)]
  assert steps == sorted(steps) and steps[0] < steps[-1]
  # DP-FedAvg: sampling fewer clients per round amplifies privacy.
  assert (
    dp_lib.dp_fedavg_epsilon(1.0, 10, 1000, 50)
    < dp_lib.dp_fedavg_epsilon(1.0, 100, 1000, 50)
    < dp_lib.dp_fedavg_epsilon(1.0, 1000, 1000, 50)
  )
  for bad in (0, 1.5, -3):
    with pytest.raises(ValueError, match=re.escape(f"steps={bad!r}")):
      dp_lib.dp_sgd_epsilon(1.0, bad)
  with pytest.raises(ValueError, match="noise_multiplier=0"):
    dp_lib.dp_sgd_epsilon(0, 10)
  with pytest.raises(ValueError, match="clients_per_round=20"):
    dp_lib.dp_fedavg_epsilon(1.0, 20, 10, 5)


# ----------------------------------------------------------------------------- validation

BAD = [
  ("masking", -0.1),
  ("masking", 1.0),
  ("masking", 1.5),
  ("masking", float("nan")),
  ("masking", float("inf")),
  ("pruning", 1.0),
  ("pruning", -0.01),
  ("pruning", float("nan")),
  ("clipping", 0.0),
  ("clipping", -1.0),
  ("clipping", float("nan")),
  ("clipping", float("inf")),
  ("value_clipping", 0.0),
  ("value_clipping", -2.0),
  ("value_clipping", float("nan")),
  ("noising", -1e-3),
  ("noising", float("nan")),
  ("noising", float("inf")),
  ("dp", -1.0),
  ("dp", float("nan")),
  ("masking", "0.5"),
  ("clipping", True),
  ("noising", [0.1]),
  ("clipping_ratio", 0.0),
  ("clipping_ratio", 1.5),
  ("clipping_ratio", -0.5),
  ("clipping_ratio", float("nan")),
  ("noising_ratio", -0.1),
  ("noising_ratio", float("inf")),
]


@pytest.mark.parametrize("name,param", BAD)
def test_bad_parameter_raises_value_error_naming_the_value(name, param):
  with pytest.raises(ValueError, match=re.escape(f"={param!r}")) as info:
    defenses.get_defense(name, param)
  assert "must be" in str(info.value)
  if name.endswith("_ratio"):  # the message names the relative parameter
    assert defenses.DEFENSES[name].param_name + "=" in str(info.value)


@pytest.mark.parametrize(
  "kwargs,needle",
  [
    (dict(name="masking", param=0.5, rescale=True), None),
    (dict(name="dp", param=1.0, l2_norm_clip=0.0), "l2_norm_clip=0.0"),
    (dict(name="dp", param=1.0, l2_norm_clip=float("nan")), "l2_norm_clip=nan"),
    (dict(name="pruning", param=0.5, scope="layer"), "scope='layer'"),
    (dict(name="noising", param=0.1, distribution="uniform"), "distribution='uniform'"),
    (dict(name="masks", param=0.5), "'masks'"),
    (dict(name="masking"), "'masking' needs a parameter"),
    (dict(name="clipping"), "'clipping' needs a parameter"),
  ],
)
def test_bad_names_and_options_raise_value_error(kwargs, needle):
  if needle is None:
    defenses.get_defense(**kwargs)  # a valid control
    return
  with pytest.raises(ValueError, match=re.escape(needle)):
    defenses.get_defense(**kwargs)


@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_update_raises(name, bad):
  update = _update()
  arr = np.asarray(update[2]).copy()
  arr[1, 2, 0, 3] = bad
  update[2] = tf.constant(arr)
  with pytest.raises(tf.errors.InvalidArgumentError, match="update tensor 2 has NaN or inf"):
    defenses.get_defense(name, PARAMS[name])(update, 0)


def test_bad_updates_and_seeds_raise():
  d = defenses.get_defense("masking", 0.5)
  with pytest.raises(TypeError, match="int32"):
    d([tf.ones([3], tf.int32)], 0)
  with pytest.raises(TypeError, match="seed"):
    d([tf.ones([3])], 0.5)
  with pytest.raises(ValueError, match="shape"):
    d([tf.ones([3])], tf.constant([1, 2, 3]))
  with pytest.raises(ValueError, match="exclude has 1 entries but the update has 2"):
    defenses.get_defense("masking", 0.5, exclude=[True])([tf.ones([3]), tf.ones([2])], 0)


# ----------------------------------------------------------------------------- API


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_config_round_trips_and_structure_is_kept(name):
  d = defenses.get_defense(name, PARAMS[name])
  cfg = d.get_config()
  assert cfg["name"] == name == d.name
  rest = {k: v for k, v in cfg.items() if k not in ("name", d.param_name)}
  again = defenses.get_defense(cfg["name"], cfg.get(d.param_name), **rest)
  assert again.get_config() == cfg and repr(again) == repr(d)
  nested = {"a": tf.ones([4, 3]), "b": [tf.ones([2]), tf.ones([5])]}
  out = d(nested, 0)
  assert tf.nest.map_structure(lambda t: tuple(t.shape), out) == tf.nest.map_structure(
    lambda t: tuple(t.shape), nested
  )


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_defences_work_inside_tf_function(name):
  model = _bn_model()
  variables = model.trainable_variables
  exclude = defenses.batchnorm_exclusion(model, variables)
  d = defenses.get_defense(name, PARAMS[name], exclude=exclude)
  update = _update(seed=3, shapes=[v.shape for v in variables])
  traces = []

  @tf.function
  def defend(u, seed):
    traces.append(1)
    return d(u, seed)

  for s in (0, 1):
    seed = tf.constant([s, 0x5EED], tf.int64)
    graph = defend(update, seed)
    eager = d(update, s)
    np.testing.assert_allclose(_flat(graph), _flat(eager), rtol=1e-6, atol=1e-7)
  assert len(traces) == 1  # the seed is a tensor input: no retracing, no baked randomness
  if name in RANDOM:
    assert np.any(
      _flat(defend(update, tf.constant([0, 1], tf.int64)))
      != _flat(defend(update, tf.constant([0, 2], tf.int64)))
    )
  with pytest.raises(tf.errors.InvalidArgumentError):
    bad = list(update)
    bad[0] = bad[0] * float("nan")
    defend(bad, tf.constant([0, 1], tf.int64))


# ----------------------------------------------------------------------------- BatchNorm


@pytest.fixture(scope="module")
def bn_round(digits):
  """One FedAvg round of the BatchNorm CNN with one client, in `fedavg.py`'s layout.

  The client starts from the server model, trains on 256 `digits` images (BN momentum
  0.5 as `FederatedConfig`, so its moving statistics track its data), and its update is
  `initial - final` for the trainable variables followed by the non-trainable ones (the
  BN moving mean/variance) -- `tf_dlg.federated.fedavg.update_variables` order.
  """
  ds = digits

  def build():
    m = models.bn_cnn(ds.x_train.shape[1:], ds.num_classes, seed=0, width=8)
    for layer, _ in models.batchnorm_variables(m):
      layer.momentum = 0.5
    return m

  server, client = build(), build()
  # fit's shuffling draws from the global seed: fix it, or the result depends on test order.
  tf.keras.utils.set_random_seed(0)
  client.compile(
    tf.keras.optimizers.SGD(0.1, momentum=0.9),
    tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  client.fit(ds.x_train[:256], ds.y_train[:256], batch_size=32, epochs=4, verbose=0)
  variables = _fedavg_layout(server)
  initial = [v.numpy() for v in variables]
  final = [v.numpy() for v in _fedavg_layout(client)]
  return dict(
    build=build,
    server=server,
    client=client,
    initial=initial,
    final=final,
    delta=[tf.constant(a - b) for a, b in zip(initial, final)],
    exclude=defenses.batchnorm_exclusion(server, variables),
    num_trainable=len(server.trainable_variables),
    x=ds.x_test[:300],
  )


def _server_apply(r, update, stats_are_values=False):
  """The server rule of `fedavg.py` with one client: weights - update (lr 1).

  With `stats_are_values`, the non-trainable entries are the statistics themselves
  (their aggregate becomes the server's statistics) instead of deltas.
  """
  m = r["build"]()
  for j, (v, w, u) in enumerate(zip(_fedavg_layout(m), r["initial"], update)):
    u = np.asarray(u)
    v.assign(u if stats_are_values and j >= r["num_trainable"] else w - u)
  return m


def _bn1_normalised_std(m, x):
  """Per-channel std of bn1's inference-mode output, undone to (x - mean) / sqrt(var + eps)."""
  layer = m.get_layer("bn1")
  out = tf.keras.Model(m.input, layer.output)(x, training=False).numpy()
  z = (out.reshape(-1, out.shape[-1]) - layer.beta.numpy()) / layer.gamma.numpy()
  return z.std(0)


def _bn_stats(m, name):
  layer = m.get_layer(name)
  return layer.moving_mean.numpy(), layer.moving_variance.numpy(), layer.epsilon


def test_masking_a_batchnorm_fedavg_update(bn_round):
  """Masking a BN model's FedAvg update: BN excluded works, naive masking breaks BN.

  Setting (`bn_round`): a client's FedAvg update in `fedavg.py`'s layout -- deltas of
  the trainable weights (conv/dense kernels, BN gamma/beta), then deltas of the BN
  moving mean/variance; the server sets weights := server - update. Masking rate 0.3.
  What is measured, on `digits` test images in inference mode:

  1. BN excluded (`batchnorm_exclusion`, the default): the server's moving statistics
     are *exactly* the client's measured ones; every variance is > 0; bn1 standardises
     its input (per-channel std of (x - mean) / sqrt(var + eps) close to 1) and the
     logits are finite and of the unmasked update's order.
  2. Naive masking of the delta (BN variables masked like any other): nothing becomes
     NaN, but each masked statistic silently reverts to the server's stale value
     (mean 0, variance 1 at initialisation) while the conv weights moved on. A channel
     whose variance delta was masked is normalised by sqrt(1 + eps) instead of
     sqrt(v + eps): its activations shrink by sqrt((v + eps) / (1 + eps)) -- measured
     equal to that prediction (below 0.5x for bn1's stale channels): the statistics no
     longer describe the layer's input, and nothing flags it.
  3. Naive masking with `rescale=True` (the unbiased variant): a kept variance delta is
     divided by (1 - rate), so the server's variance 1 - (1 - v) / (1 - rate) is
     *negative* wherever v < rate; BN then takes sqrt(negative + eps) = NaN and every
     logit of the model is NaN.
  4. When the update carries the statistics *values* (the server's aggregate of the
     clients' moving statistics, or a client that sends its model state): a masked
     variance is 0, so BN divides by sqrt(eps) = sqrt(1e-3): that channel is amplified
     by sqrt((v + eps) / eps) (measured equal to the prediction; ~15x for bn1's largest
     variance here, more for bn2's larger ones), the amplifications compound through the
     layers and the logits blow up by more than an order of magnitude (~35x here; the test
     prints the numbers). With BN excluded the values pass
     through and nothing changes. (With K clients the mean of masked variances is 0 only
     where all K masked it, probability rate^K, but each masked client still pulls the
     variance towards 0 by v_k / K.)
  """
  r = bn_round
  rate, n_train = 0.3, r["num_trainable"]
  ex = r["exclude"]
  stats_idx = range(n_train, len(ex))
  assert all(ex[i] for i in stats_idx)
  x = r["x"]

  full = _server_apply(r, r["delta"])
  full_logits = full(x, training=False).numpy()
  assert np.isfinite(full_logits).all()

  # 1. BN excluded.
  excluded_update = defenses.get_defense("masking", rate, exclude=ex)(r["delta"], 1)
  m_ex = _server_apply(r, excluded_update)
  for name in ("bn1", "bn2"):
    for got, want in zip(_bn_stats(m_ex, name)[:2], _bn_stats(r["client"], name)[:2]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(_bn_stats(m_ex, name)[1] > 0)
  z_ex = _bn1_normalised_std(m_ex, x)
  logits_ex = m_ex(x, training=False).numpy()
  assert np.isfinite(logits_ex).all()
  assert np.all((z_ex > 0.5) & (z_ex < 1.5)), z_ex
  scale_ex = np.max(np.abs(logits_ex))
  assert scale_ex < 3 * np.max(np.abs(full_logits))
  # The masking itself happened (on the non-BN entries) at the requested rate.
  # (Counted where the delta was nonzero: dead ReLU units leave exact zeros.)
  moved = np.concatenate([np.asarray(d).ravel() != 0 for d, e in zip(r["delta"], ex) if not e])
  out = np.concatenate([np.asarray(t).ravel() for t, e in zip(excluded_update, ex) if not e])
  assert abs(np.mean(out[moved] == 0) - rate) < 4 * math.sqrt(rate * (1 - rate) / moved.sum())

  # Naive: the same masked non-BN entries, and the BN entries masked as well.
  def naive(rescale):
    bn_masked = masking_lib.mask_update(
      [r["delta"][i] for i in range(len(ex)) if ex[i]], rate, 2, rescale=rescale
    )
    it = iter(bn_masked)
    return [next(it) if e else u for u, e in zip(excluded_update, ex)]

  # 2. Naive, delta layout: finite but stale statistics.
  m_naive = _server_apply(r, naive(False))
  mean0, var0, eps = _bn_stats(r["server"], "bn1")
  mean_c, var_c, _ = _bn_stats(r["client"], "bn1")
  mean_n, var_n, _ = _bn_stats(m_naive, "bn1")
  stale = np.isclose(var_n, var0) & ~np.isclose(var_c, var0)
  assert stale.any() and not stale.all()
  np.testing.assert_allclose(var_n[~stale], var_c[~stale], rtol=1e-5)
  assert np.isfinite(m_naive(x, training=False).numpy()).all()
  ratio = _bn1_normalised_std(m_naive, x) / z_ex
  predicted = np.sqrt((var_c + eps) / (var_n + eps))
  np.testing.assert_allclose(ratio, predicted, rtol=2e-3)
  assert np.min(ratio[stale]) < 0.5  # stale channels are squashed

  # 3. Naive with rescale: negative variances, NaN outputs.
  m_rescaled = _server_apply(r, naive(True))
  var_r = _bn_stats(m_rescaled, "bn1")[1]
  kept_r = ~np.isclose(var_r, var0)
  np.testing.assert_allclose(
    var_r[kept_r], var0[kept_r] - (var0 - var_c)[kept_r] / (1 - rate), rtol=1e-4, atol=1e-6
  )
  assert np.any(var_r < 0)
  assert np.isnan(m_rescaled(x, training=False).numpy()).all()

  # 4. Statistics as values: zeroed variances amplify channels by sqrt((v + eps) / eps).
  values = list(r["delta"][:n_train]) + [tf.constant(r["final"][i]) for i in stats_idx]
  guarded = defenses.get_defense("masking", rate, exclude=ex)(values, 1)
  for i in stats_idx:
    np.testing.assert_array_equal(np.asarray(guarded[i]), r["final"][i])
  m_vals = _server_apply(r, guarded, stats_are_values=True)
  np.testing.assert_allclose(m_vals(x, training=False).numpy(), logits_ex, rtol=1e-4, atol=1e-5)
  naive_values = list(excluded_update[:n_train]) + masking_lib.mask_update(
    [tf.constant(r["final"][i]) for i in stats_idx], rate, 3
  )
  m_zero = _server_apply(r, naive_values, stats_are_values=True)
  var_z = _bn_stats(m_zero, "bn1")[1]
  zeroed = var_z == 0
  assert zeroed.any()
  ratio = _bn1_normalised_std(m_zero, x) / z_ex
  np.testing.assert_allclose(ratio, np.sqrt((var_c + eps) / (var_z + eps)), rtol=2e-3)
  assert np.max(ratio) > 3
  logits_zero = m_zero(x, training=False).numpy()
  blow_up = np.max(np.abs(logits_zero)) / scale_ex
  print(
    f"BN proof: z std excluded {np.round(z_ex, 2)}, zero-variance amplification {np.round(ratio, 2)}, "
    f"logit blow-up x{blow_up:.1f}"
  )
  assert blow_up > 10


# ----------------------------------------------------------------------------- package


def test_importing_defenses_loads_no_adapter_no_study_and_no_tff():
  code = (
    "import sys, tf_dlg.defenses as d; "
    "bad = [m for m in sys.modules if m == 'tensorflow_federated' or m.startswith("
    "('tf_dlg.federated', 'tf_dlg.integrations', 'tf_dlg.study'))]; "
    "assert not bad, bad; print('ok')"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
  )
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_adapters_are_not_reachable_from_the_core_package():
  """The TFF and Keras adapters live in tf_dlg.federated / tf_dlg.integrations now."""
  for moved in ("DefendedModel", "defended_gradients", "defense_factory", "DefenseSpec"):
    with pytest.raises(AttributeError, match=f"no attribute '{moved}'"):
      getattr(defenses, moved)
