"""The import graph of src/bitsweep: no cycles, and the light entry points import no framework."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Frameworks that only a backend's own modules may import, when that backend is used.
HEAVY = ("torch", "transformers", "openvino", "onnxruntime", "mlx", "llama_cpp", "nncf", "olive", "numba")


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``path:line``; ``lazy``: inside a function."""

    source: str
    target: str
    path: str
    line: int
    lazy: bool

    def __str__(self) -> str:
        return f"{self.path}:{self.line}{' (in a function)' if self.lazy else ''}"


def module_names(src: Path, package: str = "bitsweep") -> dict[str, Path]:
    """``bitsweep.backends.base`` -> its file; a package's name -> its ``__init__.py``."""
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module):
    """(node, lazy) for every import that runs: module level and in functions, not ``if TYPE_CHECKING:``."""
    todo = [(tree, False)]
    while todo:
        node, lazy = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, lazy
            elif _is_type_checking(child):  # annotations only; its `else:` runs
                todo.extend((c, lazy) for c in child.orelse)
            else:
                inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                todo.append((child, inner))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The bitsweep modules an import statement runs: ``from a.b import c`` is a.b.c if that is a module,
    else a.b; ``import a.b`` is a.b (the parent packages are not counted)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            parts = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    found = set()
    for name in names:
        while name and name not in known:  # `import bitsweep.x.y` where y is not a module, or a namespace
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_edges(src: Path = SRC) -> list[Edge]:
    known = module_names(src)
    edges = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, lazy in _imports(tree):
            for target in sorted(_targets(node, module, path.name == "__init__.py", set(known))):
                rel = str(path.relative_to(src))
                edges.append(Edge(module, target, rel, node.lineno, lazy))
    return edges


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one component (breadth first)."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & within):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is on no cycle")


def import_cycles(src: Path = SRC) -> list[str]:
    """One line per distinct shortest cycle through each module of each cycle, with file:line of each import."""
    edges = import_edges(src)
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Edge] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
        where.setdefault((edge.source, edge.target), edge)  # the first import statement
    lines: list[str] = []
    seen: set[frozenset[tuple[str, str]]] = set()
    for component in strongly_connected(graph):
        for start in component:
            cycle = shortest_cycle(graph, start, set(component))
            steps = list(pairwise(cycle))
            if frozenset(steps) in seen:
                continue
            seen.add(frozenset(steps))
            lines.append(" -> ".join([cycle[0], *(f"{b} [{where[a, b]}]" for a, b in steps)]))
    return lines


def test_the_bitsweep_import_graph_has_no_cycle():
    """A cycle through an import inside a function is still a circle in the design (it only hides it from
    Python); imports under ``if TYPE_CHECKING:`` do not run and are not counted."""
    cycles = import_cycles()
    assert not cycles, f"{len(cycles)} import cycle(s) in src/bitsweep:\n" + "\n".join(cycles)


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_relative_import(tmp_path):
    pkg = tmp_path / "bitsweep"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("from bitsweep.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import bitsweep.a\n")
    assert import_cycles(tmp_path) == [
        "bitsweep.a -> bitsweep.sub.b [bitsweep/a.py:1] -> bitsweep.a [bitsweep/sub/b.py:2 (in a function)]"
    ]
    (pkg / "sub" / "b.py").write_text("")
    assert import_cycles(tmp_path) == []


@pytest.mark.parametrize("entry", ["bitsweep", "bitsweep.config", "bitsweep.backends"])
def test_light_entry_points_import_no_framework(entry):
    """In a fresh interpreter: what the planner (Snakefile, config, registry) imports stays light."""
    code = (
        f"import importlib, json, sys; importlib.import_module({entry!r}); "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not heavy, f"import {entry} imports {', '.join(heavy)}"
