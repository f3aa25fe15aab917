"""Federated training in TFF: FedAvg with mean / median / trimmed-mean aggregation.

Modules (imported lazily, so `import tf_dlg.federated` does not pull in TFF):
- `aggregators`: `median_factory()`, `trimmed_mean_factory(f)`, `capture_factory(inner)`,
  `stats_factory(inner, include, clip_norm)`.
- `fedavg`: `build_fedavg(input_shape, num_classes, FedAvgConfig(...))` -> `FedAvg`
  (learning process + Keras model fn); BatchNorm statistics travel with the update
  (see its docstring).
- `simulation`: `SimulationConfig`, `run_simulation(config, output_dir, workers=...)`.
- `AGGREGATORS`, `OPTIMIZERS`, `MALICIOUS_MODES`: the choices, for drivers' flags.
- TFF itself is imported through `tf_dlg.execution.runtime.import_tff()` (confined workers).
"""

import importlib

# The registries of the choices a run makes, here so that drivers can declare them on
# their flags without importing TFF.
AGGREGATORS = ("mean", "median", "trimmed_mean")
OPTIMIZERS = ("sgd", "sgdm", "adam")
MALICIOUS_MODES = ("scale", "random")

_LAZY = {
  "median_factory": "aggregators",
  "trimmed_mean_factory": "aggregators",
  "capture_factory": "aggregators",
  "stats_factory": "aggregators",
  "build_fedavg": "fedavg",
  "FedAvg": "fedavg",
  "FedAvgConfig": "fedavg",
  "SimulationConfig": "simulation",
  "run_simulation": "simulation",
  "SimulationResult": "simulation",
  "CheckpointError": "simulation",
}


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
