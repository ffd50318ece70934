"""Executes every notebook in ``examples/`` in a fresh Jupyter kernel running this interpreter.

Checks that each runs without error and that ``dsx.summary`` renders as an HTML table (its ``_repr_html_``).
"""

import sys
from pathlib import Path

import pytest

WHY = "executing notebooks needs nbclient, nbformat and ipykernel (pip install -e '.[test]')"
nbclient = pytest.importorskip("nbclient", reason=WHY)
nbformat = pytest.importorskip("nbformat", reason=WHY)
kernelspec = pytest.importorskip("ipykernel.kernelspec", reason=WHY)

NOTEBOOKS = sorted((Path(__file__).parent.parent / "examples").glob("*.ipynb"))


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernelspec launching ``sys.executable``, first on the Jupyter path (whatever else is installed).

    ``client.execute()`` raises ``CellExecutionError`` with the traceback when any cell fails.
    """
    kernelspec.write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def _is_summary(cell) -> bool:
    lines = cell.source.strip().splitlines()
    return cell.cell_type == "code" and bool(lines) and lines[-1].startswith("dsx.summary(")


def _html(cell) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs if o.output_type == "execute_result")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, python3_kernel):
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    workdir = tmp_path / "run"
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name=python3_kernel, timeout=300,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()

    stdout = "".join(o.text for o in nb.cells[-1].outputs if o.output_type == "stream" and o.name == "stdout")
    assert stdout.strip() == sys.executable, "the kernel ran another interpreter"
    summaries = [c for c in nb.cells if _is_summary(c)]
    assert summaries, f"{path.name} has no cell ending in dsx.summary(...)"
    for cell in summaries:
        assert "<table>" in _html(cell), cell.source
