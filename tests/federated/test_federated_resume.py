"""Resuming a federated run: never past the rounds asked for, damaged files named, stats kept.

A run folder that already holds more rounds than `rounds` is refused before any
training (the checkpoint cannot undo rounds, and reporting them would break "rounds =
what ran"); a damaged history names the file, line and column and advises what exists.
"""

import dataclasses
import os

import pytest

from tf_dlg.federated import simulation as sim


def _run(config, out, digits, fedavg):
  return sim.run_simulation(config, str(out), dataset=digits, fedavg=fedavg, progress=False)


def test_resume_with_fewer_rounds_is_refused_and_equal_rounds_is_a_no_op(
  sim_config, mean_fedavg, digits, tmp_path
):
  two = dataclasses.replace(sim_config, rounds=2)
  first = _run(two, tmp_path, digits, mean_fedavg)
  assert [h["round"] for h in first.history] == [1, 2]
  # No defence: its statistics are empty in the history, not zeros.
  assert all(h["zero_fraction"] is None and h["clipped_fraction"] is None for h in first.history)
  hist = tmp_path / sim.HISTORY_NAME
  text = hist.read_text()
  assert text.splitlines()[0] == ",".join(sim.HISTORY_FIELDS)
  with pytest.raises(
    sim.CheckpointError,
    match=r"already holds 2 rounds, more than federated\.rounds=1; use federated\.rounds in "
    r"\[2, inf\]",
  ):
    _run(dataclasses.replace(sim_config, rounds=1), tmp_path, digits, mean_fedavg)
  assert hist.read_text() == text  # refused before anything was rewritten
  again = _run(two, tmp_path, digits, mean_fedavg)
  assert again.resumed_from == 2 and again.history == first.history


def test_damaged_history_names_the_cell_and_advises_only_what_exists(
  sim_config, mean_fedavg, digits, tmp_path
):
  header = ",".join(sim.HISTORY_FIELDS)
  (tmp_path / sim.HISTORY_NAME).write_text(f"{header}\n1,0.5,0.5,x,0.5,1.0,,\n")
  with pytest.raises(sim.CheckpointError) as info:
    _run(dataclasses.replace(sim_config, rounds=1), tmp_path, digits, mean_fedavg)
  message = str(info.value)
  assert "line 2, column 'test_loss': 'x' is not a number" in message
  assert "--overwrite" not in message and "another --output_dir" in message
  assert not os.path.exists(tmp_path / sim.CHECKPOINT_NAME)
