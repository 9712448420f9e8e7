"""The package's import graph keeps the shape docs/architecture.md draws (issue #24).

Read from the source with `ast` (nothing is imported), so a violation is reported with its
file and line: imports go downward only, by the layer table below; no module uses another
module's private names; no module imports inside a function; nothing outside formats/ looks at
a state's class or fields to learn its format; the folders are the picture's.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = "optax_adadelta"
ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE_PAGE = ROOT / "docs" / "architecture.md"

# The layer table (the same as docs/architecture.md's; a test below compares the two). A module
# may import modules of its own layer and of lower layers, never of a higher one.
LAYERS = {
  "_checks": 0,
  "_rules": 0,
  "native/": 1,
  "formats/": 2,
  "_adadelta": 3,
  "transforms": 4,
  "presets": 4,
  "interop": 4,
  "sharding": 4,
  "checkpoint/": 4,
  "build_native": 4,
  "__init__": 5,
  "__main__": 6,
  "demo/": 6,
}
# The native layer stands alone: it imports nothing else from the package.
SELF_CONTAINED = ("native/",)
# Imported inside a function because they are optional extras: importing them at the top would
# make them required. Everything else is imported at the top of its module.
OPTIONAL_DEPENDENCIES = {"torch", "tqdm", "matplotlib"}


class Import(NamedTuple):
  source: str  # the importing module, e.g. "optax_adadelta.formats.full"
  target: str  # the module imported (a package's own module is the package's name)
  line: int
  in_function: bool


class PrivateUse(NamedTuple):
  source: str
  name: str  # e.g. "optax_adadelta._native._lib"
  line: int


def parse(path: Path) -> ast.Module:
  """`path`'s syntax tree. CPython 3.11's AST constructor can raise a spurious SystemError
  ("AST constructor recursion depth mismatch", CPython gh-106905); here it came only after the
  checkpoint tests, whose orbax threads are still alive (2 runs of 3), so such a parse is
  retried."""
  for attempt in range(5):
    try:
      return ast.parse(path.read_text(), filename=str(path))
    except SystemError:
      if attempt == 4:
        raise
  raise AssertionError("unreachable")


def modules(root: Path = ROOT) -> dict[str, Path]:
  """Every module of the package, by dotted name (a package's __init__ is the package's name)."""
  found = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if "__pycache__" in parts:
      continue
    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def folders(root: Path = ROOT) -> set[str]:
  """The package's sub-packages, relative to it, e.g. {"native", "formats"}."""
  base = root / PACKAGE
  return {p.parent.relative_to(base).as_posix() for p in base.glob("**/__init__.py")} - {"."}


def _is_private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def _is_package(module: str, root: Path) -> bool:
  return (root / Path(*module.split(".")) / "__init__.py").exists()


class _Reader(ast.NodeVisitor):
  """Collects one module's package imports and its uses of other modules' private names."""

  def __init__(self, module: str, known: set[str], root: Path):
    self.module, self.known, self.root = module, known, root
    self.imports: list[Import] = []
    self.third_party: list[Import] = []
    self.private_uses: list[PrivateUse] = []
    self.bound: dict[str, str] = {}  # local name -> package module it stands for
    self.depth = 0

  def _record(self, target: str, line: int) -> None:
    item = Import(self.module, target, line, self.depth > 0)
    if target == PACKAGE or target.startswith(PACKAGE + "."):
      self.imports.append(item)
    else:
      self.third_party.append(item)

  def _inside_function(self, node: ast.AST) -> None:
    self.depth += 1
    self.generic_visit(node)
    self.depth -= 1

  def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
    self._inside_function(node)

  def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
    self._inside_function(node)

  def visit_Lambda(self, node: ast.Lambda) -> None:
    self._inside_function(node)

  def visit_Import(self, node: ast.Import) -> None:
    for alias in node.names:
      self._record(alias.name, node.lineno)
      if alias.name in self.known:
        self.bound[alias.asname or alias.name] = alias.name if alias.asname else PACKAGE
        self._check_private_module(alias.name, node.lineno)

  def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
    source = node.module or ""
    if node.level:  # relative: resolve against this module's package
      here = self.module.split(".")
      if not _is_package(self.module, self.root):
        here = here[:-1]
      here = here[: len(here) - node.level + 1]
      source = ".".join(here + ([node.module] if node.module else []))
    for alias in node.names:
      submodule = f"{source}.{alias.name}"
      if submodule in self.known:
        self._record(submodule, node.lineno)
        self.bound[alias.asname or alias.name] = submodule
        self._check_private_module(submodule, node.lineno)
      else:
        self._record(source, node.lineno)
        if source in self.known and source != self.module and _is_private(alias.name):
          self.private_uses.append(PrivateUse(self.module, submodule, node.lineno))

  def _check_private_module(self, target: str, line: int) -> None:
    """A private module may be imported from inside its own package only."""
    package, _, name = target.rpartition(".")
    if _is_private(name) and not (self.module + ".").startswith(package + "."):
      self.private_uses.append(PrivateUse(self.module, target, line))

  def _resolve(self, node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
      return self.bound.get(node.id)
    if isinstance(node, ast.Attribute):
      owner = self._resolve(node.value)
      if owner is not None and f"{owner}.{node.attr}" in self.known:
        return f"{owner}.{node.attr}"
    return None

  def visit_Attribute(self, node: ast.Attribute) -> None:
    owner = self._resolve(node.value)
    name = f"{owner}.{node.attr}"
    if owner not in (None, self.module) and name not in self.known and _is_private(node.attr):
      self.private_uses.append(PrivateUse(self.module, name, node.lineno))
    self.generic_visit(node)


def read(root: Path = ROOT) -> dict[str, _Reader]:
  known = modules(root)
  readers = {}
  for module, path in known.items():
    reader = _Reader(module, set(known), root)
    reader.visit(parse(path))
    readers[module] = reader
  return readers


def layer_key(module: str, root: Path = ROOT) -> str | None:
  """The layer table's entry for `module`: its top-level module, or its top-level folder + "/"."""
  parts = module.split(".")[1:]
  if not parts:
    return "__init__"
  key = parts[0] + ("/" if len(parts) > 1 or _is_package(module, root) else "")
  return key if key in LAYERS else None


def where(module: str, line: int, root: Path = ROOT) -> str:
  return f"{modules(root)[module].relative_to(root)}:{line}"


def layer_violations(root: Path = ROOT) -> list[str]:
  readers = read(root)
  found = [f"{where(m, 1, root)}: {m} has no layer" for m in readers if layer_key(m, root) is None]
  registry = f"{PACKAGE}.formats"
  format_modules = {i.target for i in readers.get(registry, _Reader("", set(), root)).imports} - {
    registry,
    f"{registry}.base",
  }
  for reader in readers.values():
    for i in reader.imports:
      source, target = layer_key(i.source, root), layer_key(i.target, root)
      if source is None or target is None:
        continue
      at = f"{where(i.source, i.line, root)}: {i.source} imports {i.target}"
      if LAYERS[target] > LAYERS[source]:
        found.append(f"{at} (layer {LAYERS[source]} imports layer {LAYERS[target]})")
      elif source in SELF_CONTAINED and target != source:
        found.append(f"{at} ({source} imports nothing else from the package)")
      elif source == target == "formats/" and i.source != registry:
        if i.target == registry:
          found.append(f"{at} (a format module imports the registry)")
        elif i.source in format_modules and i.target in format_modules:
          found.append(f"{at} (a format imports another format)")
  return found + cycles(readers, root)


def cycles(readers: dict[str, _Reader], root: Path = ROOT) -> list[str]:
  graph = {m: sorted({i.target for i in r.imports if i.target != m}) for m, r in readers.items()}
  found, state = [], {}  # state: 1 on the current path, 2 done

  def visit(module: str, path: list[str]) -> None:
    state[module] = 1
    for target in graph.get(module, []):
      if state.get(target) == 1:
        loop = [*path[path.index(target) :], module, target]
        found.append(f"{where(module, 1, root)}: import cycle {' -> '.join(loop)}")
      elif target not in state:
        visit(target, [*path, module])
    state[module] = 2

  for module in graph:
    if module not in state:
      visit(module, [])
  return found


def private_violations(root: Path = ROOT) -> list[str]:
  return [
    f"{where(u.source, u.line, root)}: {u.source} uses {u.name}"
    for r in read(root).values()
    for u in r.private_uses
  ]


def function_import_violations(root: Path = ROOT) -> list[str]:
  found = []
  for reader in read(root).values():
    for i in reader.imports + reader.third_party:
      if i.in_function and i.target.split(".")[0] not in OPTIONAL_DEPENDENCIES:
        at = where(i.source, i.line, root)
        found.append(f"{at}: {i.source} imports {i.target} in a function")
  return found


def _state_classes(root: Path) -> tuple[set[str], set[str]]:
  """The state classes formats/ defines (NamedTuples, classes named *State) and their fields."""
  names, fields = set(), set()
  for path in (root / PACKAGE / "formats").glob("*.py"):
    for node in parse(path).body:
      bases = {getattr(b, "id", getattr(b, "attr", "")) for b in getattr(node, "bases", [])}
      if isinstance(node, ast.ClassDef) and ("NamedTuple" in bases or node.name.endswith("State")):
        names.add(node.name)
        fields |= {f.target.id for f in node.body if isinstance(f, ast.AnnAssign)}  # type: ignore[union-attr]
  return names, fields


def format_inspections(root: Path = ROOT) -> list[str]:
  """Places outside formats/ that look at a state's class or fields to learn its format."""
  classes, fields = _state_classes(root)
  found = []
  for module, path in modules(root).items():
    if module.startswith(f"{PACKAGE}.formats") or module == PACKAGE:
      continue
    for node in ast.walk(parse(path)):
      if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        continue
      if node.func.id == "isinstance" and len(node.args) == 2:
        kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
        looked = {getattr(k, "id", getattr(k, "attr", None)) for k in kinds} & classes
      elif node.func.id in ("hasattr", "getattr") and len(node.args) >= 2:
        looked = {getattr(node.args[1], "value", None)} & fields
      else:
        continue
      if looked:
        found.append(f"{where(module, node.lineno, root)}: {module} looks at {sorted(looked)}")
  return found


def documented_layers(page: Path = ARCHITECTURE_PAGE) -> dict[str, int]:
  """The layer table of docs/architecture.md: rows `| <layer> | `module`, `folder/` ... |`."""
  table = {}
  for row in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", page.read_text(), flags=re.MULTILINE):
    for name in re.findall(r"`([\w/]+)`", row[1]):
      table[name] = int(row[0])
  return table


def documented_folders(page: Path = ARCHITECTURE_PAGE) -> set[str]:
  """The folders drawn in the page's picture (its first code block): words ending in "/"."""
  picture = page.read_text().split("## The picture", 1)[1].split("```", 2)[1]
  return {f.rstrip("/") for f in re.findall(r"(?<!\S)((?:[a-z_][a-z0-9_]*/)+)(?!\S)", picture)}


def test_imports_go_downward_by_the_layer_table():
  assert layer_violations() == []


def test_no_module_uses_another_modules_private_names():
  assert private_violations() == []


def test_no_imports_inside_functions():
  assert function_import_violations() == []


def test_only_formats_look_at_a_states_class_or_fields():
  """The rest asks the registry (`formats.format_of(node)`) which format a state has."""
  assert format_inspections() == []


def test_the_layer_table_is_the_one_the_architecture_page_states():
  assert documented_layers() == LAYERS


def test_the_folders_are_the_ones_the_architecture_page_draws():
  assert folders() == documented_folders()


@pytest.mark.parametrize(
  ("source", "rule"),
  [
    ("from optax_adadelta import _adadelta\n", "layer"),
    ("from optax_adadelta._checks import _helper\n", "private"),
    ("def f():\n  import optax_adadelta.presets\n", "function"),
    ("def f(state):\n  return isinstance(state, ScaleByAdadeltaState)\n", "inspection"),
    ("def f(state):\n  return hasattr(state, 'e_g2')\n", "inspection"),
  ],
  ids=["upward_import", "private_name", "import_in_function", "isinstance", "hasattr"],
)
def test_each_rule_reports_a_planted_violation(tmp_path, source, rule):
  """The rules can fail: a copy of the package with one bad line in _rules.py is caught."""
  for path in modules().values():
    copy = tmp_path / path.relative_to(ROOT)
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(path.read_text() + ("\n" + source if path.name == "_rules.py" else ""))
  check = {
    "layer": layer_violations,
    "private": private_violations,
    "function": function_import_violations,
    "inspection": format_inspections,
  }[rule]
  assert any("_rules.py" in v for v in check(tmp_path))
