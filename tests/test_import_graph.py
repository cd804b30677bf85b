"""The package's import structure: no cycles among module-level imports, no late `# noqa: E402` imports.

A cycle makes a module's behaviour depend on which module of the cycle was imported first (half-initialised
modules, names missing at import time), and is what forced the registration imports at the bottom of package
``__init__`` files. The graph is built from the source with ``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "platform"
PACKAGE = ROOT / "dpdistill"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements run when the module is imported: not those in functions (lazy, run on call) nor
    those under ``if TYPE_CHECKING:`` (never run); class bodies, ``if``/``try``/``with`` blocks are run."""
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
            elif isinstance(node, (ast.Try, ast.TryStar)):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
            elif isinstance(node, ast.Match):
                for case in node.cases:
                    visit(case.body)

    visit(tree.body)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level.

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``. Importing a submodule
    also runs its parent packages' ``__init__``: those implicit edges count too, except from a module inside
    that parent, so a package ``__init__`` may re-export from its own submodules (the explicit imports still
    catch a submodule importing its package).
    """
    paths = sorted(package.rglob("*.py"))
    modules = {module_name(p, package.parent): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in module_level_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = []
                for alias in node.names:
                    sub = f"{stem}.{alias.name}"
                    targets.append(sub if sub in modules else stem)
            edges.update(t for t in targets if t in modules and t != name)
        # Importing a.b.c first runs a/__init__ and a/b/__init__: edges to those parents too, except from inside
        # the parent (a package's submodules are what its __init__ may re-export).
        for target in list(edges):
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and parent != name and not name.startswith(parent + "."):
                    edges.add(parent)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a closed path, first module repeated at the end) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan; the package is small enough for recursion
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for component in components:
        start = min(component)
        # Shortest path back to `start` inside the component (breadth first).
        parents: dict[str, str] = {}
        frontier = [start]
        seen = {start}
        end = None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w == start:
                        end = v
                        break
                    if w not in seen:
                        seen.add(w)
                        parents[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [start]
        v = end
        while v is not None and v != start:
            path.insert(1, v)
            v = parents.get(v)
        cycles.append(path + [start])
    return sorted(cycles)


def test_no_import_cycles_among_package_modules():
    graph = import_graph()
    assert len(graph) > 50 and "dpdistill.spec" in graph  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_reports_a_planted_cycle(tmp_path):
    # Control: the same graph builder and cycle finder see a cycle through a package __init__ and a late import.
    pkg = tmp_path / "dpdistill"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("def register(f):\n    return f\n\nfrom dpdistill.sub import a\n")
    (pkg / "sub" / "a.py").write_text("from dpdistill.sub import register\n")
    (pkg / "lazy.py").write_text("def f():\n    from dpdistill.sub import a\n")
    (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import dpdistill.lazy\n")
    graph = import_graph(pkg)
    assert graph["dpdistill.lazy"] == set() and graph["dpdistill.typed"] == set()
    assert find_cycles(graph) == [["dpdistill.sub", "dpdistill.sub.a", "dpdistill.sub"]]


def test_no_late_registration_imports():
    offenders = [
        f"{path.relative_to(ROOT.parent)}:{lineno}"
        for path in sorted(ROOT.rglob("*.py"))
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "noqa: E402" in line or ("noqa:" in line and "E402" in line.split("noqa:", 1)[1])
    ]
    assert not offenders, "module-level imports after code (# noqa: E402): " + ", ".join(offenders)


def test_ray_is_imported_only_in_runtime():
    """Algorithms and pipelines are plain torch; Ray (imports at any depth, lazy ones too) lives in runtime/."""
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "runtime":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                outside.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert outside == [], outside

