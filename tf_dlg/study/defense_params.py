"""Which defence settings the convergence grid trains: from a thresholds.csv, or given.

A grid label is a defence name, or `name@tag` (e.g. `masking@adaptive`) to train one
defence at a second setting; `defense_of` maps a label back to its defence.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from tf_dlg import validation
from tf_dlg.study import records


def defense_params_from_thresholds(
  path: str, dataset: str, attack: str = "idlg", kind: str = "plain", reached_only: bool = False
) -> Dict[str, Tuple[float, str]]:
  """{label: (parameter, provenance)} from a thresholds.csv for one dataset.

  `kind="plain"`: the thresholds against `attack`, labelled by defence name.
  `kind="adaptive"`: each defence's protecting setting against its strongest attacker
  (rows of kind `adaptive`): the stronger of its adjusted-SSIM and identification
  thresholds, where an image must pass both; labelled `<defence>@adaptive`. A defence whose threshold was not
  reached takes the strongest value searched, marked as such in the provenance, unless
  `reached_only`: then it is left out (no setting in its range protects, so there is no
  protecting setting to cost). Damaged cells raise ValueError naming file, line, column.
  """
  validation.check_choice("kind", kind, ("plain", "adaptive"))
  out, unprotected = {}, set()
  rows = records.read_thresholds(path)
  for r in rows:
    if r["dataset"] != dataset or (r.get("kind") or "plain") != kind:
      continue
    if kind == "plain" and r["attack"] != attack:
      continue
    label = r["defense"] + ("@adaptive" if kind == "adaptive" else "")
    if reached_only and _not_reached(r, kind):
      unprotected.add(label)  # one attacker it does not stop is enough
      continue
    setting = _setting(r, kind)
    # Several attackers of one defence (adaptive): the setting that stops them all.
    if label in out and (setting[0] > out[label][0]) != (r["stronger"] == "higher"):
      continue
    out[label] = setting
  out = {k: v for k, v in out.items() if k not in unprotected}
  if not out and not unprotected:
    available = sorted({(r["dataset"], r.get("kind") or "plain", r["attack"]) for r in rows})
    raise ValueError(
      f"{path} has no {kind} thresholds for dataset={dataset!r}"
      + (f", attack={attack!r}" if kind == "plain" else "")
      + f"; it has (dataset, kind, attack) {available}."
    )
  return out


def _criteria(r: Dict[str, Any], kind: str) -> List[Tuple[str, str]]:
  """[(threshold column, status)] of the leak criteria a row's setting must meet."""
  criteria = [("threshold", r["status"])]
  if kind == "adaptive" and r.get("id_status") not in (None, ""):
    criteria.append(("id_threshold", r["id_status"]))
  return criteria


def _not_reached(r: Dict[str, Any], kind: str) -> bool:
  return any(status == "not_reached" for _, status in _criteria(r, kind))


def _setting(r: Dict[str, Any], kind: str) -> Tuple[float, str]:
  """(parameter, provenance) a thresholds row asks training to use."""
  higher = r["stronger"] == "higher"
  strongest = r["search_high"] if higher else r["search_low"]
  against = f" vs {r['attack']}" if kind == "adaptive" else ""
  criteria = _criteria(r, kind)
  if _not_reached(r, kind):
    return strongest, f"strongest searched{against} (threshold not reached)"
  if records.attack_untested(r):
    return r["threshold"], f"weakest searched{against} ({records.UNTESTED})"
  values = [r[k] for k, _ in criteria if r[k] is not None]
  value = (max if higher else min)(values)
  both = " under both leak criteria" if len(values) > 1 else ""
  return value, f"{kind} threshold{against}{both} ({r['status']})"


def parse_defense_params(items: Sequence[str]) -> Dict[str, Tuple[float, str]]:
  """`["masking:0.6", "clipping:1.0"]` -> {defence: (value, "given")}; a defence named
  twice is refused (which value was meant cannot be guessed)."""
  out = {}
  for item in items:
    name, sep, value = item.partition(":")
    try:
      if not sep:
        raise ValueError
      number = float(value)
    except ValueError:
      raise ValueError(
        f"--defense_params entry {item!r} must look like NAME:VALUE, e.g. masking:0.6"
      ) from None
    if name.strip() in out:
      raise ValueError(
        f"--defense_params names {name.strip()!r} twice ({out[name.strip()][0]:g} and "
        f"{number:g}); give each defence one value."
      )
    out[name.strip()] = (number, "given")
  return out


def defense_of(label: str) -> str:
  """The registry defence of a grid label: `masking` or `masking@adaptive` -> masking."""
  return label.split("@", 1)[0]
