"""What a run's wall time was measured on: the processor, its usable cores, how busy they were.

One demo's wall time moved by a third between hosts of the same kind with identical
results (issue 35), so the report quotes a time with its processor and with the share of
the cores' capacity the run itself used beside that of the machine as a whole: a
machine much busier than the run had other work beside it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import psutil


def processor(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The first processor's name with its family and model ('AMD EPYC (family 26, model 2)')
  from `cpuinfo`; the platform's name where that file is missing."""
  fields = {}
  try:
    with open(cpuinfo) as f:
      for line in f:
        if not line.strip():  # the end of the first processor's block
          break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
  if "cpu family" in fields and "model" in fields:
    name += f" (family {fields['cpu family']}, model {fields['model']})"
  return name


def usable_cores() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Sample:
  """Cumulative seconds at one moment."""

  wall: float
  machine_busy: float  # CPU-seconds every core of the machine spent busy
  own: float  # CPU-seconds of this process and its descendants, live or ended


def sample() -> Sample:
  t = psutil.cpu_times()
  busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
  me = psutil.Process()
  own = _cpu(me)
  for child in me.children(recursive=True):
    try:
      own += _cpu(child)
    except psutil.Error:  # ended between the listing and the reading
      pass
  return Sample(time.monotonic(), busy, own)


def _cpu(process) -> float:
  # children_*: the descendants already waited for (their own reaped ones included).
  t = process.cpu_times()
  return t.user + t.system + t.children_user + t.children_system


def describe(start: Sample, end: Sample) -> str:
  """One line: the processor, usable cores, and the run's and the machine's CPU use."""
  cores = psutil.cpu_count() or usable_cores()
  capacity = max(end.wall - start.wall, 1e-9) * cores
  own, busy = end.own - start.own, end.machine_busy - start.machine_busy
  line = (
    f"{processor()}, {usable_cores()} usable of {cores} cores: this run used "
    f"{own:,.0f} CPU-s of their {capacity:,.0f} ({own / capacity:.0%}), the machine as a "
    f"whole {busy / capacity:.0%}"
  )
  beside = (busy - own) / capacity
  # Kernel and monitoring work is a few percent; more is another job's.
  if beside > 0.05:
    line += f" (other work took about {beside:.0%} beside this run)"
  return line
