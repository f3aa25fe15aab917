"""Identification: ranks, brightness tolerance, chance level, failures, ties, intervals."""

import numpy as np
import pytest
from scipy import stats

from tf_dlg import data
from tf_dlg.analysis import identification as idf
from tf_dlg.analysis import threshold


@pytest.fixture(scope="module")
def digits():
  ds = data.load_dataset("digits")
  return ds, idf.Gallery.from_dataset(ds)


def test_every_original_is_rank_one_and_its_own_pick(digits):
  ds, gallery = digits
  x = np.concatenate([ds.x_train, ds.x_test])
  idx = np.arange(len(x))
  for similarity in idf.SIMILARITIES:
    r = idf.identify(x, gallery, idx, similarity=similarity)
    assert r.rank.max() == 1 and r.hits[1].all() and r.hits[5].all()
    np.testing.assert_array_equal(r.pick, idx)
    np.testing.assert_allclose(r.true_similarity, 1.0, atol=1e-5)
  assert r.gallery_size == len(x) == 1797


def test_train_index_is_the_gallery_index(digits):
  ds, gallery = digits
  assert idf.identified(ds.x_train[7], gallery, 7)
  assert not idf.identified(ds.x_train[7], gallery, 8)


@pytest.mark.parametrize(
  "transform",
  [lambda x: 0.3 * x + 0.5, lambda x: 4.0 * x - 2.0, lambda x: 0.01 * x],
  ids=["dimmer", "contrast", "tiny_scale"],
)
def test_brightness_affine_original_stays_rank_one(digits, transform):
  ds, gallery = digits
  idx = np.arange(0, len(ds.x_train), 7)
  for similarity in idf.SIMILARITIES:
    r = idf.identify(transform(ds.x_train[idx]), gallery, idx, similarity=similarity)
    assert r.rank.max() == 1, similarity


def test_inverted_original_needs_the_sign_tolerant_similarity(digits):
  ds, gallery = digits
  idx = np.arange(0, len(ds.x_train), 7)
  inverted = 1.0 - ds.x_train[idx]
  assert idf.identify(inverted, gallery, idx).rank.max() == 1  # default: abs_pearson
  plain = idf.identify(inverted, gallery, idx, similarity="pearson")
  # r = -1 with its original: the most dissimilar image, never identified.
  assert not plain.hits[5].any()
  np.testing.assert_allclose(plain.true_similarity, -1.0, atol=1e-5)


def test_similarity_is_pearson_correlation_and_pick_its_argmax(digits):
  ds, gallery = digits
  x = np.concatenate([ds.x_train, ds.x_test]).reshape(1797, -1).astype(np.float64)
  rec = ds.x_test[:3] + np.random.default_rng(0).normal(0, 0.3, ds.x_test[:3].shape)
  true = len(ds.x_train) + np.arange(3)  # test image i follows the training images
  r = idf.identify(rec, gallery, true, similarity="pearson")
  for i in range(3):
    corr = np.array([np.corrcoef(rec[i].ravel(), g)[0, 1] for g in x])
    assert r.pick[i] == int(np.argmax(corr))
    np.testing.assert_allclose(r.pick_similarity[i], corr.max(), atol=1e-5)
    np.testing.assert_allclose(r.true_similarity[i], corr[true[i]], atol=1e-5)
    assert r.rank[i] == 1 + np.count_nonzero(np.delete(corr, true[i]) >= corr[true[i]])
  assert r.pick_similarity.max() < 0.99  # the noise changed the images


def test_unrelated_image_picks_its_own_match_not_the_target(digits):
  ds, gallery = digits
  r = idf.identify(ds.x_train[:50], gallery, np.arange(50, 100))
  np.testing.assert_array_equal(r.pick, np.arange(50))
  assert not r.hits[1].any() and r.rank.min() > 1


@pytest.mark.parametrize("k", [1, 5])
def test_chance_rate_of_unrelated_reconstructions_is_k_over_n(digits, k):
  # Held-out reconstructions (test split) against the training gallery, uniform targets.
  ds, _ = digits
  gallery = idf.Gallery(ds.x_train)
  rng = np.random.default_rng(1)
  recs = ds.x_test[rng.integers(0, len(ds.x_test), 6000)]
  targets = rng.integers(0, len(gallery), len(recs))
  r = idf.identify(recs, gallery, targets, k=k)
  count, p = int(r.hits[k].sum()), k / len(gallery)
  assert stats.binomtest(count, len(recs), p).pvalue > 0.01, (count, p * len(recs))
  iv = idf.identification_rate(r.hits[k])
  assert iv.low <= p <= iv.high


def test_noise_reconstructions_are_at_chance(digits):
  ds, gallery = digits
  rng = np.random.default_rng(2)
  noise = rng.uniform(size=(4000,) + ds.input_shape)
  targets = rng.integers(0, len(gallery), len(noise))
  r = idf.identify(noise, gallery, targets)
  assert stats.binomtest(int(r.hits[5].sum()), len(noise), 5 / len(gallery)).pvalue > 0.01
  assert np.all(r.pick_similarity < 0.9)  # no noise image looks like a digit


def test_non_finite_reconstruction_is_never_identified_but_never_defended(digits):
  ds, gallery = digits
  recs = ds.x_train[:3].copy()
  recs[1, 0, 0, 0] = np.nan
  recs[2, 3, 3, 0] = np.inf
  r = idf.identify(recs, gallery, [0, 1, 2])
  np.testing.assert_array_equal(r.rank, [1, 1797, 1797])
  np.testing.assert_array_equal(r.hits[1], [True, False, False])
  np.testing.assert_array_equal(r.pick, [0, -1, -1])
  assert np.isnan(r.pick_similarity[1:]).all() and np.isnan(r.true_similarity[1:]).all()
  assert not idf.identified(recs[1], gallery, 1)
  with pytest.warns(RuntimeWarning, match="non-finite"):
    verdicts = idf.defended_verdicts(recs, gallery, [0, 1, 2])
  assert [v["defended"] for v in verdicts] == [False, False, False]
  assert idf.defended_verdicts(recs[:1], gallery, [1])[0]["defended"]


def test_ties_count_against_the_attacker():
  rng = np.random.default_rng(3)
  images = rng.uniform(size=(10, 6, 6, 1))
  images[7] = images[2]  # an exact duplicate of the target
  images[8] = 0.5 * images[2] + 0.2  # and a brightness-changed copy
  r = idf.identify(images[2:3], images, [2], k=(1, 2, 3))
  assert r.rank[0] == 3 and not r.hits[1][0] and not r.hits[2][0] and r.hits[3][0]
  assert r.pick[0] in (2, 7, 8)
  flat = idf.identify(np.full((1, 6, 6, 1), 0.4), images, [0])  # no contrast: ties with all
  assert flat.rank[0] == 10 and flat.true_similarity[0] == 0.0


def test_constant_gallery_image_correlates_zero():
  images = np.random.default_rng(4).uniform(size=(5, 4, 4, 3))
  images[3] = 0.7
  gallery = idf.Gallery(images)
  assert not gallery.vectors[3].any()
  r = idf.identify(images[:3], gallery, [0, 1, 2])
  assert r.rank.max() == 1


def test_rate_interval_is_scipys_exact_interval():
  hits = np.array([True] * 3 + [False] * 5)
  iv = idf.identification_rate(hits)
  ci = stats.binomtest(3, 8).proportion_ci(0.95, method="exact")
  assert iv.estimate == 3 / 8 and iv.n == 8 and iv.low <= iv.estimate <= iv.high
  np.testing.assert_allclose([iv.low, iv.high], [ci.low, ci.high])
  none, every = idf.identification_rate(~hits & False), idf.identification_rate(hits | True)
  # 0/8 and 8/8 keep an interval of positive width (a bootstrap would give a point).
  assert none.low == 0.0 and 0.3 < none.high < 0.4
  assert every.high == 1.0 and 0.6 < every.low < 0.7
  rates = idf.identification_rates({1: hits, 5: hits | True}, level=0.9)
  assert set(rates) == {1, 5} and rates[1].level == 0.9 and rates[1].width < iv.width


def test_describe_formats_rates_and_median_rank(digits):
  ds, gallery = digits
  out = idf.describe(idf.identify(ds.x_train[:4], gallery, [0, 1, 2, 9]))
  assert out["top1"].startswith("0.75 [") and out["top1"].endswith("(n=4)")
  assert out["median_rank"] == "1"


def test_defended_verdicts_drive_per_image_bisection(digits):
  # Reconstructions get noisier with the parameter: each image's threshold must sit
  # between an identified and a not-identified noise level.
  ds, gallery = digits
  idx = np.arange(6)
  noise = np.random.default_rng(5).normal(size=(6,) + ds.input_shape)

  def reconstruct(requests):
    return np.stack([ds.x_train[i] + p * noise[i] for i, p in requests])

  def evaluate(requests):
    return idf.defended_verdicts(reconstruct(requests), gallery, [idx[i] for i, _ in requests])

  space = threshold.SearchSpace(0.01, 100.0, "log", "higher")
  images = threshold.per_image_thresholds(evaluate, space, [True] * 6, resolution=1.5)
  for i, im in enumerate(images):
    assert im.status == "found", im
    assert not idf.identified(reconstruct([(i, im.threshold)])[0], gallery, i)
    assert idf.identified(reconstruct([(i, im.weaker)])[0], gallery, i)
    assert 0.05 < im.threshold < 20


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"k": 0}, r"k=0 must be an integer in \[1, 5\]"),
    ({"k": (1, 6)}, r"k=6 must be"),
    ({"similarity": "ssim"}, "similarity='ssim' is not one of"),
    ({"true_index": [0, 5]}, r"true_index values must be in \[0, 4\]"),
    ({"true_index": [0]}, "one integer per reconstruction"),
    ({"true_index": [0.0, 1.0]}, "one integer per reconstruction"),
    ({"reconstructions": np.zeros((2, 3, 3, 1))}, r"do not match the gallery's images \(4, 4, 1\)"),
  ],
)
def test_bad_input_names_the_value(kwargs, match):
  gallery = np.random.default_rng(6).uniform(size=(5, 4, 4, 1))
  args = {"reconstructions": gallery[:2], "gallery": gallery, "true_index": [0, 1]}
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    idf.identify(**args)


def test_bad_gallery_and_hits_are_refused():
  with pytest.raises(ValueError, match="non-finite pixels"):
    idf.Gallery(np.full((3, 2, 2, 1), np.nan))
  with pytest.raises(ValueError, match="non-empty stack"):
    idf.Gallery(np.zeros((0, 2, 2, 1)))
  with pytest.raises(ValueError, match="non-empty 1-D boolean"):
    idf.identification_rate([1, 0, 1])
  with pytest.raises(ValueError, match="level=1.5"):
    idf.identification_rate(np.ones(3, bool), level=1.5)


def test_calibration_summary_on_digits():
  from benchmarks import identification_calibration as calib

  rows, _, _ = calib.calibrate("digits", n=150, ssim_n=0, seed=1)
  top = {(r["case"], r["similarity"]): r["_result"].rates() for r in rows}
  n = 1797

  def rate(case, k=1, similarity="abs_pearson"):
    return top[(case, similarity)][k]

  for case in ("original", "brightness 0.4x+0.3", "inverted 1-x"):  # affine: exact
    assert rate(case).estimate == 1.0, case
  assert rate("contrast clip(2.5x-0.6)").estimate >= 0.95  # clipping loses a little
  assert rate("inverted 1-x", 5, "pearson").estimate == 0.0
  for case in ("uniform noise", "gaussian noise N(0.5, 0.25)", "unrelated (leave-one-out)"):
    for k in (1, 5):
      assert rate(case, k).low <= k / (n - 1) <= rate(case, k).high, (case, k)
  curve = [rate(f"half-converged SNR {s:+d} dB", 5).estimate for s in calib.SNRS_DB]
  assert curve[0] < 0.1 and curve[-1] == 1.0
  assert all(b >= a - 0.1 for a, b in zip(curve, curve[1:])), curve  # rises with the SNR
  blur = [rate(f"blur sigma {s:g} px").estimate for s in calib.BLURS]
  assert blur[0] == 1.0 and blur[-1] < blur[0]


def test_a_huge_valued_copy_is_still_identified():
  """1e200 x the original overflows a plain mean and norm; identification must not call
  it unidentified (that would make a defence look stronger than it is)."""
  rng = np.random.default_rng(0)
  gallery = rng.random((50, 6, 6, 1))
  for scale in (1e-200, 1e200, 1e300):
    result = idf.identify(gallery[[7]] * scale, gallery, [7])
    assert result.rank[0] == 1 and result.pick[0] == 7, scale
  tiny = idf.standardise(np.array([[0.0, 1e-300, 0.0, 0.0]]))
  assert np.isfinite(tiny).all()
