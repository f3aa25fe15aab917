"""Client-side defences against gradient leakage, one module each.

`get_defense(name, param, **options)` builds one by name; every defence is a pure,
seeded TensorFlow transform of an update (`tf_dlg.defenses.base.Defense`), used
unchanged by the attack experiments, by TFF (`defense_factory`) and by Keras
(`tf_dlg.defenses.keras.DefendedModel`).

| name            | module       | parameter            | stronger when |
|-----------------|--------------|----------------------|---------------|
| masking         | masking.py   | rate in [0, 1)       | higher        |
| clipping        | clipping.py  | L2 norm > 0          | lower         |
| value_clipping  | clipping.py  | bound > 0            | lower         |
| pruning         | pruning.py   | rate in [0, 1)       | higher        |
| noising         | noising.py   | stddev >= 0          | higher        |
| dp              | dp.py        | noise multiplier >= 0 (clip 1.0) | higher |
"""

from __future__ import annotations

from typing import Optional

from tf_dlg.defenses.base import Defense, NoDefense, zero_fraction
from tf_dlg.defenses.batchnorm import batchnorm_exclusion
from tf_dlg.defenses.clipping import Clipping, ValueClipping, clip_by_global_norm, clip_by_value
from tf_dlg.defenses.dp import DPGaussian, dp_fedavg_epsilon, dp_sgd_epsilon
from tf_dlg.defenses.keras import DefendedModel, DefenseTrainStepMixin, defended_gradients
from tf_dlg.defenses.masking import Masking, mask_update
from tf_dlg.defenses.noising import Noising, add_noise
from tf_dlg.defenses.pruning import Pruning, prune_by_magnitude

DEFENSES = {
    "none": NoDefense,
    "masking": Masking,
    "clipping": Clipping,
    "value_clipping": ValueClipping,
    "pruning": Pruning,
    "noising": Noising,
    "dp": DPGaussian,
}

# (low, high, scale, stronger): the range `experiments.threshold_search` bisects.
PARAMETER_SEARCH = {
    # Log scale for masking: a few percent already stop the Euclidean iDLG attack.
    "masking": (1e-4, 0.99, "log", "higher"),
    # The weak end must exceed single-image gradient norms (tens), where clipping is a no-op.
    "clipping": (1e-3, 1e4, "log", "lower"),
    "value_clipping": (1e-6, 1.0, "log", "lower"),
    "pruning": (0.01, 0.99, "linear", "higher"),
    "noising": (1e-6, 1.0, "log", "higher"),
    "dp": (1e-4, 10.0, "log", "higher"),
}


def get_defense(name: str, param: Optional[float] = None, **options) -> Defense:
  """Builds a defence by name, e.g. `get_defense("masking", 0.6, exclude=bn_mask)`."""
  if name not in DEFENSES:
    raise ValueError(f"Unknown defence {name!r}; expected one of {', '.join(DEFENSES)}.")
  if name == "none":
    return NoDefense(exclude=options.get("exclude"))
  if param is None:
    raise ValueError(f"Defence {name!r} needs a parameter (--defense_param).")
  return DEFENSES[name](param, **options)


def defense_factory(defense, inner_agg_factory, exclude=None, seed: int = 0):
  """See `tf_dlg.defenses.aggregator.defense_factory` (imports TFF on first use)."""
  from tf_dlg.defenses import aggregator  # pylint: disable=g-import-not-at-top
  return aggregator.defense_factory(defense, inner_agg_factory, exclude=exclude, seed=seed)
