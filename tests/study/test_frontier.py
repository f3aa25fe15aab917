"""Privacy-utility frontier: rates are k/n with exact intervals, costs paired by seed, the
CSV round-trips, the figure has one line per defence, the equal-protection verdicts."""

import csv
import dataclasses
import math
import os

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from tf_dlg import defenses
from tf_dlg.analysis import identification
from tf_dlg.study import (
  defense_params,
  defense_table,
  frontier,
  frontier_points,
  frontier_report,
  matching,
  presets,
)

SEEDS = (0, 1)
ROUNDS = 3


# Made-up training: every round of seed s reaches 0.75 + s/16 undefended, minus the
# setting's cost STEPS[param] x (1 + s) / 16 (sixteenths: exact in float32 and in the
# 4 decimals of convergence.csv), so final accuracies do not depend on the rounds averaged.
_STEPS = {None: 0, 0.01: 1, 0.9: 3, 0.3: 2, 0.99: 0, 2.0: 2}


def _cost_of(param, seed):
  """The made-up training's cost of a setting for a seed (0 undefended)."""
  return _STEPS[param] * (1 + seed) / 16


def _accuracy(param, seed):
  return 0.75 + seed / 16 - _cost_of(param, seed)


@pytest.fixture
def fake_training(monkeypatch, no_child_trainer):
  """TFF training replaced by made-up rounds of accuracy `_accuracy(param, seed)`."""
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
        acc = _accuracy(config.defense_param, config.seed)
        w.writerow(
          dict(
            round=r, train_loss=1, train_accuracy=0.5, seconds=0.1, test_loss=1, test_accuracy=acc
          )
        )

  monkeypatch.setattr(simulation, "build_for_config", lambda config, dataset: object())
  monkeypatch.setattr(simulation, "run_simulation", fake_run)
  return runs


# A frontier reads a preset: the trained defences on the training dataset.
TINY = presets.Preset(
  convergence_dataset="digits",
  convergence_defenses=("masking", "pruning"),
  frontier_grids={"masking": (0.01, 0.9), "pruning": (0.3, 0.99)},
  dp_multipliers=(2.0,),
  frontier_images=3,
  iterations=40,
  restarts=1,
  seeds=len(SEEDS),  # SEEDS: seed 0 and the next
  rounds=ROUNDS,
  num_clients=2,
  train_examples=40,
  test_examples=20,
)
# The fake attacker's top-1 hits: {(attack, defence, setting): images it recovers exactly};
# every other image (and every image of an attacker not listed) gets back another attacked
# image, identified as that one.
HITS = {
  ("masked_ig", "none", None): {0, 1},
  ("masked_ig", "masking", 0.01): {0, 1},
  ("masked_ig", "masking", 0.9): set(),
  ("masked_ig", "pruning", 0.3): {1},
  ("masked_ig", "pruning", 0.99): set(),
  ("ig", "none", None): {0, 1, 2},
  ("idlg", "none", None): set(),
  ("ig", "dp", 2.0): {0},  # the two DP attackers find different images: 2 of 3 identified
  ("idlg", "dp", 2.0): {2},
}


def _known_hits_attacker(install_fake_attack, images):
  def reconstruction(o, k, attack):
    name, param = "none", None
    if o.defense is not None:
      name = o.defense["name"]
      param = round(float(o.defense[defenses.DEFENSES[name].param_name]), 6)
    if k in HITS.get((attack, name, param), ()):  # an attacker not listed finds none
      return o.true_images
    return images[(k + 1) % len(images)][None]

  return install_fake_attack(reconstruction)


def _clopper_pearson(k, n):
  """The exact 95 % interval from the beta quantiles (Clopper & Pearson 1934)."""
  low = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
  high = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
  return k / n, low, high


def _t_interval(values):
  """Mean and 95 % Student t interval of `values`, by hand."""
  x = np.asarray(values, np.float64)
  half = stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
  return x.mean(), x.mean() - half, x.mean() + half


def _dp_epsilon(z, clients, rounds, delta):
  """dp-accounting fed directly: every client every round (the attacker's local view),
  replace-one neighbours, sensitivity 2 x clip, so the Gaussian multiplier is z / 2."""
  accountant = dp_accounting.rdp.RdpAccountant(
    neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
  )
  event = dp_accounting.GaussianDpEvent(z / 2)
  accountant.compose(
    dp_accounting.SampledWithoutReplacementDpEvent(clients, clients, event), rounds
  )
  return accountant.get_epsilon(delta)


def test_tiny_frontier_end_to_end(tmp_path, fake_training, install_fake_attack):
  fr = frontier.Frontier(str(tmp_path), TINY, progress=False)
  images = fr.search.case("digits")[2]
  assert all(not np.array_equal(images[i], images[(i + 1) % 3]) for i in range(3))
  calls = _known_hits_attacker(install_fake_attack, images)
  points = frontier.run_frontier(str(tmp_path), TINY, progress=False)
  assert [p.label for p in points] == [
    "masking@0.01",
    "masking@0.9",
    "pruning@0.3",
    "pruning@0.99",
    "dp@2",
  ]
  # Identification: any strongest attacker's top-1 hit counts; k/n with the exact interval.
  want_hits = {"masking@0.01": 2, "masking@0.9": 0, "pruning@0.3": 1, "pruning@0.99": 0}
  want_hits["dp@2"] = 2
  for p in points:
    k = want_hits[p.label]
    assert (p.identified, p.num_images) == (k, 3), p.label
    assert (p.top1, p.top1_low, p.top1_high) == pytest.approx(_clopper_pearson(k, 3))
    # masked_ig finds 2 of 3 undefended; ig finds all 3 (idlg none).
    assert p.undefended_identified == (3 if p.defense == "dp" else 2), p.label
    assert p.attackers == "+".join(defense_table.row(p.defense).strongest_attackers)
  # Costs: per seed the made-up cost, paired by seed, beside the undefended baseline.
  base = [_accuracy(None, s) for s in SEEDS]
  for p in points:
    costs = [_cost_of(p.param, s) for s in SEEDS]
    assert (p.cost, p.cost_low, p.cost_high) == pytest.approx(_t_interval(costs), abs=1e-9)
    assert (p.baseline_accuracy, p.baseline_low, p.baseline_high) == pytest.approx(
      _t_interval(base), abs=1e-9
    )
    defended = [_accuracy(p.param, s) for s in SEEDS]
    assert (p.final_accuracy, p.final_low, p.final_high) == pytest.approx(
      _t_interval(defended), abs=1e-9
    )
    assert p.seeds == "0 1" and p.rounds == ROUNDS
  # Only the DP point carries an (epsilon, delta): 2 clients, both every round.
  assert [p.epsilon is None and p.delta is None for p in points] == [True] * 4 + [False]
  assert points[-1].epsilon == pytest.approx(_dp_epsilon(2.0, 2, ROUNDS, 1e-5), rel=1e-9)
  assert points[-1].delta == 1e-5
  # Outputs: the CSV reads back to the same records; the table and the figure exist.
  assert frontier_points.read_frontier(str(tmp_path / "frontier.csv")) == points
  table = (tmp_path / "frontier.md").read_text()
  assert "| masking | rate 0.01 | masked_ig+gallery_match | 0.67 " in table and "(2/3)" in table
  # Who identifies: the fake gallery matcher finds nothing, so every hit is a reconstruction's.
  for p in points:
    assert p.top1_gallery == 0.0 and p.top1_reconstruction == pytest.approx(p.top1), p.label
  assert "identified by reconstruction 2/3, gallery matching 0/3" in table
  assert (tmp_path / "figures" / "frontier.png").stat().st_size > 5000
  # A rerun trains and attacks nothing new.
  trained, attacked = len(fake_training), len(calls)
  assert trained == 6 * len(SEEDS)  # none + 5 settings
  assert frontier.run_frontier(str(tmp_path), TINY, progress=False) == points
  assert (len(fake_training), len(calls)) == (trained, attacked)


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
  return frontier_points.FrontierPoint(
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
  cheapest, vs_dp, evidence = frontier_report.equal_protection([cheap_leaky, masking, pruning, dp])
  assert (cheapest, vs_dp) == ("masking", "masking, pruning beat DP")
  assert len(evidence) == 3 and "epsilon 25" in evidence[-1]
  # Overlapping cost intervals: neither a cheapest defence nor a DP verdict.
  close = _point("pruning", 0.99, 0.0, 0.06, width=0.02)
  near_dp = _point("dp", 1.0, 0.0, 0.07, width=0.03, epsilon=25.0)
  assert frontier_report.equal_protection([masking, close, near_dp])[:2] == (
    "inconclusive",
    "inconclusive",
  )
  # DP wholly cheaper; no DP point protecting; nothing protecting at a stricter level.
  cheap_dp = _point("dp", 3.0, 0.0, 0.0, width=0.005, epsilon=6.0)
  assert frontier_report.equal_protection([masking, cheap_dp])[1] == "DP costs less"
  assert frontier_report.equal_protection([masking])[1] == "no DP point protects"
  assert frontier_report.equal_protection([cheap_leaky], 0.0)[:2] == (
    "none protects",
    "nothing protects",
  )
  # A looser level lets 2/8 identified count as protected.
  assert frontier_report.equal_protection([cheap_leaky], 0.25)[0] == "masking"
  assert frontier_report.equal_protection([cheap_leaky, dp])[:2] == (
    "none protects",
    "only DP protects",
  )
  row = frontier_report.claims_row([masking, pruning, dp])
  assert (
    len(row) == 4
    and "<= 0 of the attacked" in row[0]
    and row[3].startswith("cheapest: masking; vs DP:")
  )


def test_csv_round_trip_and_damaged_cells(tmp_path):
  pts = [_point("masking", 0.99, 0.0, 0.05), _point("dp", 0.5, 0.125, 0.3, epsilon=65.4)]
  path = str(tmp_path / "frontier.csv")
  frontier_points.write_frontier(path, pts)
  assert frontier_points.read_frontier(path) == pts
  text = open(path).read().splitlines()
  text[2] = text[2].replace(",0.3,", ",0.3x,", 1)
  (tmp_path / "bad.csv").write_text("\n".join(text) + "\n")
  with pytest.raises(ValueError, match=r"bad.csv, line 3, column 'cost'"):
    frontier_points.read_frontier(str(tmp_path / "bad.csv"))
  (tmp_path / "other.csv").write_text("a,b\n1,2\n")
  with pytest.raises(ValueError, match="not a frontier.csv"):
    frontier_points.read_frontier(str(tmp_path / "other.csv"))


@pytest.mark.parametrize(
  "parts, match",
  [
    (dict(frontier_grids={"masking": (0.5, 1.5)}), r"masking rate"),
    (
      dict(frontier_grids={"pruning": (0.5,)}, convergence_defenses=("masking",)),
      "not in defenses",
    ),
    (dict(convergence_defenses=("clipping_median",)), "defenses"),
    (dict(seeds=1), r"seeds=\[0\] must be at least 2 distinct"),
    (dict(seed=-1), "seeds=-1"),
    (dict(dp_multipliers=(0.0,)), "dp_multipliers"),
    (dict(convergence_defenses=(), dp_multipliers=()), "nothing to measure"),
    (dict(rounds=0), "rounds"),
    (dict(batch_size=0), "batch_size"),
    (dict(frontier_images=0), "study.frontier_images=0"),
    (dict(dp_delta=1.0), "delta=1.0"),
    (
      dict(iterations={"mnist": 40}),
      "study.iterations has no entry for study.convergence_dataset 'digits'",
    ),
    (
      dict(frontier_grids={"masking": (0.5, 0.5)}, convergence_defenses=("masking",)),
      "settings repeat",
    ),
    (dict(image_count=3), "unknown preset settings"),
  ],
)
def test_bad_settings_fail_before_any_work(tmp_path, parts, match, fake_training):
  with pytest.raises(ValueError, match=match):
    frontier.run_frontier(str(tmp_path), TINY.override(**parts), progress=False)
  assert fake_training == [] and not os.listdir(tmp_path)


def test_dp_among_the_trained_defences_is_measured_by_its_multipliers_only():
  """DP is on the frontier as its `dp_multipliers` points, never as a grid of its own."""
  both = TINY.override(convergence_defenses=("masking", "dp"))
  assert frontier.defenses(both) == ("masking",)
  assert frontier.settings(both) == [("masking", 0.01), ("masking", 0.9), ("dp", 2.0)]
  assert frontier.dp_multipliers(TINY.override(dp_multipliers=None)) == (0.01, 0.1, 1.0)
  assert frontier.dp_multipliers(TINY.override(dp_multipliers=())) == ()


def test_frontier_grids_run_from_leaking_to_strongest():
  for name in defense_table.PAPER_DEFENSES + ("dp",):
    spec = defense_table.row(name)
    grid = spec.frontier
    assert (3 if name == "dp" else 4) <= len(grid) <= 6, name
    step = [b - a for a, b in zip(grid, grid[1:])]
    assert (
      all(s > 0 for s in step) if spec.search.stronger == "higher" else all(s < 0 for s in step)
    )
  # Masking and pruning reach what masked cosine matching needs; clipping its strongest.
  assert defense_table.row("masking").frontier[-1] >= 0.99
  assert defense_table.row("pruning").frontier[-1] >= 0.99
  assert (
    defense_table.row("clipping_ratio").frontier[-1]
    == defense_table.row("clipping_ratio").search.low
  )
  with pytest.raises(ValueError, match=r"frontier settings \[2.0\] lie outside"):
    dataclasses.replace(defense_table.row("masking"), frontier=(0.5, 2.0))


def test_dp_point_carries_its_epsilon(tmp_path):
  """The worst-case epsilon of the attacked client's own noised update, every round."""
  st = presets.Preset(
    convergence_dataset="digits",
    convergence_defenses=(),
    dp_multipliers=(2.0,),
    rounds=7,
    num_clients=5,
    dp_delta=1e-6,
  )
  fr = frontier.Frontier(str(tmp_path), st, progress=False)
  iv = identification.identification_rate(np.array([True, False, False]))
  iv = dict(num_images=3, top1=iv.estimate, top1_low=iv.low, top1_high=iv.high)
  iv.update(dict.fromkeys(matching.MEASURES[3:], 0.5))
  row = dict(seeds="0 1", rounds=7, final_test_accuracy=0.5, final_low=0.4, final_high=0.6)
  rows = {
    "dp@2": dict(row, cost=0.3, cost_low=0.2, cost_high=0.4),
    "none": dict(row, final_test_accuracy=0.8),
  }
  p = fr._point("dp", 2.0, {("dp", 2.0): iv, ("dp", None): iv}, rows)
  assert p.epsilon == pytest.approx(_dp_epsilon(2.0, 5, 7, 1e-6), rel=1e-9)
  assert (p.delta, p.identified, p.num_images) == (1e-6, 1, 3)
  assert p.attackers == "ig+idlg+gallery_match" and p.median_rank == 0.5
  assert (p.cost, p.baseline_accuracy, p.unit) == (0.3, 0.8, "noise_multiplier")


def test_convergence_labels_are_per_setting():
  assert frontier.label("masking", 0.99) == "masking@0.99"
  assert defense_params.defense_of(frontier.label("clipping_ratio", 1e-4)) == "clipping_ratio"


@pytest.mark.slow
def test_tiny_frontier_with_real_training(tmp_path):
  """Real TFF rounds (1 round, 2 clients, 40 images) and real attacks."""
  preset = TINY.override(
    convergence_defenses=("masking",),
    frontier_grids={"masking": (0.01, 0.9)},
    dp_multipliers=(1.0,),
    rounds=1,
  )
  points = frontier.run_frontier(str(tmp_path), preset, progress=False)
  assert [p.label for p in points] == ["masking@0.01", "masking@0.9", "dp@1"]
  for p in points:
    assert 0 <= p.final_accuracy <= 1 and p.final_low <= p.final_accuracy <= p.final_high
  assert points[-1].epsilon == pytest.approx(_dp_epsilon(1.0, 2, 1, 1e-5), rel=1e-9)
  assert frontier_points.read_frontier(str(tmp_path / "frontier.csv")) == points


def test_equal_protection_skips_non_finite_costs():
  """A protecting setting whose cost is NaN or infinite (a training that diverged) is no
  evidence: it never competes, and alone it leaves "none protects"."""
  masking = _point("masking", 0.99, 0.0, 0.05)
  for bad in (math.nan, math.inf, -math.inf):
    broken = dataclasses.replace(_point("pruning", 0.99, 0.0, 0.0), cost=bad)
    assert frontier_report.equal_protection([masking, broken])[:2] == (
      "masking",
      "no DP point protects",
    )
    assert frontier_report.equal_protection([broken])[:2] == ("none protects", "nothing protects")
    broken_dp = dataclasses.replace(_point("dp", 1.0, 0.0, 0.0, epsilon=25.0), cost=bad)
    assert frontier_report.equal_protection([masking, broken_dp])[1] == "no DP point protects"
  # The cheaper setting of one defence is kept when the other's cost is not finite.
  cheap = _point("masking", 0.5, 0.0, 0.01)
  nan_cheaper = dataclasses.replace(_point("masking", 0.9, 0.0, 0.0), cost=math.nan)
  _, _, evidence = frontier_report.equal_protection([nan_cheaper, cheap, masking])
  assert evidence == ["masking 0.5: identified 0/8 (<= 0.37), cost +1.0 [+0.0, +2.0] pp"]
  # One seed: a finite cost with an infinite interval protects but wins no comparison.
  one_seed = dataclasses.replace(cheap, cost_low=-math.inf, cost_high=math.inf)
  dp = _point("dp", 1.0, 0.0, 0.40, epsilon=25.0)
  assert frontier_report.equal_protection([one_seed, _point("pruning", 0.99, 0.0, 0.2), dp])[
    :2
  ] == (
    "inconclusive",
    "pruning beats DP",
  )


def test_equal_protection_ties_are_inconclusive():
  """Equal cost intervals, or intervals that only touch, put no defence below another."""
  masking = _point("masking", 0.99, 0.0, 0.05)
  twin = _point("pruning", 0.99, 0.0, 0.05)
  dp_twin = _point("dp", 1.0, 0.0, 0.05, epsilon=25.0)
  assert frontier_report.equal_protection([masking, twin, dp_twin])[:2] == (
    "inconclusive",
    "inconclusive",
  )
  # Touching: masking's interval ends exactly where the other's begins.
  edge = masking.cost_high
  touching = dataclasses.replace(_point("pruning", 0.99, 0.0, 0.07), cost_low=edge)
  assert frontier_report.equal_protection([masking, touching])[0] == "inconclusive"
  dp_touching = dataclasses.replace(_point("dp", 1.0, 0.0, 0.07, epsilon=25.0), cost_low=edge)
  assert frontier_report.equal_protection([masking, dp_touching])[1] == "inconclusive"
  # Just apart: then the order is clear both ways.
  apart = _point("pruning", 0.99, 0.0, 0.0701)
  assert frontier_report.equal_protection([masking, apart])[0] == "masking"
  dp_apart = _point("dp", 1.0, 0.0, 0.0299, epsilon=25.0)
  assert frontier_report.equal_protection([masking, dp_apart])[1] == "DP costs less"
  # Two settings of one defence at the same cost: the defence is counted once.
  same_cost = _point("masking", 0.5, 0.0, 0.05)
  _, _, evidence = frontier_report.equal_protection([masking, same_cost])
  assert len(evidence) == 1 and evidence[0].startswith("masking ")
