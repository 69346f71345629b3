"""Executes every notebook in notebooks/ from scratch, so that none of them can rot.

Each notebook runs top to bottom in a fresh kernel of this interpreter, with the Agg
matplotlib backend (no figures are rendered to the outputs) and 8 fake CPU devices.
A new notebook is picked up by the glob. The run time is never asserted: the
executor's per-cell timeout ``HANG_GUARD_S`` only stops a hung kernel, and is set far
above what any cell needs on a loaded two-core machine.
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
HANG_GUARD_S = 1800  # per cell


def _kernel_env():
  env = dict(os.environ)
  env["MPLBACKEND"] = "Agg"
  env.setdefault("JAX_PLATFORMS", "cpu")
  flags = env.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    flags = (flags + " --xla_force_host_platform_device_count=8").strip()
  env["XLA_FLAGS"] = flags
  return env


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
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=HANG_GUARD_S, startup_timeout=600,
                          kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
  client.execute(env=_kernel_env())  # raises CellExecutionError on any failing cell
