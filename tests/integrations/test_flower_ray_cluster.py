"""The Flower engine on a two-node Ray cluster: the single-node result, to the bit.

A head node (`ray start --head --port=P`) and a worker node (`ray start
--address=127.0.0.2:P`) run as two separate processes on this machine, one CPU each,
on loopback only (both nodes at 127.0.0.2). The engine joins the cluster (`address=`), so its two client
actors run one on each node, and trains the same 2-client round as a local
single-node Ray: the server's arrays and history must be equal. Both nodes are stopped
afterwards (their process groups), even when the test fails.

Marked slow: `bash bazel_free_scripts/test.sh --slow` (or `.venv-k3/bin/python -m pytest
-m slow tests/integrations`) runs it.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tf_dlg.federated import simulation as sim
from tf_dlg.federated.config import FederatedConfig
from tf_dlg.integrations import flower_engine
from tf_dlg.study import convergence

STARTED = "Ray runtime started."
HOST = "127.0.0.2"  # a loopback address
START_DEADLINE_S = 240  # generous: two Ray nodes on 2 busy cores


def _free_port() -> int:
  with socket.socket() as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def _wait_for(path: str, text: str, proc: subprocess.Popen) -> None:
  deadline = time.monotonic() + START_DEADLINE_S
  while time.monotonic() < deadline:
    with open(path, errors="replace") as f:
      if text in f.read():
        return
    if proc.poll() is not None:
      break
    time.sleep(0.5)
  with open(path, errors="replace") as f:
    log = f.read()[-3000:]
  raise AssertionError(f"a Ray node did not start (exit {proc.poll()}):\n{log}")


def _stop(procs) -> None:
  """SIGTERM to each node's process group, then SIGKILL to what is left."""
  for p in procs:
    try:
      os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  for p in procs:
    try:
      p.wait(timeout=60)
    except subprocess.TimeoutExpired:
      pass
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


@pytest.fixture
def two_nodes(tmp_path):
  """`127.0.0.2:P` of a running head node and worker node (1 CPU each)."""
  ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
  port = _free_port()
  # Loopback only: Ray turns a given 127.0.0.1 into the machine's network address,
  # but not another loopback address, so both nodes (and the driver) use 127.0.0.2.
  env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
  env.pop("RAY_ADDRESS", None)
  common = ["--num-cpus=1", "--block", "--disable-usage-stats", f"--node-ip-address={HOST}"]
  commands = [
    ("head", ["--head", f"--port={port}", "--include-dashboard=false"]),
    ("worker", [f"--address={HOST}:{port}"]),
  ]
  procs = []
  try:
    for name, args in commands:
      log = str(tmp_path / f"{name}.log")
      with open(log, "w") as out:
        procs.append(
          subprocess.Popen(
            [ray_cli, "start", *args, *common],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: stopped whole, by id
          )
        )
      _wait_for(log, STARTED, procs[-1])
    yield f"{HOST}:{port}"
  finally:
    flower_engine.shutdown()  # the driver leaves the cluster first
    _stop(procs)
    # `ray start --head` names itself the machine's current cluster; not any more.
    current = "/tmp/ray/ray_current_cluster"
    try:
      with open(current) as f:
        if f.read().strip().endswith(f":{port}"):
          os.remove(current)
    except OSError:
      pass


def _arrays(run_dir):
  from tf_dlg import io as io_lib

  header, stored = io_lib.load_npz(
    os.path.join(run_dir, sim.CHECKPOINT_NAME), expected_format=flower_engine.CHECKPOINT_FORMAT
  )
  return [stored[f"leaf_{i}"] for i in range(int(header["num_leaves"]))]


# Two Ray nodes, a local Ray and three TensorFlow actors: 60-170 s on 2 cores, so it runs
# with the slow tests (`bash bazel_free_scripts/test.sh --slow`).
@pytest.mark.slow
def test_two_node_cluster_gives_the_single_node_result(two_nodes, digits, tmp_path):
  import ray

  tiny = convergence.subset(digits, 60, 40, seed=0)
  config = FederatedConfig(
    dataset="digits",
    num_clients=2,
    rounds=1,
    seed=3,
    batch_size=16,
    defense="masking",
    defense_param=0.5,
  )
  local = flower_engine.run_simulation(
    config, str(tmp_path / "local"), dataset=tiny, progress=False, num_cpus=2
  )
  flower_engine.shutdown()
  cluster = flower_engine.run_simulation(
    config, str(tmp_path / "cluster"), dataset=tiny, progress=False, address=two_nodes
  )
  nodes = [n for n in ray.nodes() if n["Alive"]]
  assert len(nodes) == 2 and all(n["NodeManagerAddress"] == HOST for n in nodes)
  assert [n["Resources"].get("CPU") for n in nodes] == [1.0, 1.0]
  for a, b in zip(_arrays(str(tmp_path / "local")), _arrays(str(tmp_path / "cluster"))):
    np.testing.assert_array_equal(a, b)
  strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
  assert strip(cluster.history) == strip(local.history)
