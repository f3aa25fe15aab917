"""Privacy-utility frontier: rates are k/n with exact intervals, costs paired by seed, the
CSV round-trips, the figure has one line per defence, the equal-protection verdicts."""

import csv
import dataclasses
import os

import numpy as np
import pytest

from tf_dlg import defenses
from tf_dlg.analysis import identification, intervals
from tf_dlg.study import convergence, frontier

SEEDS = (0, 1)
ROUNDS = 3


# Made-up costs per setting (in 64ths: exact in the float32 of a history file).
_STEPS = {None: 0, 0.01: 1, 0.9: 3, 0.3: 2, 0.99: 5, 1.0: 7}


def _cost_of(param, seed):
  """The made-up training's cost of a setting for a seed (0 undefended)."""
  return _STEPS[param] * (1 + seed) / 64


@pytest.fixture
def fake_training(monkeypatch):
  """TFF training replaced by made-up rounds whose cost is `_cost_of(param, seed)`."""
  from tf_dlg.federated import simulation

  runs = []

  def fake_run(config, out_dir, dataset=None, fedavg=None, progress=True):
    del dataset, fedavg, progress
    runs.append((config.defense, config.defense_param, config.seed))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, simulation.HISTORY_NAME), "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=simulation.HISTORY_FIELDS)
      w.writeheader()
      for r in range(1, config.rounds + 1):
        acc = 0.5 + r / 8 + config.seed / 16 - _cost_of(config.defense_param, config.seed)
        w.writerow(
          dict(
            round=r, train_loss=1, train_accuracy=0.5, seconds=0.1, test_loss=1, test_accuracy=acc
          )
        )

  monkeypatch.setattr(simulation, "build_for_config", lambda config, dataset: object())
  monkeypatch.setattr(simulation, "run_simulation", fake_run)
  return runs


TINY = dict(
  dataset="digits",
  # Both attacked by masked_ig: one attack to trace keeps the test short.
  defenses=("masking", "pruning"),
  grids={"masking": (0.01, 0.9), "pruning": (0.3, 0.99)},
  dp_multipliers=(),
  num_images=2,
  iterations=40,
  seeds=SEEDS,
  rounds=ROUNDS,
  num_clients=2,
  train_examples=40,
  test_examples=20,
)


def _hits(search, point):
  """Per image: whether any of the point's attackers identified it (from the run log)."""
  recs = [
    search.evaluate_images(point.dataset, a, point.defense, [(i, point.param) for i in range(2)])
    for a in point.attackers.split("+")
  ]
  return [any(r[i]["top1"] for r in recs) for i in range(2)]


def test_tiny_frontier_end_to_end(tmp_path, fake_training):
  points = frontier.run_frontier(str(tmp_path), progress=False, **TINY)
  assert [p.label for p in points] == [
    "masking@0.01",
    "masking@0.9",
    "pruning@0.3",
    "pruning@0.99",
  ]
  # Identification: any strongest attacker's top-1 hit counts; k/n with its exact interval.
  fr = frontier.Frontier(str(tmp_path), frontier.FrontierSettings(**TINY), progress=False)
  for p in points:
    assert p.attackers == "+".join(defenses.spec(p.defense).strongest_attackers)
    hits = _hits(fr.search, p)
    iv = identification.identification_rate(np.array(hits))
    assert p.identified == sum(hits) and p.num_images == 2
    assert p.top1 == p.identified / p.num_images
    assert (p.top1_low, p.top1_high) == pytest.approx((iv.low, iv.high))
  assert fr.search.attack_calls == []  # every point came from the run log
  # Costs: the made-up training's, paired by seed, beside the undefended baseline.
  base = [0.5 + (ROUNDS - 1) / 8 + s / 16 for s in SEEDS]
  for p in points:
    # convergence.csv keeps each seed's final accuracy to 4 decimals.
    defended = [round(b - _cost_of(p.param, s), 4) for b, s in zip(base, SEEDS)]
    expected = intervals.paired_difference([round(b, 4) for b in base], defended)
    assert (p.cost, p.cost_low, p.cost_high) == pytest.approx(
      (expected.estimate, expected.low, expected.high)
    )
    assert p.baseline_accuracy == pytest.approx(sum(base) / 2)
    assert p.final_accuracy == pytest.approx(p.baseline_accuracy - p.cost, abs=1e-4)
    assert p.seeds == "0 1" and p.rounds == ROUNDS
    assert p.epsilon is None and p.delta is None
  # Outputs: the CSV reads back to the same records; the table and the figure exist.
  assert frontier.read_frontier(str(tmp_path / "frontier.csv")) == points
  table = (tmp_path / "frontier.md").read_text()
  assert f"| masking | rate 0.01 | masked_ig | {points[0].top1:.2f} " in table
  assert f"({points[3].identified}/2)" in table
  assert (tmp_path / "figures" / "frontier.png").stat().st_size > 5000
  # A rerun trains and attacks nothing new.
  trained = len(fake_training)
  assert trained == 5 * len(SEEDS)  # none + 4 settings
  assert frontier.run_frontier(str(tmp_path), progress=False, **TINY) == points
  assert len(fake_training) == trained


def test_figure_draws_one_line_per_defence(tmp_path):
  from tf_dlg.analysis import frontier_figure

  pts = [
    _point("masking", 0.1, 1.0, 0.01),
    _point("masking", 0.9, 0.0, 0.05),
    _point("pruning", 0.9, 0.5, 0.02),
    _point("dp", 1.0, 0.0, 0.2, epsilon=25.0),
  ]
  drawn = frontier_figure.plot_frontier(pts, str(tmp_path / "f.png"))
  assert (tmp_path / "f.png").exists()
  assert drawn == {
    "masking": [(1.0, 1.0), (5.0, 0.0)],
    "pruning": [(2.0, 0.5)],
    "DP (noise multiplier)": [(20.0, 0.0)],
  }


def _point(defense, param, top1, cost, high=None, width=0.01, epsilon=None, n=8):
  """A synthetic point: `top1` of n images identified (upper bound `high`), cost +- width."""
  k = round(top1 * n)
  iv = identification.identification_rate(np.arange(n) < k)
  return frontier.FrontierPoint(
    defense=defense,
    label=frontier.label(defense, param),
    param=param,
    unit="u",
    attackers="ig",
    dataset="mnist",
    num_images=n,
    identified=k,
    top1=iv.estimate,
    top1_low=iv.low,
    top1_high=iv.high if high is None else high,
    undefended_identified=n,
    seeds="0 1 2",
    rounds=15,
    final_accuracy=0.97 - cost,
    final_low=0.96 - cost,
    final_high=0.98 - cost,
    cost=cost,
    cost_low=cost - width,
    cost_high=cost + width,
    baseline_accuracy=0.97,
    baseline_low=0.96,
    baseline_high=0.98,
    epsilon=epsilon,
    delta=None if epsilon is None else 1e-5,
  )


def test_equal_protection_verdicts():
  # 0/8 identified protects (upper bound 0.37); 2/8 does not.
  cheap_leaky = _point("masking", 0.1, 0.25, 0.0)
  masking = _point("masking", 0.99, 0.0, 0.05)
  pruning = _point("pruning", 0.99, 0.0, 0.20)
  dp = _point("dp", 1.0, 0.0, 0.40, epsilon=25.0)
  assert cheap_leaky.top1 > 0.0 == masking.top1
  cheapest, vs_dp, evidence = frontier.equal_protection([cheap_leaky, masking, pruning, dp])
  assert (cheapest, vs_dp) == ("masking", "masking, pruning beat DP")
  assert len(evidence) == 3 and "epsilon 25" in evidence[-1]
  # Overlapping cost intervals: neither a cheapest defence nor a DP verdict.
  close = _point("pruning", 0.99, 0.0, 0.06, width=0.02)
  near_dp = _point("dp", 1.0, 0.0, 0.07, width=0.03, epsilon=25.0)
  assert frontier.equal_protection([masking, close, near_dp])[:2] == (
    "inconclusive",
    "inconclusive",
  )
  # DP wholly cheaper; no DP point protecting; nothing protecting at a stricter level.
  cheap_dp = _point("dp", 3.0, 0.0, 0.0, width=0.005, epsilon=6.0)
  assert frontier.equal_protection([masking, cheap_dp])[1] == "DP costs less"
  assert frontier.equal_protection([masking])[1] == "no DP point protects"
  assert frontier.equal_protection([cheap_leaky], 0.0)[:2] == (
    "none protects",
    "nothing protects",
  )
  # A looser level lets 2/8 identified count as protected.
  assert frontier.equal_protection([cheap_leaky], 0.25)[0] == "masking"
  assert frontier.equal_protection([cheap_leaky, dp])[:2] == (
    "none protects",
    "only DP protects",
  )
  row = frontier.claims_row([masking, pruning, dp])
  assert (
    len(row) == 4
    and "<= 0 of the attacked" in row[0]
    and row[3].startswith("cheapest: masking; vs DP:")
  )


def test_csv_round_trip_and_damaged_cells(tmp_path):
  pts = [_point("masking", 0.99, 0.0, 0.05), _point("dp", 0.5, 0.125, 0.3, epsilon=65.4)]
  path = str(tmp_path / "frontier.csv")
  frontier.write_frontier(path, pts)
  assert frontier.read_frontier(path) == pts
  text = open(path).read().splitlines()
  text[2] = text[2].replace(",0.3,", ",0.3x,", 1)
  (tmp_path / "bad.csv").write_text("\n".join(text) + "\n")
  with pytest.raises(ValueError, match=r"bad.csv, line 3, column 'cost'"):
    frontier.read_frontier(str(tmp_path / "bad.csv"))
  (tmp_path / "other.csv").write_text("a,b\n1,2\n")
  with pytest.raises(ValueError, match="not a frontier.csv"):
    frontier.read_frontier(str(tmp_path / "other.csv"))


@pytest.mark.parametrize(
  "parts, match",
  [
    (dict(grids={"masking": (0.5, 1.5)}), r"masking rate"),
    (dict(grids={"pruning": (0.5,)}, defenses=("masking",)), "not in defenses"),
    (dict(defenses=("clipping_median",)), "defenses"),
    (dict(seeds=(0,)), "at least 2 distinct"),
    (dict(dp_multipliers=(0.0,)), "dp_multipliers"),
    (dict(defenses=(), dp_multipliers=()), "nothing to measure"),
    (dict(rounds=0), "rounds"),
    (dict(batch_size=0), "batch_size"),
    (dict(grids={"masking": (0.5, 0.5)}, defenses=("masking",)), "settings repeat"),
    (dict(defenses=("masking", "dp")), "dp_multipliers"),
    (dict(image_count=3), "unknown frontier settings"),
  ],
)
def test_bad_settings_fail_before_any_work(tmp_path, parts, match, fake_training):
  with pytest.raises(ValueError, match=match):
    frontier.run_frontier(str(tmp_path), progress=False, **parts)
  assert fake_training == [] and not os.listdir(tmp_path)


def test_spec_grids_run_from_leaking_to_strongest():
  for name in defenses.PAPER_DEFENSES + ("dp",):
    spec = defenses.spec(name)
    grid = spec.frontier
    assert (3 if name == "dp" else 4) <= len(grid) <= 6, name
    step = [b - a for a, b in zip(grid, grid[1:])]
    assert (
      all(s > 0 for s in step) if spec.search.stronger == "higher" else all(s < 0 for s in step)
    )
  # Masking and pruning reach what masked cosine matching needs; clipping its strongest.
  assert defenses.spec("masking").frontier[-1] >= 0.99
  assert defenses.spec("pruning").frontier[-1] >= 0.99
  assert defenses.spec("clipping_ratio").frontier[-1] == defenses.spec("clipping_ratio").search.low
  with pytest.raises(ValueError, match=r"frontier settings \[2.0\] lie outside"):
    dataclasses.replace(defenses.spec("masking"), frontier=(0.5, 2.0))


def test_dp_point_carries_its_epsilon(tmp_path):
  """The worst-case epsilon of the attacked client's own noised update, every round."""
  st = frontier.FrontierSettings(
    dataset="digits", defenses=(), dp_multipliers=(2.0,), rounds=7, num_clients=5, delta=1e-6
  )
  fr = frontier.Frontier(str(tmp_path), st, progress=False)
  iv = identification.identification_rate(np.array([True, False, False]))
  row = dict(seeds="0 1", rounds=7, final_test_accuracy=0.5, final_low=0.4, final_high=0.6)
  rows = {
    "dp@2": dict(row, cost=0.3, cost_low=0.2, cost_high=0.4),
    "none": dict(row, final_test_accuracy=0.8),
  }
  p = fr._point("dp", 2.0, {("dp", 2.0): iv, ("dp", None): iv}, rows)
  assert p.epsilon == pytest.approx(defenses.dp_fedavg_epsilon(2.0, 5, 5, 7, 1e-6))
  assert (p.delta, p.identified, p.num_images, p.attackers) == (1e-6, 1, 3, "ig+idlg")
  assert (p.cost, p.baseline_accuracy, p.unit) == (0.3, 0.8, "noise_multiplier")


def test_convergence_labels_are_per_setting():
  assert frontier.label("masking", 0.99) == "masking@0.99"
  assert convergence.defense_of(frontier.label("clipping_ratio", 1e-4)) == "clipping_ratio"


@pytest.mark.slow
def test_tiny_frontier_with_real_training(tmp_path):
  """Real TFF rounds (1 round, 2 clients, 40 images) and real attacks."""
  parts = dict(
    TINY, defenses=("masking",), grids={"masking": (0.01, 0.9)}, dp_multipliers=(1.0,), rounds=1
  )
  points = frontier.run_frontier(str(tmp_path), progress=False, **parts)
  assert [p.label for p in points] == ["masking@0.01", "masking@0.9", "dp@1"]
  for p in points:
    assert 0 <= p.final_accuracy <= 1 and p.final_low <= p.final_accuracy <= p.final_high
  assert points[-1].epsilon == pytest.approx(defenses.dp_fedavg_epsilon(1.0, 2, 2, 1, 1e-5))
  assert frontier.read_frontier(str(tmp_path / "frontier.csv")) == points
