"""The package's import structure: no import cycles between its modules, and every module imports on its own.

The graph: one node per module of ``mtlkit`` (a package is its ``__init__``), one edge per module-level import of an
mtlkit module, read with ``ast`` from the source (nothing is imported to build it):

* ``import mtlkit.a.b`` and ``from mtlkit.a import b`` (``b`` a module) are edges to ``mtlkit.a.b``;
  ``from mtlkit.a import name`` (``name`` not a module) is an edge to ``mtlkit.a``;
* importing ``mtlkit.a.b`` first runs the ``__init__`` of ``mtlkit.a``: that is an edge to ``mtlkit.a`` as well,
  unless the importer is itself inside ``mtlkit.a`` (its package is already being imported then);
* imports inside functions (run when called, not when the module loads) and under ``if TYPE_CHECKING:`` do not
  count; everything else at module level does (class bodies, ``try``, other ``if`` blocks).

A cycle means that which module is imported first decides whether the import works (a half-initialised module
is seen by the other). :data:`KNOWN_CYCLES` lists the edges that still close a cycle, to be emptied.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import mtlkit

ROOT = Path(mtlkit.__file__).parent

#: Edges (importer, imported) that close a cycle today, in files this test does not own; each entry is one
#: explicit edge to remove (a module-level import moved into the function that needs it, or a shared piece moved
#: to a module both can import). Empty it, do not grow it.
KNOWN_CYCLES: set[tuple[str, str]] = set()


def module_files() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)
            else:
                for name in ("body", "orelse", "finalbody"):
                    visit(getattr(node, name, []) or [])
                for handler in getattr(node, "handlers", []) or []:
                    visit(handler.body)
                for case in getattr(node, "cases", []) or []:  # match statements
                    visit(case.body)

    visit(tree.body)
    return found


def _targets(node: ast.Import | ast.ImportFrom, importer: str, modules: set[str], is_package: bool) -> set[str]:
    """The mtlkit modules an import statement imports (before the implicit parent packages)."""
    out: set[str] = set()
    if isinstance(node, ast.Import):
        out |= {a.name for a in node.names if a.name in modules}
        return out
    base = node.module or ""
    if node.level:  # relative import
        pkg = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
    if base not in modules:
        return out
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in modules else base)
    return out


def import_graph() -> dict[str, set[str]]:
    """importer -> the mtlkit modules it imports at module level (see the module docstring)."""
    files = module_files()
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        own = name if is_package else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, name, modules, is_package):
                edges.add(target)
                parent = target.rpartition(".")[0]
                while parent:  # the parent packages' __init__ run first, unless the importer is inside them
                    if parent in modules and not (own == parent or own.startswith(parent + ".")):
                        edges.add(parent)
                    parent = parent.rpartition(".")[0]
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path ``[a, b, ..., a]``) per strongly connected component with more than one module
    (Tarjan's algorithm, then a shortest cycle through the component's first module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in components:
        members, start = set(comp), comp[0]
        # breadth-first search back to start inside the component: a shortest cycle
        prev: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        v = prev[start]
        while v != start:
            path.append(v)
            v = prev[v]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def test_the_graph_sees_the_imports_it_must():
    """The graph builder itself: a known edge, a function-level import ignored, a TYPE_CHECKING import ignored."""
    g = import_graph()
    assert "mtlkit.aggregation._base" in g["mtlkit.aggregation.cagrad"]
    assert "mtlkit.errors" in g["mtlkit._registry"]
    # methods.py imports weighting.uw: the weighting package's __init__ runs first
    assert {"mtlkit.weighting.uw", "mtlkit.weighting"} <= g["mtlkit.methods"]
    # mtlkit/config.py imports mtlkit.methods only inside check_run_config; models/base.py imports callbacks only
    # for type checking
    assert "mtlkit.methods" not in g["mtlkit.config"]
    assert "mtlkit.callbacks" not in g["mtlkit.models.base"]
    # a package's own submodules do not depend on its __init__ (it is already being imported)
    assert "mtlkit.aggregation" not in g["mtlkit.aggregation.cagrad"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_registry_module_imports_only_errors():
    assert import_graph()["mtlkit._registry"] <= {"mtlkit.errors", "mtlkit"}


def test_method_files_import_no_method_registry_front_end_and_no_package_init():
    """Method files import the bases, helpers and other method files, never ``mtlkit.methods`` and never the
    ``mtlkit.aggregation`` / ``mtlkit.weighting`` package ``__init__``s (``from mtlkit.aggregation import X``)."""
    files = module_files()
    bad = []
    for name, path in files.items():
        if not name.startswith(("mtlkit.aggregation.", "mtlkit.weighting.")):
            continue
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad += [
                f"{name} imports {m}" for m in mods if m in ("mtlkit.methods", "mtlkit.aggregation", "mtlkit.weighting")
            ]
    assert not bad, bad


def test_no_import_cycles():
    graph = import_graph()
    for a, b in KNOWN_CYCLES:
        assert b in graph.get(a, set()), f"KNOWN_CYCLES lists {a} -> {b}, which is gone: remove it from the list"
        graph[a] = graph[a] - {b}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between mtlkit modules (module-level imports):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles
    )


# Imports every module given on the command line, each in a clean state: every mtlkit module is dropped from
# sys.modules first, so the module is imported as if it were the first thing a program imports (third-party
# modules such as torch stay loaded: they do not import mtlkit). Prints {module: error or null} as JSON.
_ALONE = r"""
import importlib, json, sys, traceback
out = {}
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "mtlkit" or m.startswith("mtlkit.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
        out[name] = None
    except BaseException:
        out[name] = traceback.format_exc(limit=-4)
print(json.dumps(out))
"""


def test_every_module_imports_alone():
    """Each module, imported first (fresh mtlkit state, one interpreter for all, sequentially: about 10 s)."""
    names = [n for n in module_files() if not n.endswith("__main__")]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _ALONE, *names], capture_output=True, text=True, timeout=300, cwd=ROOT.parent
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {k: v for k, v in result.items() if v is not None}
    assert not failed, "modules that fail to import on their own:\n" + "\n".join(
        f"{k}:\n{v}" for k, v in failed.items()
    )
    assert set(result) == set(names)
    assert elapsed < 120, f"importing every module alone took {elapsed:.0f} s"
