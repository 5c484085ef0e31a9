"""The package's layering, checked from the source: dependencies point inward (STYLE.md).

Every ``import`` and ``from ... import`` in ``zdlb/`` counts, those under ``if TYPE_CHECKING:``
included: a type-only cycle still means two modules that cannot be understood apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "zdlb"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The zdlb modules ``path`` imports (a ``from zdlb.x import y`` names zdlb.x.y if that is
    a module, else zdlb.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("zdlb"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zdlb"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return found - {"zdlb"}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
# A module importing itself (daemon/worker.py, run as __main__, re-imports its own name so
# pickled classes match) is no cycle.
GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(GRAPH.get(name, ())):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("layer", ["zdlb.http", "zdlb.tcp", "zdlb.balancer", "zdlb.health"])
def test_the_data_plane_imports_nothing_above_it(layer: str) -> None:
    above = ("zdlb.metrics", "zdlb.control", "zdlb.daemon")
    wrong = {
        (name, dep)
        for name, deps in GRAPH.items()
        if name.startswith(layer)
        for dep in deps
        if dep.startswith(above)
    }
    assert not wrong


def test_the_http_connection_is_imported_by_no_module_it_uses() -> None:
    """connection.py's helpers (answers, pinning, waiting, recovery, splicing, switch, handover)
    take the connection as an argument typed by a Protocol of their own: none imports it, so
    each reads without it and none can call back into its private methods."""
    importers = {name for name, deps in GRAPH.items() if "zdlb.http.connection" in deps}
    assert not {name for name in importers if name.startswith("zdlb.http")}
    assert importers <= {"zdlb.daemon.acceptor", "zdlb.daemon.lifecycle"}
