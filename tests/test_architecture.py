"""The layering rules: a stated layer order, imports that point down it only, no circles.

:data:`LAYERS` is the order, lowest first: each package or top-level module imports only those
below it (and itself). Every import statement counts, also those inside functions and under
``TYPE_CHECKING``: a late import that hides a circle is still a circle. An edge joins two modules
of the project; the implicit import of a package's ``__init__`` is not an edge (every submodule
has it). A module imports no private (``_name``) name of another.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("seqenv", "agents")

LAYERS: tuple[str, ...] = (
    "seqenv",  # the MDP: no learning code
    "agents.collate",
    "agents.data",
    "agents.buffer",
    "agents.outputs",
    "agents.models",
    "agents.generate",
    "agents.objectives",
    "agents.deprecated",  # old setting names, still read for one release
    "agents.config",  # TrainConfig: what algorithms and the trainer both read
    "agents.evaluation",
    "agents.algorithms",
    "agents.training",
    "agents.agent",
    "agents.experiments",
    "agents.commands",  # the bodies of eval, generate and export
    "agents.cli",
    "agents",  # the package's __init__: the public names
)
"""The layer order, lowest first: a package or top-level module of ``agents``, or ``seqenv``."""


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
    assert "agents.config" in graph["agents.algorithms.ppo"]


def layer(module: str) -> str:
    """The layer of ``module``: the longest entry of :data:`LAYERS` that is it or holds it.

    The ``agents`` entry is the package's ``__init__`` alone: a new module of ``agents`` must be
    placed in the order.
    """
    holders = [
        entry
        for entry in LAYERS
        if module == entry or (entry != "agents" and module.startswith(entry + "."))
    ]
    assert holders, f"{module} is in no layer: add it to LAYERS"
    return max(holders, key=len)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_follow_the_layers(module: str) -> None:
    """A module imports only modules of its own layer or of the layers below it."""
    rank = LAYERS.index(layer(module))
    upward = sorted(m for m in import_graph()[module] if LAYERS.index(layer(m)) > rank)
    assert not upward, f"{module} ({layer(module)}) imports a higher layer: {upward}"


def test_the_readme_shows_the_layers() -> None:
    """The README's layout section shows :data:`LAYERS` (``agents.`` left out)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\nseqenv < ") + 1
    chain = text[start : text.index("```", start)].split("<")
    shown = [name.strip() for name in chain]
    assert shown == [
        {"agents": "__init__"}.get(entry, entry.removeprefix("agents.")) for entry in LAYERS
    ]


def test_the_layers_are_each_used() -> None:
    assert {layer(module) for module in _modules()} == set(LAYERS)


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
