"""Client-side defences against gradient leakage, one module each.

`get_defense(name, param, **options)` builds one by name; every defence is a pure,
seeded TensorFlow transform of an update (`tf_dlg.defenses.base.Defense`), used
unchanged by the attack experiments, by TFF (`defense_factory`) and by Keras
(`tf_dlg.defenses.keras.DefendedModel`).

Each module declares, beside its transform, a `DefenseSpec` (search range and direction,
units, strongest attackers, TFF mapping); the registry below is one `register` line per
spec, and `DEFENSES`, `PARAMETER_SEARCH`, `STRONGEST_ATTACKERS`, `ABSOLUTE_OF` and
`RELATIVE_OF` are read-only views of the registered specs. A new defence is a module
with a transform and a spec, and one `register(SPEC)` line.

| name            | module      | parameter                           | stronger when |
|-----------------|-------------|-------------------------------------|---------------|
| masking         | masking.py  | rate in [0, 1)                      | higher        |
| clipping        | clipping.py | L2 norm > 0                         | lower         |
| clipping_ratio  | clipping.py | clip_ratio in (0, 1] x own L2 norm  | lower         |
| clipping_median | clipping.py | clip_ratio in (0, 1] x round median | training only |
| value_clipping  | clipping.py | bound > 0                           | lower         |
| pruning         | pruning.py  | rate in [0, 1)                      | higher        |
| noising         | noising.py  | stddev >= 0                         | higher        |
| noising_ratio   | noising.py  | noise_ratio >= 0 x update RMS       | higher        |
| dp              | dp.py       | noise multiplier >= 0 (clip 1.0)    | higher        |

`clipping_ratio` and `noising_ratio` are the relative units: one setting means the same
on any model's updates, where an absolute norm or stddev does not transfer.
`clipping_median` clips each client of a round to a ratio of the round's median client
norm: it needs the round, so it exists in federated training only and is not searched.

Importing this package is cheap: the Keras glue (`DefendedModel`,
`DefenseTrainStepMixin`, `defended_gradients`) and the TFF aggregators
(`defense_factory`, `median_clipping_factory`, `dp_fedavg_aggregator`) load on first
use, so attack-only code never imports TensorFlow Federated.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Callable, Dict, Optional

from tf_dlg.defenses import clipping, dp, masking, noising, pruning
from tf_dlg.defenses.base import (
  Defense,
  DefenseSpec,
  NoDefense,
  SearchRange,
  UnitLink,
  zero_fraction,
)
from tf_dlg.defenses.batchnorm import batchnorm_exclusion
from tf_dlg.defenses.clipping import (
  Clipping,
  MedianClipping,
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
  "STRONGEST_ATTACKERS",
  "ABSOLUTE_OF",
  "RELATIVE_OF",
  "PAPER_DEFENSES",
  "register",
  "unregister",
  "spec",
  "get_defense",
  "Defense",
  "DefenseSpec",
  "SearchRange",
  "UnitLink",
  "NoDefense",
  "zero_fraction",
  "batchnorm_exclusion",
  "Clipping",
  "MedianClipping",
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

_SPECS: Dict[str, DefenseSpec] = {}


def register(defense_spec: DefenseSpec) -> DefenseSpec:
  """Adds a defence to the registry (every view below sees it); returns the spec."""
  if not isinstance(defense_spec, DefenseSpec):
    raise TypeError(f"register takes a DefenseSpec, got {type(defense_spec).__name__}.")
  known = _SPECS.get(defense_spec.name)
  if known is not None and known is not defense_spec:
    raise ValueError(f"A defence named {defense_spec.name!r} is already registered.")
  _SPECS[defense_spec.name] = defense_spec
  return defense_spec


def unregister(name: str) -> None:
  """Removes a registered defence (for tests that register a toy one)."""
  spec(name)
  del _SPECS[name]


def spec(name: str) -> DefenseSpec:
  """The registered spec of `name`; ValueError naming the known defences."""
  if name not in _SPECS:
    raise ValueError(f"Unknown defence {name!r}; expected one of {', '.join(_SPECS)}.")
  return _SPECS[name]


class _SpecView(Mapping):
  """Read-only {name: read(spec)} over the registry, skipping specs where it is None."""

  def __init__(self, read: Callable[[DefenseSpec], object]):
    self._read = read

  def __getitem__(self, name):
    value = self._read(_SPECS[name]) if name in _SPECS else None
    if value is None:
      raise KeyError(name)
    return value

  def __iter__(self):
    return (n for n, s in list(_SPECS.items()) if self._read(s) is not None)

  def __len__(self):
    return sum(1 for _ in self)

  def __repr__(self):
    return repr(dict(self))


def _link(link: Optional[UnitLink]):
  return None if link is None else (link.other, link.statistic)


DEFENSES = _SpecView(lambda s: s.cls)
# (low, high, scale, stronger): the range the threshold search bisects.
PARAMETER_SEARCH = _SpecView(lambda s: None if s.search is None else s.search.as_tuple())
STRONGEST_ATTACKERS = _SpecView(lambda s: s.strongest_attackers if s.search else None)
# Defence -> (the other unit's name, statistic of the undefended update it scales by).
ABSOLUTE_OF = _SpecView(lambda s: _link(s.absolute))
RELATIVE_OF = _SpecView(lambda s: _link(s.relative))


def paper_cost_claims() -> Dict[str, str]:
  """{family: the paper's accuracy-cost claim (`DefenseSpec.paper_cost`)}, registry order."""
  return {s.family: s.paper_cost for s in _SPECS.values() if s.paper_cost}


# The four defences of the paper, in the units that transfer between models.
PAPER_DEFENSES = ("masking", "clipping_ratio", "pruning", "noising_ratio")

register(DefenseSpec(name="none", cls=NoDefense))
register(masking.SPEC)
register(clipping.SPEC)
register(clipping.RATIO_SPEC)
register(clipping.MEDIAN_SPEC)
register(clipping.VALUE_SPEC)
register(pruning.SPEC)
register(noising.SPEC)
register(noising.RATIO_SPEC)
register(dp.SPEC)

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
  cls = spec(name).cls
  if cls is NoDefense:
    return NoDefense(exclude=options.get("exclude"))
  if param is None:
    raise ValueError(f"Defence {name!r} needs a parameter (--defense_param).")
  return cls(param, **options)
