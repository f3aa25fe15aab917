"""Federated training in TFF: FedAvg with mean / median / trimmed-mean aggregation.

Modules (imported lazily, so `import tf_dlg.federated.runtime` does not pull in TFF):
- `aggregators`: `median_factory()`, `trimmed_mean_factory(f)`, `capture_factory(inner)`,
  `stats_factory(inner, include, clip_norm)`.
- `fedavg`: `build_fedavg(...)` -> `FedAvg` (learning process + Keras model fn); BatchNorm
  statistics travel with the update (see its docstring).
- `simulation`: `SimulationConfig`, `run_simulation(config, output_dir, workers=...)`.
- `runtime`: `import_tff()`, execution targets (local or remote TFF workers).
- `worker`: starting TFF's worker_binary on loopback only, bound to its parent's life
  (`python -m tf_dlg.federated.worker --port=8000 [--expose]` for remote workers).
"""

import importlib

_LAZY = {
    "median_factory": "aggregators", "trimmed_mean_factory": "aggregators",
    "capture_factory": "aggregators", "stats_factory": "aggregators", "build_fedavg": "fedavg", "FedAvg": "fedavg",
    "SimulationConfig": "simulation", "run_simulation": "simulation",
    "SimulationResult": "simulation", "CheckpointError": "simulation",
}


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
