"""The layering rules of DESIGN: imports point upstream only, with no circles.

Every import statement counts, also those inside functions and under ``TYPE_CHECKING``: a late
import that hides a circle is still a circle. An edge joins two modules of the project; the
implicit import of a package's ``__init__`` is not an edge (every submodule has it).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("seqenv", "agents")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module that ``name`` (a module, or a name inside one) refers to."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    modules = _modules()
    return {module: _imports(module, path, modules) for module, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports() -> None:
    """The parser finds known edges (so the tests below cannot pass on an empty graph)."""
    graph = import_graph()
    assert "agents.collate" in graph["agents.objectives"]
    assert "seqenv.rules" in graph["seqenv.mdp"]
    assert "agents.evaluation.evaluate" in graph["agents.training.trainer"]


def test_no_import_cycles() -> None:
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _private_imports(module: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """The names starting with ``_`` that ``module`` (at ``path``) imports from a project module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        if _resolve(base, modules) is None:
            continue  # not the project's
        found += [
            f"{base}.{alias.name}"
            for alias in node.names
            if alias.name.startswith("_") and not alias.name.startswith("__")
        ]
    return found


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_private_name_crosses_modules(module: str) -> None:
    """A module imports only the public names of another (``_name`` is its module's own)."""
    modules = _modules()
    assert not _private_imports(module, modules[module], modules)


def test_the_private_import_finder_finds_them(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from agents.experiments.report import _x, y\nfrom torch import _z\n")
    assert _private_imports("m", source, {"agents.experiments.report": source}) == [
        "agents.experiments.report._x"
    ]


@pytest.mark.parametrize("module", [m for m in _modules() if m.startswith("seqenv")])
def test_seqenv_imports_nothing_from_agents(module: str) -> None:
    graph = import_graph()
    assert not {m for m in graph[module] if m.startswith("agents")}, graph[module]
