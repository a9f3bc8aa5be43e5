"""Every README block that can run on a CPU machine runs here, in order, in one
namespace, in a fresh folder: a pasted example never meets a NameError, and printed
output shown after `>>>` is what the code prints today. Blocks after an HTML comment
saying "not run" (GPUs, SLURM) are skipped; the install-and-test commands at the top
are what CI itself runs."""
import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks():
    text = README.read_text()
    for m in BLOCK.finditer(text):
        before = text[:m.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].startswith("<!--") and "not run" in before[-1]
        yield m.group(1), m.group(2), skipped, text[:m.start()].count("\n") + 1


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


def test_readme_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    ran = 0
    for lang, code, skipped, line in blocks():
        if skipped:
            continue
        if lang == "python":
            try:
                exec(compile(code, f"README.md:{line}", "exec"), namespace)
            except Exception as e:
                pytest.fail(f"README block at line {line} fails: {type(e).__name__}: {e}")
            ran += 1
        elif lang == "text" and code.startswith(">>> "):
            exec("import numpy as np\nimport volarray\nfrom volarray.models import FaultSeg3D, "
                 "seeded", namespace)
            for statement, expected, printed in run_session(code, namespace):
                assert printed == expected, f"README line {line}: {statement}"
            ran += 1
    assert ran >= 5
