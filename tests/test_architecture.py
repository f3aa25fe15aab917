"""The layer picture of docs/ARCHITECTURE.md holds: no lower layer imports a higher one,
no import cycle, and TensorFlow Federated stays out of the core but for tf_dlg.execution.

Imports are read with `ast` from every module of `tf_dlg`, `experiments` and
`benchmarks`, those inside functions too (a lazy import is still a dependency). The
layers are parsed from the table in docs/ARCHITECTURE.md, so the picture and the check
cannot drift apart. `importlib.import_module` with a computed name is not seen (the
lazy attribute maps of `tf_dlg.federated`); every other import is.

The checker is also run on synthetic trees in tmp_path, which it must fail.
"""

import ast
import pathlib
import re
from typing import Dict, List, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("tf_dlg", "experiments", "benchmarks")


def parse_layers(text: str) -> List[Tuple[str, List[str]]]:
  """[(layer, [module prefixes])], lowest first, from the doc's `| layer | modules |` table."""
  layers = []
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 2 and "`" in cells[1]:
      layers.append((cells[0], re.findall(r"`([\w.]+)`", cells[1])))
  return layers


def modules(root: pathlib.Path, packages=PACKAGES) -> Dict[str, pathlib.Path]:
  """{dotted module name: file} of the packages' .py files under `root`."""
  out = {}
  for package in packages:
    for path in sorted((root / package).rglob("*.py")):
      parts = list(path.relative_to(root).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def _resolve(name: str, known: Dict[str, pathlib.Path]):
  """The longest known module that `name` (a.b.c) is or lies in, or None."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in known:
      return ".".join(parts[:n])
  return None


def imports(module: str, path: pathlib.Path, known) -> Set[str]:
  """The known modules `module` imports, at any depth of its code."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import sub` imports the submodule when there is one, else pkg itself.
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    for name in names:
      target = _resolve(name, known)
      if target is not None and target != module:
        found.add(target)
  return found


def graph(root: pathlib.Path, packages=PACKAGES) -> Dict[str, Set[str]]:
  known = modules(root, packages)
  return {m: imports(m, p, known) for m, p in known.items()}


def layer_of(module: str, layers) -> Tuple[int, str]:
  """(rank, layer name) of the most specific prefix naming `module`; KeyError if none."""
  best = None
  for rank, (name, prefixes) in enumerate(layers):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + "."):
        if best is None or len(prefix) > best[0]:
          best = (len(prefix), rank, name)
  if best is None:
    raise KeyError(module)
  return best[1], best[2]


def layer_violations(g: Dict[str, Set[str]], layers) -> List[str]:
  bad = []
  for module, targets in sorted(g.items()):
    rank, name = layer_of(module, layers)
    for target in sorted(targets):
      t_rank, t_name = layer_of(target, layers)
      if t_rank > rank:
        bad.append(f"{module} ({name}) imports {target} ({t_name})")
  return bad


def cycles(g: Dict[str, Set[str]]) -> List[List[str]]:
  """Strongly connected components with more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(g.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(g):
    if v not in index:
      visit(v)
  return out


def tff_importers(root: pathlib.Path, packages=PACKAGES) -> Set[str]:
  """Modules with an `import tensorflow_federated` (or from it) anywhere in their code."""
  out = set()
  for module, path in modules(root, packages).items():
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module or ""]
      if any(n.split(".")[0] == "tensorflow_federated" for n in names):
        out.add(module)
  return out


LAYERS = parse_layers(ARCHITECTURE.read_text())


# --------------------------------------------------------------------------- the tree


def test_the_doc_names_the_four_layers_lowest_first():
  assert [name for name, _ in LAYERS] == ["core", "adapters", "study", "drivers"]
  assert "tf_dlg.defenses" in LAYERS[0][1] and "tf_dlg.federated" in LAYERS[1][1]


def test_every_module_has_a_layer():
  missing = []
  for module in modules(ROOT):
    try:
      layer_of(module, LAYERS)
    except KeyError:
      missing.append(module)
  assert not missing, f"add these to docs/ARCHITECTURE.md's table: {missing}"


def test_no_lower_layer_imports_a_higher_one():
  g = graph(ROOT)
  assert len(g) > 60  # the whole tree was read
  assert "tf_dlg.defenses.base" in g["tf_dlg.defenses.clipping"]  # and its imports
  assert layer_violations(g, LAYERS) == []


def test_no_import_cycle():
  assert cycles(graph(ROOT)) == []


def test_tff_stays_out_of_the_core_but_for_execution():
  importers = tff_importers(ROOT)
  assert "tf_dlg.federated.defense_aggregator" in importers  # the check sees imports
  core = [m for m in importers if layer_of(m, LAYERS)[1] == "core"]
  assert all(m.startswith("tf_dlg.execution") for m in core), core
  assert not [m for m in importers if m.startswith("tf_dlg.defenses")]


# --------------------------------------------------------------------------- it can fail


def _tree(tmp_path, files: Dict[str, str]) -> pathlib.Path:
  for name, source in files.items():
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
  return tmp_path


SYNTHETIC_LAYERS = parse_layers(
  "| layer | modules |\n|---|---|\n"
  "| core | `pkg`, `pkg.core` |\n| adapters | `pkg.adapter` |\n| study | `pkg.study` |"
)


def test_a_core_module_importing_the_study_inside_a_function_is_caught(tmp_path):
  root = _tree(
    tmp_path,
    {
      "pkg/__init__.py": "",
      "pkg/core/__init__.py": "",
      "pkg/core/t.py": "import os\n\ndef f():\n  from pkg.study import table\n  return table\n",
      "pkg/adapter.py": "from pkg.core import t\n",
      "pkg/study/__init__.py": "",
      "pkg/study/table.py": "from ..adapter import t\n",  # relative, upward: allowed
    },
  )
  g = graph(root, ("pkg",))
  assert g["pkg.study.table"] == {"pkg.adapter"}
  assert layer_violations(g, SYNTHETIC_LAYERS) == [
    "pkg.core.t (core) imports pkg.study.table (study)"
  ]


def test_a_cycle_through_a_lazy_import_is_caught(tmp_path):
  root = _tree(
    tmp_path,
    {
      "pkg/__init__.py": "",
      "pkg/core/__init__.py": "",
      "pkg/core/a.py": "from pkg.core import b\n",
      "pkg/core/b.py": "def g():\n  import pkg.core.c\n",
      "pkg/core/c.py": "class C:\n  def m(self):\n    from . import a\n",
      "pkg/core/d.py": "from pkg.core import a\n",  # into the cycle, not on it
    },
  )
  g = graph(root, ("pkg",))
  assert layer_violations(g, SYNTHETIC_LAYERS) == []
  assert cycles(g) == [["pkg.core.a", "pkg.core.b", "pkg.core.c"]]


def test_an_unplaced_module_and_a_tff_import_are_caught(tmp_path):
  root = _tree(
    tmp_path,
    {
      "pkg/__init__.py": "",
      "pkg/core/x.py": "def f():\n  import tensorflow_federated as tff\n",
      "other/y.py": "",
    },
  )
  assert tff_importers(root, ("pkg",)) == {"pkg.core.x"}
  with pytest.raises(KeyError):
    layer_of("other.y", SYNTHETIC_LAYERS)
