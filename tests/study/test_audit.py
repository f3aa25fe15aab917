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

OPTIONS = dict(gallery_size=150, defenses=(("masking", 0.9),), recon_iterations=5)


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
  opts = dict(OPTIONS, attacks=("gallery_match",))
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
