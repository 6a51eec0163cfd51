"""The package layout, read with ``ast`` (nothing is imported).

* No import cycle among the modules of ``ddim_jax`` and ``ddim_torch_ref``: every import counts,
  top-level or inside a function (``import ddim_jax.x``, ``from ddim_jax import x, y``,
  ``from ddim_jax.x import y``, relative imports). A package's ``__init__`` is a module of its own
  (``ddim_jax``); ``from ddim_jax import x`` is an edge to ``ddim_jax.x`` when x is a submodule or
  subpackage, else to ``ddim_jax``.
* The layers (``LAYERS``): each folder of ``ddim_jax`` imports only the folders below it: ``core``,
  ``data``, ``infra`` and ``configs`` only the base (``errors``, and ``files``, which imports ``errors``); ``quality`` and ``interop`` those; ``inference``
  everything but ``training``; ``training`` everything but the command line. A planted upward
  import fails (tested on the real graph).
* ``ddim_torch_ref`` never imports jax, flax or ddim_jax (but ``ddim_jax.inference.grids``, NumPy and
  Pillow only, which writes the twin's PNG grids exactly as ``ddim-jax sample`` does).
* ``ddim_jax/cli.py`` is the command line only: top-level functions ``build_parser``, ``main``,
  ``cmd_*``, ``add_*_parser`` and ``add_*_arguments``, imports, UPPER_CASE constants, the module docstring and
  ``if __name__ == "__main__":``; the library code lives in the other modules. It imports neither
  ``parallel`` nor ``sampling``: devices and the sampler are the library's (``inference.sharded``).
* No module of ``ddim_jax`` uses an underscore name of another (``from ddim_jax.x import _y``,
  ``from .x import _y``, ``x._y`` of an imported module): a shared name is public. A planted
  private import fails.
"""

import ast
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("ddim_jax", "ddim_torch_ref")


# ------------------------------------------------------------------------------------------------
# Reading the packages


def package_modules(root: str, packages=PACKAGES) -> dict[str, tuple[str, bool]]:
  """Dotted module name -> (file path, is a package ``__init__``) for every .py file of ``packages``."""
  modules = {}
  for package in packages:
    for directory, subdirs, files in os.walk(os.path.join(root, package)):
      subdirs[:] = sorted(d for d in subdirs if d != "__pycache__" and not d.startswith("."))
      if "__init__.py" not in files:
        continue  # not a package: nothing in it is importable as a submodule
      parts = os.path.relpath(directory, root).split(os.sep)
      for name in sorted(files):
        if not name.endswith(".py"):
          continue
        is_package = name == "__init__.py"
        dotted = ".".join(parts if is_package else parts + [name[:-3]])
        modules[dotted] = (os.path.join(directory, name), is_package)
  return modules


def _known(dotted: str, modules) -> str | None:
  """The longest prefix of ``dotted`` that is one of ``modules`` (``a.b.name`` -> ``a.b``)."""
  parts = dotted.split(".")
  for end in range(len(parts), 0, -1):
    candidate = ".".join(parts[:end])
    if candidate in modules:
      return candidate
  return None


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
  """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
  if level == 0:
    return target or ""
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[:len(base) - (level - 1)] if level > 1 else base
  return ".".join(base + ([target] if target else []))


def imported_modules(tree: ast.AST, module: str, is_package: bool, modules) -> dict[str, int]:
  """The modules of ``modules`` that ``tree`` (the source of ``module``) imports -> first line."""
  found = {}

  def add(dotted, line):
    name = _known(dotted, modules)
    if name is not None and name != module:
      found.setdefault(name, line)

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name, node.lineno)
    elif isinstance(node, ast.ImportFrom):
      source = _absolute(module, is_package, node.level, node.module)
      for alias in node.names:
        submodule = f"{source}.{alias.name}"
        add(submodule if submodule in modules else source, node.lineno)
  return found


def import_graph(root: str, packages=PACKAGES) -> dict[str, dict[str, int]]:
  """module -> {imported module: line of the first such import} over ``packages``."""
  modules = package_modules(root, packages)
  graph = {}
  for name, (path, is_package) in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
    graph[name] = imported_modules(tree, name, is_package, modules)
  return graph


def find_cycles(graph) -> list[list[str]]:
  """One shortest cycle per strongly connected component that has one, as [a, b, ..., a].

  Tarjan's algorithm (iterative) for the components; within a component the cycle starts at its
  alphabetically first module and is found by breadth-first search, so the report is stable.
  """
  nodes = sorted(set(graph) | {m for targets in graph.values() for m in targets})
  edges = {n: sorted(graph.get(n, ())) for n in nodes}
  index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
  for start in nodes:
    if start in index:
      continue
    work = [(start, iter(edges[start]))]
    index[start] = low[start] = counter[0]
    counter[0] += 1
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter[0]
          counter[0] += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(edges[child])))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = set()
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.add(member)
          if member == node:
            break
        components.append(component)

  cycles = []
  for component in components:
    first = min(component)
    if len(component) == 1 and first not in edges[first]:
      continue
    parent, queue, cycle = {first: None}, [first], None
    while queue and cycle is None:
      next_queue = []
      for node in queue:
        for child in edges[node]:
          if child == first:
            path = [node]
            while parent[path[-1]] is not None:
              path.append(parent[path[-1]])
            cycle = path[::-1] + [first]
            break
          if child in component and child not in parent:
            parent[child] = node
            next_queue.append(child)
        if cycle is not None:
          break
      queue = next_queue
    cycles.append(cycle)
  return sorted(cycles)


def format_cycle(cycle, graph) -> str:
  """``a -> b -> a`` with the line of each import: ``a (line 3) -> b (line 9) -> a``."""
  hops = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
  return " -> ".join(hops + [cycle[-1]])


# ------------------------------------------------------------------------------------------------
# The cycle finder and the import reader on small synthetic inputs


@pytest.mark.parametrize("graph,want", [
    ({}, []),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, []),  # a diamond is no cycle
    ({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]]),
    ({"a": {"a"}}, [["a", "a"]]),
    ({"x": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}, [["a", "b", "c", "a"]]),
    # The shortest cycle through the first module of the component, one per component.
    ({"a": {"b", "c"}, "b": {"c"}, "c": {"a"}, "p": {"q"}, "q": {"p", "a"}}, [["a", "c", "a"], ["p", "q", "p"]]),
    # Modules that only appear as import targets.
    ({"m": {"n"}}, []),
])
def test_find_cycles_on_synthetic_graphs(graph, want):
  assert find_cycles(graph) == want


def test_find_cycles_on_a_long_chain_does_not_recurse():
  chain = {f"m{i:05d}": {f"m{i + 1:05d}"} for i in range(5000)}
  assert find_cycles(chain) == []
  chain["m05000"] = {"m00000"}
  (cycle,) = find_cycles(chain)
  assert len(cycle) == 5002 and cycle[0] == cycle[-1] == "m00000"


def test_format_cycle_names_the_lines():
  graph = {"p.a": {"p.b": 3}, "p.b": {"p.a": 9}}
  assert format_cycle(["p.a", "p.b", "p.a"], graph) == "p.a (line 3) -> p.b (line 9) -> p.a"


def _write(root, files):
  for path, text in files.items():
    full = os.path.join(root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w", encoding="utf-8") as f:
      f.write(text)


def test_import_graph_reads_every_form_of_import(tmp_path):
  _write(tmp_path, {
      "pkg/__init__.py": '"""The package."""\n',
      "pkg/a.py": "import os\nimport pkg.b\nfrom pkg import c, VERSION\n",
      "pkg/b.py": "def f():\n  from pkg.sub.deep import thing\n  return thing\n",
      "pkg/c.py": "from . import b\nfrom .sub import deep\n",
      "pkg/sub/__init__.py": "from .. import a\n",
      "pkg/sub/deep.py": "from ..c import x\nfrom . import missing_name\nimport pkg\n",
      "pkg/notes/readme.py": "import pkg.a\n",  # no __init__.py: not a package
      "other/__init__.py": "import pkg.a\n",  # another package, not scanned here
  })
  graph = import_graph(str(tmp_path), ("pkg",))
  assert {m: set(t) for m, t in graph.items()} == {
      "pkg": set(),
      "pkg.a": {"pkg.b", "pkg.c", "pkg"},  # VERSION is not a submodule: the package __init__
      "pkg.b": {"pkg.sub.deep"},  # inside a function
      "pkg.c": {"pkg.b", "pkg.sub.deep"},
      "pkg.sub": {"pkg.a"},
      "pkg.sub.deep": {"pkg.c", "pkg.sub", "pkg"},
  }
  assert graph["pkg.b"]["pkg.sub.deep"] == 2
  # One component {a, b, c, sub, sub.deep}; its shortest cycle through pkg.a:
  assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.deep", "pkg.sub", "pkg.a"]]


def test_cli_rules_on_a_synthetic_module():
  source = '''"""Doc."""
import argparse
from x import y
TIMEOUT_S = 3
COLUMNS: int = 4
def build_parser(): pass
def main(argv=None): pass
def cmd_sample(args): pass
def add_sample_parser(sub): pass
def _helper(): pass
def sample_images(): pass
class Source: pass
cache = {}
async def cmd_async(args): pass
try:
  import z
except ImportError:
  z = None
if __name__ == "__main__":
  main()
'''
  assert cli_violations(source) == [
      "line 10: def _helper", "line 11: def sample_images", "line 12: class Source",
      "line 13: cache = ...", "line 14: async def cmd_async", "line 15: a try statement"]


# ------------------------------------------------------------------------------------------------
# The real packages


def test_no_import_cycles():
  graph = import_graph(REPO)
  assert {"ddim_jax", "ddim_jax.cli", "ddim_jax.configs", "ddim_torch_ref.models"} <= set(graph)
  cycles = find_cycles(graph)
  assert not cycles, "import cycle(s):\n" + "\n".join(format_cycle(c, graph) for c in cycles)


# What each top-level module or folder of ddim_jax may import besides itself (bottom up).
# errors (the exception classes) and files (the only module that opens a path for writing) are the base
# every layer stands on: every layer raises expected errors and writes files.
_BASE = {"errors", "files"}
LAYERS = {
    "ddim_jax": set(),  # the package __init__: a docstring and the version
    "errors": set(),
    "files": {"errors"},
    "configs": _BASE,
    "core": _BASE,
    "data": _BASE,
    "infra": _BASE,
    "quality": _BASE | {"configs", "core", "data"},
    "interop": _BASE | {"configs", "core", "data"},
    "inference": _BASE | {"configs", "core", "data", "infra", "quality", "interop"},
    "training": _BASE | {"configs", "core", "data", "infra", "quality", "interop", "inference"},
    "arguments": _BASE | {"configs", "core", "data", "infra", "quality", "interop", "inference"},
    # cli also reads the package's __version__ (``ddim-jax --version``).
    "cli": _BASE | {"ddim_jax", "configs", "core", "data", "infra", "quality", "interop", "inference", "training",
                    "arguments"},
    "__main__": {"cli"},  # `python -m ddim_jax`: the command line, nothing else
}


def layer_of(module: str) -> str:
  """``ddim_jax.core.models`` -> ``core``; ``ddim_jax`` -> ``ddim_jax``."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph, layers=LAYERS) -> list[str]:
  """Imports of ``ddim_jax`` modules that reach a layer their own may not import (or an unknown one)."""
  found = []
  for module, targets in sorted(graph.items()):
    if not module.startswith("ddim_jax"):
      continue
    own = layer_of(module)
    if own not in layers:
      found.append(f"{module}: {own!r} is in no layer (add it to LAYERS)")
      continue
    for target, line in sorted(targets.items()):
      other = layer_of(target)
      if target.startswith("ddim_jax") and other != own and other not in layers[own]:
        found.append(f"{module} (line {line}) imports {target}: {own} may import {sorted(layers[own]) or 'nothing'}")
  return found


def test_the_layers_hold():
  graph = import_graph(REPO, ("ddim_jax",))
  assert {layer_of(m) for m in graph} == set(LAYERS), "a folder without a layer, or a layer without a folder"
  violations = layer_violations(graph)
  assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_a_planted_upward_import_breaks_the_layers():
  graph = {m: dict(t) for m, t in import_graph(REPO, ("ddim_jax",)).items()}
  graph["ddim_jax.core.models"]["ddim_jax.training.trainer"] = 7
  graph["ddim_jax.inference.pipeline"]["ddim_jax.training.feed"] = 9
  assert layer_violations(graph) == [
      "ddim_jax.core.models (line 7) imports ddim_jax.training.trainer: core may import ['errors', 'files']",
      "ddim_jax.inference.pipeline (line 9) imports ddim_jax.training.feed: inference may import "
      "['configs', 'core', 'data', 'errors', 'files', 'infra', 'interop', 'quality']"]


FORBIDDEN_IN_TWIN = ("jax", "flax", "ddim_jax")
# NumPy + Pillow: the same PNG grids as ddim-jax sample; and the standard-library file primitives, so
# that the twin's outputs are written as safely as the package's.
ALLOWED_IN_TWIN = ("ddim_jax.inference.grids", "ddim_jax.files")


def test_torch_twin_never_imports_jax():
  found = []
  for name, (path, _) in package_modules(REPO, ("ddim_torch_ref",)).items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        modules = [f"{node.module}.{alias.name}" for alias in node.names]
      else:
        continue
      found += [f"{name} line {node.lineno}: {module}" for module in modules
                if module.split(".")[0] in FORBIDDEN_IN_TWIN and module not in ALLOWED_IN_TWIN]
  assert not found, "ddim_torch_ref imports JAX code: " + "; ".join(found)


CLI_FUNCTION = re.compile(r"^(build_parser|main|entry|cmd_\w+|add_\w+_parser|add_\w+_arguments)$")
CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _is_main_guard(node) -> bool:
  test = node.test
  return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
          and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq) and len(test.comparators) == 1
          and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def cli_violations(source: str) -> list[str]:
  """The top-level statements of ``source`` that the command-line module should not hold."""
  tree = ast.parse(source)
  bad = []
  for i, node in enumerate(tree.body):
    if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(
        node.value.value, str):
      continue
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    if isinstance(node, ast.FunctionDef):
      if not CLI_FUNCTION.match(node.name):
        bad.append(f"line {node.lineno}: def {node.name}")
    elif isinstance(node, ast.AsyncFunctionDef):
      bad.append(f"line {node.lineno}: async def {node.name}")
    elif isinstance(node, ast.ClassDef):
      bad.append(f"line {node.lineno}: class {node.name}")
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names = [t.id if isinstance(t, ast.Name) else ast.unparse(t) for t in targets]
      if not all(isinstance(t, ast.Name) and CONSTANT.match(t.id) for t in targets):
        bad.append(f"line {node.lineno}: {', '.join(names)} = ...")
    elif isinstance(node, ast.If) and _is_main_guard(node):
      continue
    else:
      bad.append(f"line {node.lineno}: a {type(node).__name__.lower()} statement")
  return bad


def test_cli_holds_only_the_command_line():
  path = os.path.join(REPO, "ddim_jax", "cli.py")
  with open(path, encoding="utf-8") as f:
    bad = cli_violations(f.read())
  assert not bad, ("ddim_jax/cli.py should define only build_parser, main, entry, cmd_*, add_*_parser, add_*_arguments, "
                   "imports and UPPER_CASE constants; move the rest into the library:\n" + "\n".join(bad))


# Devices and the sampler belong to the library (``ddim_jax.inference.sharded`` splits the rows): the
# command line parses, calls one library function per step, and prints.
CLI_FORBIDDEN = ("ddim_jax.infra.parallel", "ddim_jax.core.sampling")


def cli_forbidden_imports(graph) -> list[str]:
  """The imports of ``ddim_jax.cli`` that reach a module of ``CLI_FORBIDDEN``."""
  return [f"ddim_jax.cli (line {line}) imports {target}" for target, line in sorted(graph["ddim_jax.cli"].items())
          if target in CLI_FORBIDDEN]


def test_cli_imports_neither_parallel_nor_sampling():
  bad = cli_forbidden_imports(import_graph(REPO, ("ddim_jax",)))
  assert not bad, ("ddim_jax/cli.py should leave devices and the sampler to the library (ddim_jax.inference.sharded, "
                   "pipeline, figures):\n" + "\n".join(bad))


def test_a_planted_sampler_import_in_the_cli_is_caught():
  graph = {m: dict(t) for m, t in import_graph(REPO, ("ddim_jax",)).items()}
  graph["ddim_jax.cli"]["ddim_jax.core.sampling"] = 30
  graph["ddim_jax.cli"]["ddim_jax.infra.parallel"] = 31
  graph["ddim_jax.cli"]["ddim_jax.core.schedules"] = 32  # allowed
  assert cli_forbidden_imports(graph) == ["ddim_jax.cli (line 30) imports ddim_jax.core.sampling",
                                          "ddim_jax.cli (line 31) imports ddim_jax.infra.parallel"]


LEAVES = ("ddim_jax.infra.parallel", "ddim_jax.infra.checkpointing", "ddim_jax.data", "ddim_jax.errors", "ddim_jax.infra.workdir",
          "ddim_jax.infra.flops", "ddim_jax.infra.digests", "ddim_jax.infra.preemption", "ddim_jax.infra.object_store",
          "ddim_jax.files")
# The base every leaf may import: the exception classes (which import nothing of ddim_jax) and the file
# primitives (which import only the exception classes).
SHARED = {"ddim_jax.errors": (), "ddim_jax.files": ("ddim_jax.errors",)}
# The leaves a leaf is made of (and may import): the Checkpointer's digests, preemption and bucket paths.
LEAF_PARTS = {"ddim_jax.infra.checkpointing": ("ddim_jax.infra.digests", "ddim_jax.infra.preemption",
                                               "ddim_jax.infra.object_store")}


def test_parallel_checkpointing_and_data_are_leaves():
  """The modules the trainer calls import nothing else of ddim_jax (the data package only itself),
  except the base (``SHARED``: errors, which imports nothing of ddim_jax at all, and files, which imports
  only errors) and their parts (``LEAF_PARTS``)."""
  graph = import_graph(REPO)
  for name, imports in graph.items():
    leaf = next((l for l in LEAVES if name == l or name.startswith(l + ".")), None)
    if leaf is None:
      continue
    allowed = SHARED[leaf] if leaf in SHARED else (*SHARED, *LEAF_PARTS.get(leaf, ()))
    outside = sorted(m for m in imports if m.startswith("ddim_jax") and m not in allowed
                     and not (m == leaf or m.startswith(leaf + ".")))
    assert not outside, f"{name} should be a leaf but imports {outside}"


# ------------------------------------------------------------------------------------------------
# Private names stay in their module: no module of ddim_jax imports an underscore name of another
# (``from ddim_jax.x import _y``, ``from .x import _y``, ``import ddim_jax.x as m`` then ``m._y``). A name
# two modules share is public (no underscore) in the module that defines it.


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports_in(source: str, module: str, is_package: bool, modules) -> list[str]:
  """The uses in ``source`` (the text of ``module``) of underscore names of other modules of ``modules``."""
  tree = ast.parse(source)
  found, aliases = [], {}  # aliases: local name -> the module of ``modules`` it is bound to
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        target = _known(alias.name, modules)
        if alias.asname and target == alias.name:
          aliases[alias.asname] = target
        parts = alias.name.split(".")
        if target is not None and any(_is_private(p) for p in parts[1:]):
          found.append(f"{module} (line {node.lineno}) imports {alias.name}")
    elif isinstance(node, ast.ImportFrom):
      source_module = _absolute(module, is_package, node.level, node.module)
      if _known(source_module, modules) is None:
        continue
      for alias in node.names:
        submodule = f"{source_module}.{alias.name}"
        if submodule in modules:
          aliases[alias.asname or alias.name] = submodule
        if _is_private(alias.name) and (submodule in modules or source_module != module):
          found.append(f"{module} (line {node.lineno}) imports {alias.name} from {source_module}")
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        and _is_private(node.attr) and aliases[node.value.id] != module):
      found.append(f"{module} (line {node.lineno}) uses {aliases[node.value.id]}.{node.attr}")
  return sorted(set(found), key=lambda s: (s.split(" (line")[0], int(s.split("line ")[1].split(")")[0]), s))


def private_imports(root: str, packages=("ddim_jax",)) -> list[str]:
  """``private_imports_in`` over every module of ``packages``."""
  modules = package_modules(root, packages)
  found = []
  for name, (path, is_package) in modules.items():
    with open(path, encoding="utf-8") as f:
      found += private_imports_in(f.read(), name, is_package, modules)
  return found


def test_private_imports_on_a_synthetic_package(tmp_path):
  _write(tmp_path, {
      "pkg/__init__.py": '"""The package."""\n__version__ = "1"\n',
      "pkg/a.py": "_HIDDEN = 1\nSHOWN = 2\ndef _helper(): pass\n",
      "pkg/_impl.py": "X = 1\n",
      "pkg/b.py": ("from pkg.a import SHOWN, _HIDDEN\n"  # line 1: _HIDDEN
                   "from .a import _helper as helper\n"  # line 2
                   "from pkg import __version__, a\n"  # dunder names are not private
                   "import pkg.a as mod\n"
                   "def f():\n"
                   "  return a._helper(), mod._HIDDEN, a.SHOWN\n"  # line 6: two uses
                   "from pkg import _impl\n"  # line 7: a private submodule
                   "import pkg._impl\n"  # line 8
                   "from os import _exit\n"  # not the package's
                   "def g(self):\n  return self._cache\n"),
      "pkg/c.py": "from pkg.c import _own\n_own = 1\nimport pkg.c as me\nme._own\n",  # its own names
  })
  assert private_imports(str(tmp_path), ("pkg",)) == [
      "pkg.b (line 1) imports _HIDDEN from pkg.a",
      "pkg.b (line 2) imports _helper from pkg.a",
      "pkg.b (line 6) uses pkg.a._HIDDEN",
      "pkg.b (line 6) uses pkg.a._helper",
      "pkg.b (line 7) imports _impl from pkg",
      "pkg.b (line 8) imports pkg._impl",
  ]


def test_no_module_imports_a_private_name_of_another():
  bad = private_imports(REPO)
  assert not bad, ("a module of ddim_jax uses an underscore name of another; make the name public (no underscore, "
                   "a docstring line) or keep the code in its module:\n" + "\n".join(bad))


def test_a_planted_private_import_is_caught():
  modules = package_modules(REPO, ("ddim_jax",))
  path, is_package = modules["ddim_jax.data.cache"]
  with open(path, encoding="utf-8") as f:
    source = f.read()
  public = "from ddim_jax.data.tfds_source import build_tfds\n"
  assert public in source
  line = source[:source.index(public)].count("\n") + 1
  planted = source.replace(public, "from ddim_jax.data.tfds_source import _build_tfds\n")
  assert private_imports_in(planted, "ddim_jax.data.cache", is_package, modules) == [
      f"ddim_jax.data.cache (line {line}) imports _build_tfds from ddim_jax.data.tfds_source"]


def test_training_does_not_import_torch():
  """tensorboardX's writer imports torch only to accept torch tensors: the trainer hides it (a train
  start without 1.3-6 s of torch), and TensorBoard events are still written (test_run_record)."""
  code = ("import sys; import ddim_jax.training.trainer, ddim_jax.training.reporting as r; "
          "assert 'torch' not in sys.modules, 'torch was imported'; assert r.SummaryWriter is not None")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
