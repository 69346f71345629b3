"""Executes every notebook in notebooks/ from scratch, so that none of them can rot.

Each notebook runs top to bottom in a fresh kernel of this interpreter, with the Agg
matplotlib backend (no figures are rendered to the outputs) and 8 fake CPU devices,
with the smaller parameters of ``TEST_PARAMETERS`` where a notebook has them. A new
notebook is picked up by the glob. The run time is never asserted: the
executor's per-cell timeout ``HANG_GUARD_S`` only stops a hung kernel, and is set far
above what any cell needs on a loaded two-core machine.
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from tests.subprocess_env import compile_flag

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
HANG_GUARD_S = 1800  # per cell


# Papermill-style parameters: a notebook whose first code cell starts with
# "# Parameters" runs with these values, set in a cell inserted after that one, so the
# suite trains less than a reader's default run (every cell still runs).
TEST_PARAMETERS = {"02_expert_specialisation.ipynb": {"TRAIN_STEPS": 40}}


# Notebooks whose time goes into running a model rather than compiling it: their
# kernels get XLA:CPU's optimised code. The others compile as the in-process tests do
# (compile_flag(): conftest.py's level). Measured on the 2-core machine, optimised against not:
# 02 (it trains) 72 against 117 s; 01 20 against 17 s, 03 26 against 16 s, 04 21
# against 18 s.
RUNTIME_BOUND = frozenset({"02_expert_specialisation.ipynb"})


def _kernel_env(name):
  env = dict(os.environ)
  env["MPLBACKEND"] = "Agg"
  env.setdefault("JAX_PLATFORMS", "cpu")
  level = compile_flag()
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_backend_optimization_level")]
  if not any(f.startswith("--xla_force_host_platform_device_count") for f in flags):
    flags.append("--xla_force_host_platform_device_count=8")
  if name not in RUNTIME_BOUND:
    flags.append(level)
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def _with_test_parameters(nb, name):
  values = TEST_PARAMETERS.get(name)
  if not values:
    return nb
  code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
  first = code[0]
  assert nb.cells[first].source.startswith("# Parameters"), (
      f"{name}: TEST_PARAMETERS needs a first code cell that starts with '# Parameters'")
  for key in values:
    assert f"\n{key} = " in "\n" + nb.cells[first].source, f"{name} has no parameter {key}"
  source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
  nb.cells.insert(first + 1, nbformat.v4.new_code_cell(source))
  return nb


def test_notebooks_are_found():
  assert NOTEBOOKS, f"no notebooks in {NOTEBOOKS_DIR}"


def test_notebooks_are_committed_without_large_outputs():
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    size = sum(len(str(out)) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))
    assert size < 20_000, f"{path.name} has {size} characters of outputs; clear them."


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
  nb = _with_test_parameters(nbformat.read(path, as_version=4), path.name)
  client = NotebookClient(nb, timeout=HANG_GUARD_S, startup_timeout=600,
                          kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
  client.execute(env=_kernel_env(path.name))  # raises CellExecutionError on any failing cell
