"""What wall times are measured on: processor, cores, and whose CPU time it was."""

import subprocess
import sys
import time

import psutil

from tf_dlg.study import machine

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_processor_names_the_first_block_with_family_and_model(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text(
    "processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 26\nmodel\t\t: 2\n\n"
    "processor\t: 1\nmodel name\t: Other\ncpu family\t: 6\nmodel\t\t: 85\n"
  )
  assert machine.processor(str(info)) == "AMD EPYC (family 26, model 2)"
  assert machine.processor(str(tmp_path / "missing"))  # the platform's name instead


def test_own_time_counts_live_and_ended_children():
  start = machine.sample()
  ended = subprocess.run([sys.executable, "-c", BURN.format(s=0.6)])
  assert ended.returncode == 0
  live = subprocess.Popen([sys.executable, "-c", BURN.format(s=30)])
  try:
    deadline = time.monotonic() + 20
    while psutil.Process(live.pid).cpu_times().user < 0.6 and time.monotonic() < deadline:
      time.sleep(0.1)
    end = machine.sample()
  finally:
    live.kill()
    live.wait()
  # 0.6 s in the ended child, at least 0.6 s in the live one, a little in this process.
  assert end.own - start.own >= 1.2
  assert end.machine_busy - start.machine_busy >= 1.0


def test_describe_reports_shares_and_flags_other_work(monkeypatch):
  monkeypatch.setattr(psutil, "cpu_count", lambda: 2)
  start = machine.Sample(wall=0.0, machine_busy=0.0, own=0.0)
  alone = machine.describe(start, machine.Sample(wall=100.0, machine_busy=190.0, own=186.0))
  assert "this run used 186 CPU-s of their 200 (93%), the machine as a whole 95%" in alone
  assert "other work" not in alone
  shared = machine.describe(start, machine.Sample(wall=100.0, machine_busy=196.0, own=120.0))
  assert shared.endswith("(other work took about 38% beside this run)")
