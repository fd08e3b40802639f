"""The own-error measures on hand-made episodes whose values are known."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from agents.evaluation.episodes import OWN_ERROR_DENOMINATORS, own_error_units
from agents.evaluation.evaluate import METRICS, OWN_ERROR_METRICS
from seqenv.disturbance import Disturbance
from seqenv.expert import NoOracleError
from seqenv.tasks import Example, Split, Task
from seqenv.tasks.arithmetic import ArithmeticTask
from seqenv.tasks.dyck import DyckTask
from seqenv.trajectory import Trajectory, disturbed_demonstrations
from seqenv.vocab import CharVocab

DYCK = DyckTask()  # ^ 0, ( 1, ) 2, [ 3, ] 4, <eos> 5, <bkspc> 6


def ids(text: str) -> list[int]:
    """Dyck actions written as text: '<' is a backspace, '$' is <eos>."""
    special = {"<": DYCK.vocab.backspace_id, "$": DYCK.vocab.eos_id}
    return [special[c] if c in special else DYCK.vocab.encode(c)[0] for c in text]


def episode(executed: str, intended: str | None = None) -> Trajectory:
    actions = ids(executed)
    ended = actions[-1] == DYCK.vocab.eos_id
    return Trajectory(
        prompt=[DYCK.start_id],
        actions=actions,
        terminated=ended,
        truncated=not ended,
        special=DYCK.vocab.special,
        intended=None if intended is None else ids(intended),
    )


def units(*episodes: Trajectory, noise: bool = True) -> dict[str, list[float]]:
    return own_error_units(DYCK, list(episodes), noise=noise)


def test_an_own_error_repaired() -> None:
    # "(" then "]" (the grammar wants ")" or an opening bracket): an own error, deleted.
    u = units(episode("(]<)$"))
    assert u["own_error_rate"] == [1.0]
    assert u["own_error_repair_rate"] == [1.0]
    assert u["valid_after_own_error"] == [1.0]
    assert u["false_backspace_share"] == [0.0]  # it deleted the error
    assert u["early_eos_rate"] == [0.0]
    assert u["noise_unrepaired"] == [0.0]


def test_an_own_error_not_repaired() -> None:
    # The ")" after "(]" is written off the language: not a second own error, and the <eos>
    # there is not an early one (the error is the bracket).
    u = units(episode("(])$"))
    assert u["own_error_rate"] == [1.0]
    assert u["own_error_repair_rate"] == [0.0]
    assert u["valid_after_own_error"] == [0.0]
    assert u["false_backspace_share"] == []
    assert u["early_eos_rate"] == [0.0]


def test_noise_left_in_is_not_an_own_error() -> None:
    # The agent meant ")" and the environment wrote "]"; the agent writes on.
    u = units(episode("(])$", intended="())$"))
    assert u["own_error_rate"] == [0.0]
    assert u["own_error_repair_rate"] == []
    assert u["valid_after_own_error"] == []
    assert u["noise_unrepaired"] == [1.0]
    assert u["early_eos_rate"] == [0.0]


def test_noise_repaired_is_not_left_in() -> None:
    u = units(episode("(]<)$", intended="()<)$"))
    assert u["noise_unrepaired"] == [0.0]
    assert u["false_backspace_share"] == [0.0]  # deleting noise is never false
    assert u["own_error_rate"] == [0.0]


def test_an_early_eos() -> None:
    # <eos> with a bracket open: counted apart, not as an own error.
    u = units(episode("($"))
    assert u["early_eos_rate"] == [1.0]
    assert u["own_error_rate"] == [0.0]
    assert u["own_error_repair_rate"] == []


def test_a_backspace_over_a_correct_own_token() -> None:
    u = units(episode("()<)$"))
    assert u["false_backspace_share"] == [1.0]
    assert u["own_error_rate"] == [0.0]


def test_a_backspace_over_valid_noise_is_not_false() -> None:
    # Random noise "[" in place of "(" is valid text: the oracle would continue, the agent
    # deletes it as the demonstrator does. Deleting noise is never false.
    u = units(episode("([<())$", intended="((<())$"))
    assert u["false_backspace_share"] == [0.0]
    assert u["noise_unrepaired"] == [0.0]  # valid noise never takes the text off
    assert u["own_error_rate"] == [0.0]


def test_tokens_after_valid_noise_are_judged_by_the_oracle() -> None:
    # After valid noise "[", the agent's "]" is correct and its ")" an own error.
    u = units(episode("([])$", intended="((])$"))
    assert u["own_error_rate"] == [0.0]
    u = units(episode("([)$", intended="(()$"))
    assert u["own_error_rate"] == [1.0]
    assert u["noise_unrepaired"] == [0.0]


def test_units_pool_over_episodes() -> None:
    u = units(episode("(]<)$"), episode("(])$"), episode("()$"), episode("(]<^<)$"), noise=False)
    assert u["own_error_rate"] == [1.0, 1.0, 0.0, 1.0]
    # Per own error: the first repaired, the second not, both of the last episode repaired.
    assert u["own_error_repair_rate"] == [1.0, 0.0, 1.0, 1.0]
    assert u["valid_after_own_error"] == [1.0, 0.0, 1.0]
    assert u["false_backspace_share"] == [0.0, 0.0, 0.0]
    assert "noise_unrepaired" not in u  # a clean evaluation has no noise


def test_a_deleted_error_written_again_is_a_second_own_error() -> None:
    u = units(episode("(]<])$"))
    assert u["own_error_repair_rate"] == [1.0, 0.0]
    assert u["own_error_rate"] == [1.0]


def test_arithmetic_against_its_answer() -> None:
    task = ArithmeticTask(base=10, max_digits=1, test_fraction=0.0)
    prompt = task.vocab.encode("In base 10, what is 7 + 5?")
    v = task.vocab

    def arith(text: str) -> Trajectory:
        actions = [
            v.backspace_id if c == "<" else v.eos_id if c == "$" else v.encode(c)[0] for c in text
        ]
        return Trajectory(prompt, actions, True, False, v.special)

    u = own_error_units(task, [arith("13<2$"), arith("1$"), arith("12<2$"), arith("122$")])
    assert u["own_error_rate"] == [1.0, 0.0, 0.0, 1.0]
    assert u["own_error_repair_rate"] == [1.0, 0.0]  # the "2" after the answer is not deleted
    assert u["valid_after_own_error"] == [1.0, 0.0]
    assert u["false_backspace_share"] == [0.0, 1.0]
    assert u["early_eos_rate"] == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["random", "ground_truth"])
def test_the_demonstrator_makes_no_own_error(kind: str) -> None:
    # The disturbed env's demonstrator: no own error, no early <eos>, no noise left in, and
    # never a false backspace (it deletes noise only, valid noise included).
    examples = DYCK.examples("train", 300, seed=3)
    max_length = DYCK.default_max_length
    clean = [DYCK.demonstration(e, max_length) for e in examples]
    demos = disturbed_demonstrations(
        clean,
        Disturbance(0.3, kind),  # type: ignore[arg-type]
        max_length,
        noise_fn=DYCK.ground_truth_noise,
        rng=np.random.default_rng(0),
    )
    u = own_error_units(DYCK, demos, noise=True)
    assert sum(u["own_error_rate"]) == 0.0
    assert sum(u["early_eos_rate"]) == 0.0
    assert sum(u["noise_unrepaired"]) == 0.0
    assert len(u["false_backspace_share"]) > 50
    assert sum(u["false_backspace_share"]) == 0.0


class _NoOracle(Task):
    name = "no_oracle"

    def __init__(self) -> None:
        self.vocab = CharVocab("ab")
        self.default_max_length = 8

    def sample(self, rng: np.random.Generator, split: Split = "train") -> Example:
        return Example(prompt=(0,), completion=(1,))

    def score(self, prompt: Sequence[int], generated: Sequence[int], terminated: bool) -> float:
        return 0.0

    def ground_truth_noise(
        self, rng: np.random.Generator, prompt: Sequence[int], generated: Sequence[int], t: int
    ) -> int:
        return 0


def test_a_task_without_an_oracle_is_refused() -> None:
    with pytest.raises(NoOracleError, match=r"no expert oracle.*dyck"):
        own_error_units(_NoOracle(), [])


def test_every_measure_is_named_once_with_a_unit_range() -> None:
    assert set(OWN_ERROR_METRICS) == set(OWN_ERROR_DENOMINATORS)
    for name in OWN_ERROR_METRICS:
        assert METRICS[name].bounds == (0.0, 1.0)
        assert METRICS[name].higher_is_better is not None
    u = units(episode("()$"))
    assert set(u) == set(OWN_ERROR_METRICS)
    assert all(not math.isnan(sum(v)) for v in u.values())
