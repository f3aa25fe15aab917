"""The threat-model sweep: settings refused before work, a tiny run end to end, its resume.

The tiny run trains FedAvg in TFF on `digits` for one round (two clients) and attacks the
updates TFF's client work sends. Expected values do not come from the sweep's code: the
captured update is compared with the attacker's independent simulation of one Adam step,
columns with the issue's list, and a resumed run must not call the attack again.
"""

import csv
import os

import numpy as np
import pytest

from tf_dlg.study import presets, results, sweep, sweep_case, sweep_report, sweep_settings

# The sweep preset: the quick preset's training attacked (what a sweep's settings default to).
SWEEP = presets.PRESETS["sweep"]
TINY = SWEEP.override(
  datasets=("digits",),
  sweep_trained_datasets=("digits",),
  sweep_rounds=(0, 1),
  rounds=1,
  train_examples=64,
  test_examples=32,
  num_clients=2,
  sweep_batch_sizes=(1, 4),
  sweep_local_work=("step", "epoch"),
  sweep_epoch_examples=4,
  sweep_gallery=200,
  sweep_defenses=(("masking", 0.9), ("noising_ratio", 10.0)),
  sweep_recon_max_batch=1,
  sweep_min_images=4,
  sweep_recon_iterations=5,
  sweep_chunk=100,
)


@pytest.mark.parametrize(
  "field, value, names",
  [
    ("sweep_batch_sizes", (0, 4), "batch_sizes"),
    ("sweep_rounds", (0, 20), "rounds=20"),
    ("datasets", ("mnist", "nope"), "datasets"),
    ("sweep_local_work", ("step", "week"), "local_work"),
    ("sweep_attacks", ("gallery_match", "dlg"), "attacks"),
    ("sweep_defenses", (("masking", 1.5),), "masking"),
    ("sweep_defenses", (("none", None),), "undefended"),
    ("sweep_epoch_examples", 10_000, "epoch_examples"),
    ("sweep_gallery", 1, "study.sweep_gallery=1"),
    ("sweep_trained_datasets", ("digits",), "trained_datasets"),
    ("sweep_batch_sizes", (), "batch_sizes is empty"),
    ("rounds", 0, "study.rounds=0"),
  ],
)
def test_bad_settings_are_one_error_before_any_work(tmp_path, field, value, names):
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=names):
    sweep.Sweep(str(out), SWEEP.override(**{field: value}))
  assert not out.exists()


def test_a_dataset_that_cannot_train_is_refused_before_anything_is_written(tmp_path):
  out = tmp_path / "out"
  settings = SWEEP.override(
    datasets=("cifar10_sample",), sweep_trained_datasets=("cifar10_sample",)
  )
  with pytest.raises(
    ValueError, match="study.sweep_trained_datasets: 'cifar10_sample' has no test split"
  ):
    sweep.Sweep(str(out), settings).run()
  assert not os.listdir(out)  # the checked (empty) output folder, nothing in it


def test_default_settings_are_the_quick_training_at_the_frontier():
  from tf_dlg.study import defense_table, presets

  s = sweep_settings.check(SWEEP)
  quick = presets.PRESETS["quick"]
  assert (s.batch_size, s.client_lr, s.train_examples, s.num_clients, s.rounds) == (
    quick.batch_size,
    quick.client_lr,
    quick.train_examples,
    quick.num_clients,
    quick.rounds,
  )
  assert sweep_settings.share(s) == 600 and sweep_settings.epoch_size(s) == 600
  for name in list(defense_table.PAPER_DEFENSES) + ["dp"]:
    assert [p for d, p in s.sweep_defenses if d == name] == list(defense_table.row(name).frontier)


def test_cells_name_every_setting_that_cannot_run():
  s = sweep_settings.check(
    SWEEP.override(
      datasets=("mnist", "cifar10_sample"), sweep_rounds=(0, 5), sweep_batch_sizes=(4, 64)
    )
  )
  todo, skipped = sweep_case.cells(s, {"mnist": 600, "cifar10_sample": 10})
  assert {(c.dataset, c.round, c.batch, c.local_work) for c in todo if c.dataset != "mnist"} == {
    ("cifar10_sample", 0, 4, "step"),
    ("cifar10_sample", 0, 4, "epoch"),
  }
  assert len([c for c in todo if c.dataset == "mnist"]) == 2 * 2 * 2
  assert any("rounds [5] not run" in s for s in skipped)
  assert any("batch 64, step not run" in s for s in skipped)
  clients = {(c.dataset, c.batch): c.clients for c in todo if c.local_work == "step"}
  assert clients == {("mnist", 4): 4, ("mnist", 64): 1, ("cifar10_sample", 4): 2}
  epoch = [c for c in todo if c.dataset == "mnist" and c.local_work == "epoch" and c.batch == 64]
  assert epoch[0].num_images == 600 and epoch[0].local_steps == 10  # ceil(600 / 64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sweep"))
  settings = TINY
  paths = sweep.Sweep(out, settings, progress=False).run()
  with open(paths["csv"], newline="") as f:
    rows = list(csv.DictReader(f))
  return out, settings, paths, rows


def test_tiny_sweep_writes_the_columns_figure_and_report(tiny):
  out, settings, paths, rows = tiny
  with open(paths["csv"], newline="") as f:
    header = next(csv.reader(f))
  for column in (
    "batch",
    "local_steps",
    "round",
    "attack",
    "defense",
    "param",
    "identified",
    "num_images",
    "low",
    "high",
    "label_accuracy",
    "seconds",
    "auc",
    "tpr",
    "gallery_size",
  ):
    assert column in header
  # 2 rounds x (2 step + 2 epoch cells) x 3 settings of gallery matching, and the three
  # reconstructions (bn_cnn has BatchNorm: the prior's too) of the undefended batch-1
  # step cell at each round.
  assert len([r for r in rows if r["attack"] == "gallery_match"]) == 2 * 4 * 3
  recon = [r["attack"] for r in rows if r["attack"] != "gallery_match"]
  assert sorted(set(recon)) == ["cosine_tv", "cosine_tv_direction", "cosine_tv_direction_bn"]
  assert len(recon) == 2 * 3
  for r in rows:
    assert 0.0 <= float(r["test_accuracy"]) <= 1.0  # round 0's untrained model included
    assert int(r["gallery_size"]) == 200
    assert 0 <= int(r["identified"]) <= int(r["num_images"])
    assert float(r["low"]) <= int(r["identified"]) / int(r["num_images"]) <= float(r["high"])
  epoch = [r for r in rows if r["local_work"] == "epoch" and r["batch"] == "1"]
  assert {r["num_images"] for r in epoch} == {"4"} and {r["local_steps"] for r in epoch} == {"4"}
  assert os.path.getsize(paths["figure"]) > 10_000
  with open(paths["report"], encoding="utf-8") as f:
    text = f.read()
  assert "gallery_match" in text and "digits" in text


def test_batch_one_step_undefended_is_identified_by_the_exact_simulation(tiny):
  """The attacker's single-image Adam step is the client's own update at batch 1, so the
  original ranks first (a mismatch with TFF's client work would break this)."""
  _, _, _, rows = tiny
  hits = [
    r
    for r in rows
    if r["batch"] == "1" and r["local_work"] == "step" and r["defense"] == "none"
    if r["attack"] == "gallery_match"
  ]
  # 4 clients' single images per round (min_images), every one named.
  assert len(hits) == 2 and all(r["identified"] == r["num_images"] == "4" for r in hits)
  assert all(float(r["label_accuracy"]) == 1.0 for r in hits)


def test_captured_update_equals_the_simulated_adam_step(digits):
  """What TFF's client work sends for one image is the attacker's simulated step."""
  import tensorflow as tf

  from tf_dlg import models
  from tf_dlg.attacks import functional
  from tf_dlg.execution import runtime
  from tf_dlg.federated import fedavg, local_training, simulation

  s = sweep_settings.check(TINY)
  config = sweep_settings.training_config(s, "digits", 1)
  runtime.install_context()
  fa = simulation.build_for_config(config, digits)
  state = fa.initialize()
  x, y = digits.x_train[3:4], digits.y_train[3:4].astype(np.int64)
  update = sweep_case.capture_update(fa, state, x, y, 1, seed=0)
  model = models.build_model("bn_cnn", digits.input_shape, digits.num_classes, seed=0)
  fa.assign_to_keras(fa.process.get_model_weights(state), model)
  model = local_training.attack_model(model)
  fmodel = functional.BatchedModel(model)
  w = [tf.constant(v)[None] for v in fmodel.trainable_weights_from(model.get_weights())]
  sim = local_training.local_update(
    fmodel,
    w,
    tf.constant(x[None]),
    tf.one_hot(y[None], 10),
    1,
    1,
    fedavg.build_optimizer("adam", s.client_lr),
  )
  for got, want in zip(update[: fa.num_trainable], sim):
    np.testing.assert_allclose(got, want[0].numpy(), atol=2e-5)


def test_rerun_resumes_without_attacking_and_refuses_other_settings(tiny, monkeypatch):
  out, settings, paths, rows = tiny

  def refuse(*args, **kwargs):
    raise AssertionError("a finished sweep attacked again")

  monkeypatch.setattr(sweep_case, "capture_update", refuse)
  monkeypatch.setattr(sweep_case, "train", refuse)
  again = sweep.Sweep(out, settings, progress=False).run()
  with open(again["csv"], newline="") as f:
    assert list(csv.DictReader(f)) == rows
  other = TINY.override(sweep_batch_sizes=(1,))
  with pytest.raises(results.ResultsFileError, match="different configuration"):
    sweep.Sweep(out, other, progress=False).run()


def test_the_sweep_preset_is_the_quick_training_attacked_at_rounds_0_5_and_last():
  from tf_dlg.study import presets

  s = sweep_settings.check(presets.PRESETS["sweep"])
  assert s.datasets == ("mnist", "cifar10_sample") and s.sweep_trained_datasets == ("mnist",)
  assert s.sweep_rounds == (0, 5, 15) and s.rounds == 15 and s.sweep_gallery == 10_000
  assert (s.batch_size, s.client_lr, s.train_examples, s.test_examples) == (64, 0.002, 6000, 2000)
  short = sweep_settings.check(presets.with_overrides("sweep", {"rounds": 3}))
  assert short.sweep_rounds == (0, 3) and short.rounds == 3
  longer = sweep_settings.check(presets.with_overrides("sweep", {"rounds": 20}))
  assert longer.sweep_rounds == (0, 5, 20)
  with pytest.raises(ValueError, match="study.rounds=0"):
    sweep_settings.check(presets.with_overrides("sweep", {"rounds": 0}))
  # test_examples None: the training subset's size.
  assert sweep_settings.check(SWEEP.override(test_examples=None)).test_examples == 6000


def test_the_sweep_fingerprint_keeps_its_stored_names_and_values():
  """What a sweep's rows.jsonl stores (a resumed sweep is refused if it differs): the
  names and values of the sweep preset's settings before they were `Preset` fields."""
  from tf_dlg.study import defense_table

  defended = [
    [n, float(p)]
    for n in list(defense_table.PAPER_DEFENSES) + ["dp"]
    for p in defense_table.row(n).frontier
  ]
  assert sweep_settings.fingerprint(sweep_settings.check(SWEEP)) == dict(
    datasets=("mnist", "cifar10_sample"),
    trained_datasets=("mnist",),
    batch_sizes=(1, 4, 16, 64),
    local_work=("step", "epoch"),
    rounds=(0, 5, 15),
    defenses=defended,
    attacks=("gallery_match", "cosine_tv", "cosine_tv_direction", "cosine_tv_direction_bn"),
    gallery_size=10_000,
    epoch_examples=None,
    max_simulated_steps=10,
    min_images=16,
    recon_max_batch=4,
    recon_iterations=300,
    recon_defended=False,
    tv_weight=1e-4,
    model="bn_cnn",
    training_rounds=15,
    train_examples=6000,
    test_examples=2000,
    num_clients=10,
    batch_size=64,
    local_epochs=1,
    client_optimizer="adam",
    client_lr=0.002,
    seed=0,
    case_digest="",
  )


def _row(defense, param, identified, n, high, auc=0.5):
  return dict(
    dataset="mnist",
    batch=64,
    local_work="epoch",
    local_steps=10,
    round=15,
    gallery_size=10_000,
    attack="gallery_match",
    defense=defense,
    param=param,
    identified=identified,
    num_images=n,
    low=0.0,
    high=high,
    auc=auc,
  )


def test_first_line_names_the_weakest_protecting_setting_and_what_is_inconclusive():
  """Controlled rows: 0/600 below the undefended 300/600 protects; 0/16 beside an
  undefended 1/16 (its upper bound 0.21 above 1/16) is inconclusive."""
  s = sweep_settings.check(
    SWEEP.override(
      sweep_defenses=(("masking", 0.5), ("masking", 0.9), ("pruning", 0.3), ("noising_ratio", 3.0))
    )
  )
  rows = [
    _row("none", None, 300, 600, 0.54),
    _row("masking", 0.5, 2, 600, 0.012),
    _row("masking", 0.9, 0, 600, 0.006, auc=0.61),
    _row("pruning", 0.3, 5, 600, 0.02),
    _row("noising_ratio", 3.0, 0, 600, 0.006),
  ]
  line = sweep_report.opening_line(rows, s)
  assert line.startswith("At the training's own client setting (mnist, batch 64, one epoch of 600")
  assert "gallery_match identifies 300/600" in line
  assert "masking 0.9 (0/600 identified, rate at most 0.01, membership AUC 0.61" in line
  assert "pruning: no frontier setting protects" in line and "noising_ratio 3 (0/600" in line
  weak = [_row("none", None, 1, 16, 0.30), _row("masking", 0.5, 0, 16, 0.21)]
  s16 = sweep_settings.check(SWEEP.override(sweep_defenses=(("masking", 0.5),)))
  assert "masking 0.5 (inconclusive: 0/16 identified" in sweep_report.opening_line(weak, s16)
  none = [_row("none", None, 0, 600, 0.006, auc=0.52), _row("masking", 0.5, 0, 600, 0.006)]
  assert "no image identified undefended" in sweep_report.opening_line(none, s16)


def test_later_rounds_continue_the_earlier_rounds_training(tmp_path):
  """Round 2's run starts from round 1's checkpoint: one training of 2 rounds, not 1 + 2."""
  from tf_dlg.execution import runtime
  from tf_dlg.federated import simulation

  settings = sweep_settings.check(TINY.override(sweep_rounds=(0, 1, 2), rounds=2))
  case = sweep_case.load_case(settings, "digits")
  runtime.install_context()
  states = sweep_case.train(settings, case, str(tmp_path), progress=False)
  assert sorted(states) == [0, 1, 2]
  for r in (1, 2):
    history = simulation.read_history(
      str(tmp_path / "training" / f"digits_round{r}" / "history.csv")
    )
    assert [h["round"] for h in history] == list(range(1, r + 1))
  one = simulation.read_history(str(tmp_path / "training" / "digits_round1" / "history.csv"))
  two = simulation.read_history(str(tmp_path / "training" / "digits_round2" / "history.csv"))
  assert two[0] == one[0]  # round 1 copied, not retrained


def test_a_cell_resumed_midway_redoes_only_its_missing_rows(tiny, tmp_path, monkeypatch):
  import json
  import shutil

  from tf_dlg.federated import local_training

  out, settings, _, rows = tiny
  copy = str(tmp_path / "copy")
  shutil.copytree(out, copy)
  path = os.path.join(copy, "rows.jsonl")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  # As if killed after round 1's gallery rows but before its reconstruction rows.
  kept = [lines[0]] + [
    line
    for line in lines[1:]
    if not (json.loads(line)["round"] == 1 and json.loads(line)["attack"] == "cosine_tv")
  ]
  assert len(kept) == len(lines) - 1
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(kept) + "\n")

  def refuse(*args, **kwargs):
    raise AssertionError("gallery rows already logged were recomputed")

  monkeypatch.setattr(local_training, "match_gallery", refuse)
  paths = sweep.Sweep(copy, settings, progress=False).run()
  with open(paths["csv"], newline="") as f:
    again = list(csv.DictReader(f))
  key = lambda r: (r["round"], r["batch"], r["local_work"], r["attack"], r["defense"], r["param"])  # noqa: E731
  assert sorted(map(key, again)) == sorted(map(key, rows))  # each row once, none missing


@pytest.mark.parametrize("model, expected", [("bn_cnn", True), ("lenet", False)])
def test_the_batchnorm_prior_attacks_only_models_with_batchnorm(tmp_path, model, expected):
  settings = TINY.override(model=model)
  run = sweep.Sweep(str(tmp_path), settings, progress=False)
  assert run.has_batchnorm is expected
  cell = sweep_case.Cell(dataset="digits", round=0, batch=1, local_work="step", num_images=1)
  assert ("cosine_tv_direction_bn" in run._runs(cell, "none")) is expected
