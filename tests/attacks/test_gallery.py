"""The gallery matcher: the attacker who holds the gallery the identification criterion assumes.

Expected values come from a plain per-candidate loop (Keras `GradientTape` on one image at
a time, cosine in float64 with NumPy), not from the batched code under test.
"""

import numpy as np
import pytest

from tf_dlg import data, defenses, models
from tf_dlg.attacks import gallery, threat_model


@pytest.fixture(scope="module")
def digits():
  ds = data.load_dataset("digits")
  model = models.attack_lenet(ds.input_shape, ds.num_classes, seed=0)
  return ds, model


def _brute_force(model, obs, images, labels):
  """Per candidate: its own update by the honest client's code, masked cosine in float64."""
  o = np.concatenate([np.ravel(u) for u in obs.update]).astype(np.float64)
  carried = o != 0
  out = []
  for x, y in zip(images, labels):
    if obs.kind == "gradient":
      c = threat_model.observe_gradient(model, x[None], [y])
    else:
      c = threat_model.observe_fedavg_delta(
        model, x[None], [y], local_steps=obs.local_steps, learning_rate=obs.learning_rate
      )
    g = np.concatenate([np.ravel(u) for u in c.update]).astype(np.float64)
    out.append(g @ o / (np.linalg.norm(g[carried]) * np.linalg.norm(o)))
  return np.array(out)


@pytest.mark.parametrize("kind", ["gradient", "fedavg_delta"])
def test_scores_and_ranks_equal_a_per_candidate_loop(digits, kind):
  ds, model = digits
  x, y = ds.x_train[:40], ds.y_train[:40]
  member = 7
  masking = defenses.get_defense("masking", 0.6)
  if kind == "gradient":
    obs = threat_model.observe_gradient(
      model, x[member : member + 1], y[member : member + 1], masking, seed=3
    )
  else:
    obs = threat_model.observe_fedavg_delta(
      model, x[member : member + 1], y[member : member + 1], 3, 0.1, defense=masking, seed=3
    )
  want = _brute_force(model, obs, x, y)
  scores, used = gallery.score_gallery(model, [obs], x, y.astype(np.int64), chunk=16)
  np.testing.assert_allclose(scores[:, 0], want, rtol=0, atol=2e-5)
  np.testing.assert_array_equal(used[:, 0], y)
  (res,) = gallery.match_gallery(model, [obs], x, y, [[member]], chunk=16)
  others = np.delete(want, member)
  assert res.ranks[0] == 1 + np.count_nonzero(others >= want[member] - gallery.TIE_TOLERANCE)
  assert res.pick == int(np.argmax(want)) and res.non_members == len(x) - 1
  # The original's own update on its own carried coordinates: cosine 1 up to float32.
  assert res.member_scores[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
  "name, param",
  [("masking", 0.99), ("pruning", 0.99), ("clipping_ratio", 1e-4), ("none", None)],
)
def test_zeroing_and_rescaling_leave_the_original_first(digits, name, param):
  """Why these defences cannot stop gallery matching: masking and pruning zero coordinates
  (the cosine is taken over the ones carried, where the original's update is the observed
  one, so its cosine stays 1), and clipping rescales (a cosine ignores scale)."""
  ds, model = digits
  x, y = ds.x_train[:400], ds.y_train[:400]
  members = [3, 50, 111, 222, 333]
  d = None if name == "none" else defenses.get_defense(name, param)
  obs = [
    threat_model.observe_gradient(model, x[i : i + 1], y[i : i + 1], d, seed=i) for i in members
  ]
  res = gallery.match_gallery(model, obs, x, y, [[i] for i in members], chunk=100)
  assert [r.pick for r in res] == members
  assert all(r.ranks[0] == 1 for r in res)


def test_identification_falls_as_noise_grows(digits):
  ds, model = digits
  x, y = ds.x_train[:500], ds.y_train[:500]
  members = list(range(0, 500, 25))  # 20 images
  median, identified = [], []
  for ratio in (0.1, 3.0, 30.0):
    d = defenses.get_defense("noising_ratio", ratio)
    obs = [
      threat_model.observe_gradient(model, x[i : i + 1], y[i : i + 1], d, seed=i) for i in members
    ]
    res = gallery.match_gallery(model, obs, x, y, [[i] for i in members], chunk=250)
    ranks = np.array([r.ranks[0] for r in res])
    identified.append(int(np.count_nonzero(ranks == 1)))
    median.append(float(np.median(ranks)))
  assert identified[0] == len(members)  # little noise: every original first
  assert identified[0] >= identified[1] >= identified[2]
  assert median[0] <= median[1] < median[2]
  assert identified[2] < len(members) and median[2] > 10  # buried: far from first


def test_label_free_matching_finds_the_label(digits):
  ds, model = digits
  x, y = ds.x_train[:200], ds.y_train[:200]
  members = [5, 17, 123]
  obs = [threat_model.observe_gradient(model, x[i : i + 1], y[i : i + 1]) for i in members]
  # A gallery without labels: every candidate is tried with every label.
  wrong = (y + 1) % ds.num_classes
  res = gallery.match_gallery(model, obs, x, wrong, [[i] for i in members], labels="best")
  assert [r.pick for r in res] == members
  assert [r.pick_label for r in res] == [int(y[i]) for i in members]
  # With the wrong labels taken at face value the original is not found.
  blind = gallery.match_gallery(model, obs, x, wrong, [[i] for i in members])
  assert all(r.ranks[0] > 1 for r in blind)


def test_a_batch_update_ranks_each_member_among_non_members(digits):
  ds, model = digits
  x, y = ds.x_train[:60], ds.y_train[:60]
  batch = [10, 20, 30, 40]
  obs = threat_model.observe_gradient(model, x[batch], y[batch])
  (res,) = gallery.match_gallery(model, [obs], x, y, [batch])
  want = _brute_force(model, obs, x, y)
  others = np.delete(want, batch)
  for m, rank in zip(batch, res.ranks):
    assert rank == 1 + np.count_nonzero(others >= want[m] - gallery.TIE_TOLERANCE)
  assert res.non_members == len(x) - len(batch)


def test_the_candidate_cache_gives_the_same_scores(digits, tmp_path):
  ds, model = digits
  x, y = ds.x_train[:120], ds.y_train[:120]
  d = defenses.get_defense("noising_ratio", 1.0)
  obs = [
    threat_model.observe_gradient(model, x[i : i + 1], y[i : i + 1], d, seed=i) for i in (1, 2)
  ]
  plain = gallery.match_gallery(model, obs, x, y, [[1], [2]], chunk=50)
  first = gallery.match_gallery(model, obs, x, y, [[1], [2]], chunk=50, cache_dir=str(tmp_path))
  again = gallery.match_gallery(model, obs, x, y, [[1], [2]], chunk=50, cache_dir=str(tmp_path))
  assert len(list(tmp_path.glob("*.npy.complete"))) == 1
  for a, b, c in zip(plain, first, again):
    assert a.pick == b.pick == c.pick and a.ranks[0] == b.ranks[0] == c.ranks[0]
    np.testing.assert_array_equal(a.member_scores, c.member_scores)


def test_bad_input_is_refused_before_any_work(digits):
  ds, model = digits
  x, y = ds.x_train[:10], ds.y_train[:10]
  obs = [threat_model.observe_gradient(model, x[:1], y[:1])]
  with pytest.raises(ValueError, match="labels"):
    gallery.match_gallery(model, obs, x, y, [[0]], labels="guess")
  with pytest.raises(ValueError, match=r"members\[0\]=\[10\]"):
    gallery.match_gallery(model, obs, x, y, [[10]])
  with pytest.raises(ValueError, match="gallery_labels"):
    gallery.match_gallery(model, obs, x, y.astype(np.float32), [[0]])
  with pytest.raises(ValueError, match="members has 2"):
    gallery.match_gallery(model, obs, x, y, [[0], [1]])
