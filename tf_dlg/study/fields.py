"""How study errors name a setting: by its path in the study section, `study.<field>`.

The study section is `tf_dlg.study.presets.Preset`; the attack and federated sections
name theirs `attack.<field>` and `federated.<field>`. A driver translates a path into
its flag (`experiments.cli.flag_names`). This module sits below every study module, so
the checks of the presets' readers (search, frontier, sweep) name paths without
importing the presets.
"""

SECTION = "study"


def path(field: str) -> str:
  """`study.<field>`: a `Preset` field as an error names it."""
  return f"{SECTION}.{field}"
