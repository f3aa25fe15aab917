"""report.html is escaped by construction: a hostile output directory, data source or
section cannot add markup to the page, nor make it inline a file from outside the run.
"""

import base64
import os
import re
import sys

from experiments import reproduce
from tf_dlg.analysis import figures
from tf_dlg.study import presets, report

TAG = "<img src=x onerror=alert(1)>"
HOSTILE = f"`{TAG}` `![k](/etc/hostname)` <script>alert(2)</script>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path, marker: bytes):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  plt.plot([0, 1])
  plt.savefig(path)
  plt.close()
  with open(path, "ab") as f:
    f.write(marker)  # after IEND: still a PNG, and its base64 is recognisable


def _b64_fragments(data: bytes):
  """Base64 renderings of `data`'s last 48 bytes (its marker), at any alignment in a file."""
  tail = data[-48:]
  return [base64.b64encode(tail[i:])[4:40].decode() for i in range(3)]


def test_reproduce_report_into_a_hostile_output_dir(tmp_path, monkeypatch):
  out = tmp_path / HOSTILE  # "/" in the name makes nested directories, as on a command line
  (out / "thresholds" / "figures").mkdir(parents=True)
  _png(out / "thresholds" / "figures" / "strip.png", b"INSIDE-FIGURE-" * 5)
  secret = tmp_path / "secret.png"
  _png(secret, b"OUTSIDE-SECRET-" * 5)
  os.symlink(secret, out / "thresholds" / "figures" / "link.png")  # inside by name only
  (out / "thresholds" / "thresholds.md").write_text(
    f"# Thresholds {TAG}\n\n| defence | threshold |\n|---|---|\n| masking | 0.3 |\n\n"
    f"![a]({secret})\n\n![b](../../secret.png)\n\n![c](figures/link.png)\n\n"
    "[x](javascript:alert(3))\n\n<div onclick=alert(4)>block</div>\n"
  )
  monkeypatch.setattr(sys, "argv", ["reproduce", f"--output_dir={out}"])
  command = reproduce.command_line()  # the driver's, with the hostile directory in it
  report.write_report(
    str(out),
    presets.PRESETS["quick"],
    {"mnist": HOSTILE},
    {"threshold search": 1.0},
    {"thresholds/thresholds.md": f"command: {figures.code_span(command)}"},
    command,
  )
  html = (out / "report.html").read_text()
  tags = re.findall(r"<\s*([a-zA-Z][a-zA-Z0-9]*)", html)
  allowed = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "em"}
  allowed |= {"code", "pre", "table", "thead", "tbody", "tr", "th", "td", "ul", "li", "a", "img"}
  assert set(tags) <= allowed, set(tags) - allowed
  assert "<script" not in html and "<div" not in html and "<img src=x" not in html
  assert "onerror=" not in re.sub(r"&lt;.*?&gt;", "", html)  # only inside escaped text
  assert html.count("&lt;img src=x onerror=alert(1)&gt;") >= 3  # shown, not dropped
  assert "javascript:" not in re.findall(r'href="([^"]*)"', html) and "href=" not in html
  srcs = re.findall(r'<img[^>]*src="([^"]*)"', html)
  assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")  # strip.png only
  inside = (out / "thresholds" / "figures" / "strip.png").read_bytes()
  assert any(f in html for f in _b64_fragments(inside))
  assert not any(f in html for f in _b64_fragments(secret.read_bytes()))
  if os.path.isfile("/etc/hostname"):
    host = open("/etc/hostname", "rb").read()
    assert base64.b64encode(host).decode() not in html
  md = (out / "report.md").read_text()
  assert f"Command: `` python -m experiments.reproduce --output_dir={out} ``" in md


def test_code_span_shows_backticks_literally():
  assert figures.code_span("a") == "` a `"
  assert figures.code_span("x `y` ``z``") == "``` x `y` ``z`` ```"
  html = figures.markdown_to_html(figures.code_span("`<b>`"), "/nonexistent")
  assert "<code>`&lt;b&gt;`</code>" in html
