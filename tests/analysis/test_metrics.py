"""Leakage metrics: SSIM family, brightness adjustment, labels, verdict."""

import numpy as np
import pytest

from tf_dlg import data, metrics


@pytest.fixture(scope="module")
def faces():
  return data.load_dataset("lfw_subset").x_train[:6]


@pytest.fixture(scope="module")
def photos():
  return data.load_dataset("photos").x_train[:4]


def test_identical_images_score_perfectly(faces, photos):
  for img in list(faces[:2]) + list(photos[:2]):
    assert metrics.ssim(img, img) == pytest.approx(1.0)
    assert metrics.mse(img, img) == 0.0
    assert metrics.psnr(img, img) == 100.0
    assert metrics.adjusted_ssim(img, img)[0] == pytest.approx(1.0)


def test_ssim_window_fits_28x28_digits():
  digits = data.load_dataset("digits").x_train
  assert digits.shape[1:] == (28, 28, 1)
  s = metrics.ssim(digits[0], digits[1])
  assert -1.0 <= s < 0.99


def test_psnr_and_mse_values():
  a = np.zeros((8, 8, 1), np.float32)
  b = np.full((8, 8, 1), 0.1, np.float32)
  assert metrics.mse(a, b) == pytest.approx(0.01, rel=1e-5)
  assert metrics.psnr(a, b) == pytest.approx(20.0, rel=1e-4)


def test_adjusted_ssim_never_below_plain(faces, photos):
  rng = np.random.default_rng(0)
  pairs = [(faces[i], faces[i + 1]) for i in range(4)]
  pairs += [(photos[0], rng.uniform(size=photos[0].shape).astype(np.float32))]
  pairs += [(faces[0], np.clip(faces[0] + rng.normal(0, 0.3, faces[0].shape), -1, 2))]
  pairs += [(photos[1], 0.3 * photos[1] - 0.2)]
  for original, leaked in pairs:
    plain = metrics.ssim(original, np.clip(leaked, 0, 1))
    adjusted, image = metrics.adjusted_ssim(original, leaked)
    assert adjusted >= plain - 1e-9
    assert image.shape == original.shape
    assert image.min() >= 0.0 and image.max() <= 1.0
    # The returned image is the one that attains the score.
    assert metrics.ssim(original, image) == pytest.approx(adjusted, abs=1e-6)


@pytest.mark.parametrize("gain,offset", [(0.5, 0.2), (0.25, 0.6), (1.0, -0.0), (0.7, 0.05)])
def test_pure_brightness_change_scores_one(faces, photos, gain, offset):
  for original in (faces[2], photos[2]):
    leaked = gain * original + offset  # stays inside [0, 1]: no information lost
    assert leaked.min() >= 0 and leaked.max() <= 1
    adjusted, image = metrics.adjusted_ssim(original, leaked)
    assert adjusted == pytest.approx(1.0, abs=1e-4)
    if gain != 1.0:
      assert metrics.ssim(original, leaked) < adjusted
    np.testing.assert_allclose(image, original, atol=1e-3)


def test_non_finite_reconstruction_is_unmeasurable_and_counts_as_leaked(faces):
  bad = faces[0].copy()
  bad[0, 0, 0] = np.nan
  assert np.isnan(metrics.ssim(faces[0], bad))
  score, image = metrics.adjusted_ssim(faces[0], bad)
  assert np.isnan(score) and np.all(np.isfinite(image))
  with pytest.warns(RuntimeWarning, match="counts as leaked"):
    assert metrics.leaked(score)
  with pytest.warns(RuntimeWarning):
    rows = metrics.score_images(faces[:2], np.stack([faces[1], bad]))
  # The NaN reconstruction is matched last and is never counted as defended.
  assert rows[1]["ssim"] == pytest.approx(1.0) and rows[1]["leaked"]
  assert np.isnan(rows[0]["adjusted_ssim"]) and rows[0]["leaked"]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_leak_verdict_of_non_finite_score_is_leaked(value):
  with pytest.warns(RuntimeWarning):
    assert metrics.leaked(value)
  with pytest.warns(RuntimeWarning):
    assert metrics.leaked(value, threshold=0.0)


def test_non_finite_original_is_refused(faces):
  bad = faces[0].copy()
  bad[1, 2, 0] = np.inf
  for fn in (metrics.ssim, metrics.adjusted_ssim, metrics.mse, metrics.psnr):
    with pytest.raises(ValueError, match="original image has 1 non-finite pixels"):
      fn(bad, faces[0])


def test_label_accuracy_is_order_free():
  assert metrics.label_accuracy([3], [3]) == 1.0
  assert metrics.label_accuracy([3], [4]) == 0.0
  assert metrics.label_accuracy([1, 1, 4], [4, 1, 1]) == 1.0
  assert metrics.label_accuracy([1, 1, 4], [1, 4, 4]) == pytest.approx(2 / 3)


def test_leak_verdict_and_default_bar():
  assert 0.0 < metrics.DEFAULT_LEAK_SSIM < 1.0
  assert metrics.leaked(metrics.DEFAULT_LEAK_SSIM)
  assert not metrics.leaked(metrics.DEFAULT_LEAK_SSIM - 1e-6)
  assert metrics.leaked(0.65, threshold=0.6) and not metrics.leaked(0.55, threshold=0.6)


def test_score_images_matches_batch_order(faces):
  originals = faces[:3]
  leaked = originals[[2, 0, 1]]
  rows = metrics.score_images(originals, leaked, [0, 1, 1], [1, 0, 1])
  assert [r["ssim"] for r in rows] == pytest.approx([1.0, 1.0, 1.0])
  assert all(r["label_correct"] for r in rows)


def test_ssim_many_equals_skimage_pair_by_pair(faces, photos):
  """The batched SSIM of the brightness family is skimage's, bit for bit."""
  from skimage.metrics import structural_similarity

  digits = data.load_dataset("digits").x_train[:2]
  rng = np.random.default_rng(7)
  for original, other in ((digits[0], digits[1]), (faces[0], faces[1]), (photos[0], photos[1])):
    # Outside [0, 1] and noisy, so that the family's clipping is exercised.
    leaked = other * 1.7 - 0.4 + rng.normal(0.0, 0.2, other.shape)
    images = np.stack([im for _, im in metrics.brightness_adjustments(original, leaked)])
    plain = [
      structural_similarity(np.float64(original), im, data_range=1.0, channel_axis=-1)
      for im in images
    ]
    np.testing.assert_array_equal(metrics.ssim_many(original, images), plain)
    score, adjusted = metrics.adjusted_ssim(original, leaked)
    assert score == max(plain)
    np.testing.assert_array_equal(adjusted, images[int(np.argmax(plain))].astype(np.float32))


def test_ssim_many_refuses_bad_shapes(faces):
  with pytest.raises(ValueError, match=r"candidates have shape \(5, 5, 1\)"):
    metrics.ssim_many(faces[0], np.zeros((3, 5, 5, 1)))
  with pytest.raises(ValueError, match="smaller than the 7x7 SSIM window"):
    metrics.ssim_many(np.zeros((5, 5, 1)), np.zeros((3, 5, 5, 1)))
