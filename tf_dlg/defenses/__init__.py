"""Client-side defences against gradient leakage, one module each.

`get_defense(name, param, **options)` builds one by name; every defence is a pure,
seeded TensorFlow transform of an update (`tf_dlg.defenses.base.Defense`), used
unchanged by the attack experiments, by TFF (`defense_factory`) and by Keras
(`tf_dlg.defenses.keras.DefendedModel`).

| name            | module       | parameter                          | stronger when |
|-----------------|--------------|------------------------------------|---------------|
| masking         | masking.py   | rate in [0, 1)                     | higher        |
| clipping        | clipping.py  | L2 norm > 0                        | lower         |
| clipping_ratio  | clipping.py  | clip_ratio in (0, 1] x own L2 norm | lower         |
| value_clipping  | clipping.py  | bound > 0                          | lower         |
| pruning         | pruning.py   | rate in [0, 1)                     | higher        |
| noising         | noising.py   | stddev >= 0                        | higher        |
| noising_ratio   | noising.py   | noise_ratio >= 0 x update RMS      | higher        |
| dp              | dp.py        | noise multiplier >= 0 (clip 1.0)   | higher        |

`clipping_ratio` and `noising_ratio` are the relative units: one setting means the same
on any model's updates, where an absolute norm or stddev does not transfer. In TFF,
`median_clipping_factory` clips relative to the round's median client norm instead.

Importing this package is cheap: the Keras glue (`DefendedModel`,
`DefenseTrainStepMixin`, `defended_gradients`) and the TFF aggregators
(`defense_factory`, `median_clipping_factory`, `dp_fedavg_aggregator`) load on first
use, so attack-only code never imports TensorFlow Federated.
"""

from __future__ import annotations

import importlib
from typing import Optional

from tf_dlg.defenses.base import Defense, NoDefense, zero_fraction
from tf_dlg.defenses.batchnorm import batchnorm_exclusion
from tf_dlg.defenses.clipping import (
  Clipping,
  RelativeClipping,
  ValueClipping,
  clip_by_global_norm,
  clip_by_value,
  clip_scale,
)
from tf_dlg.defenses.dp import DPGaussian, dp_fedavg_epsilon, dp_sgd_epsilon
from tf_dlg.defenses.masking import Masking, mask_update
from tf_dlg.defenses.noising import Noising, RelativeNoising, add_noise
from tf_dlg.defenses.pruning import Pruning, prune_by_magnitude

__all__ = [
  "DEFENSES",
  "PARAMETER_SEARCH",
  "get_defense",
  "Defense",
  "NoDefense",
  "zero_fraction",
  "batchnorm_exclusion",
  "Clipping",
  "RelativeClipping",
  "ValueClipping",
  "clip_by_global_norm",
  "clip_by_value",
  "clip_scale",
  "DPGaussian",
  "dp_fedavg_epsilon",
  "dp_sgd_epsilon",
  "Masking",
  "mask_update",
  "Noising",
  "RelativeNoising",
  "add_noise",
  "Pruning",
  "prune_by_magnitude",
  # Lazy (see _LAZY).
  "DefendedModel",
  "DefenseTrainStepMixin",
  "defended_gradients",
  "defense_from_config",
  "defense_factory",
  "median_clipping_factory",
  "dp_fedavg_aggregator",
]

DEFENSES = {
  "none": NoDefense,
  "masking": Masking,
  "clipping": Clipping,
  "clipping_ratio": RelativeClipping,
  "value_clipping": ValueClipping,
  "pruning": Pruning,
  "noising": Noising,
  "noising_ratio": RelativeNoising,
  "dp": DPGaussian,
}

# (low, high, scale, stronger): the range `experiments.threshold_search` bisects.
PARAMETER_SEARCH = {
  # Log scale for masking: a few percent already stop the Euclidean iDLG attack.
  "masking": (1e-4, 0.99, "log", "higher"),
  # The weak end must exceed single-image gradient norms (tens), where clipping is a no-op.
  "clipping": (1e-3, 1e4, "log", "lower"),
  # Fractions of the update's own norm: 1 is a no-op, 1e-4 shrinks it 10^4-fold.
  "clipping_ratio": (1e-4, 1.0, "log", "lower"),
  "value_clipping": (1e-6, 1.0, "log", "lower"),
  "pruning": (0.01, 0.99, "linear", "higher"),
  "noising": (1e-6, 1.0, "log", "higher"),
  # Noise-to-signal ratios: 1e-4 barely perturbs, 10 buries the update in noise.
  "noising_ratio": (1e-4, 10.0, "log", "higher"),
  "dp": (1e-4, 10.0, "log", "higher"),
}

# Loaded on first access (module __getattr__): the Keras glue and everything that needs TFF.
_LAZY = {
  "DefendedModel": "keras",
  "DefenseTrainStepMixin": "keras",
  "defended_gradients": "keras",
  "defense_from_config": "keras",
  "defense_factory": "aggregator",
  "median_clipping_factory": "aggregator",
  "dp_fedavg_aggregator": "dp",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))


def get_defense(name: str, param: Optional[float] = None, **options) -> Defense:
  """Builds a defence by name, e.g. `get_defense("masking", 0.6, exclude=bn_mask)`."""
  if name not in DEFENSES:
    raise ValueError(f"Unknown defence {name!r}; expected one of {', '.join(DEFENSES)}.")
  if name == "none":
    return NoDefense(exclude=options.get("exclude"))
  if param is None:
    raise ValueError(f"Defence {name!r} needs a parameter (--defense_param).")
  return DEFENSES[name](param, **options)
