"""The import graph runs one way, floor by floor, with no circles (docs/ARCHITECTURE.md's "Layout").

Every ``import`` of an almanet module counts, also those under
``TYPE_CHECKING`` and inside functions: a reader follows them all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "almanet"

# Lowest first. A module may import its own floor and those below; the
# client (nsq) and the broker share a floor and never import each other.
FLOORS: list[tuple[str, ...]] = [
    ("almanet._version", "almanet.wire", "almanet.loops", "almanet.observer"),
    ("almanet._speedups", "almanet.conversion"),
    ("almanet.nsq", "almanet.broker"),
    ("almanet.errors",),
    ("almanet.rpc", "almanet.options", "almanet.subscription"),
    ("almanet.calls", "almanet.discovery", "almanet.replies", "almanet.still_running"),
    ("almanet.session",),
    ("almanet.service",),
    ("almanet.asyncapi",),
    (
        "almanet",
        "almanet.cli",
        "almanet.workers",
        "almanet.pytest_plugin",
        "almanet.bench",
        "almanet.__main__",
        "almanet.otel",
    ),
]
APART = [("almanet.nsq", "almanet.broker")]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # ``from almanet import loops`` imports almanet.loops
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if name == "almanet" or name.startswith("almanet.")}


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
# A package's __init__ importing its own modules is how it exports them: not an edge up or a circle.
GRAPH = {
    name: {
        imported
        for imported in imports_of(path)
        if imported in MODULES and imported != name and not imported.startswith(name + ".")
    }
    for name, path in MODULES.items()
}


def floor_of(module: str) -> int:
    best = (-1, -1)  # (length of the longest matching prefix, floor)
    for floor, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), floor)
    assert best[1] >= 0, f"{module} is on no floor: add it to FLOORS"
    return best[1]


def group_of(module: str) -> str | None:
    return next((prefix for pair in APART for prefix in pair if module.startswith(prefix)), None)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_one_above_it(module: str) -> None:
    above = sorted(imported for imported in GRAPH[module] if floor_of(imported) > floor_of(module))
    assert not above, f"{module} imports from a floor above it: {above}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_client_and_the_broker_never_import_each_other(module: str) -> None:
    group = group_of(module)
    crossing = sorted(imported for imported in GRAPH[module] if group and group_of(imported) not in (None, group))
    assert not crossing, f"{module} imports {crossing}"


def test_no_modules_import_each_other_in_a_circle() -> None:
    circles = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == "open":
                circles.append([*stack[stack.index(imported) :], imported])
            elif imported not in state:
                visit(imported)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not circles, "\n".join(" -> ".join(circle) for circle in circles)
