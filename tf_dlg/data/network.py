"""The network probe: whether a download host answers, within a bounded time."""

from __future__ import annotations

REACHABILITY_TIMEOUT_S = 3.0


def host_reachable(host: str, port: int = 443, timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
  """Whether `host` resolves and accepts a TCP connection within `timeout` seconds.

  Name resolution has no timeout of its own, so it runs in a daemon thread that is
  abandoned (never joined) when it takes too long.
  """
  import socket
  import threading

  result = []

  def probe():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      result.append(False)

  thread = threading.Thread(target=probe, daemon=True, name=f"reach-{host}")
  thread.start()
  thread.join(timeout)
  return bool(result and result[0])
