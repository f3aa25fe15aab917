"""The defences as pure transforms: the parameter and the seed are passed in, nothing is
copied and changed, and transforms compose (`Chain`).

Expected values are hand computations or NumPy; no TFF, no tensorflow-privacy (the dp
chain's check is in `test_defenses.py`), so this runs in the core environment too.
"""

import pickle

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import defenses
from tf_dlg.defenses import base


def _update():
  rng = np.random.default_rng(3)
  return [rng.normal(size=(10, 10)).astype(np.float32), rng.normal(size=(7,)).astype(np.float32)]


def _norm(tensors):
  return float(np.sqrt(sum(np.sum(np.asarray(t, np.float64) ** 2) for t in tensors)))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_apply_takes_the_parameter_as_a_number_or_a_float64_tensor(as_tensor):
  update = _update()

  def setting(v):
    return tf.constant(v, tf.float64) if as_tensor else v

  built = defenses.get_defense("clipping_ratio", 0.9)
  out = built.apply(update, setting(0.25), seed=0)
  for o, u in zip(out, update):
    np.testing.assert_allclose(o, 0.25 * u, rtol=1e-6)
  # 29 of the first tensor's 100 entries, 2 of the second's 7 (floor(0.29 x 7) = 2).
  pruned = defenses.get_defense("pruning", 0.5).apply(update, setting(0.29), seed=0)
  assert [int(np.sum(np.asarray(t) == 0)) for t in pruned] == [29, 2]
  clipped = defenses.get_defense("clipping", 100.0).apply(update, setting(1.0), seed=0)
  assert _norm(clipped) == pytest.approx(1.0, rel=1e-5)
  assert built.param == 0.9  # the object keeps its own setting


def test_calling_a_defence_is_apply_at_its_own_parameter():
  update = _update()
  for name, param in (("masking", 0.3), ("noising", 0.1), ("pruning", 0.4)):
    d = defenses.get_defense(name, param)
    for a, b in zip(d(update, 5), d.apply(update, param, 5)):
      np.testing.assert_array_equal(a, b)


def test_clip_scale_at_a_passed_parameter():
  update = _update()
  norm = _norm(update)
  d = defenses.get_defense("clipping", 1e6)
  assert float(d.clip_scale(update)) == 1.0  # its own bound is far above the norm
  assert float(d.clip_scale(update, norm / 4)) == pytest.approx(0.25, rel=1e-5)
  # The second tensor excluded: the scale is of the first tensor's norm alone.
  first = _norm(update[:1])
  scale = d.clip_scale(update, first / 2, exclude=[False, True])
  assert float(scale) == pytest.approx(0.5, rel=1e-5)


def test_exclude_passed_to_apply_replaces_the_defences_own():
  update = _update()
  d = defenses.get_defense("clipping_ratio", 0.5, exclude=[True, False])
  own = d(update, 0)
  np.testing.assert_array_equal(own[0], update[0])
  np.testing.assert_allclose(own[1], 0.5 * update[1], rtol=1e-6)
  passed = d.apply(update, 0.5, 0, exclude=[False, True])
  np.testing.assert_allclose(passed[0], 0.5 * update[0], rtol=1e-6)
  np.testing.assert_array_equal(passed[1], update[1])
  assert d.exclude == [True, False]


def test_a_defence_is_frozen():
  d = defenses.get_defense("masking", 0.5, rescale=True)
  for name, value in (("param", 0.1), ("exclude", [True]), ("rescale", False)):
    with pytest.raises(AttributeError, match="is frozen"):
      setattr(d, name, value)
  assert d.get_config() == {"name": "masking", "rate": 0.5, "rescale": True}


def test_check_param_validates_without_building(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("built")

  monkeypatch.setattr(defenses.Masking, "__init__", refuse)
  assert defenses.check_param("masking", 0.25) == 0.25
  assert defenses.check_param("none") is None
  with pytest.raises(ValueError, match=r"masking rate=1.5 must be a number in \[0.0, 1.0\)"):
    defenses.check_param("masking", 1.5)
  with pytest.raises(ValueError, match="'masking' needs a parameter"):
    defenses.check_param("masking")
  with pytest.raises(ValueError, match="Unknown defence 'mask'"):
    defenses.check_param("mask", 0.5)


def test_chain_of_clip_then_noise_routes_the_parameter_to_each_step():
  update = _update()
  norm = _norm(update)
  clip = defenses.Clipping(1.0)
  noise = defenses.Noising(0.0)
  # param p: clip to the norm / 2 (fixed), then noise of stddev p.
  chain = base.Chain(0.0, steps=((clip, lambda p: norm / 2), (noise, lambda p: p)))
  out = chain(update, 7)
  for o, u in zip(out, update):  # stddev 0: exactly the clipped update
    np.testing.assert_allclose(o, u / 2, rtol=1e-5)
  assert float(chain.clip_scale(update)) == pytest.approx(0.5, rel=1e-5)
  # With stddev 0.1 the noise is what the noise step alone draws with the chain's seed.
  noisy = chain.apply(update, 0.1, 7)
  alone = defenses.get_defense("noising", 0.1)([u / 2 for u in update], 7)
  for a, b in zip(noisy, alone):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chain_gives_later_random_steps_their_own_draws():
  ones = [np.ones((200, 100), np.float32)]
  mask = defenses.Masking(0.0)
  twice = base.Chain(0.5, steps=((mask, lambda p: p), (mask, lambda p: p)))
  zeros = float(np.mean(np.asarray(twice(ones, 1)[0]) == 0))
  # Independent masks keep 0.5 x 0.5 of the entries; one mask drawn twice would keep 0.5.
  # 20000 entries: the standard deviation of the kept share is about 0.003.
  assert zeros == pytest.approx(0.75, abs=0.015)


def test_chain_takes_at_most_one_clipping_step():
  clip = defenses.Clipping(1.0)
  with pytest.raises(ValueError, match="at most one norm-clipping step"):
    base.Chain(1.0, steps=((clip, lambda p: p), (clip, lambda p: p)))


def test_every_defence_pickles_into_the_same_transform():
  update = _update()
  for name in defenses.DEFENSES:
    param = {"none": None, "dp": 0.5}.get(name, 0.25)
    d = defenses.get_defense(name, param, exclude=[False, True])
    again = pickle.loads(pickle.dumps(d))
    assert again.get_config() == d.get_config() and again.exclude == [False, True]
    if d.single_update and name != "dp":  # dp's clip needs tensorflow-privacy: test_defenses.py
      for a, b in zip(again(update, 4), d(update, 4)):
        np.testing.assert_array_equal(a, b)
