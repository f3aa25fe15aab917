"""The audit of a user's own Keras model (one not in `tf_dlg.models`), end to end and its
refusals. Expected values are properties the attack must meet whatever the code: at batch
1 and one local step the client's own image is the one candidate whose simulated update
is the observed one, so undefended gallery matching names it."""

import csv

import numpy as np
import pytest
import tensorflow as tf

from tf_dlg.federated.config import FederatedConfig
from tf_dlg.study import audit, results

# The leakage only: the cost training has its own test below.
OPTIONS = dict(
  sweep_gallery=150, sweep_defenses=(("masking", 0.9),), sweep_recon_iterations=5, cost_seeds=()
)


def _user_model(seed=0):
  init = tf.keras.initializers.GlorotUniform(seed=seed)
  return tf.keras.Sequential(
    [
      tf.keras.Input((28, 28, 1)),
      tf.keras.layers.Conv2D(4, 5, padding="same", activation="tanh", kernel_initializer=init),
      tf.keras.layers.AveragePooling2D(),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(10, kernel_initializer=init),
    ],
    name="users_net",
  )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("model") / "users_net.keras")
  _user_model().save(path)
  return path


def test_audit_of_a_saved_user_model_answers_on_its_first_line(saved, tmp_path):
  config = FederatedConfig(dataset="digits", batch_size=1, num_clients=600, client_lr=0.01)
  paths = audit.audit(saved, "digits", config, str(tmp_path), progress=False, **OPTIONS)
  with open(paths["csv"], newline="") as f:
    rows = list(csv.DictReader(f))
  step = [r for r in rows if r["local_work"] == "step" and r["defense"] == "none"]
  gallery = [r for r in step if r["attack"] == "gallery_match"]
  # Two clients' single images (each holds 2 of the 1,797 digits), both named.
  assert len(gallery) == 1 and gallery[0]["identified"] == gallery[0]["num_images"] == "2"
  epoch = [r for r in rows if r["local_work"] == "epoch"]
  assert {r["num_images"] for r in epoch} == {"2"}  # 1,797 digits / 600 clients
  assert {r["local_steps"] for r in epoch} == {"2"}
  with open(paths["report"], encoding="utf-8") as f:
    text = f.read()
  first = text.split("\n\n")[1]
  assert first.startswith("At your configuration (users_net, 600 clients, adam lr 0.01)")
  assert "gallery of 150" in first and "Audit of users_net" in text


def test_another_model_in_the_same_folder_is_refused(saved, tmp_path):
  config = FederatedConfig(dataset="digits", batch_size=2, num_clients=600)
  opts = dict(OPTIONS, sweep_attacks=("gallery_match",))
  audit.audit(saved, "digits", config, str(tmp_path), progress=False, **opts)
  with pytest.raises(results.ResultsFileError, match="case_digest"):
    audit.audit(
      lambda: _user_model(seed=1), "digits", config, str(tmp_path), progress=False, **opts
    )


def test_bad_inputs_are_one_error_before_work(saved, tmp_path):
  config = FederatedConfig(dataset="digits", batch_size=4)
  with pytest.raises(ValueError, match="local_epochs=2"):
    audit.Audit(str(tmp_path), saved, "digits", FederatedConfig(dataset="digits", local_epochs=2))
  with pytest.raises(ValueError, match="num_clients=1 must be >= 2"):
    audit.Audit(str(tmp_path), saved, "digits", FederatedConfig(dataset="digits", num_clients=1))
  with pytest.raises(ValueError, match="existing .keras file"):
    audit.Audit(str(tmp_path), str(tmp_path / "missing.h5"), "digits", config)
  x = np.zeros((20, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match=r"takes \(28, 28, 1\) images"):
    audit.Audit(str(tmp_path), saved, (x, np.zeros(20, np.int64)), config)
  with pytest.raises(ValueError, match="not supported"):
    layers = [tf.keras.layers.LayerNormalization(), tf.keras.layers.Flatten()]
    bad = tf.keras.Sequential([tf.keras.Input((28, 28, 1)), *layers, tf.keras.layers.Dense(10)])
    audit.Audit(str(tmp_path), bad, "digits", config)


def test_user_builder_gives_the_users_architecture_with_seeded_fresh_weights():
  # Unseeded initializers: the seed draws the start (seeded ones fix it whatever the seed).
  model = tf.keras.Sequential(
    [tf.keras.Input((28, 28, 1)), tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)]
  )
  trained = [w + 1.0 for w in model.get_weights()]
  model.set_weights(trained)
  build = audit.user_builder(model)
  a, b, c = (build((28, 28, 1), 10, seed=s) for s in (3, 3, 4))
  assert [type(x).__name__ for x in a.layers] == [type(x).__name__ for x in model.layers]
  assert [w.shape for w in a.get_weights()] == [w.shape for w in trained]
  assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
  assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])
  assert not np.array_equal(a.get_weights()[0], trained[0])  # fresh, not the given weights
  with pytest.raises(ValueError, match=r"takes \(28, 28, 1\) images and 10 classes"):
    build((32, 32, 3), 10)


def _row(defense, param, identified, local_work="epoch", batch=8):
  return dict(
    dataset="digits",
    round=0,
    batch=batch,
    local_work=local_work,
    defense=defense,
    param=param,
    identified=identified,
    num_images=16,
    attack="gallery_match",
    local_steps=2,
    gallery_size=150,
    low=0.0,
    high=0.2,
    auc=0.6,
  )


def test_costs_train_the_weakest_protecting_setting_of_the_users_model(saved, tmp_path):
  from tf_dlg import models
  from tf_dlg.study import sweep_report

  config = FederatedConfig(
    dataset="digits", batch_size=8, num_clients=10, rounds=2, client_lr=0.01, seed=0
  )
  defenses = (("masking", 0.5), ("masking", 0.9), ("pruning", 0.9))
  study = audit.Audit(
    str(tmp_path),
    saved,
    "digits",
    config,
    progress=False,
    **dict(OPTIONS, sweep_defenses=defenses, cost_seeds=(0, 1)),
  )
  # At the user's own cell (batch 8, one epoch): masking 0.5 leaks, 0.9 protects; pruning
  # 0.9 leaks; a one-step row (not the own cell) does not change the choice.
  rows = [
    _row("none", None, 5),
    _row("masking", 0.5, 1),
    _row("masking", 0.9, 0),
    _row("pruning", 0.9, 2),
    _row("masking", 0.9, 3, local_work="step"),
  ]
  assert sweep_report.protecting_settings(rows[:4], study.settings) == {
    "masking": 0.9,
    "pruning": None,
  }
  # Nothing identified undefended at the own cell: no setting is needed, nothing trained.
  assert study.train_costs([dict(r, identified=0) for r in rows]) is None
  assert not (tmp_path / "costs").exists()
  costs = study.train_costs(rows)
  assert set(costs) == {("masking", 0.9), ("none", None)}
  runs = tmp_path / "costs" / "runs"
  assert sorted(p.name for p in runs.iterdir()) == ["mean_iid_masking", "mean_iid_none"]
  with open(tmp_path / "costs" / "convergence.csv", newline="") as f:
    table = {r["label"]: r for r in csv.DictReader(f)}
  base, masked = costs[("none", None)], costs[("masking", 0.9)]
  assert base.baseline_accuracy == pytest.approx(float(table["none"]["final_test_accuracy"]))
  assert masked.cost == pytest.approx(float(table["masking"]["cost"]))
  assert masked.seeds == "0 1" and base.cost == 0.0
  # The trained model is the user's architecture (its checkpoint's shapes).
  ckpt = np.load(runs / "mean_iid_none" / "seed0" / "checkpoint.npz")
  shapes = sorted(tuple(ckpt[k].shape) for k in ckpt.files if ckpt[k].ndim == 4)
  assert shapes == [(5, 5, 1, 4)]
  assert f"user_{study.settings.case_digest}" in models.MODELS
  # The same audit again in this process (same model, same data): the runs resume and the
  # model, already registered under its digest, is not refused.
  again = audit.Audit(
    str(tmp_path),
    saved,
    "digits",
    config,
    progress=False,
    **dict(OPTIONS, sweep_defenses=defenses, cost_seeds=(0, 1)),
  )
  assert again.train_costs(rows) == costs
  line = sweep_report.opening_line(rows[:4], study.settings, costs, "your configuration")
  assert "masking 0.9" in line and "cost " in line and "pruning: no frontier setting" in line
