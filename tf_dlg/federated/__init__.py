"""Federated training in TFF: FedAvg with mean / median / trimmed-mean aggregation.

Modules (imported lazily, so `import tf_dlg.federated` does not pull in TFF):
- `config`: `FederatedConfig`, the one configuration of a federated run (no TFF import).
- `aggregators`: `median_factory()`, `trimmed_mean_factory(f)`, `capture_factory(inner)`.
- `fedavg`: `build_fedavg(input_shape, num_classes, FederatedConfig(...))` -> `FedAvg`
  (learning process + Keras model fn); BatchNorm statistics travel with the update
  (see its docstring); its TFF parts `client_work` (client roles, local training) and
  `finalizer` (server optimizer, averaged BatchNorm statistics).
- `simulation`: `run_simulation(config, output_dir, workers=...)`; its parts `rounds`
  (who trains on what), `run_store` (history and checkpoint files, `CheckpointError`),
  `evaluation` (the server model's test metrics) and `capture` (the captured update).
- `AGGREGATORS`, `OPTIMIZERS`, `MALICIOUS_MODES`: the choices, for drivers' flags.
- Importing any of them leaves TFF's execution context alone; `run_simulation` (and the
  drivers) install the loopback-only one (`tf_dlg.execution.runtime.install_context()`).
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
  "build_fedavg": "fedavg",
  "FedAvg": "fedavg",
  "FederatedConfig": "config",
  "run_simulation": "simulation",
  "SimulationResult": "simulation",
  "CheckpointError": "run_store",
}


def __getattr__(name):
  if name in _LAZY:
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
