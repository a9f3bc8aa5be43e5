"""examples/jupyter_hpc.ipynb executed as a user runs it: in a real Jupyter kernel
(nbclient + ipykernel), every cell, with no error output and nothing on stderr; the
plan renders as HTML, the write shows a progress bar, and the result equals a local
run."""
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "jupyter_hpc.ipynb"


def test_the_notebook_runs_clean_in_a_kernel(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stripped
    root = str(NOTEBOOK.parent.parent)  # this checkout's volarray in the kernel
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, [(o.ename, o.evalue) for o in errors]
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, "".join(stderr)
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any('class="volarray-plan"' in h for h in html)
    stdout = "".join(o.text for o in outputs if o.output_type == "stream")
    assert "100% Completed" in stdout  # distributed's progress bar, for the write
    diff = re.search(r"max difference from a local run: (\S+)", stdout)
    assert diff and float(diff.group(1)) <= 1e-5, stdout
