"""report.md and a self-contained report.html: every stage's tables, figures and provenance.

`write_report` joins Markdown sections in order: the header with the command, the first
screen, each stage's own Markdown (thresholds, claims, frontier, convergence, robustness)
with the provenance of its numbers, then the figures, settings, data sources, package
versions and wall time, and writes both files.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import platform
import shutil
from typing import Dict, Mapping, Optional

from tf_dlg import io as io_lib
from tf_dlg.analysis import figures
from tf_dlg.study.presets import Preset

# Each stage's Markdown, relative to the run's folder, in the order the report shows it.
STAGE_SECTIONS = (
  "thresholds/thresholds.md",
  "claims.md",
  "frontier/frontier.md",
  "convergence/convergence.md",
  "thresholds/robustness.md",
)
# Packages whose versions the report names.
_PACKAGES = (
  "tensorflow",
  "tensorflow-federated",
  "tensorflow-privacy",
  "tensorflow-probability",
  "tensorflow-datasets",
  "numpy",
  "scikit-image",
)


def versions() -> Dict[str, str]:
  """{package: version} of Python and the packages the numbers depend on."""
  import importlib.metadata as md

  out = {"python": platform.python_version()}
  for pkg in _PACKAGES:
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = "not installed"
  return out


def stage_section(output_dir: str, rel: str, provenance: str) -> str:
  """One stage's Markdown, headings demoted, image links made relative to output_dir."""
  path = os.path.join(output_dir, rel)
  if not os.path.exists(path):
    return ""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  text = "\n".join(("#" + line) if line.startswith("#") else line for line in text.splitlines())
  prefix = os.path.dirname(rel)
  if prefix:
    text = text.replace("](figures/", f"]({prefix}/figures/")
  lines = text.splitlines()
  # The provenance line goes right under the section's heading.
  return "\n".join(lines[:1] + ["", f"*Source: `{rel}`; {provenance}*"] + lines[1:]) + "\n\n"


def _header(settings: Preset, command: Optional[str]) -> str:
  if command is None:
    return f"# tf-dlg report\n\nRun from Python (preset `{settings.name}`)\n\n"
  return f"# tf-dlg report\n\nCommand: {figures.code_span(command)} (preset `{settings.name}`)\n\n"


def _figures(output_dir: str) -> str:
  pngs = sorted(glob.glob(os.path.join(glob.escape(output_dir), "*", "figures", "*.png")))
  return "## Figures\n\n" + "".join(
    f"### {os.path.basename(p)}\n\n![{os.path.basename(p)}]({os.path.relpath(p, output_dir)})\n\n"
    for p in pngs
  )


def write_report(
  output_dir: str,
  settings: Preset,
  sources: Mapping[str, str],
  stage_seconds: Mapping[str, float],
  provenance: Mapping[str, str],
  command: Optional[str] = None,
  first_screen: str = "",
  measured_on: str = "",
) -> str:
  """Writes report.md and report.html (figures inline); returns report.md's path.

  The sections, in order: header, `first_screen` (the answer, `tf_dlg.study.summary`),
  each stage's Markdown under `provenance` ({stage file: what its numbers rest on}),
  figures, settings, data `sources`, versions and `stage_seconds`. `command`: the
  command line that made the run (None: a call from Python); `measured_on`: what the
  wall times were measured on (`tf_dlg.study.machine.describe`).
  """
  settings_json = io_lib.dumps(dataclasses.asdict(settings), indent=2, sort_keys=True)
  text = "".join(
    [
      _header(settings, command),
      first_screen,
      *(stage_section(output_dir, rel, provenance.get(rel, "")) for rel in STAGE_SECTIONS),
      _figures(output_dir),
      "## Settings\n\n```json\n" + settings_json + "\n```\n\n",
      "## Data\n\n" + "".join(f"- `{k}`: {v}\n" for k, v in sources.items()) + "\n",
      "## Versions\n\n" + "".join(f"- {k} {v}\n" for k, v in versions().items()) + "\n",
      # A resumed run redoes nothing it finished: its stages count only the work left.
      "## Wall time (this invocation)\n\n"
      + "".join(f"- {k}: {v:.0f} s\n" for k, v in stage_seconds.items())
      + f"- total: {sum(stage_seconds.values()):.0f} s\n"
      + (f"- measured on: {measured_on}\n" if measured_on else ""),
    ]
  )
  io_lib.atomic_write_text(
    os.path.join(output_dir, "report.html"), figures.markdown_to_html(text, output_dir)
  )
  return io_lib.atomic_write_text(os.path.join(output_dir, "report.md"), text)


def write_figure_index(output_dir: str) -> None:
  """figures/ at the top level holds every figure, so users find them in one place."""
  top = os.path.join(output_dir, "figures")
  os.makedirs(top, exist_ok=True)
  for sub in ("thresholds", "convergence", "frontier"):
    src = os.path.join(output_dir, sub, "figures")
    if os.path.isdir(src):
      for name in sorted(os.listdir(src)):
        shutil.copyfile(os.path.join(src, name), os.path.join(top, name))
