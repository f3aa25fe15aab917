"""One Flower simulation on Ray that serves every run of the process (`session()`).

By default Ray starts locally on this machine's CPUs (one actor per CPU, each
TensorFlow limited to one thread), on loopback only; with `RAY_ADDRESS=HOST:PORT` (or
`address=`) the runs use an existing Ray cluster (`ray start --head` / `ray start
--address=...`, see docs/FLOWER.md), one actor per CPU of every node. The simulation's
ServerApp thread runs the functions handed to `Session.call`; it ends at exit or with
`shutdown()`.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import queue
import threading
from typing import Any, Dict, List, Optional

from tf_dlg.integrations.flower_client import client_app


@dataclasses.dataclass
class _Call:
  """A function for the session's ServerApp thread, and what it gave back."""

  fn: Any
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: Any = None
  error: Optional[BaseException] = None


# Passed to every client actor, on every node: the same TensorFlow set-up everywhere
# (thread count and oneDNN change the float rounding, and Adam's first steps amplify it).
_ACTOR_ENV = ("TF_DLG_FLOWER_THREADS", "TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL")


def _actor_env() -> Dict[str, str]:
  env = {k: os.environ[k] for k in _ACTOR_ENV if k in os.environ}
  env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p)
  return env


def _ray_loopback() -> None:
  """A local Ray on 127.0.0.1 only.

  Ray gives its nodes this machine's network address even when started locally; its
  switch for loopback is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import (so the
  imported constant is set too). Ray's processes inherit the environment. (Set it
  yourself for `ray start` nodes on one machine, as tests/integrations do.)
  """
  from ray._private import ray_constants

  os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
  ray_constants.ENABLE_RAY_CLUSTER = False


class Session:
  """One Flower simulation on Ray that trains runs one after another (`run`).

  Args:
    num_clients: SuperNodes of the simulation (every run's `num_clients`).
    address: A Ray cluster to join (`HOST:PORT`); default `RAY_ADDRESS`, else a local
      Ray on `num_cpus` CPUs (default: all of this machine's).
    client_cpus: CPUs per client actor (and TensorFlow threads in it).
    verbose: Flower's and Ray's logs (default: warnings only).
  """

  def __init__(
    self,
    num_clients: int,
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    client_cpus: int = 1,
    verbose: bool = False,
  ):
    self.num_clients = int(num_clients)
    self.address = address or os.environ.get("RAY_ADDRESS") or None
    self.num_cpus = None if self.address else int(num_cpus or os.cpu_count() or 1)
    self.client_cpus = int(client_cpus)
    self.verbose = verbose
    self._jobs: "queue.Queue[Optional[_Call]]" = queue.Queue()
    self._refs: Dict[str, Any] = {}
    self._data_keys: Dict[int, str] = {}
    self._thread: Optional[threading.Thread] = None
    self._failure: List[BaseException] = []
    self._owns_ray = False

  def options(self) -> tuple:
    return (self.num_clients, self.address, self.num_cpus, self.client_cpus)

  def start(self) -> "Session":
    import ray
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    if self._thread is not None:
      return self
    if not self.verbose:
      # Flower warns of its own settings here (run_simulation's deprecation in favour of
      # `flwr run`, fraction_evaluate=0): errors only.
      logging.getLogger("flwr").setLevel(logging.ERROR)
    # TensorFlow threads per actor; Ray's workers inherit this process's environment.
    os.environ["TF_DLG_FLOWER_THREADS"] = str(self.client_cpus)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # a FutureWarning
    if not ray.is_initialized():
      init = dict(
        include_dashboard=False,
        log_to_driver=self.verbose,
        logging_level=logging.INFO if self.verbose else logging.WARNING,
      )
      if self.address:
        init["address"] = self.address
      else:
        # A new local Ray (never a cluster `ray start` left running), on loopback only.
        _ray_loopback()
        init["address"] = "local"
        init["num_cpus"] = self.num_cpus
      ray.init(runtime_env={"env_vars": _actor_env()}, **init)
      self._owns_ray = True
    # At exit this simulation ends before Ray's own exit hook (registered by ray.init)
    # stops Ray: atexit runs the latest first. Else Flower's teardown finds its actors
    # gone and logs a traceback.
    atexit.unregister(shutdown)
    atexit.register(shutdown)
    ready = threading.Event()
    server = ServerApp()

    @server.main()
    def main(grid, context):
      ready.set()
      while True:
        call = self._jobs.get()
        if call is None:
          return
        try:
          call.result = call.fn(grid)
        except BaseException as e:  # handed to the caller's thread
          call.error = e
        finally:
          call.done.set()

    backend = {"client_resources": {"num_cpus": self.client_cpus, "num_gpus": 0.0}}

    def simulate():
      try:
        run_simulation(
          server_app=server,
          client_app=client_app(self._refs),
          num_supernodes=self.num_clients,
          backend_name="ray",
          backend_config=backend,
        )
      except BaseException as e:
        self._failure.append(e)
      finally:
        ready.set()

    self._thread = threading.Thread(target=simulate, name="tf_dlg-flower", daemon=True)
    self._thread.start()
    ready.wait()
    self._check_alive()
    return self

  def _check_alive(self) -> None:
    if self._failure or self._thread is None or not self._thread.is_alive():
      cause = self._failure[0] if self._failure else None
      raise RuntimeError(f"the Flower simulation stopped ({cause!r}).") from cause

  def data_key(self, dataset) -> str:
    """The key of `dataset`'s training data in Ray's object store (put there once)."""
    import ray

    key = self._data_keys.get(id(dataset.x_train))
    if key is None:
      key = f"d{len(self._data_keys)}"
      payload = (dataset.x_train, dataset.y_train, int(dataset.num_classes))
      self._refs[key] = ray.put(payload)
      self._data_keys[id(dataset.x_train)] = key
      self._keep = getattr(self, "_keep", []) + [dataset.x_train]  # ids stay unique
    return key

  def call(self, fn):
    """`fn(grid)` run in the simulation's ServerApp thread; returns its result."""
    self.start()
    call = _Call(fn)
    self._jobs.put(call)
    while not call.done.wait(1.0):
      self._check_alive()
    if call.error is not None:
      raise call.error
    return call.result

  def close(self) -> None:
    if self._thread is None:
      return
    self._jobs.put(None)
    self._thread.join(timeout=120)
    self._thread = None
    if self._owns_ray:
      import ray

      ray.shutdown()  # Flower's backend shuts Ray down too; this one is a no-op then


_SESSION: List[Session] = []


def session(num_clients: int, **options) -> Session:
  """The process's `Session` for `num_clients` (a new one when the options differ)."""
  want = Session(num_clients, **options)
  if _SESSION and _SESSION[0].options() == want.options():
    return _SESSION[0]
  shutdown()
  _SESSION.append(want)
  return want


def shutdown() -> None:
  """Ends the process's Flower simulation (and the Ray it started), if any."""
  while _SESSION:
    _SESSION.pop().close()


atexit.register(shutdown)
