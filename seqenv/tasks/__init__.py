"""Tasks, one per file. ``make_task(name, **kwargs)`` builds one by name.

Names are the built-in tasks (``arithmetic``, ``dyck``, ``text``), tasks added with
:func:`register_task`, or ``"module:Class"``: a :class:`Task` subclass (or any callable that
returns a task) importable from ``module``, which the command line accepts as ``--task``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from seqenv.tasks.base import Example, Split, Task, answer_policy
from seqenv.vocab import Vocab

TaskFactory = Callable[..., Task]
"""Builds a task from keyword arguments (a :class:`Task` subclass is one)."""


class UnknownTaskError(ValueError):
    """A task name that is not registered and not an importable ``module:Class``."""


TASK_NAMES = ("arithmetic", "dyck", "text")
_registered: dict[str, TaskFactory] = {}


def _builtin() -> dict[str, TaskFactory]:
    from seqenv.tasks.arithmetic import ArithmeticTask
    from seqenv.tasks.dyck import DyckTask
    from seqenv.tasks.text import TextTask

    return {cls.name: cls for cls in (ArithmeticTask, DyckTask, TextTask)}


def register_task(name: str, factory: TaskFactory, *, overwrite: bool = False) -> None:
    """Make ``make_task(name, **kwargs)`` call ``factory(**kwargs)``.

    Raises:
        ValueError: for an empty name, one with a colon (reserved for ``module:Class``), or a
            name already taken (a built-in task, or a registered one unless ``overwrite``).
    """
    if not name or ":" in name:
        raise ValueError(f"a task name must be non-empty and hold no ':', got {name!r}")
    if name in TASK_NAMES or (name in _registered and not overwrite):
        raise ValueError(f"task {name!r} is already registered")
    if not callable(factory):
        raise ValueError(f"the factory of task {name!r} is not callable")
    _registered[name] = factory


def _implements_oracle(factory: TaskFactory) -> bool:
    """Whether ``factory`` is a :class:`Task` class that implements :meth:`Task.expert_policy`."""
    return (
        isinstance(factory, type)
        and issubclass(factory, Task)
        and factory.expert_policy is not Task.expert_policy
    )


def oracle_task_names() -> list[str]:
    """The built-in and registered tasks whose class implements :meth:`Task.expert_policy`."""
    factories = {**_builtin(), **_registered}
    return sorted(name for name, factory in factories.items() if _implements_oracle(factory))


def task_has_oracle(name: str) -> bool:
    """Whether the task ``name`` (registered or ``module:Class``) implements the oracle.

    Known without building the task; False for a name that does not resolve (building it says
    why).
    """
    try:
        return _implements_oracle(_factory(name))
    except UnknownTaskError:
        return False


def _import_factory(spec: str) -> TaskFactory:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownTaskError(
            f"task {spec!r}: cannot import module {module_name!r} ({err})"
        ) from None
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise UnknownTaskError(
            f"task {spec!r}: module {module_name!r} has no callable {attribute!r}"
        )
    return factory


def _factory(name: str) -> TaskFactory:
    """The factory of a registered task name or of ``module:Class``.

    Raises:
        UnknownTaskError: for a name that is neither.
    """
    if ":" in name:
        return _import_factory(name)
    factories = {**_builtin(), **_registered}
    if name not in factories:
        raise UnknownTaskError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(factories))} (or module:Class)"
        )
    return factories[name]


def make_task(name: str, vocab: Vocab | None = None, **kwargs: Any) -> Task:
    """Build a task by name (or ``module:Class``); keyword arguments go to its constructor.

    ``vocab``: build the task on this vocabulary (a pretrained model's tokenizer) instead of
    its own; the arithmetic and text tasks accept one. Dyck does not: it needs one token per
    bracket, and subword tokenizers merge brackets.
    """
    factory = _factory(name)
    if vocab is not None:
        if name == "dyck":
            raise ValueError(
                "task 'dyck' cannot use a pretrained model's tokenizer (subword tokens merge "
                "brackets); use arithmetic or text with --model"
            )
        kwargs = {**kwargs, "vocab": vocab}
    try:
        task = factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"task {name!r}: {err}") from None
    if not isinstance(task, Task):
        raise ValueError(f"task {name!r}: its factory returned {type(task).__name__}, not a Task")
    return task


__all__ = [
    "TASK_NAMES",
    "Example",
    "Split",
    "Task",
    "TaskFactory",
    "UnknownTaskError",
    "answer_policy",
    "make_task",
    "oracle_task_names",
    "register_task",
    "task_has_oracle",
]
