"""The package structure: imports run one way (attrib ← editing ← benchmarks ← visedit) and form no cycle.

The import graph is read from the source with `ast` (every import statement, inside functions too), so
a lazy import that would close a cycle is caught as well as a top-level one.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("attrib", "editing", "benchmarks", "visedit")
# Each package may import the ones before it, never the ones after.
ORDER = {name: rank for rank, name in enumerate(PACKAGES)}


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the project's packages (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports: ``from a.b import c`` is a.b.c when that is a module, else a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_the_known_edges():
    graph = _graph()
    assert "attrib.regions.sweep" in graph["attrib.regions.registry"]
    assert "attrib.world.dataset" in graph["attrib.world"]  # a relative import in a package's __init__
    assert "editing.adapter.visedit" in graph["editing.command.run"]


def test_packages_import_only_the_packages_below_them():
    wrong = [(source, target) for source, targets in _graph().items() for target in targets
             if ORDER[target.split(".")[0]] > ORDER[source.split(".")[0]]]
    assert not wrong, wrong  # e.g. attrib must never import editing


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " → ".join(cycle)
