"""Custom tasks: ``register_task`` and ``module:Class`` names, in make_task, the env, the CLI."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import seqenv
from seqenv.tasks import Example, Task, UnknownTaskError, make_task, register_task
from seqenv.vocab import CharVocab

# The README's example task: copy a word of a, b and c, then stop; it opts in to the oracle.
COPY_TASK = """
import numpy as np
from seqenv.tasks import Example, Task, answer_policy
from seqenv.vocab import CharVocab

class CopyTask(Task):
    name = "copy"
    def __init__(self, length: int = 3):
        self.vocab, self.length, self.default_max_length = CharVocab("abc>"), length, 2 * length + 3
    def sample(self, rng, split="train"):
        word = self.vocab.encode("".join(rng.choice(list("abc"), self.length)))
        return Example(prompt=(*word, *self.vocab.encode(">")), completion=tuple(word))
    def score(self, prompt, generated, terminated):
        return float(terminated and list(generated) == list(prompt[:-1]))
    def ground_truth_noise(self, rng, prompt, generated, true_next):
        return int(rng.choice([t for t in self.vocab.encode("abc") if t != true_next]))
    def expert_policy(self, prompt, generated):
        return answer_policy(self.vocab.special, prompt[:-1], generated)
    def prompt_length(self, state):
        return list(state).index(self.vocab.encode(">")[0]) + 1
    def config(self):
        return {"length": self.length}
"""


@pytest.fixture
def copy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_tasks.py").write_text(textwrap.dedent(COPY_TASK))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_tasks:CopyTask"


def test_module_class_name_builds_the_task(copy_module: str) -> None:
    task = make_task(copy_module, length=4)
    example = task.sample(np.random.default_rng(0))
    assert len(example.completion) == 4
    assert task.score(example.prompt, example.completion, True) == 1.0
    env = gym.make(seqenv.ENV_ID, task=copy_module, length=2)
    _, info = env.reset(seed=0)
    assert info["text"].endswith(">") and len(info["text"]) == 3


def test_register_task_and_its_errors() -> None:
    class Constant(Task):
        name = "constant"

        def __init__(self) -> None:
            self.vocab, self.default_max_length = CharVocab("x"), 4

        def sample(self, rng: np.random.Generator, split: str = "train") -> Example:
            return Example(prompt=(0,), completion=(0,))

        def score(self, prompt, generated, terminated) -> float:  # type: ignore[no-untyped-def]
            return 1.0

        def ground_truth_noise(self, rng, prompt, generated, true_next) -> int:  # type: ignore[no-untyped-def]
            return 0

    register_task("constant-test", Constant, overwrite=True)
    assert isinstance(make_task("constant-test"), Constant)
    with pytest.raises(ValueError, match="already registered"):
        register_task("constant-test", Constant)
    with pytest.raises(ValueError, match="already registered"):
        register_task("dyck", Constant)
    with pytest.raises(ValueError, match="no ':'"):
        register_task("a:b", Constant)
    register_task("not-a-task", lambda: object(), overwrite=True)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="not a Task"):
        make_task("not-a-task")


def test_unknown_names_say_what_exists() -> None:
    with pytest.raises(UnknownTaskError, match=r"known tasks: .*arithmetic"):
        make_task("nope")
    with pytest.raises(UnknownTaskError, match="cannot import module"):
        make_task("no_such_module_xyz:Task")
    with pytest.raises(UnknownTaskError, match="has no callable"):
        make_task("json:NoSuchThing")


def test_cli_trains_and_evaluates_a_module_class_task(
    copy_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agents.cli import main

    save = tmp_path / "ck"
    code = main(
        [
            "train", "--agent", "mle", "--task", copy_module, "--task-args", '{"length": 2}',
            "--steps", "3", "--batch-size", "4", "--num-demonstrations", "16", "--layers", "1",
            "--width", "16", "--heads", "1", "--eval-interval", "0", "--eval-episodes", "4",
            "--logdir", "", "--save", str(save), "--no-progress", "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metadata_files = list(save.rglob("checkpoint.json"))
    assert (
        metadata_files and json.loads(metadata_files[0].read_text())["task"]["name"] == copy_module
    )
    code = main(["eval", "--checkpoint", str(save), "--episodes", "4", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "task/score" in out
    assert "task/own_error_rate" in out  # the task opted in to the oracle


def test_the_copy_task_opts_in_to_the_oracle(copy_module: str) -> None:
    from stable_baselines3.common.evaluation import evaluate_policy

    env = gym.make(seqenv.ENV_ID, task=copy_module, length=3)
    _, info = env.reset(seed=0)
    word = info["text"][:-1]
    vocab = env.unwrapped.vocab
    assert env.unwrapped.expert_action_probs()[vocab.encode(word[0])[0]] == 1.0
    wrong = next(c for c in "abc" if c != word[0])
    _, _, _, _, info = env.step(vocab.encode(wrong)[0])
    assert env.unwrapped.expert_action_probs()[vocab.backspace_id] == 1.0
    mean, _ = evaluate_policy(seqenv.ExpertPolicy(env), env, n_eval_episodes=20, warn=False)
    assert mean == 1.0
