"""What the studies know about each defence, in one table keyed by defence name.

The transform library (`tf_dlg.defenses`) says what a defence does; this table says how
the studies treat it: the range the threshold search bisects, the attackers known to
break it, the paper's name for it in any unit and its claim about the accuracy cost, the
other unit's counterpart, and the privacy-utility frontier's settings. A defence without
a row here is not studied; a toy one is added with `register(DefenseRow(...))`.

`PARAMETER_SEARCH`, `STRONGEST_ATTACKERS`, `ABSOLUTE_OF` and `RELATIVE_OF` are read-only
views of the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Callable, Dict, Optional, Tuple

from tf_dlg import defenses
from tf_dlg.registry import Registry


@dataclasses.dataclass(frozen=True)
class SearchRange:
  """Where the threshold search bisects a parameter: [low, high] on a `scale`.

  `stronger` says which end protects more: "higher" or "lower".
  """

  low: float
  high: float
  scale: str  # "log" | "linear"
  stronger: str  # "higher" | "lower"

  def __post_init__(self):
    if self.scale not in ("log", "linear") or self.stronger not in ("higher", "lower"):
      raise ValueError(f"{self}: scale must be log|linear and stronger higher|lower.")
    if not self.low < self.high or (self.scale == "log" and self.low <= 0):
      raise ValueError(f"{self}: needs 0 < low < high on a log scale, low < high otherwise.")

  def as_tuple(self) -> Tuple[float, float, str, str]:
    return (self.low, self.high, self.scale, self.stronger)


@dataclasses.dataclass(frozen=True)
class UnitLink:
  """The same defence in the other unit: `other`'s parameter = this one's x or / `statistic`.

  `statistic` names a statistic of the undefended update (`norm`: global L2 norm, `rms`:
  root mean square of its entries). A relative defence's value times the statistic is
  the absolute equivalent; an absolute value divided by it is the relative one.
  """

  other: str
  statistic: str


# The paper's claims about a defence's accuracy cost at its threshold ("" = none).
PAPER_COSTS = ("", "almost_none", "degrades")


@dataclasses.dataclass(frozen=True)
class DefenseRow:
  """One defence as the studies see it.

  Attributes:
    name: The `tf_dlg.defenses` name.
    search: The threshold search's range, or None: not searched.
    strongest_attackers: Attacks known to break it best; an image leaks if any does.
    family: The paper's name of the defence in any unit (`clipping_ratio` -> clipping).
    absolute: For a relative-unit defence, its absolute counterpart (`UnitLink`).
    relative: For an absolute-unit defence, its relative counterpart.
    frontier: The privacy-utility frontier's default settings, weakest (leaks) to
      strongest (meant to protect against `strongest_attackers`); () = not on it.
    paper_cost: What the paper claims its threshold costs in accuracy, one of
      `PAPER_COSTS`, or "" (no claim); claims.md tests it.
  """

  name: str
  search: Optional[SearchRange] = None
  strongest_attackers: Tuple[str, ...] = ()
  family: str = ""
  absolute: Optional[UnitLink] = None
  relative: Optional[UnitLink] = None
  frontier: Tuple[float, ...] = ()
  paper_cost: str = ""

  def __post_init__(self):
    cls = defenses.DEFENSES.get(self.name)
    if cls is None:
      raise ValueError(f"DefenseRow {self.name!r}: no such defence in tf_dlg.defenses.")
    if self.paper_cost not in PAPER_COSTS:
      raise ValueError(
        f"DefenseRow {self.name!r}: paper_cost={self.paper_cost!r} is not one of {PAPER_COSTS}."
      )
    if self.search is not None and not cls.single_update:
      raise ValueError(f"DefenseRow {self.name!r}: a search needs a single-update defence.")
    outside = [
      v for v in self.frontier if self.search and not self.search.low <= v <= self.search.high
    ]
    if outside:
      raise ValueError(
        f"DefenseRow {self.name!r}: frontier settings {outside} lie outside the searched "
        f"range [{self.search.low:g}, {self.search.high:g}]."
      )

  @property
  def param_name(self) -> str:
    return defenses.DEFENSES[self.name].param_name


# Cosine matching ignores a rescaled update: the strongest answer to norm clipping, by
# reconstruction (ig) or by matching a gallery of candidates (gallery_match).
_CLIPPING_ATTACKERS = ("ig", "gallery_match")
# Masked cosine matching ignores the zeroed coordinates; so does gallery matching
# (tf_dlg.attacks.gallery), which scores candidates on the coordinates carried.
_ZEROING_ATTACKERS = ("masked_ig", "gallery_match")
# Noise has no adaptive answer: the better of cosine and Euclidean matching, and
# gallery matching (the attacker the identification criterion assumes).
_NOISE_ATTACKERS = ("ig", "idlg", "gallery_match")


_REGISTRY = Registry("defence", taken="already in the table")
_ROWS = _REGISTRY.view


def register(row: DefenseRow) -> DefenseRow:
  """Adds a defence's row (every view below sees it); returns the row."""
  if not isinstance(row, DefenseRow):
    raise TypeError(f"register takes a DefenseRow, got {type(row).__name__}.")
  return _REGISTRY.register(row.name, row)


def unregister(name: str) -> None:
  """Removes a defence's row (for tests that add a toy one)."""
  _REGISTRY.unregister(name)


def row(name: str) -> DefenseRow:
  """The row of `name`; ValueError naming the defences in the table."""
  return _REGISTRY[name]


for _row in (
  DefenseRow(name="none"),
  DefenseRow(
    name="masking",
    # Log scale: a few percent already stop the Euclidean iDLG attack.
    search=SearchRange(1e-4, 0.99, "log", "higher"),
    strongest_attackers=_ZEROING_ATTACKERS,
    family="masking",
    paper_cost="almost_none",
    # From a rate that stops iDLG only to the one masked cosine matching needs.
    frontier=(0.01, 0.1, 0.5, 0.9, 0.99),
  ),
  DefenseRow(
    name="clipping",
    # The weak end must exceed single-image gradient norms (tens), where clipping is a no-op.
    search=SearchRange(1e-3, 1e4, "log", "lower"),
    strongest_attackers=_CLIPPING_ATTACKERS,
    family="clipping",
    paper_cost="almost_none",
    relative=UnitLink("clipping_ratio", "norm"),
  ),
  DefenseRow(
    name="clipping_ratio",
    # Fractions of the update's own norm: 1 is a no-op, 1e-4 shrinks it 10^4-fold.
    search=SearchRange(1e-4, 1.0, "log", "lower"),
    strongest_attackers=_CLIPPING_ATTACKERS,
    family="clipping",
    paper_cost="almost_none",
    absolute=UnitLink("clipping", "norm"),
    # Scale-free cosine matching ignores any rescaling: the strongest setting searched is
    # on the frontier to show that it does not protect.
    frontier=(0.5, 0.1, 0.01, 1e-3, 1e-4),
  ),
  # Not measurable on one update, so not searched.
  DefenseRow(name="clipping_median", family="clipping", paper_cost="almost_none"),
  DefenseRow(
    name="value_clipping",
    search=SearchRange(1e-6, 1.0, "log", "lower"),
    strongest_attackers=("ig", "idlg", "gallery_match"),
    family="value_clipping",
  ),
  DefenseRow(
    name="pruning",
    search=SearchRange(0.01, 0.99, "linear", "higher"),
    strongest_attackers=_ZEROING_ATTACKERS,
    family="pruning",
    paper_cost="degrades",
    # Masked cosine matching is stopped only in the last few percent of kept entries.
    frontier=(0.3, 0.6, 0.9, 0.95, 0.99),
  ),
  DefenseRow(
    name="noising",
    search=SearchRange(1e-6, 1.0, "log", "higher"),
    strongest_attackers=_NOISE_ATTACKERS,
    family="noising",
    paper_cost="degrades",
    relative=UnitLink("noising_ratio", "rms"),
  ),
  DefenseRow(
    name="noising_ratio",
    # Noise-to-signal ratios: 1e-4 barely perturbs, 10 buries the update in noise.
    search=SearchRange(1e-4, 10.0, "log", "higher"),
    strongest_attackers=_NOISE_ATTACKERS,
    family="noising",
    paper_cost="degrades",
    absolute=UnitLink("noising", "rms"),
    frontier=(0.1, 0.3, 1.0, 3.0, 10.0),
  ),
  DefenseRow(
    name="dp",
    search=SearchRange(1e-4, 10.0, "log", "higher"),
    strongest_attackers=_NOISE_ATTACKERS,
    family="dp",
    # Noise multipliers (clip 1.0): over 15 full-participation rounds, epsilon ~3.3e5,
    # ~3.4e3, ~65 (replace-one neighbours: see tf_dlg.defenses.dp.dp_fedavg_epsilon).
    frontier=(0.01, 0.1, 1.0),
  ),
):
  register(_row)

# The four defences of the paper, in the units that transfer between models.
PAPER_DEFENSES = ("masking", "clipping_ratio", "pruning", "noising_ratio")


class _View(Mapping):
  """Read-only {name: read(row)} over the table, skipping rows where it is None."""

  def __init__(self, read: Callable[[DefenseRow], object]):
    self._read = read

  def __getitem__(self, name):
    value = self._read(_ROWS[name]) if name in _ROWS else None
    if value is None:
      raise KeyError(name)
    return value

  def __iter__(self):
    return (n for n, r in list(_ROWS.items()) if self._read(r) is not None)

  def __len__(self):
    return sum(1 for _ in self)

  def __repr__(self):
    return repr(dict(self))


def _link(link: Optional[UnitLink]):
  return None if link is None else (link.other, link.statistic)


# (low, high, scale, stronger): the range the threshold search bisects.
PARAMETER_SEARCH = _View(lambda r: None if r.search is None else r.search.as_tuple())
STRONGEST_ATTACKERS = _View(lambda r: r.strongest_attackers if r.search else None)
# Defence -> (the other unit's name, statistic of the undefended update it scales by).
ABSOLUTE_OF = _View(lambda r: _link(r.absolute))
RELATIVE_OF = _View(lambda r: _link(r.relative))


def paper_cost_claims() -> Dict[str, str]:
  """{family: the paper's accuracy-cost claim (`DefenseRow.paper_cost`)}, table order."""
  return {r.family: r.paper_cost for r in _ROWS.values() if r.paper_cost}
