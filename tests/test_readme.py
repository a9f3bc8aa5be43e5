"""Every README ```python block runs alone, as a user pastes one block into a fresh Python
interpreter: each in its own subprocess, in its own empty folder, so that a block that
leans on a name from an earlier one (``volume``, ``volarray``, ``zarr``) fails here with
NameError. Blocks that need what a CPU test machine lacks say so on their first line, a
comment users see too:

    # needs: gpu ...
    # needs: cluster ...
    # needs: a trained model folder ...

Those are only compiled. ```text blocks of `>>>` statements run in a fresh namespace
holding numpy, volarray and the reference models, and print what the README shows.
```bash blocks are not run (the install-and-test commands at the top are what CI runs)."""
import ast
import builtins
import contextlib
import io
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NEEDS = re.compile(r"# needs: (gpu|cluster|a trained model folder)\b")
SESSION_IMPORTS = "import numpy as np\nimport volarray\nfrom volarray.models import FaultSeg3D, seeded"


def blocks(lang: str):
    """(line, code) of each ```lang block, in order."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in BLOCK.finditer(text)
            if m.group(1) == lang]


def needs(code: str) -> str | None:
    """What a block says it needs (its first line), or None: it runs anywhere."""
    first = code.splitlines()[0] if code.strip() else ""
    m = NEEDS.match(first)
    if first.startswith("# needs:") and not m:
        raise AssertionError(f"unknown '# needs:' marker {first!r}; use one of {NEEDS.pattern}")
    return m.group(1) if m else None


PYTHON = blocks("python")


def run_alone(code: str, folder: Path) -> subprocess.CompletedProcess:
    """``code`` as a script of its own, in a fresh interpreter, in the empty ``folder``."""
    folder.mkdir()
    (folder / "block.py").write_text(code)
    return subprocess.run([sys.executable, "block.py"], cwd=folder, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, MPLBACKEND="Agg"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every runnable block started at once, two interpreters at a time (most of a
    block's ~7 s of CPU is importing torch and tracing the model, once per interpreter)."""
    root = tmp_path_factory.mktemp("readme")
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {line: pool.submit(run_alone, code, root / f"line{line}")
               for line, code in PYTHON if needs(code) is None}


@pytest.mark.parametrize("line, code", PYTHON, ids=[f"line{line}" for line, _ in PYTHON])
def test_python_block_runs_alone(line, code, runs):
    compile(code, f"README.md:{line}", "exec")
    need = needs(code)
    if need is not None:
        pytest.skip(f"README block at line {line} needs {need}")
    r = runs[line].result()
    assert r.returncode == 0, f"README block at line {line} fails alone:\n{r.stderr[-3000:]}"


def unbound_names(code: str) -> set[str]:
    """Names a block reads but neither imports, assigns nor defines (nor are builtins):
    the NameError a user meets pasting it alone, found without running it."""
    bound, loaded = set(dir(builtins)), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound


@pytest.mark.parametrize("line, code", PYTHON, ids=[f"line{line}" for line, _ in PYTHON])
def test_python_block_defines_every_name_it_uses(line, code):
    """Also for the blocks that cannot run here (GPU, cluster, model folder)."""
    assert not unbound_names(code), f"README block at line {line}: {unbound_names(code)}"


def test_every_python_block_runs_or_says_what_it_needs():
    runnable = [line for line, code in PYTHON if needs(code) is None]
    marked = {needs(code) for _, code in PYTHON} - {None}
    assert len(runnable) >= 10 and marked == {"gpu", "cluster", "a trained model folder"}


def run_session(code: str, namespace: dict) -> list[tuple[str, str, str]]:
    """(statement, expected, printed) for each `>>>` statement of a text block."""
    results, statement, expected = [], None, []
    for line in code.splitlines() + [">>> "]:
        if line.startswith(">>> "):
            if statement is not None:
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(statement, namespace)
                results.append((statement, "\n".join(expected).rstrip(), out.getvalue().rstrip()))
            statement, expected = line[4:], []
        else:
            expected.append(line)
    return results


def test_readme_sessions_print_what_they_show(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sessions = [(line, code) for line, code in blocks("text") if code.startswith(">>> ")]
    for line, code in sessions:
        namespace = {"__name__": "readme"}
        exec(SESSION_IMPORTS, namespace)
        for statement, expected, printed in run_session(code, namespace):
            assert printed == expected, f"README line {line}: {statement}"
    assert sessions
