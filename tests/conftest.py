"""Shared pytest set-up: quiet TensorFlow, shared fixtures, no TFF orphans.

Fixtures for every test module:
- `digits`: the offline `digits` `ImageDataset` (real 8x8 digits at 28x28), loaded once.
- `sim_config`: a 10-client, 3-round IID `FederatedConfig` on `digits` (mean FedAvg).
- `mean_fedavg`: the `FedAvg` of `sim_config`, built once for every federated test.
- `tiny_bn_model`: a function `(input_shape, num_classes, seed=0) -> tf.keras.Model`, a
  one-conv BatchNorm model small enough for TFF rounds in a second or two.
- `install_fake_attack`: replaces `runner.run_attacks` by an attacker whose outcome the
  test decides (threshold-search tests check bookkeeping in seconds).
"""

import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

# Modules that need the pinned TFF stack (the `tff` extra: TFF, tensorflow-privacy,
# dp-accounting, tensorflow-datasets, or the paper's drivers that use them). Without TFF
# -- the current-Keras core environment of bazel_free_scripts/setup_core.sh -- they are
# not collected (the run's header lists them); every other module runs in both.
TFF_STACK_TESTS = [
  "test_convergence.py",  # drivers: TFF simulations, tfds MNIST
  "test_data.py",  # tensorflow-datasets
  "test_defense_spec.py",  # TFF rounds
  "test_defenses.py",  # the dp defence's cases: tensorflow-privacy, dp-accounting
  "test_dp_accounting.py",
  "test_fail_closed_worker.py",
  "test_federated*.py",
  "test_frontier.py",  # TFF training, tensorflow-privacy (the dp defence)
  "test_kill_resume.py",  # drivers, federated ones included
  "test_readme.py",  # the README's driver commands, federated ones included
  "test_report_numbers.py",  # experiments.reproduce: tfds MNIST
  "test_probe_one_seed_pipeline.py",  # a whole pipeline: TFF training
  "test_reproduce.py",  # the paper's pipeline: TFF, tfds
  "test_runtime.py",
  "test_sweep.py",  # TFF training and capture
  "test_audit.py",  # the client's TFF optimizer
  "test_threshold_search.py",  # tfds MNIST
]
# The Flower client mod's tests need the `flower` extra (installed in the core environment).
FLOWER_TESTS = ["test_flower.py"]
# Patterns are matched (fnmatch) against full paths below this folder: "*/" finds the
# file in any of the package folders (tests/defenses/, tests/study/, ...).
collect_ignore_glob = [
  pattern
  for name in (TFF_STACK_TESTS if importlib.util.find_spec("tensorflow_federated") is None else [])
  + (FLOWER_TESTS if importlib.util.find_spec("flwr") is None else [])
  for pattern in (name, "*/" + name)
]


def pytest_report_header(config):
  if collect_ignore_glob:
    return "not collected in this environment: " + ", ".join(collect_ignore_glob)
  return None


@pytest.fixture(scope="session", autouse=True)
def _stop_tff_workers_at_end():
  yield
  from tf_dlg.execution import runtime

  runtime.stop_tff_workers()


@pytest.fixture(scope="session")
def digits():
  from tf_dlg import data

  return data.load_dataset("digits")


@pytest.fixture(scope="session")
def sim_config():
  from tf_dlg.federated.config import FederatedConfig

  return FederatedConfig(dataset="digits", num_clients=10, rounds=3, aggregator="mean", seed=0)


@pytest.fixture(scope="session")
def mean_fedavg(sim_config, digits):
  from tf_dlg.federated import simulation

  return simulation.build_for_config(sim_config, digits)


def _tiny_bn_model(input_shape, num_classes, seed=0):
  import tensorflow as tf

  init = tf.keras.initializers.GlorotUniform(seed=seed)
  inputs = tf.keras.Input(input_shape)
  h = tf.keras.layers.Conv2D(4, 3, strides=2, use_bias=False, kernel_initializer=init)(inputs)
  h = tf.keras.layers.BatchNormalization()(h)
  h = tf.keras.layers.ReLU()(h)
  h = tf.keras.layers.GlobalAveragePooling2D()(h)
  dense_init = tf.keras.initializers.GlorotUniform(seed=seed + 1)
  return tf.keras.Model(
    inputs, tf.keras.layers.Dense(num_classes, kernel_initializer=dense_init)(h)
  )


@pytest.fixture(scope="session")
def tiny_bn_model():
  return _tiny_bn_model


@pytest.fixture
def no_child_trainer(monkeypatch):
  """Training patched into this process (made-up TFF runs) cannot reach a child process:
  grids fixed in advance (`beside.training`) train here alone."""
  import contextlib

  from tf_dlg.study import beside

  @contextlib.contextmanager
  def here_alone(grid, enabled=True):
    del grid, enabled
    yield None

  monkeypatch.setattr(beside, "training", here_alone)


@pytest.fixture
def install_fake_attack(monkeypatch):
  """A function `install(images_of)` that replaces `runner.run_attacks` (and the gallery
  matcher, `_fake_matcher`) by a fake.

  `images_of(observed, k, attack)` gives the reconstruction of one `ObservedUpdate`, image
  k of the sample (its seed modulo 100_003: the threshold searches seed image k so); the
  fake converges where that is the true image. `install` returns the list of the
  `AttackConfig`s the fake is called with, one per call.
  """
  import numpy as np

  from tf_dlg.attacks import gallery, runner

  def install(images_of):
    calls = []

    def run_attacks(model, observed, config=None, **kwargs):
      config = runner.AttackConfig() if config is None else config
      calls.append(config)
      out = []
      for o, seed in zip(observed, config.seeds(len(observed))):
        img = np.asarray(images_of(o, seed % 100_003, config.attack))
        leak = np.array_equal(img, o.true_images)
        out.append(
          runner.AttackResult(
            attack=config.attack,
            images=img.astype(np.float32),
            raw_images=img,
            labels=o.true_labels,
            status="converged" if leak else "max_iterations",
            distance=0.0,
            iterations=5,
            seconds=0.0,
            batch_size=len(observed),
            seed=seed,
            observed=o,
          )
        )
      return out

    monkeypatch.setattr(runner, "run_attacks", run_attacks)
    monkeypatch.setattr(gallery, "match_gallery", _fake_matcher(images_of))
    return calls

  return install


def _fake_matcher(images_of):
  """The gallery matcher's fake: names the original (rank 1) where `images_of` gives the
  true image for attack `gallery_match`, else the next gallery image (rank N)."""
  import numpy as np

  from tf_dlg.attacks import gallery

  def match_gallery(model, observed, images, labels, members, **kwargs):
    out = []
    for o, m in zip(observed, members):
      img = np.asarray(images_of(o, int(o.metadata["image"]), "gallery_match"))
      hit = np.array_equal(img, o.true_images)
      index = int(m[0])
      pick = index if hit else (index + 1) % len(images)
      out.append(
        gallery.MatchResult(
          members=np.asarray(m),
          ranks=np.array([1 if hit else len(images)]),
          member_scores=np.array([1.0 if hit else 0.0]),
          pick=pick,
          pick_score=1.0,
          pick_label=int(labels[pick]),
          non_members=len(images) - 1,
        )
      )
    return out

  return match_gallery
