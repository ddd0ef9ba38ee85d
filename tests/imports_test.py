"""The package's import graph: no circle between files, and imports run one way down the layers.

Every ``import`` / ``from ... import`` statement of every file under ``gptq_jax/`` counts, at module
level or inside a function (relative forms resolved), as an edge from that file to the file it
names: ``from gptq_jax.models import hf`` names ``models/hf.py``, ``from gptq_jax.models import
forward`` names ``models/__init__.py``. The layers (docs/layout.md), lowest first:

    base       config.py, integrity.py, data.py    (import nothing of the package)
    core       core/                               (pure JAX: no Flax, no I/O)
    kernels    kernels/
    models     models/
    pipeline   pipeline/, eval.py
    io         interop/, checkpoint.py, checkpoint_parts.py, resume.py, loading.py, plan/
    cli        cli/                                (the scripts' front ends)
    api        __init__.py                         (the public names, re-exported)

A file may import files of its own layer (without closing a circle) and of lower layers only.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gptq_jax"

LAYERS = ("base", "core", "kernels", "models", "pipeline", "io", "cli", "api")
# The layer of every subpackage and top-level module (a new top-level module must be added here).
LAYER_OF = {
    "gptq_jax": "api",
    "gptq_jax.config": "base", "gptq_jax.integrity": "base", "gptq_jax.data": "base",
    "gptq_jax.core": "core",
    "gptq_jax.kernels": "kernels",
    "gptq_jax.models": "models",
    "gptq_jax.pipeline": "pipeline", "gptq_jax.eval": "pipeline",
    "gptq_jax.interop": "io", "gptq_jax.checkpoint": "io", "gptq_jax.checkpoint_parts": "io",
    "gptq_jax.resume": "io", "gptq_jax.loading": "io", "gptq_jax.plan": "io",
    "gptq_jax.cli": "cli",
}


def modules(root: pathlib.Path = PACKAGE) -> dict[str, tuple[pathlib.Path, bool]]:
  """{dotted module name: (file, is a package __init__)} of every .py file under ``root``."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
  return out


def _owner(name: str, mods) -> str | None:
  """The deepest module of ``mods`` that ``name`` (a module or a name in one) lives in."""
  while name and name not in mods:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(module: str, source: str, is_package: bool, mods) -> set[str]:
  """The modules of ``mods`` that ``source`` imports anywhere (functions included)."""
  package = module if is_package else module.rpartition(".")[0]
  top = next(iter(mods)).split(".")[0]
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out |= {_owner(a.name, mods) for a in node.names if a.name.split(".")[0] == top}
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: one level is the current package
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      if target.split(".")[0] != top:
        continue
      for a in node.names:  # `from pkg import submodule` names the submodule's file
        sub = f"{target}.{a.name}"
        out.add(sub if sub in mods else _owner(target, mods))
  out.discard(None)
  out.discard(module)
  return out


def import_graph(root: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  mods = modules(root)
  return {m: imports_of(m, path.read_text(), is_package, mods)
          for m, (path, is_package) in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One circle of ``graph`` as ``[a, b, ..., a]``, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One circle per group of files that reach each other (each group reported once)."""
  out, left = [], {a: set(b) for a, b in graph.items()}
  while (cycle := find_cycle(left)) is not None:
    out.append(cycle)
    left = {a: b - set(cycle) for a, b in left.items() if a not in cycle}
  return out


def layer_of(module: str) -> str:
  """The layer of a module: its own entry, else its subpackage's (never the root package's)."""
  parts = module.split(".")
  for n in range(len(parts), 1, -1):
    if ".".join(parts[:n]) in LAYER_OF:
      return LAYER_OF[".".join(parts[:n])]
  if module in LAYER_OF:
    return LAYER_OF[module]
  raise KeyError(module)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  rank = {layer: i for i, layer in enumerate(LAYERS)}
  return [f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
          for a in sorted(graph) for b in sorted(graph[a])
          if rank[layer_of(b)] > rank[layer_of(a)]]


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def test_every_module_has_a_layer(graph):
  missing = []
  for m in graph:
    try:
      layer_of(m)
    except KeyError:
      missing.append(m)
  assert not missing, f"give these modules a layer in LAYER_OF (and docs/layout.md): {missing}"


def test_no_circle_between_files(graph):
  cycles = all_cycles(graph)
  assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_run_down_the_layers(graph):
  up = upward_imports(graph)
  assert not up, "upward imports:\n" + "\n".join(up)


def test_package_inits_only_re_export():
  """``__init__.py`` files hold a docstring, imports and ``__all__``, nothing else."""
  for path in sorted(PACKAGE.rglob("__init__.py")):
    for node in ast.parse(path.read_text()).body:
      ok = (isinstance(node, (ast.Import, ast.ImportFrom))
            or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
            or (isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["__all__"]))
      assert ok, f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: not a re-export"


def test_the_checker_sees_circles_and_upward_imports(tmp_path):
  """The graph builder on a small package: function-level and relative imports count."""
  pkg = tmp_path / "gptq_jax"
  (pkg / "core").mkdir(parents=True)
  (pkg / "models").mkdir()
  files = {
      "__init__.py": "from gptq_jax.core.a import f\n",
      "config.py": "",
      "core/__init__.py": "",
      "core/a.py": "from . import b\n",
      "core/b.py": "def g():\n  from gptq_jax.core.a import f\n  from ..models import m\n",
      "models/__init__.py": "",
      "models/m.py": "from gptq_jax import config\nimport gptq_jax.core.a\n",
  }
  for name, text in files.items():
    (pkg / name).write_text(text)
  g = import_graph(pkg)
  assert g["gptq_jax.core.a"] == {"gptq_jax.core.b"}
  assert g["gptq_jax.core.b"] == {"gptq_jax.core.a", "gptq_jax.models.m"}
  assert g["gptq_jax.models.m"] == {"gptq_jax.config", "gptq_jax.core.a"}
  assert find_cycle(g) == ["gptq_jax.core.a", "gptq_jax.core.b", "gptq_jax.core.a"]
  assert upward_imports(g) == ["gptq_jax.core.b (core) imports gptq_jax.models.m (models)"]
