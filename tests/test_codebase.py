"""The shape of the code base, read from the package's AST: modules keep to their own
private names, functions fit on a screen, classes do one job, modules stay readable,
and no module imports one that imports it back."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "volarray"
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 250
MAX_MODULE_LINES = 600


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


def test_modules_stay_readable():
    long = [f"{path} ({n} lines > {MAX_MODULE_LINES})" for path, _ in modules()
            if (n := len((PACKAGE.parent / path).read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, long


# ---------------------------------------------------------------- import graph
def module_name(path: Path) -> str:
    """``volarray/ops/conv.py`` -> ``volarray.ops.conv``; a package is its __init__."""
    parts = list(path.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(name: str, is_package: bool, tree, known: set[str]) -> set[str]:
    """The volarray modules ``tree`` imports, wherever the import stands (inside a
    function too: a lazy import is still an edge). ``from .x import y`` imports
    ``x.y`` where that is a module, else ``x``."""
    here = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[:len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in known:
                    out.add(f"{target}.{a.name}")
                elif target in known:
                    out.add(target)
    return out - {name}


def import_graph(sources: dict[str, tuple[bool, str]]) -> dict[str, set[str]]:
    """Module -> the modules it imports, from {module: (is_package, source)}."""
    known = set(sources)
    return {m: imported_modules(m, pkg, ast.parse(text), known)
            for m, (pkg, text) in sources.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm,
    iterative): each is a set of modules that import each other around a loop."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    sources = {module_name(path): (path.name == "__init__.py",
                                   (PACKAGE.parent / path).read_text())
               for path, _ in modules()}
    graph = import_graph(sources)
    assert {"volarray.io", "volarray.formats", "volarray.formats.nifti"} <= set(graph)
    assert "volarray.graph" in graph["volarray.trace"]  # the graph is read
    cycles = import_cycles(graph)
    assert not cycles, [{m: sorted(graph[m] & set(c)) for m in c} for c in cycles]


@pytest.mark.parametrize("files,cycle", [
    ({"p.a": "from . import b", "p.b": "x = 1"}, []),
    ({"p.a": "from .b import f", "p.b": "def g():\n    from .a import h"}, [["p.a", "p.b"]]),
    ({"p.a": "import p.b", "p.b": "from .c import x", "p.c": "from p import a"},
     [["p.a", "p.b", "p.c"]]),
    ({"p": "from .sub import m", "p.sub": "", "p.sub.m": "from .. import x"}, [["p", "p.sub.m"]]),
    ({"p.a": "from .b import f", "p.b": "import numpy"}, []),
])
def test_the_cycle_rule_catches_what_it_should(files, cycle):
    sources = {m: (m in ("p", "p.sub"), text) for m, text in files.items()}
    assert import_cycles(import_graph(sources)) == cycle
