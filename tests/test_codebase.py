"""The shape of the code base, read from the package's AST: modules keep to their own
private names, functions fit on a screen, classes do one job, modules stay readable,
and no module imports one that imports it back."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "volarray"
MAX_FUNCTION_LINES = 80
MAX_FUNCTION_CODE = 60  # lines of code: docstrings, blank and comment lines left out
MAX_TASK_PARAMETERS = 6
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


# ---------------------------------------------------------------- shapes of functions
def docstring_lines(tree) -> set[int]:
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) \
                and n.body and isinstance(n.body[0], ast.Expr) \
                and isinstance(n.body[0].value, ast.Constant) \
                and isinstance(n.body[0].value.value, str):
            found.update(range(n.body[0].lineno, n.body[0].end_lineno + 1))
    return found


def long_functions(text: str, limit: int = MAX_FUNCTION_CODE) -> list[str]:
    """Functions over ``limit`` lines of code (their docstrings, blank and comment-only
    lines left out; nested functions count in theirs)."""
    tree, lines = ast.parse(text), text.splitlines()
    skip = docstring_lines(tree)
    found = []
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            code = sum(1 for i in range(n.lineno, n.end_lineno + 1) if i not in skip
                       and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))
            if code > limit:
                found.append(f"line {n.lineno} {n.name} ({code} lines of code > {limit})")
    return found


def crowded_tasks(text: str, limit: int = MAX_TASK_PARAMETERS) -> list[str]:
    """Task functions (named ``*_task``) taking more than ``limit`` parameters."""
    found = []
    for n in ast.walk(ast.parse(text)):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.endswith("_task"):
            a = n.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) \
                + bool(a.kwarg)
            if count > limit:
                found.append(f"line {n.lineno} {n.name} ({count} parameters > {limit})")
    return found


def test_functions_fit_in_sixty_lines_of_code():
    long = {str(path): found for path, _ in modules()
            if (found := long_functions((PACKAGE.parent / path).read_text()))}
    assert not long, long


def test_task_functions_take_a_handful_of_arguments():
    text = (PACKAGE / "worker.py").read_text()
    assert "def run_task(" in text
    assert not crowded_tasks(text), crowded_tasks(text)


@pytest.mark.parametrize("source,long", [
    ("def f():\n" + "    x = 1\n" * 59, 0),
    ("def f():\n" + "    x = 1\n" * 60, 1),
    ('def f():\n    """doc\n' + "    more\n" * 30 + '    """\n' + "    # note\n\n" * 30
     + "    x = 1\n" * 58, 0),
    ("def f():\n    def g():\n" + "        x = 1\n" * 60, 2),
], ids=["60", "61", "docstring-and-comments", "nested"])
def test_the_function_length_rule_catches_what_it_should(source, long):
    assert len(long_functions(source)) == long


@pytest.mark.parametrize("source,crowded", [
    ("def run_task(runner, names, boxes, channels, parts, scratch, gnames, gvalues):\n    pass",
     1),
    ("def run_task(runner, spec, parts, values):\n    pass", 0),
    ("def stats_task(a, b, c, d, e, *rest, **more):\n    pass", 1),
    ("def helper(a, b, c, d, e, f, g):\n    pass", 0),
])
def test_the_task_parameter_rule_catches_what_it_should(source, crowded):
    assert len(crowded_tasks(source)) == crowded


# ---------------------------------------------------------------- module state
MUTATORS = {"setdefault", "update", "append", "add", "pop", "extend", "insert", "remove",
            "discard", "clear", "popitem"}
# caches, not registries: functools' own, and weak maps whose entries live with (and
# are found from) the objects they are about, as an attribute of theirs would
CACHE_CALLS = {"lru_cache", "cache", "WeakKeyDictionary"}


def mutated_names(fn) -> list[tuple[str, int]]:
    """Names a function fills: ``name[k] = v``, ``del name[k]``, ``name.update(...)``..."""
    found = []
    for n in ast.walk(fn):
        targets = n.targets if isinstance(n, (ast.Assign, ast.Delete)) else \
            [n.target] if isinstance(n, ast.AugAssign) else []
        found += [(t.value.id, n.lineno) for t in targets
                  if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)]
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) \
                and n.func.attr in MUTATORS and isinstance(n.func.value, ast.Name):
            found.append((n.func.value.id, n.lineno))
    return found


def filled_at_run_time(text: str) -> list[str]:
    """Module-level names bound to a dict, list or set (a literal, a comprehension or a
    call) that a function of the module fills; constants never filled pass."""
    tree, bound = ast.parse(text), {}
    for st in tree.body:
        value = st.value if isinstance(st, (ast.Assign, ast.AnnAssign)) else None
        targets = st.targets if isinstance(st, ast.Assign) else [st.target] if value else []
        if isinstance(value, ast.Call):
            func = value.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in CACHE_CALLS:
                continue
        if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp,
                              ast.SetComp, ast.Call)):
            bound.update((t.id, st.lineno) for t in targets if isinstance(t, ast.Name))
    return sorted({f"{name} (line {bound[name]}) filled in {fn.name}, line {line}"
                   for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef,
                                                               ast.AsyncFunctionDef))
                   for name, line in mutated_names(fn) if name in bound})


def test_no_module_level_container_is_filled_at_run_time():
    bad = {str(path): found for path, _ in modules()
           if (found := filled_at_run_time((PACKAGE.parent / path).read_text()))}
    assert not bad, bad


@pytest.mark.parametrize("source,filled", [
    ("import weakref\n_READERS = weakref.WeakValueDictionary()\n"
     "def remember(name, data):\n    _READERS[name] = data", 1),
    ("SEEN = set()\ndef f(x):\n    SEEN.add(x)", 1),
    ("TABLE = {}\ndef f(k):\n    del TABLE[k]", 1),
    ("CACHE = dict()\ndef f(k):\n    return CACHE.setdefault(k, [])", 1),
    ("OPS = {'a': 1}\nNAMES = [1, 2]\ndef f(k):\n    return OPS[k] + NAMES[0]", 0),
    ("import weakref\n_seen = weakref.WeakKeyDictionary()\ndef f(m):\n"
     "    return _seen.setdefault(m, {})", 0),
    ("import functools\n@functools.lru_cache\ndef f(k):\n    return [k]", 0),
    ("def f():\n    local = {}\n    local['a'] = 1", 0),
])
def test_the_module_state_rule_catches_what_it_should(source, filled):
    assert len(filled_at_run_time(source)) == filled


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
