"""Figures in the paper's shape (leak grids, Figures 2-4; accuracy panels, Figure 5) and
the text helpers every report shares (intervals, costs in points, Markdown tables, HTML)."""

from __future__ import annotations

import os
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# Where a t interval over seeds would stand but one seed cannot give one (its bounds are
# infinite): the point estimate is shown with this note instead.
NO_INTERVAL = "n=1: no interval"


def has_interval(low, high) -> bool:
  """Whether [low, high] is an interval to print or draw (both bounds finite numbers)."""
  try:
    return bool(np.isfinite(float(low)) and np.isfinite(float(high)))
  except (TypeError, ValueError):
    return False


def with_interval(estimate, low, high, fmt: str = "{:.3f}", unit: str = "") -> str:
  """`0.912 [0.90, 0.93]`, or `0.912 (n=1: no interval)` where the interval is infinite."""
  if not has_interval(low, high):
    return f"{fmt.format(estimate)}{unit} ({NO_INTERVAL})"
  return f"{fmt.format(estimate)}{unit} [{fmt.format(low)}, {fmt.format(high)}]"


def pyplot():
  """matplotlib's pyplot on the Agg backend (headless: figures are files, never windows)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save(fig, path: str, dpi: int = 110) -> str:
  """Writes `fig` to `path` (its folder made), closes it, returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return path


def cost_pp(cost, low, high, unit: str = " pp") -> str:
  """`+1.1 pp [+0.4, +1.8]`: an accuracy cost (fractions) with its interval, in points."""
  return with_interval(100 * cost, 100 * low, 100 * high, "{:+.1f}", unit)


def show_image(ax, image) -> None:
  """An HxWxC image in [0, 1] on `ax` (grey for one channel), without ticks."""
  image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
  if image.ndim == 3 and image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
  else:
    ax.imshow(image, vmin=0.0, vmax=1.0)
  ax.set_xticks([])
  ax.set_yticks([])


def leak_grid(
  rows: Sequence[Mapping],
  path: str,
  columns: Sequence[Tuple[str, str]],
  caption: Callable[[Mapping, str], str],
  title: str = "",
  footer: str = "",
  width: float = 6.0,
) -> str:
  """Saves a leak grid: one row per setting, one column per (row key, column title).

  Args:
    rows: Dicts with `label` (the row's title), `original` and an HxWxC image in [0, 1]
      (or None: drawn black) under each column's key.
    path: PNG path.
    columns: (row key, column title) pairs, left to right.
    caption: (row, column key) -> the text under that image ("" for none).
    title, footer: Figure title (name the dataset and attack); small print (name the
      data source).
    width: Figure width in inches.
  """
  plt = pyplot()
  n = len(rows)
  fig, axes = plt.subplots(n, len(columns), figsize=(width, 2.1 * n + 0.6), squeeze=False)
  for i, row in enumerate(rows):
    for j, (col, name) in enumerate(columns):
      ax = axes[i, j]
      show_image(ax, row[col] if row[col] is not None else np.zeros_like(row["original"]))
      if i == 0:
        ax.set_title(name, fontsize=9)
      if j == 0:
        ax.set_ylabel(row["label"], fontsize=8)
      ax.set_xlabel(caption(row, col), fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  if footer:
    fig.text(0.01, 0.005, footer, fontsize=6, ha="left", va="bottom", wrap=True)
  fig.tight_layout(rect=(0, 0.03 if footer else 0, 1, 0.97 if title else 1))
  return save(fig, path)


def accuracy_panel(
  curves: Mapping[Tuple[str, str], Mapping[str, Sequence[Tuple[int, float]]]],
  path: str,
  title: str = "",
  footer: str = "",
  panel_order: Optional[List[Tuple[str, str]]] = None,
) -> str:
  """Saves Figure 5's panel: one subplot per (aggregator, partition), one curve per defence.

  Args:
    curves: {(aggregator, partition): {defence label: [(round, test accuracy), ...]}};
      points may be (round, mean, low, high) to draw an interval band around the mean.
    path: PNG path.
    panel_order: Subplot order; default sorted keys, laid out 2 per row.
  """
  plt = pyplot()
  keys = panel_order or sorted(curves)
  cols = 2
  nrows = max(1, int(np.ceil(len(keys) / cols)))
  fig, axes = plt.subplots(nrows, cols, figsize=(10, 3.6 * nrows), squeeze=False)
  for k, key in enumerate(keys):
    ax = axes[k // cols, k % cols]
    for label, points in sorted(curves[key].items(), key=lambda kv: (kv[0] != "none", kv[0])):
      if not points:
        continue
      pts = list(zip(*points))
      line = ax.plot(
        pts[0], pts[1], marker=".", label=label, linewidth=2.2 if label == "none" else 1.4
      )[0]
      if len(pts) == 4:  # (round, mean, low, high): a band, only where it is finite
        low, high = (np.asarray(c, float) for c in pts[2:])
        finite = np.isfinite(low) & np.isfinite(high)
        if finite.any():
          ax.fill_between(
            pts[0],
            np.clip(np.where(finite, low, 0.0), 0.0, 1.0),
            np.clip(np.where(finite, high, 0.0), 0.0, 1.0),
            where=finite,
            color=line.get_color(),
            alpha=0.18,
            linewidth=0,
          )
    ax.set_title(f"{key[0]} aggregation, {key[1]} clients", fontsize=10)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
  for k in range(len(keys), nrows * cols):
    axes[k // cols, k % cols].axis("off")
  if title:
    fig.suptitle(title, fontsize=11)
  if footer:
    fig.text(0.01, 0.005, footer, fontsize=7, ha="left", va="bottom")
  fig.tight_layout(rect=(0, 0.03 if footer else 0, 1, 0.96 if title else 1))
  return save(fig, path)


def markdown_row(cells: Sequence) -> str:
  """One row of a GitHub-flavoured Markdown table (no newline). Floats get 3 significant
  digits, None is empty; `|` is escaped and a newline becomes a space, so a cell never
  splits into columns or ends the row."""

  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}"
    return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

  return "| " + " | ".join(fmt(v) for v in cells) + " |"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A GitHub-flavoured Markdown table (cells as `markdown_row` writes them)."""
  lines = [markdown_row(header), "|" + "---|" * len(header)]
  lines += [markdown_row(row) for row in rows]
  return "\n".join(lines) + "\n"


_HTML_STYLE = (
  "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
  "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 6px;"
  "font-size:90%}img{max-width:100%}code,pre{background:#f4f4f4}"
)


def code_span(text: str) -> str:
  """`text` as one Markdown code span, whatever backticks it holds (shown literally)."""
  import re

  text = str(text).replace("\n", " ")
  fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
  return f"{fence} {text} {fence}"


_IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


def _inline_image(src: str, base_dir: str) -> Optional[str]:
  """A data: URI of `src` if it is a PNG/JPEG file inside `base_dir` (symlinks resolved)."""
  import base64
  import urllib.parse

  parts = urllib.parse.urlsplit(src)
  if parts.scheme or parts.netloc or os.path.isabs(parts.path):
    return None
  base = os.path.realpath(base_dir)
  for rel in dict.fromkeys((src, urllib.parse.unquote(parts.path))):
    path = os.path.realpath(os.path.join(base, rel))
    if os.path.commonpath([path, base]) != base or not os.path.isfile(path):
      continue
    with open(path, "rb") as f:
      data = f.read()
    for magic, mime in _IMAGE_TYPES.items():
      if data.startswith(magic):
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
  return None


def _safe_tree(root, base_dir: str) -> None:
  """Images inlined from `base_dir` only (else their alt text); links to http(s) or relative."""
  import urllib.parse

  for el in list(root.iter()):
    if el.tag == "img":
      data = _inline_image(el.get("src", ""), base_dir)
      if data is None:
        label = el.get("alt") or el.get("src", "")
        el.tag, el.text = "em", f"[figure {label} missing]"
        el.attrib.clear()
      else:
        el.set("src", data)
    elif el.tag == "a":
      parts = urllib.parse.urlsplit(el.get("href", ""))
      if parts.scheme not in ("", "http", "https") or (not parts.scheme and parts.netloc):
        el.attrib.pop("href", None)


def markdown_to_html(text: str, base_dir: str, title: str = "tf-dlg report") -> str:
  """A self-contained HTML page of a Markdown report, escaped by construction.

  Raw HTML in `text` is not interpreted: it is shown as text (Markdown's HTML block and
  inline HTML rules are removed), so a user string in the report (an output directory,
  a command line) can never become markup. An image is inlined as base64 only if it is a
  PNG or JPEG file inside `base_dir` after resolving symlinks; any other image (absolute,
  `..`, a URL, missing) becomes its alt text, so the page never reads nor points at a file
  elsewhere. Links keep only http(s) or relative targets.
  """
  import html

  import markdown
  from markdown import treeprocessors

  class _Safe(treeprocessors.Treeprocessor):
    def run(self, root):
      _safe_tree(root, base_dir)

  md = markdown.Markdown(extensions=["tables", "fenced_code"])
  md.preprocessors.deregister("html_block")
  md.inlinePatterns.deregister("html")
  md.treeprocessors.register(_Safe(md), "tf_dlg_safe", 5)  # after inline (20)
  body = md.convert(text)
  return (
    f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
    f"<style>{_HTML_STYLE}</style></head><body>\n{body}\n</body></html>\n"
  )
