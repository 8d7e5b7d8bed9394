"""The parts of the package import each other in one direction only: no import cycle between them.

A part is a top-level module or package of scalellm (supervisor, shape, gateway, replica, rpc, bench,
deploy, engine, ...). Every import counts, including those inside functions (deferred imports still
tie the parts together).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import scalellm

PACKAGE_ROOT = Path(scalellm.__file__).resolve().parent
DEPLOYMENT_PARTS = ("supervisor", "shape", "gateway", "replica", "rpc", "bench", "deploy")


def _part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE_ROOT).with_suffix("")
    return relative.parts[0]


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            dotted = name.split(".")
            if dotted[0] == "scalellm" and len(dotted) > 1:
                parts.add(dotted[1])
    return parts


def import_graph() -> dict[str, set[str]]:
    """part -> the other parts it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE_ROOT.rglob("*.py"):
        part = _part_of(path)
        graph[part] |= _imported_parts(path) - {part}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None when it has none."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_deployment_parts_exist_and_import_nothing_in_a_cycle():
    graph = import_graph()
    assert set(DEPLOYMENT_PARTS) <= set(graph), sorted(graph)
    deployment = {part: graph[part] & set(DEPLOYMENT_PARTS) for part in DEPLOYMENT_PARTS}
    assert find_cycle(deployment) is None, " -> ".join(find_cycle(deployment))


def test_no_part_of_the_package_imports_in_a_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_lower_layers_do_not_reach_up():
    graph = import_graph()
    assert graph["rpc"] <= {"protocol", "engine", "tracing"}, graph["rpc"]
    assert graph["tracing"] <= {"protocol"}, graph["tracing"]  # a leaf: both processes' spans use it
    assert not graph["gateway"] & {"supervisor", "deploy", "replica", "bench", "serve", "cli"}
    assert not graph["bench"] & {"supervisor", "deploy", "shape", "gateway", "serve", "cli"}
    assert "supervisor" not in graph["deploy"]
