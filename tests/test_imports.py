"""The package's import graph has no cycles, and the planner/kernel/reader layering holds.

Reads every module under ``streammerge/`` with ``ast`` (module-level and function-level imports, ``if
TYPE_CHECKING`` blocks excluded) and builds the graph of ``streammerge.*`` imports. Importing ``a.b.c``
runs ``a/__init__`` and ``a/b/__init__`` first, so those packages count as imported too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import streammerge

ROOT = Path(streammerge.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(head + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for target in _imports(ast.parse(path.read_text(encoding="utf-8")), package):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # the module and every package above it (not `streammerge` itself)
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                    edges.add(prefix)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layering() -> None:
    """The kernel and the readers never reach the planner's assembly; the planner never imports torch code."""
    graph = import_graph()
    assert not {m for m in _closure(graph, "streammerge.kernel") if m.startswith(("streammerge.plan.assemble",
                                                                                 "streammerge.tuners"))}
    assert not {m for m in _closure(graph, "streammerge.formats.reader") if m.startswith("streammerge.plan")}
    planner = _closure(graph, "streammerge.plan.assemble") | {"streammerge.plan.assemble"}
    torch_modules = {"streammerge.kernel", "streammerge.execute", "streammerge.formats.reader", "streammerge.combine"}
    assert not planner & torch_modules, sorted(planner & torch_modules)
