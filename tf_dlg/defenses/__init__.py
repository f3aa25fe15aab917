"""Client-side defences against gradient leakage: a library of pure, seeded transforms.

`get_defense(name, param, **options)` builds one by name; every defence is a pure
TensorFlow transform of an update, `defense.apply(update, param, seed)`, bound to the
setting it was checked with (`defense(update, seed)`; `tf_dlg.defenses.base.Defense`).
The same object is used unchanged by the attack experiments and by the adapters that
carry it into training: TFF (`tf_dlg.federated.defense_aggregator`), Keras
(`tf_dlg.integrations.keras`) and Flower (`tf_dlg.integrations.flower`). This package
imports none of them, and no study: what a study knows about a defence (its search range,
frontier grid, the paper's claims, its strongest attackers) is in
`tf_dlg.study.defense_table`.

| name            | module      | parameter                           |
|-----------------|-------------|-------------------------------------|
| masking         | masking.py  | rate in [0, 1)                      |
| clipping        | clipping.py | L2 norm > 0                         |
| clipping_ratio  | clipping.py | clip_ratio in (0, 1] x own L2 norm  |
| clipping_median | clipping.py | clip_ratio in (0, 1] x round median |
| value_clipping  | clipping.py | bound > 0                           |
| pruning         | pruning.py  | rate in [0, 1)                      |
| noising         | noising.py  | stddev >= 0                         |
| noising_ratio   | noising.py  | noise_ratio >= 0 x update RMS       |
| dp              | dp.py       | noise multiplier >= 0 (clip 1.0)    |

`clipping_ratio` and `noising_ratio` are the relative units: one setting means the same
on any model's updates, where an absolute norm or stddev does not transfer.
`clipping_median` clips each client of a round to a ratio of the round's median client
norm: it needs the round (`Defense.single_update` is False), so it exists in federated
training only. A new defence is a `Defense` subclass and one `register(cls)` line.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from tf_dlg.defenses.base import Chain, Defense, NoDefense, zero_fraction
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
from tf_dlg.registry import Registry

__all__ = [
  "DEFENSES",
  "register",
  "unregister",
  "check_param",
  "get_defense",
  "defense_from_config",
  "Defense",
  "Chain",
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
]


_REGISTRY = Registry("defence")
# {name: Defense subclass}, read-only; `register` adds to it.
DEFENSES = _REGISTRY.view


def register(cls: type) -> type:
  """Adds a `Defense` subclass under its `name`; returns it."""
  if not (isinstance(cls, type) and issubclass(cls, Defense)):
    raise TypeError(f"register takes a Defense subclass, got {cls!r}.")
  return _REGISTRY.register(cls.name, cls)


def unregister(name: str) -> None:
  """Removes a registered defence (for tests that register a toy one)."""
  _REGISTRY.unregister(name)


def _class(name: str) -> type:
  return _REGISTRY[name]


for _cls in (
  NoDefense,
  Masking,
  Clipping,
  RelativeClipping,
  MedianClipping,
  ValueClipping,
  Pruning,
  Noising,
  RelativeNoising,
  DPGaussian,
):
  register(_cls)


def check_param(name: str, param: Optional[float] = None, at: str = "param"):
  """`param`, checked for defence `name` without building it (ValueError naming it).

  `at`: how the caller's user names the parameter, for the error when it is missing
  (a configuration gives its field path, which the drivers turn into their flag).
  """
  cls = _class(name)
  if cls is NoDefense:
    return None
  if param is None:
    raise ValueError(f"Defence {name!r} needs a parameter; none was given ({at}=None).")
  return cls.check(param)


def get_defense(name: str, param: Optional[float] = None, **options) -> Defense:
  """Builds a defence by name, e.g. `get_defense("masking", 0.6, exclude=bn_mask)`."""
  cls = _class(name)
  if cls is NoDefense:
    return NoDefense(exclude=options.get("exclude"))
  check_param(name, param)
  return cls(param, **options)


def defense_from_config(config: Dict[str, Any]) -> Defense:
  """Rebuilds a defence from its `get_config()` (the inverse, for serialisation)."""
  config = dict(config)
  cls = _class(config.pop("name"))
  return get_defense(cls.name, config.pop(cls.param_name, None), **config)
