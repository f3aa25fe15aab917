"""The privacy-utility frontier figure: accuracy cost against identification rate."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from tf_dlg.analysis import figures

DP = "dp"


def _series(points) -> Dict[str, list]:
  """{defence: its points in the given (weakest-first) order}."""
  out: Dict[str, list] = {}
  for p in points:
    out.setdefault(p.defense, []).append(p)
  return out


def plot_frontier(
  points: Sequence, path: str, title: str = "", footer: str = ""
) -> Dict[str, List[Tuple[float, float]]]:
  """Saves the frontier: x = accuracy cost (pp), y = top-1 identification rate.

  One line per defence through its settings (weakest first) with both intervals as
  error bars; DP points form their own line, each labelled with its epsilon.

  Args:
    points: `tf_dlg.study.frontier_points.FrontierPoint`s.
    path: PNG path.

  Returns:
    {line label: [(cost pp, rate), ...]}: what was drawn, one entry per defence.
  """
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 5))
  drawn: Dict[str, List[Tuple[float, float]]] = {}
  for defense, pts in _series(points).items():
    x = np.array([100 * p.cost for p in pts])
    y = np.array([p.top1 for p in pts])
    xerr = np.abs(
      np.array([[100 * (p.cost - p.cost_low), 100 * (p.cost_high - p.cost)] for p in pts]).T
    )
    yerr = np.abs(np.array([[p.top1 - p.top1_low, p.top1_high - p.top1] for p in pts]).T)
    name = "DP (noise multiplier)" if defense == DP else defense
    ax.errorbar(
      x,
      y,
      xerr=np.nan_to_num(xerr),
      yerr=yerr,
      marker="s" if defense == DP else "o",
      linestyle="--" if defense == DP else "-",
      capsize=3,
      label=name,
    )
    for i, (p, xi, yi) in enumerate(zip(pts, x, y)):
      text = f"z={p.param:g}, ε={p.epsilon:.3g}" if defense == DP else f"{p.param:g}"
      # Alternate above / below: neighbouring settings often sit at nearly the same point.
      offset = (4, 5 if i % 2 == 0 else -11)
      ax.annotate(text, (xi, yi), textcoords="offset points", xytext=offset, fontsize=7)
    drawn[name] = list(zip(x.tolist(), y.tolist()))
  costs = [abs(v) for line in drawn.values() for v, _ in line if np.isfinite(v)]
  if costs and max(costs) > 10:
    # Costs span 0.1 to 80 points: linear up to 1 pp, logarithmic beyond, so the cheap
    # settings, where the choice is made, are not crowded into one spot.
    from matplotlib import ticker

    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xticks([t for t in (-1, 0, 1, 2, 5, 10, 20, 50, 100) if t <= max(costs) * 1.5])
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.set_xlabel("accuracy cost at convergence (pp, paired by seed, 95 % t interval)")
  ax.set_ylabel("top-1 identification rate (95 % exact interval)")
  ax.set_ylim(-0.05, 1.05)
  ax.axvline(0, color="grey", linewidth=0.8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  if title:
    ax.set_title(title, fontsize=10)
  if footer:
    fig.text(0.01, 0.005, footer, fontsize=7, ha="left", va="bottom")
  fig.tight_layout(rect=(0, 0.03 if footer else 0, 1, 1))
  figures.save(fig, path)
  return drawn
