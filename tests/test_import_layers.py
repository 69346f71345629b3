"""The library's imports point one way, down the layers of ``LAYERS``.

Every module of ``moe_jax/`` is read with ``ast`` (no import runs): its imports at the
top and inside functions, ``import x`` and ``from x import y``, absolute and relative.
A module may import its own layer or a lower one, never a higher one, and the library
never imports or reads ``experiments/`` (the command lines and their configs sit on
top of it and pass what it needs in).
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "moe_jax"

# A module's layer is its first name under moe_jax (a subpackage, or a top-level
# module). Lower numbers sit lower; a module may import its own layer or lower ones.
LAYERS = {
    "errors": 0,
    "routing": 1,
    "parallel": 1,
    "data": 1,
    "layers": 2,
    "models": 3,
    "inference": 4,
    "training": 5,
    "peft": 6,
    "analysis": 6,
    "compare": 7,
    "planner": 7,
    "interop": 7,
    # moe_jax/__init__.py: the package's short names (MoeConfig, MoeLayer, ...), for
    # users; nothing in the library goes through it.
    "__init__": 8,
}


def module_files(root: str) -> dict[str, str]:
  """``{dotted module name: path}`` of every ``.py`` file under ``root/moe_jax``."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(root, PACKAGE)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, root)[:-3].split(os.sep)
        if rel[-1] == "__init__" and len(rel) > 1:
          rel = rel[:-1]
        out[".".join(rel)] = path
  return out


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
  """The ``moe_jax`` modules ``module`` imports anywhere in its file.

  ``from P import y`` imports module ``P.y`` when there is one, else ``P`` (a name
  defined in ``P``): ``from moe_jax import routing`` is ``moe_jax.routing``, ``from
  moe_jax import MoeLayer`` is ``moe_jax`` (the package's ``__init__``), ``from
  moe_jax.layers.experts import Experts`` is ``moe_jax.layers.experts``.
  """
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  is_package = path.endswith("__init__.py")

  def resolve(name: str) -> str | None:
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
      return None
    while name not in known and "." in name:
      name = name.rsplit(".", 1)[0]
    return name if name in known else None

  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [resolve(alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else resolve(base)
                 for a in node.names]
    else:
      continue
    out.update(t for t in targets if t is not None and t != module)
  return out


def layer_of(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def import_graph(root: str) -> dict[str, set[str]]:
  files = module_files(root)
  known = set(files)
  return {m: imports_of(m, p, known) for m, p in sorted(files.items())}


def upward_edges(graph: dict[str, set[str]], layers=None) -> list[str]:
  layers = LAYERS if layers is None else layers
  bad = []
  for module, targets in graph.items():
    for target in sorted(targets):
      if layers[layer_of(target)] > layers[layer_of(module)]:
        bad.append(f"{module} (layer {layer_of(module)}) imports {target} (layer "
                   f"{layer_of(target)})")
  return bad


# A path through experiments/: a string without spaces (messages that name a command
# line, "run experiments/train.py first", are sentences) with it as a component.
EXPERIMENTS_PATH = re.compile(r"(^|/)experiments(/|$)")


def experiments_uses(root: str) -> list[str]:
  """Where the library imports ``experiments`` or builds a path through it (in code:
  docstrings and comments may name it)."""
  out = []
  for module, path in module_files(root).items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
    docstrings = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef,
                           ast.ClassDef)) and ast.get_docstring(node) is not None:
        docstrings.add(id(node.body[0].value))
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        if any(n.split(".")[0] == "experiments" for n in names):
          out.append(f"{module}:{node.lineno} imports experiments")
      elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and not re.search(r"\s", node.value)
            and EXPERIMENTS_PATH.search(node.value)):
        out.append(f"{module}:{node.lineno} builds a path through {node.value!r}")
  return out


def test_every_layer_is_ranked():
  graph = import_graph(ROOT)
  unranked = sorted({layer_of(m) for m in graph} - set(LAYERS))
  assert not unranked, f"modules without a layer in LAYERS: {unranked}"


def test_imports_point_down():
  assert upward_edges(import_graph(ROOT)) == []


def test_library_does_not_use_experiments():
  assert experiments_uses(ROOT) == []


def _write(root, rel, text):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def test_reader_sees_every_import_form(tmp_path):
  """Top-level and in-function imports, ``import x``, ``from x import y``, relative."""
  root = str(tmp_path)
  for rel in ("moe_jax/__init__.py", "moe_jax/errors.py", "moe_jax/layers/__init__.py",
              "moe_jax/layers/a.py", "moe_jax/models/__init__.py",
              "moe_jax/models/b.py", "moe_jax/training/__init__.py",
              "moe_jax/training/c.py"):
    _write(root, rel, "")
  _write(root, "moe_jax/layers/x.py", "import moe_jax.models.b\n")
  _write(root, "moe_jax/layers/y.py",
         "def f():\n  from moe_jax.training import c\n  return c\n")
  _write(root, "moe_jax/layers/z.py", "from ..models import b\nfrom . import a\n")
  _write(root, "moe_jax/layers/w.py", "from moe_jax import MoeLayer\n")
  _write(root, "moe_jax/models/ok.py",
         "from moe_jax.layers.a import thing\nfrom moe_jax import errors\n")
  graph = import_graph(root)
  assert graph["moe_jax.layers.x"] == {"moe_jax.models.b"}
  assert graph["moe_jax.layers.y"] == {"moe_jax.training.c"}
  assert graph["moe_jax.layers.z"] == {"moe_jax.models.b", "moe_jax.layers.a"}
  assert graph["moe_jax.layers.w"] == {"moe_jax"}
  assert graph["moe_jax.models.ok"] == {"moe_jax.layers.a", "moe_jax.errors"}
  assert len(upward_edges(graph)) == 4  # x, y, z (models.b) and w (the package)


@pytest.mark.parametrize("line", [
    'CONFIGS = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")',
    "import experiments.cli",
    'path = "experiments/configs/switch_small.py"',
])
def test_experiments_uses_are_caught(tmp_path, line):
  root = str(tmp_path)
  _write(root, "moe_jax/__init__.py", "")
  _write(root, "moe_jax/compare/rows.py",
         '"""Rows from experiments/configs (docs may name it)."""\nimport os\n'
         'MESSAGE = "run experiments/train.py first"\n'  # a sentence: allowed
         f"{line}\n")
  assert len(experiments_uses(root)) == 1
