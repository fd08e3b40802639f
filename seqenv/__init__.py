"""seqenv: text generation as a Gymnasium environment whose actions are tokens plus a backspace.

Importing this package registers ``SequenceGen-v0``; ``gym.make("seqenv:SequenceGen-v0")`` imports
it on demand. Every registration of the project is in this file.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from gymnasium.envs.registration import register, registry

from seqenv.disturbance import Disturbance
from seqenv.expert import ExpertPolicy, NoOracleError, expert_probs, trajectory_expert_probs
from seqenv.mdp import InvalidActionError, PromptTooLongError, SequenceMDP
from seqenv.tasks import TASK_NAMES, Task, UnknownTaskError, make_task, register_task
from seqenv.trajectory import (
    DemonstrationError,
    Trajectory,
    augment,
    disturbed_demonstration,
    disturbed_demonstrations,
    load_demonstrations,
    random_noise,
    replay,
)
from seqenv.vocab import CharVocab, SpecialIds, TokenizerVocab, Vocab, VocabularyError

ENV_ID = "SequenceGen-v0"

if ENV_ID not in registry:
    register(
        id=ENV_ID,
        entry_point="seqenv.env:SequenceGenEnv",
        vector_entry_point="seqenv.vector:SequenceGenVectorEnv",
    )

_SUBMODULES = ("checker", "vector")
"""Submodules loaded on first use (they import stable-baselines3): ``seqenv.checker`` works
after ``import seqenv`` alone."""


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"seqenv.{name}")
    raise AttributeError(f"module 'seqenv' has no attribute {name!r}")


__all__ = [
    "ENV_ID",
    "TASK_NAMES",
    "CharVocab",
    "DemonstrationError",
    "Disturbance",
    "ExpertPolicy",
    "InvalidActionError",
    "NoOracleError",
    "PromptTooLongError",
    "SequenceMDP",
    "SpecialIds",
    "Task",
    "TokenizerVocab",
    "Trajectory",
    "UnknownTaskError",
    "Vocab",
    "VocabularyError",
    "augment",
    "disturbed_demonstration",
    "disturbed_demonstrations",
    "expert_probs",
    "load_demonstrations",
    "make_task",
    "random_noise",
    "register_task",
    "replay",
    "trajectory_expert_probs",
]
