"""Every notebook in ``notebooks/`` runs top to bottom, in quick mode.

Each notebook is executed with nbclient in a fresh kernel started from the
Python running the tests (``sys.executable``), through a kernelspec written to
a temporary directory: no user- or system-level kernel installation is used
or needed. The kernel's environment sets ``SOFO_QUICK=1`` (the notebooks'
small sizes) and keeps the fast-compile ``XLA_FLAGS`` of ``conftest.py``,
which make the many small compilations of a notebook about three times
faster and the quick runs slower by less than that. The run time of each
notebook is printed as it finishes and recorded as a junit property.

Requires the ``test`` extra (nbclient, nbformat, ipykernel, matplotlib, tqdm).
"""

import json
import os
import pathlib
import sys
import tempfile
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
from jupyter_client import KernelManager  # pylint: disable=g-import-not-at-top
from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "sofo-jax-notebook-test"
CELL_TIMEOUT_S = 300


def _kernel_manager(directory: pathlib.Path, sockets: str) -> KernelManager:
  """A kernel manager whose kernel is this interpreter, in quick mode."""
  spec_dir = directory / "kernels" / KERNEL_NAME
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "sofo_jax notebook test",
    "language": "python",
    "env": {
      "SOFO_QUICK": "1",
      # conftest.py's fast-compile flags.
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    },
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  specs = KernelSpecManager(kernel_dirs=[str(directory / "kernels")])
  # Kernel messages go through Unix-domain sockets: no TCP port is opened,
  # not even on the loopback interface. (Socket paths must stay short.)
  return KernelManager(
    kernel_name=KERNEL_NAME,
    kernel_spec_manager=specs,
    transport="ipc",
    ip=os.path.join(sockets, "kernel"),
  )


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 4, f"expected the notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for index, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert not cell.outputs, f"cell {index} of {path.name} has outputs"
      assert cell.execution_count is None, f"cell {index} of {path.name} was run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, record_property, capsys):
  notebook = nbformat.read(path, as_version=4)
  with tempfile.TemporaryDirectory(prefix="nb") as sockets:
    client = nbclient.NotebookClient(
      notebook,
      km=_kernel_manager(tmp_path, sockets),
      timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
  record_property("seconds", round(seconds, 1))
  with capsys.disabled():  # shown even when output is captured
    print(f" [{path.name} ran in {seconds:.1f} s, quick mode]", end=" ")

  images = sum(
    "image/png" in output.get("data", {})
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.outputs
  )
  assert images >= 2, f"{path.name} showed {images} figures"
