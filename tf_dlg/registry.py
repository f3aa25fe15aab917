"""A name -> entry table with one error per misuse: the defences, their study rows, the models.

Each registry is read through `view` (a read-only mapping: `name in view`, `list(view)`),
extended with `register`, and shrunk with `unregister` (tests add toy entries). Lookups of an
unknown name raise one ValueError naming the known ones.
"""

from __future__ import annotations

import types
from typing import Any, Dict


class Registry:
  """Entries by name.

  Args:
    noun: What an entry is, in messages ("defence", "model").
    taken: How a taken name is said ("already registered", "already in the table").

  Each owner checks an entry's kind before it reads its name, so the table does not.
  """

  def __init__(self, noun: str, taken: str = "already registered"):
    self.noun, self._taken = noun, taken
    self._entries: Dict[str, Any] = {}
    self.view = types.MappingProxyType(self._entries)

  def register(self, name: str, entry: Any) -> Any:
    """Adds `entry` under `name` (registering the same entry again is a no-op)."""
    known = self._entries.get(name)
    if known is not None and known is not entry:
      raise ValueError(f"A {self.noun} named {name!r} is {self._taken}.")
    self._entries[name] = entry
    return entry

  def unregister(self, name: str) -> None:
    self[name]
    del self._entries[name]

  def __getitem__(self, name: str) -> Any:
    if name not in self._entries:
      raise ValueError(f"Unknown {self.noun} {name!r}; expected one of {', '.join(self._entries)}.")
    return self._entries[name]
