"""No import circles inside kvbound: the package-internal import graph, one node per module, has no cycle.

An edge A -> B is any `import`/`from ... import` in A that names B or something defined in B, wherever it sits:
module level, inside a function or method (an import moved into a function to dodge a cycle still closes it), in
a try/except. `from pkg import name` points at `pkg.name` when that is a module, else at `pkg` (its __init__).

Not counted:
- imports under `if TYPE_CHECKING:` (its else branch counts). They never run, so they cannot make an import order
  matter; they are how an annotation names a type of a module that depends on this one (a Chat holds the LLM that
  creates it). A runtime need for such a type still shows up, as a plain import.
- the implicit import of a module's parent packages: importing kvbound.chat.session runs kvbound/chat/__init__.py,
  but a package's __init__ re-exporting its modules is the facade, not a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvbound

PACKAGE = "kvbound"
SOURCE = Path(kvbound.__file__).parent


def modules_of(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Every Import/ImportFrom node that can run: all of them, less the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package -> line of the first import of it}."""
    modules = modules_of(root, package)

    def owner(name: str) -> str | None:  # the module that defines dotted `name` (a module, or a name in one)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for module, (path, is_package) in modules.items():
        here = module if is_package else module.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [owner(alias.name) for alias in node.names if alias.name.split(".")[0] == package]
            else:
                if node.level:  # relative: level 1 is this module's package
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != package:
                    continue
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else owner(source)
                           for alias in node.names]
            for target in targets:
                if target is not None and target != module:
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm; the graph is a few hundred modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for component in components:
        members, start = set(component), min(component)
        path, seen = [start], {start}
        while True:  # walk inside the component until a module repeats: that closes a cycle
            nxt = min(w for w in graph[path[-1]] if w in members)
            if nxt in seen:
                found.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return found


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return "\n    ".join(f"{a} -> {b}  (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_kvbound_has_no_import_cycles():
    graph = import_graph(SOURCE, PACKAGE)
    assert len(graph) > 50 and "kvbound.llm" in graph["kvbound"]  # the walk saw the package
    found = cycles(graph)
    assert not found, "import cycles in src/kvbound:\n" + "\n".join(
        f"  {' -> '.join(c)}\n    {describe(c, graph)}" for c in found)


def test_function_level_imports_close_cycles_and_type_checking_ones_do_not(tmp_path: Path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("from pkg.a import A\n")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from pkg.sub import b\nA = 1\n")
    (root / "sub" / "b.py").write_text("def f():\n    from ..a import A\n    return A\n")  # relative, in a function
    (root / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import D\n"
                               "else:\n    import pkg.e\n")
    (root / "d.py").write_text("import pkg.c\nD = 1\n")
    (root / "e.py").write_text("")
    graph = import_graph(root, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b": 1} and graph["pkg.sub.b"] == {"pkg.a": 2}
    assert graph["pkg.c"] == {"pkg.e": 5}  # the TYPE_CHECKING import is left out, its else branch is not
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.a"]]
