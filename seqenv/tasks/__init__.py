"""Tasks, one per file. ``make_task(name, **kwargs)`` builds one by name."""

from __future__ import annotations

from typing import Any

from seqenv.tasks.base import Example, Split, Task
from seqenv.vocab import Vocab


class UnknownTaskError(ValueError):
    """A task name that is not registered."""


def _registry() -> dict[str, type[Task]]:
    from seqenv.tasks.arithmetic import ArithmeticTask
    from seqenv.tasks.dyck import DyckTask
    from seqenv.tasks.text import TextTask

    return {cls.name: cls for cls in (ArithmeticTask, DyckTask, TextTask)}


TASK_NAMES = ("arithmetic", "dyck", "text")


def make_task(name: str, vocab: Vocab | None = None, **kwargs: Any) -> Task:
    """Build a task by name; keyword arguments go to its constructor.

    ``vocab``: build the task on this vocabulary (a pretrained model's tokenizer) instead of
    its own; the arithmetic and text tasks accept one. Dyck does not: it needs one token per
    bracket, and subword tokenizers merge brackets.
    """
    registry = _registry()
    if name not in registry:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(registry))}")
    if vocab is not None:
        if name == "dyck":
            raise ValueError(
                "task 'dyck' cannot use a pretrained model's tokenizer (subword tokens merge "
                "brackets); use arithmetic or text with --model"
            )
        kwargs = {**kwargs, "vocab": vocab}
    try:
        return registry[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"task {name!r}: {err}") from None


__all__ = ["TASK_NAMES", "Example", "Split", "Task", "UnknownTaskError", "make_task"]
