"""The sweep's outputs: the figure (`figures/sweep.png`) and the report (`sweep.md`),
whose first line answers at the training's own client setting (`opening_line`), with the
accuracy cost of each protecting setting: read from a frontier run (`read_costs`), or, in an
audit, trained on the user's model (`Cost`).
"""

from __future__ import annotations

import collections
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from tf_dlg.analysis import figures
from tf_dlg.study import sweep_settings
from tf_dlg.study.presets import Preset
from tf_dlg.study.sweep_settings import UNDEFENDED


def _undefended(rows):
  return [r for r in rows if r["defense"] == UNDEFENDED]


def figure(rows, path: str) -> str:
  """Undefended identification against batch size, one panel per round (matplotlib)."""
  plt = figures.pyplot()
  rows = _undefended(rows)
  rounds = sorted({r["round"] for r in rows})
  panels = max(len(rounds), 1)
  fig, axes = plt.subplots(1, panels, figsize=(max(4.6 * panels, 6.0), 4.0))
  axes = np.atleast_1d(axes)
  for ax, rnd in zip(axes, rounds):
    lines = collections.defaultdict(list)
    for r in rows:
      if r["round"] == rnd:
        lines[(r["dataset"], r["local_work"], r["attack"])].append(r)
    for (dataset, work, attack), pts in sorted(lines.items()):
      pts = sorted(pts, key=lambda r: r["batch"])
      x = [p["batch"] for p in pts]
      y = [p["identified"] / p["num_images"] for p in pts]
      err = [[yy - p["low"] for yy, p in zip(y, pts)], [p["high"] - yy for yy, p in zip(y, pts)]]
      gallery = pts[0]["gallery_size"]
      ax.errorbar(
        x,
        y,
        yerr=err,
        marker="o" if work == "step" else "s",
        capsize=3,
        label=f"{attack}: {dataset} ({gallery:,} gallery), {work}",
      )
    acc = next(
      (r["test_accuracy"] for r in rows if r["round"] == rnd and r.get("test_accuracy")), None
    )
    title = f"round {rnd}" + ("" if acc is None else f" (test accuracy {acc:.3f})")
    ax.set_title(title, fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("client batch size")
    ax.set_ylabel("images identified (top-1), undefended")
    ax.legend(fontsize=6)
  fig.suptitle(
    "Images identified top-1 from the update FedAvg sends, undefended (exact 95 % intervals)",
    fontsize=9,
    wrap=True,
  )
  fig.tight_layout()
  return figures.save(fig, path, dpi=120)


# What the report quotes of a cost; a frontier.csv's `FrontierPoint`s carry the same fields.
# Fractions of accuracy; `seeds` space-separated.
Cost = collections.namedtuple("Cost", "cost cost_low cost_high baseline_accuracy dataset seeds")


def read_costs(path: str) -> Dict[Tuple[str, float], Any]:
  """{(defence, setting): FrontierPoint} of a frontier.csv."""
  from tf_dlg.study import frontier_points

  if not os.path.isfile(path):
    raise ValueError(f"frontier_csv={path!r} is not a file; give a frontier run's frontier.csv.")
  return {(p.defense, float(p.param)): p for p in frontier_points.read_frontier(path)}


def _cost(costs, name: str, param: float) -> str:
  if costs is None:
    return "cost not measured here (pass a frontier run's frontier.csv)"
  p = costs.get((name, float(param)))
  if p is None:
    return "cost not measured at this setting"
  return (
    f"cost {figures.cost_pp(p.cost, p.cost_low, p.cost_high)} "
    f"beside the baseline's accuracy {p.baseline_accuracy:.3f} ({p.dataset}, seeds {p.seeds})"
  )


def _fmt(r) -> str:
  return f"{r['identified']}/{r['num_images']} [{r['low']:.2f}, {r['high']:.2f}]"


def own_cell(rows, settings: Preset):
  """(dataset, round, rows) at the training's own batch size and one epoch of its share,
  the last round measured on the first trained dataset; None when not swept."""
  trained = [d for d in settings.datasets if d in settings.sweep_trained_datasets]
  target = trained[0] if trained else settings.datasets[0]  # an audit trains nothing
  if sweep_settings.epoch_size(settings) != sweep_settings.share(settings):
    return None
  at = [
    r
    for r in rows
    if r["dataset"] == target and r["batch"] == settings.batch_size and r["local_work"] == "epoch"
  ]
  if not at:
    return None
  rnd = max(r["round"] for r in at)
  return target, rnd, [r for r in at if r["round"] == rnd]


def opening_line(
  rows, settings: Preset, costs=None, subject="the training's own client setting"
) -> str:
  """At the training's own batch size and local work: how much leaks undefended, and
  each defence's weakest protecting setting there (none identified by any attacker)."""
  own = own_cell(rows, settings)
  if own is None:
    return "The training's own configuration was not in this sweep."
  target, rnd, at = own
  und = [r for r in at if r["defense"] == UNDEFENDED]
  head = (
    f"At {subject} ({target}, batch {settings.batch_size}, one "
    f"epoch of {sweep_settings.share(settings)} images = {und[0]['local_steps']} "
    f"{settings.client_optimizer} "
    f"steps, round {rnd}, gallery of {und[0]['gallery_size']:,}), undefended: "
    + ", ".join(f"{r['attack']} identifies {_fmt(r)}" for r in und)
  )
  if all(r["identified"] == 0 for r in und):
    auc = ", ".join(f"{r['attack']} {r['auc']:.2f}" for r in und)
    return (
      head + "; no image identified undefended, so no setting is needed there against "
      f"top-1 identification (membership AUC {auc}: 0.5 is chance, above it members still "
      "stand out)."
    )
  parts = []
  for name, param in protecting_settings(at, settings).items():
    if param is None:
      parts.append(f"{name}: no frontier setting protects")
      continue
    worst = [r for r in at if r["defense"] == name and r["param"] == param]
    # 0 of n only shows protection when even its upper bound is below the undefended rate.
    leak = max(r["identified"] / r["num_images"] for r in und)
    shown = "" if max(r["high"] for r in worst) < leak else "inconclusive: "
    parts.append(
      f"{name} {param:g} ({shown}0/{worst[0]['num_images']} identified, rate at most "
      f"{max(r['high'] for r in worst):.2f}, membership AUC {max(r['auc'] for r in worst):.2f}; "
      f"{_cost(costs, name, param)})"
    )
  return head + "; weakest protecting setting: " + "; ".join(parts) + "."


def protecting_settings(at, settings: Preset) -> Dict[str, Optional[float]]:
  """{defence: its weakest frontier setting at which no row of `at` identifies an image,
  or None where none does}, in the order of `settings.sweep_defenses`."""
  out = {}
  order = [tuple(d) for d in settings.sweep_defenses]
  for name in dict.fromkeys(d for d, _ in order):
    pts = sorted(
      {r["param"] for r in at if r["defense"] == name},
      key=lambda p: order.index((name, p)),
    )
    protects = [
      p
      for p in pts
      if all(r["identified"] == 0 for r in at if r["defense"] == name and r["param"] == p)
    ]
    out[name] = protects[0] if protects else None
  return out


def report(
  rows,
  settings: Preset,
  skipped: Sequence[str] = (),
  costs=None,
  title: str = "Leakage where FedAvg trains: the threat-model sweep",
  subject: str = "the training's own client setting",
  case: str = "",
) -> str:
  lines = [f"# {title}", "", opening_line(rows, settings, costs, subject), ""]
  sources = sorted({(r["dataset"], r.get("dataset_source", "")) for r in rows})
  lines += [
    "Attacker: gallery matching (the candidate's own update simulated with the client's "
    f"{settings.client_optimizer} (lr {settings.client_lr:g}) for the client's local steps, "
    f"capped at {settings.sweep_max_simulated_steps}; column `simulated_steps`), with the "
    "client's images ranked among the gallery's non-members. Reconstruction (cosine + TV, "
    "exact and update-direction) on batches of at most "
    f"{settings.sweep_recon_max_batch} images, "
    + ("every setting" if settings.sweep_recon_defended else "undefended only")
    + "; every other verdict names gallery matching alone. Labels recovered from the "
    "last dense layer. " + case,
    "",
    "Data: " + "; ".join(f"{d}: {s}" for d, s in sources),
    "",
  ]
  if skipped:
    lines += ["Not run:"] + [f"- {s}" for s in skipped] + [""]
  lines += [
    "| dataset | round | batch | local work (steps) | attack | identified [95 %] | "
    "AUC | TPR@1%FPR | label acc. |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in sorted(
    _undefended(rows), key=lambda r: (r["dataset"], r["round"], r["local_work"], r["batch"])
  ):
    lines.append(
      f"| {r['dataset']} | {r['round']} | {r['batch']} | {r['local_work']} ({r['local_steps']}) "
      f"| {r['attack']} | {_fmt(r)} | {r['auc']:.3f} | {r['tpr']:.2f} | {r['label_accuracy']:.2f} |"
    )
  own = own_cell(rows, settings)
  if own is not None:
    target, rnd, at = own
    lines += [
      "",
      f"Every setting at {subject} ({target}, round {rnd}, batch {settings.batch_size}, "
      "one epoch):",
      "",
      "| defence | setting | attack | identified [95 %] | AUC [95 %] | TPR@1%FPR | label acc. |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in at:
      param = "" if r["param"] is None else f"{r['param']:g}"
      lines.append(
        f"| {r['defense']} | {param} | {r['attack']} | {_fmt(r)} | {r['auc']:.3f} "
        f"[{r['auc_low']:.3f}, {r['auc_high']:.3f}] | {r['tpr']:.2f} | {r['label_accuracy']:.2f} |"
      )
  lines += ["", "![sweep](figures/sweep.png)", ""]
  return "\n".join(lines)
