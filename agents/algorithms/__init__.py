"""The learning algorithms, one file each, and every registered name (all registrations here).

=========================  ==================================================================
name                       what it is
=========================  ==================================================================
``mle``                    teacher forcing on clean data; the backspace masked (mle.py)
``bc``                     BC on the disturbed demonstrations, intended actions (bc.py)
``bc_executed``            the same demonstrations, executed actions as labels: noise tokens
                           are targets (the paper's scheme), a preset of ``bc``
``sequencematch``          SequenceMatch (chi^2 mixture) in the disturbed environment
                           (sequencematch.py)
``sequencematch_eta0``     SequenceMatch's run with its term weighted 0 (BC with the level
                           penalty, same rollouts): what the term itself adds, a preset
``sequencematch_no_bkspc`` SequenceMatch without backspace (clean data), a preset
``ppo``                    stable-baselines3 PPO on the task reward (ppo.py)
``untuned``                the pretrained model as loaded, never updated (mle.py)
``dagger``                 DAgger: the task's oracle labels the learner's own states
                           (dagger.py; tasks with an oracle)
``dagger_demos``           its control: the demonstrations relabelled by the oracle, the same
                           number of expert-labelled states, no rollouts (a preset)
=========================  ==================================================================

Write your own as an :class:`Algorithm` subclass (see the README) and name it
``module:Class``, or register it here under a name.
"""

from agents.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    AlgorithmSpec,
    DataKind,
    Run,
    describe_algorithms,
    register_algorithm,
    resolve_algorithm,
)
from agents.algorithms.bc import BC
from agents.algorithms.dagger import DAgger
from agents.algorithms.mle import MLE, Untuned
from agents.algorithms.ppo import PPO
from agents.algorithms.sequencematch import SequenceMatch

# name, class, the settings the name fixes, label and short label (the class's when empty).
_REGISTRY: tuple[tuple[str, type[Algorithm], dict[str, object], str, str], ...] = (
    ("mle", MLE, {"backspace": False}, "", ""),
    ("bc", BC, {}, "", ""),
    ("bc_executed", BC, {"labels": "executed"},
     "BC (executed actions: noise as targets, the paper's)", "BC (executed)"),
    ("sequencematch", SequenceMatch, {}, "", ""),
    ("sequencematch_eta0", SequenceMatch, {"eta": 0.0},
     "SequenceMatch at eta 0 (BC with the level penalty)", "SequenceMatch at eta 0"),
    ("sequencematch_no_bkspc", SequenceMatch, {"backspace": False},
     "SequenceMatch, no backspace", "SequenceMatch, no backspace"),
    ("ppo", PPO, {}, "", ""),
    ("untuned", Untuned, {"backspace": False}, "", ""),
    ("dagger", DAgger, {}, "", ""),
    ("dagger_demos", DAgger, {"dagger_demo_share": 1.0},
     "DAgger's control: BC on oracle-relabelled demonstrations", "DAgger control"),
)  # fmt: skip
for _name, _cls, _overrides, _label, _short in _REGISTRY:
    register_algorithm(_name, _cls, overrides=_overrides, label=_label, short_label=_short)

__all__ = [
    "ALGORITHMS",
    "BC",
    "MLE",
    "PPO",
    "Algorithm",
    "AlgorithmSpec",
    "DAgger",
    "DataKind",
    "Run",
    "SequenceMatch",
    "Untuned",
    "describe_algorithms",
    "register_algorithm",
    "resolve_algorithm",
]
