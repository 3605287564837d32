"""Every notebook in notebooks/ runs top to bottom through a Jupyter kernel, as CI's notebook check.

Each notebook is executed cell by cell by `nbclient` in a fresh IPython kernel (so `%` magics,
rich display and per-cell errors are exercised), in a temporary folder, and any cell error fails
the test. The kernel is this interpreter (`sys.executable`, i.e. the project's venv), started from
a kernel spec written for the test into a temporary folder and found through that folder only, so
neither a missing `ipykernel install` nor another `python3` kernel on the machine can change what
runs. Committed notebooks carry no outputs.
"""

import json
import os
import pathlib
import re
import sys
import time

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "keras-transfer-tests"
CELL_TIMEOUT_S = 600

# What each notebook must leave: files in its working folder, a line its last steps print, and
# how many figures it displays at least. Notebooks not listed must simply run without errors.
EXPECTED = {
    "01_quickstart.ipynb": dict(
        files=["photos/Sneaker", "saved_models/fashion/1/saved_model.pb"],
        text="cases passed in a clean process",
        figures=4,
    ),
    "02_fine_tuning_strategies.ipynb": dict(files=[], text="whole network  ", figures=2),
    "03_domain_adaptation.ipynb": dict(files=[], text="source-only -> oracle gap", figures=1),
    "04_serving.ipynb": dict(
        files=["saved_models/models.config", "saved_models/pets/2/saved_model.pb"],
        text="PNG bytes    ->",
        figures=0,
    ),
    "05_beyond_fine_tuning.ipynb": dict(
        files=[],
        text="candidates ranked in",
        figures=0,
        # Rows of its markdown table, each with a test accuracy in [0, 1].
        rows=[
            "linear probe",
            "fine-tune",
            "fine-tune + L2-SP",
            "uniform soup",
            "greedy soup",
            "WiSE-FT",
            "small CNN, labels only",
            "small CNN, distilled",
        ],
    ),
}


def _read(path: pathlib.Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    return notebook


def _code(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def test_the_issue_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} >= set(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_are_stripped_and_small_by_default(path):
    notebook = _read(path)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
        assert not cell.get("attachments"), cell.source[:80]
    assert "widgets" not in notebook.metadata
    code = _code(notebook)
    assert code and code[0].splitlines()[0] == "SMALL = True"  # CI's switch, first line
    source = "\n".join(code)
    assert "import keras_transfer as kt" in source
    # Notebooks use the library; they define none of its logic.
    assert not [
        line for line in source.splitlines() if line.lstrip().startswith(("def ", "class "))
    ]


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """A kernel spec for this interpreter, in a folder of its own."""
    folder = tmp_path_factory.mktemp("kernels")
    spec = folder / KERNEL_NAME
    spec.mkdir()
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "keras_transfer tests",
                "language": "python",
                "env": {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"},
            }
        )
    )
    return KernelSpecManager(kernel_dirs=[str(folder)])


def _errors(notebook) -> list[str]:
    return [
        f"{output.ename}: {output.evalue}"
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_a_kernel(path, tmp_path, kernel_specs, monkeypatch):
    # Connection files in a folder of the test's own (the user's runtime folder may not exist).
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / ".jupyter_runtime"))
    notebook = _read(path)
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # the kernel's own inline backend renders the figures
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_specs)
    client = nbclient.NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=env)  # raises CellExecutionError at the first failing cell
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell failed:\n{str(error)[-4000:]}")
    finally:
        # nbclient shuts down only the kernels it started itself: this one is ours to stop (left
        # running, each kernel kept its TensorFlow memory and threads until the session ended).
        if client.kc is not None:
            client.kc.stop_channels()
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s")
    assert not _errors(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)  # every cell ran, in the kernel
    outputs = [output for cell in code_cells for output in cell.outputs]
    expected = EXPECTED.get(path.name, dict(files=[], text="", figures=0))
    figures = sum("image/png" in output.get("data", {}) for output in outputs)
    assert figures >= expected["figures"], f"{figures} figures displayed"
    printed = "".join(output.get("text", "") for output in outputs)
    assert expected["text"] in printed
    for relative in expected["files"]:
        assert (tmp_path / relative).exists(), relative
    for row in expected.get("rows", []):
        accuracies = re.findall(rf"^\| {re.escape(row)}[^|]* \| (\S+) \|", printed, re.M)
        assert accuracies and all(0 <= float(a) <= 1 for a in accuracies), (row, accuracies)
