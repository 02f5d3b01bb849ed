"""The package's import graph: no cycles between subpackages, no private modules used from outside.

Every ``import`` statement in ``rslora_deploy`` counts, at module level or inside a function (a
lazy import is still a dependency), except those under ``if TYPE_CHECKING:``, which never run.
A node is a subpackage (``adapters``, ``stages``...); top-level modules (``config``, ``errors``,
``registry``...) are the shared core every subpackage may use, so they are not nodes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rslora_deploy"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[str]:
    """Dotted names of every ``rslora_deploy`` module imported outside TYPE_CHECKING blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.startswith("rslora_deploy"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rslora_deploy"):
            found.extend(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _modules() -> dict[str, list[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        graph[name] = _imports(ast.parse(path.read_text(encoding="utf-8")))
    return graph


def _subpackage(module: str) -> str | None:
    """``rslora_deploy.stages.merge`` -> ``stages``; top-level modules -> None."""
    parts = module.split(".")
    if len(parts) < 2 or not (PACKAGE / parts[1]).is_dir():
        return None
    return parts[1]


def _subpackage_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, imported in _modules().items():
        source = _subpackage(module)
        if source is None:
            continue
        for target in map(_subpackage, imported):
            if target is not None and target != source:
                edges.setdefault(source, set()).add(target)
    return edges


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def test_no_cycle_between_subpackages():
    cycle = _find_cycle(_subpackage_graph())
    assert cycle is None, "import cycle between subpackages: " + " -> ".join(cycle or [])


def test_private_modules_are_used_only_inside_their_subpackage():
    offenders = []
    for module, imported in _modules().items():
        for target in imported:
            parts = target.split(".")
            # rslora_deploy.<sub>._private[.attr] is private to <sub>.
            private = len(parts) >= 3 and parts[2].startswith("_") and _subpackage(target)
            if private and _subpackage(module) != parts[1]:
                offenders.append(f"{module} imports {target}")
    assert not offenders, "; ".join(offenders)


@pytest.mark.parametrize(
    ("edges", "has_cycle"),
    [
        ({"a": {"b"}, "b": {"c"}}, False),
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ],
)
def test_cycle_finder_finds_cycles(edges, has_cycle):
    """The checker itself can fail: it sees a two- and a three-node cycle."""
    assert (_find_cycle(edges) is not None) is has_cycle
