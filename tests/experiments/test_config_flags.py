"""Flags generated from a configuration dataclass (`experiments.cli.define_config_flags`),
read back into an equal configuration, and library errors that name field paths shown
with the driver's flag names (`experiments.cli.flag_names`)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Tuple, Union

import pytest
from absl import flags

from experiments import cli
from tf_dlg.attacks.runner import AttackConfig
from tf_dlg.federated.config import FederatedConfig


@dataclasses.dataclass(frozen=True)
class Toy:
  """A configuration of every kind of field.

  Attributes:
    count: How many.
    rate: How fast, over
      two lines.
    name, label: A name and its label.
    kind: One of `a`, `b`.
    limit: A bound (None: none).
    fast: Whether to hurry (None: decide).
    seed: One seed, or one per run.
    seeds: Seeds of the runs.
    kinds: Kinds.
  Other text ends the section's entries:
    options: Not a flag (no flag type).
  """

  count: int = 3
  rate: float = 0.5
  name: str = "x"
  label: Optional[str] = None
  kind: str = "a"
  limit: Optional[int] = None
  fast: Optional[bool] = None
  seed: Union[int, Tuple[int, ...]] = 0
  seeds: Tuple[int, ...] = (0, 1)
  kinds: Tuple[str, ...] = ("a",)
  options: Mapping[str, int] = dataclasses.field(default_factory=dict)


@pytest.fixture
def names(monkeypatch):
  """The translation table, empty and restored after the test."""
  table = {}
  monkeypatch.setattr(cli, "_FLAG_NAMES", table)
  return table


def test_attribute_help_reads_one_line_per_field_and_shared_lines():
  helps = cli.attribute_help(Toy)
  assert helps["rate"] == "How fast, over two lines."
  assert helps["name"] == helps["label"] == "A name and its label."
  assert helps["count"] == "How many." and "options" in helps  # parsed, not a flag


def test_a_dataclass_becomes_typed_flags_with_its_defaults_and_help(names):
  fv = flags.FlagValues()
  cli.define_config_flags(
    Toy, names={"fast": "hurry"}, choices={"kind": "ab", "kinds": "ab"}, flag_values=fv
  )
  fv(["prog"])
  assert "options" not in fv and "fast" not in fv  # no flag type; named otherwise
  kinds = {name: fv[name].parser.flag_type() for name in fv}
  listed = "comma separated list of strings"
  assert kinds == dict(
    count="int", rate="float", name="string", label="string", kind="string enum",
    limit="int", hurry="bool", seed="int", seeds=listed, kinds=listed,
  )  # fmt: skip
  defaults = {name: fv[name].default for name in fv}
  assert defaults == dict(
    count=3, rate=0.5, name="x", label=None, kind="a", limit=None, hurry=None, seed=0,
    seeds=["0", "1"], kinds=["a"],
  )  # fmt: skip
  assert fv["rate"].help == "How fast, over two lines."
  assert fv["kinds"].help.startswith("Kinds. Any of: a, b")
  assert cli.config_from_flags(Toy, flag_values=fv) == Toy()


def test_parsed_flags_give_back_an_equal_configuration(names):
  fv = flags.FlagValues()
  cli.define_config_flags(Toy, names={"fast": "hurry"}, choices={"kind": "ab"}, flag_values=fv)
  fv(["prog", "--count=7", "--rate=2.5", "--label=y", "--kind=b", "--limit=4", "--nohurry"])
  fv(["prog", "--seeds=3,4,5", "--kinds=b,a"])
  want = Toy(count=7, rate=2.5, label="y", kind="b", limit=4, fast=False)
  want = dataclasses.replace(want, seeds=(3, 4, 5), kinds=("b", "a"))
  assert cli.config_from_flags(Toy, flag_values=fv) == want
  assert cli.config_from_flags(Toy, flag_values=fv, count=1).count == 1
  with pytest.raises(flags.IllegalFlagValueError):
    fv(["prog", "--kind=c"])


def test_a_field_without_help_or_flag_type_is_refused(names):
  with pytest.raises(ValueError, match=r"Toy.options: no flag type or no help text"):
    cli.define_config_flags(Toy, ["options"], flag_values=flags.FlagValues())
  with pytest.raises(ValueError, match=r"Toy has no fields \['counts'\]"):
    cli.define_config_flags(Toy, ["counts"], flag_values=flags.FlagValues())


def test_every_federated_field_is_a_documented_flag_and_reads_back(names):
  fv = flags.FlagValues()
  cli.define_config_flags(FederatedConfig, flag_values=fv)
  assert set(fv) == {f.name for f in dataclasses.fields(FederatedConfig)}
  assert all(fv[name].help for name in fv)
  fv(["prog", "--num_clients=4", "--clients_per_round=3", "--capture_round=2", "--rounds=3"])
  got = cli.config_from_flags(FederatedConfig, flag_values=fv)
  assert got == FederatedConfig(num_clients=4, clients_per_round=3, capture_round=2, rounds=3)
  # The one default: the configuration's (a flag cannot disagree with it).
  fresh = flags.FlagValues()
  cli.define_config_flags(FederatedConfig, flag_values=fresh)
  fresh(["prog"])
  assert cli.config_from_flags(FederatedConfig, flag_values=fresh) == FederatedConfig()


def test_errors_name_field_paths_and_drivers_show_flags(names):
  with pytest.raises(ValueError, match=r"^federated\.batch_size=0 must be an integer") as e:
    FederatedConfig(batch_size=0)
  assert cli.flag_names(str(e.value)) == "--batch_size=0 must be an integer in [1, inf]."
  with pytest.raises(ValueError, match=r"^attack\.iterations=0 must") as e:
    AttackConfig(iterations=0)
  assert cli.flag_names(str(e.value)).startswith("--iterations=0 must be an integer")
  # A registered flag of another name; a plain argument; a path that is no field.
  cli.register_flag_names({"attack.jit_compile": "jit", "index": "index"})
  message = "attack.jit_compile=2 with index=3 (indexes=1); attack.json and study.x exist"
  assert cli.flag_names(message) == (
    "--jit=2 with --index=3 (indexes=1); attack.json and study.x exist"
  )
  # A path registered by the flags that were generated for it.
  cli.define_config_flags(
    AttackConfig, ["jit_compile"], names={"jit_compile": "jit"}, flag_values=flags.FlagValues()
  )
  assert names["attack.jit_compile"] == "jit"
