"""agents: policies, objectives (MLE, BC, SequenceMatch), the trainer and the `seqmatch` command.

``from agents import SequenceMatch, MLE, BC`` gives the Stable-Baselines3-style facade (loaded on
first use, so that the `seqmatch` command starts without it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agents.agent import BC, MLE, ImitationAgent, SequenceMatch

__all__ = ["BC", "MLE", "ImitationAgent", "SequenceMatch"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("agents.agent"), name)
    raise AttributeError(f"module 'agents' has no attribute {name!r}")
