"""Executes every notebook in notebooks/ from scratch, so that none of them can rot.

Each notebook runs top to bottom in a fresh kernel of this interpreter, with the Agg
matplotlib backend (no figures are rendered to the outputs) and 8 fake CPU devices,
and must finish within ``TIME_LIMIT_S``. A new notebook is picked up by the glob.
"""

import os
import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
TIME_LIMIT_S = 300


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=TIME_LIMIT_S, startup_timeout=120,
                          kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
  start = time.perf_counter()
  client.execute(env=_kernel_env())  # raises CellExecutionError on any failing cell
  elapsed = time.perf_counter() - start
  assert elapsed < TIME_LIMIT_S, f"{path.name} took {elapsed:.0f}s (> {TIME_LIMIT_S}s)"
