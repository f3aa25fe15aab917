"""run_attacks: configuration, compile cache, continuous batching, restarts, hooks."""

import glob

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg import data, metrics, models
from tf_dlg.attacks import observe_gradient, run_attacks, runner, schedule, summaries


@pytest.fixture(scope="module")
def digits():
  ds = data.load_dataset("digits")
  model = models.attack_lenet(ds.input_shape, ds.num_classes, seed=0)
  obs = [
    observe_gradient(model, ds.x_train[i : i + 1], ds.y_train[i : i + 1]) for i in range(20, 26)
  ]
  return model, obs


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("attack", "dlgg", "attack='dlgg'"),
    ("iterations", 0, "iterations=0"),
    ("restarts", 0, "restarts=0"),
    ("slots", 0, "slots=0"),
    ("optimizer", "sgd", "optimizer='sgd'"),
    ("tolerance", -1.0, "tolerance=-1.0"),
    ("optimizer_options", {"momentum": 0.9}, "momentum"),
    ("init", "zeros", "init='zeros'"),
  ],
)
def test_config_is_validated(field, value, message):
  with pytest.raises(ValueError, match=message):
    runner.AttackConfig(**{field: value})


def test_config_must_be_an_attack_config():
  # The attack name in the config's place (the older signature) is refused, not ignored.
  with pytest.raises(TypeError, match="config must be an AttackConfig, got str"):
    run_attacks(None, [], "ig")
  with pytest.raises(TypeError, match="cache must be a CompileCache, got dict"):
    run_attacks(None, [], cache={})


def test_cache_is_keyed_by_architecture_and_clearable(digits):
  model, obs = digits
  cache = runner.CompileCache(max_entries=3)
  config = runner.AttackConfig(attack="idlg", iterations=2, jit_compile=False)
  run_attacks(model, obs[:1], config, cache=cache)
  same_arch = models.attack_lenet((28, 28, 1), 10, seed=7)  # other weights, same graph
  assert cache.batched_model(same_arch) is cache.batched_model(model)
  assert 0 < len(cache) <= 3
  cache.clear()
  assert len(cache) == 0


def test_batch_larger_than_slots_completes_and_matches_solo(digits):
  """6 attacks on 2 slots finish at different iterations; each equals its solo run."""
  model, obs = digits
  config = runner.AttackConfig(iterations=400, seed=3, slots=2, check_every=20)
  together = run_attacks(model, obs, config=config)
  assert len(set(r.iterations for r in together)) > 2
  assert all(r.batch_size == 2 for r in together)
  for i in (0, 3, 5):
    alone = run_attacks(
      model,
      [obs[i]],
      config=runner.AttackConfig(iterations=400, seed=3 + i, slots=2, check_every=20),
    )[0]
    assert alone.iterations == together[i].iterations
    np.testing.assert_array_equal(alone.raw_images, together[i].raw_images)
    assert alone.status == together[i].status


def test_restarts_pick_smallest_distance_never_ground_truth(digits):
  model, obs = digits
  config = runner.AttackConfig(iterations=25, seed=0, restarts=3, slots=4)
  res = run_attacks(model, obs[:2], config=config)
  blind = [
    runner.ObservedUpdate(**{**vars(o), "true_images": None, "true_labels": None}) for o in obs[:2]
  ]
  res_blind = run_attacks(model, blind, config=config)
  for r, b in zip(res, res_blind):
    assert r.status == "max_iterations" and len(r.restart_distances) == 3
    assert r.restart == int(np.argmin(r.restart_distances))
    assert r.distance == min(r.restart_distances)
    assert len(set(r.restart_distances)) == 3  # differently seeded starts
    assert b.restart == r.restart
    np.testing.assert_array_equal(b.raw_images, r.raw_images)
  # Restart 0 is the plain attack of the same seed.
  plain = run_attacks(model, obs[:1], config=runner.AttackConfig(iterations=25, seed=0))[0]
  assert plain.distance == res[0].restart_distances[0]


def test_converged_restart_sends_later_siblings_away(digits):
  model, obs = digits
  res = run_attacks(
    model, obs[:1], config=runner.AttackConfig(iterations=1500, restarts=4, slots=2, check_every=10)
  )[0]
  assert res.status == "converged"
  assert metrics.ssim(obs[0].true_images[0], res.images[0]) > 0.95
  # Earlier restarts ran to their own end without converging; later ones left.
  earlier, later = res.restart_status[: res.restart], res.restart_status[res.restart + 1 :]
  assert set(earlier) <= {"max_iterations", "stalled", "failed"}
  assert later and set(later) <= {"superseded", None, "converged"}
  assert None in later or "superseded" in later


def test_results_do_not_depend_on_slots_or_lanes(digits):
  """Same seeds on 2 slots in one lane, 8 slots in 2 lanes, 6 slots in 3 lanes (threads
  racing for one queue): the same winning restart and the same reconstruction."""
  model, obs = digits
  runs = [
    run_attacks(
      model,
      obs[:4],
      config=runner.AttackConfig(
        iterations=300, seed=5, restarts=3, slots=slots, lanes=lanes, check_every=10
      ),
    )
    for slots, lanes in ((2, 1), (8, 2), (6, 3))
  ]
  statuses = {s for r in runs[0] for s in r.restart_status}
  assert "converged" in statuses and statuses - {"converged", "superseded", None}
  assert [r.batch_size for r in runs[1]] == [4] * 4 and [r.batch_size for r in runs[2]] == [2] * 4
  for other in runs[1:]:
    for a, b in zip(runs[0], other):
      assert (a.restart, a.status, a.iterations) == (b.restart, b.status, b.iterations)
      np.testing.assert_array_equal(a.raw_images, b.raw_images)


def test_lane_layout_keeps_two_slots_per_lane():
  layout = lambda slots, lanes, jobs: schedule.lane_layout(  # noqa: E731
    runner.AttackConfig(slots=slots, lanes=lanes), jobs
  )
  assert layout(8, 2, 32) == (2, 4)
  assert layout(8, 4, 32) == (4, 2)
  assert layout(8, 8, 32) == (4, 2)  # never fewer than 2 slots per lane
  assert layout(8, 2, 3) == (2, 2)
  assert layout(8, 2, 2) == (1, 2) and layout(8, 2, 1) == (1, 2)
  assert layout(1, 2, 5) == (1, 1)  # one slot only where asked
  with pytest.raises(ValueError, match="lanes=0"):
    runner.AttackConfig(lanes=0)


def test_tensorboard_hook_writes_progress(digits, tmp_path):
  model, obs = digits
  hook = summaries.TensorBoardHook(str(tmp_path), image_every=2)
  run_attacks(model, obs[:2], config=runner.AttackConfig(iterations=60, check_every=20), hook=hook)
  hook.close()
  tags = set()
  for path in glob.glob(str(tmp_path / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  for i in range(2):
    assert {f"attack_{i}/distance", f"attack_{i}/ssim", f"attack_{i}/reconstruction"} <= tags, tags
