"""The shape of the code base, read from the package's AST: modules keep to their own
private names, functions fit on a screen, classes do one job."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "volarray"
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 250


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text(), str(path))


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def is_package_module(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").split(".")[0] == "volarray"


def module_aliases(tree) -> set[str]:
    """Names a module binds to other volarray modules (``from . import plan``,
    ``import volarray.io as io``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and is_package_module(node):
            names.update(a.asname or a.name for a in node.names
                         if (node.module is None or node.level > 0) and a.name.islower())
        elif isinstance(node, ast.Import):
            names.update(a.asname or a.name.split(".")[0] for a in node.names
                         if a.name.split(".")[0] == "volarray")
    return names


def reaches_into_privates(tree) -> list[str]:
    found, aliases = [], module_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and is_package_module(node):
            found += [f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import "
                      f"{a.name}" for a in node.names if private(a.name)]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names():
    bad = {str(path): found for path, tree in modules() if (found := reaches_into_privates(tree))}
    assert not bad, bad


def test_functions_and_classes_stay_small():
    long = []
    for path, tree in modules():
        for node in ast.walk(tree):
            limit = (MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     else MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else None)
            if limit and node.end_lineno - node.lineno + 1 > limit:
                long.append(f"{path}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines > {limit})")
    assert not long, long


@pytest.mark.parametrize("source,expected", [
    ("from .api import _predict", 1), ("from volarray.window import _weights_token", 1),
    ("from . import plan\nplan._fmt_bytes(1)", 1), ("import volarray.io as vio\nvio._x", 1),
    ("from .api import predict\nimport torch\ntorch._ops", 0), ("from . import __version__", 0),
    ("self._cache = 1", 0),
])
def test_the_private_name_rule_catches_what_it_should(source, expected):
    assert len(reaches_into_privates(ast.parse(source))) == expected
