"""The first screen's figure: top-1 identification against accuracy cost, with intervals."""

from __future__ import annotations

import textwrap
from typing import Sequence

from tf_dlg.analysis import figures
from tf_dlg.study.defence_lines import MARGIN, Line


def _cost_axis(ax, lines: Sequence[Line], margin: float) -> None:
  """The first screen's x axis: accuracy cost, to the costliest point's interval."""
  # One seed gives no cost interval: its point estimate bounds the axis instead.
  costs = [q["cost"] for x in lines for q in x.points]
  right = max([100 * margin] + [c[2] if figures.has_interval(c[1], c[2]) else c[0] for c in costs])
  bare = not all(figures.has_interval(c[1], c[2]) for c in costs)
  ax.set_xlim(right=right * 1.15 + 0.1)
  if right > 10:  # costs from tenths of a point to tens: keep the small ones apart
    from matplotlib import ticker

    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xticks([t for t in (0, 1, 2, 5, 10, 20, 50, 100) if t <= right * 1.15 + 0.1])
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  bars = "95 % t interval over seeds" + (f"; {figures.NO_INTERVAL}" if bare else "")
  ax.set_xlabel(f"accuracy cost at convergence, pp ({bars})", fontsize=8)


def plot(lines: Sequence[Line], path: str, title: str, reference=None, margin=MARGIN) -> str:
  """The first screen's figure: top-1 identification against accuracy cost, with intervals.

  One colour per defence; a filled marker where the setting protects (no attacked image
  identified), hollow where the attacker still identifies some; DP-FedAvg points are
  stars labelled with their epsilon. `reference`: (label, (rate, low, high)) at zero cost.
  """
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(8.4, 2.7))
  for i, line in enumerate(lines):
    color = plt.get_cmap("tab10")(i % 10)
    pts = sorted(line.points, key=lambda q: q["cost"][0])
    if len(pts) > 1:
      ax.plot([q["cost"][0] for q in pts], [q["top1"][0] for q in pts], color=color, lw=1)
    for j, q in enumerate(pts):
      (x, xlo, xhi), (y, ylo, yhi) = q["cost"], q["top1"]
      ax.errorbar(
        x,
        y,
        xerr=[[x - xlo], [xhi - x]] if figures.has_interval(xlo, xhi) else None,
        yerr=[[y - ylo], [yhi - y]],
        fmt="*" if q["epsilon"] is not None else "o",
        ms=8,
        color=color,
        mfc=color if q["protects"] else "white",
        capsize=3,
        label=line.defense if j == 0 else None,
      )
      eps = "" if q["epsilon"] is None else f" (ε={q['epsilon']:.3g})"
      # Staggered by defence so that labels of points at one place stay readable.
      offset = (6, 6 - 11 * (i % 3))
      ax.annotate(q["label"] + eps, (x, y), xytext=offset, textcoords="offset points", fontsize=7)
  if reference is not None:
    y, ylo, yhi = reference[1]
    ax.errorbar(0, y, yerr=[[y - ylo], [yhi - y]], fmt="s", color="black", capsize=3)
    ax.annotate(
      reference[0], (0, y), xytext=(-6, 0), textcoords="offset points", fontsize=7, ha="right"
    )
  ax.axvline(100 * margin, color="grey", ls="--", lw=0.8, label=f"{100 * margin:.0f} pp margin")
  ax.set_ylim(-0.08, 1.17)
  ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
  _cost_axis(ax, lines, margin)
  ax.set_ylabel("identified, top-1 rate\n(95 % exact interval)", fontsize=8)
  # Wrapped: with several strongest attackers per defence the title outgrew the axes.
  ax.set_title(textwrap.fill(title, 90), fontsize=8.5)
  ax.grid(alpha=0.3)
  if any(x.points for x in lines):
    # Room right of the costliest point for its label, which would run into the legend.
    left, right_edge = ax.get_xlim()
    ax.set_xlim(left, right_edge * 2.2 if right_edge > 10 else right_edge + 0.3)
    legend = dict(loc="center left", bbox_to_anchor=(1.01, 0.5), title_fontsize=7)
    ax.legend(fontsize=7, title="filled: protects", **legend)
  else:
    ax.text(0.5, 0.5, "no cost measured: see the table", transform=ax.transAxes, ha="center")
  fig.tight_layout()
  return figures.save(fig, path, dpi=100)
