"""The task's expert as an oracle: dyck's grammar, arithmetic's answer, the envs, ExpertPolicy."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

import seqenv
from seqenv.disturbance import Disturbance
from seqenv.expert import (
    ExpertPolicy,
    NoOracleError,
    expert_probs,
    task_of,
    trajectory_expert_probs,
)
from seqenv.tasks import Task, answer_policy, make_task, oracle_task_names
from seqenv.tasks.arithmetic import ArithmeticTask
from seqenv.tasks.dyck import DyckTask
from seqenv.trajectory import Trajectory, disturbed_demonstrations
from seqenv.vector import SB3VecEnv, SequenceGenVectorEnv

DYCK = DyckTask()  # ^ 0, ( 1, ) 2, [ 3, ] 4, <eos> 5, <bkspc> 6
BKSPC = DYCK.vocab.backspace_id
SMALL = {"num_types": 2, "max_depth": 3, "max_brackets": 8}


def backspace_only(num_actions: int, backspace_id: int) -> np.ndarray:
    probs = np.zeros(num_actions)
    probs[backspace_id] = 1.0
    return probs


# --------------------------------------------------------------------------------------------
# Dyck: the grammar


@pytest.mark.parametrize("kwargs", [SMALL, {"num_types": 1, "max_depth": 2, "min_brackets": 4}])
def test_dyck_oracle_is_the_grammar_on_every_valid_prefix(kwargs: dict) -> None:
    task = DyckTask(**kwargs)
    count = 0
    for prefix, _ in task.enumerate_prefixes():
        np.testing.assert_array_equal(
            task.expert_policy((task.start_id,), prefix), task.next_token_probs(prefix)
        )
        count += 1
    assert count > 20


def test_dyck_oracle_is_backspace_off_the_language() -> None:
    task = DyckTask(**SMALL)
    off = backspace_only(task.vocab.num_actions, task.vocab.backspace_id)
    tokens = [t for t in range(task.vocab.num_actions) if task.vocab.special.is_token(t)]
    checked = 0
    for prefix, _ in task.enumerate_prefixes(max_len=6):
        grammar = task.next_token_probs(prefix)
        for token in tokens:
            if grammar[token] > 0.0:
                continue
            # The first forbidden token, and anything written after it, stays off.
            for tail in ((), (task.open_ids[0],), (task.close_ids[0], task.open_ids[-1])):
                state = (*prefix, token, *tail)
                np.testing.assert_array_equal(task.expert_policy((task.start_id,), state), off)
                checked += 1
    assert checked > 100


def test_dyck_oracle_agrees_with_the_log_probability_on_random_texts() -> None:
    # The oracle's own walk against the grammar's: off the language exactly where the prefix
    # has probability zero, the grammar's conditional elsewhere.
    task = DyckTask(num_types=2, max_depth=3, max_brackets=10)
    rng = np.random.default_rng(0)
    off = backspace_only(task.vocab.num_actions, task.vocab.backspace_id)
    seen = {True: 0, False: 0}
    for _ in range(3000):
        prefix = [int(t) for t in rng.choice([0, 1, 1, 2, 3, 3, 4], size=rng.integers(0, 12))]
        valid = task.log_prob(prefix, terminated=False) > -math.inf
        probs = task.expert_policy((task.start_id,), prefix)
        expected = task.next_token_probs(prefix) if valid else off
        np.testing.assert_array_equal(probs, expected)
        seen[valid] += 1
    assert min(seen.values()) > 100


def test_dyck_oracle_needs_the_start_prompt() -> None:
    with pytest.raises(ValueError, match="knows the prompt"):
        DYCK.expert_policy((1,), ())
    with pytest.raises(ValueError, match="outside the action space"):
        DYCK.expert_policy((0,), (99,))


# --------------------------------------------------------------------------------------------
# Arithmetic: the answer


def test_arithmetic_oracle_follows_the_answer() -> None:
    task = ArithmeticTask(base=10, max_digits=1, test_fraction=0.0)
    v = task.vocab
    prompt = v.encode("In base 10, what is 7 + 5?")
    one_hot = {
        "": v.encode("1")[0],
        "1": v.encode("2")[0],
        "12": v.eos_id,
        "13": v.backspace_id,
        "123": v.backspace_id,
        "2": v.backspace_id,
    }
    for generated, action in one_hot.items():
        probs = task.expert_policy(prompt, v.encode(generated))
        assert probs is not None
        np.testing.assert_array_equal(probs, np.eye(v.num_actions)[action])
    with pytest.raises(ValueError, match="needs a question"):
        task.expert_policy(v.encode("5"), [])


def test_arithmetic_has_no_oracle_on_a_subword_vocabulary() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from seqenv.vocab import TokenizerVocab

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    questions = [
        ArithmeticTask(base=10, max_digits=2).draw_question(np.random.default_rng(i))
        for i in range(100)
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(questions, trainer)
    task = ArithmeticTask(base=10, max_digits=2, vocab=TokenizerVocab(tokenizer.to_str()))
    assert not task.has_oracle
    assert task.expert_policy(task.vocab.encode(questions[0]), []) is None
    with pytest.raises(NoOracleError, match="pretrained model's tokenizer") as err:
        expert_probs(task, [task.vocab.encode(questions[0])], [[]])
    assert "\n" not in str(err.value)


def test_answer_policy_by_hand() -> None:
    special = DYCK.vocab.special
    np.testing.assert_array_equal(answer_policy(special, [1, 2], []), np.eye(7)[1])
    np.testing.assert_array_equal(answer_policy(special, [1, 2], [1]), np.eye(7)[2])
    np.testing.assert_array_equal(answer_policy(special, [1, 2], [1, 2]), np.eye(7)[5])
    np.testing.assert_array_equal(answer_policy(special, [1, 2], [2]), np.eye(7)[BKSPC])
    np.testing.assert_array_equal(answer_policy(special, [1, 2], [1, 2, 1]), np.eye(7)[BKSPC])


# --------------------------------------------------------------------------------------------
# The oracle against the demonstrator of the disturbed environment


def clean_demonstrations(task: Task, num: int) -> list[Trajectory]:
    max_length = task.default_max_length
    return [task.demonstration(e, max_length) for e in task.examples("train", num, seed=7)]


def demonstrations(task: Task, kind: str, num: int, p: float = 0.3) -> list[Trajectory]:
    max_length = task.default_max_length
    return disturbed_demonstrations(
        clean_demonstrations(task, num),
        Disturbance(p, kind),  # type: ignore[arg-type]
        max_length,
        noise_fn=task.ground_truth_noise,
        rng=np.random.default_rng(1),
    )


@pytest.mark.parametrize("kind", ["ground_truth", "random"])
def test_the_oracle_is_the_demonstrator_on_arithmetic(kind: str) -> None:
    # One right answer: every noise token leaves it, so the demonstrator's intended action is
    # the oracle's one action at every state of 1,000 episodes.
    task = ArithmeticTask(base=10, max_digits=3)
    disturbed = 0
    for demo in demonstrations(task, kind, 1000):
        probs = trajectory_expert_probs(task, demo)  # (N, A)
        np.testing.assert_array_equal(probs[np.arange(len(probs)), demo.intended_actions], 1.0)
        disturbed += demo.num_disturbances
    assert disturbed > 300


def test_the_oracle_is_the_demonstrator_on_dyck_with_ground_truth_noise() -> None:
    # Ground-truth noise is a forbidden bracket: the text is off the language exactly while the
    # demonstrator repairs, where both backspace; elsewhere the text is the demonstrator's plan
    # so far, its intended action the plan's next one, drawn from the grammar's conditional,
    # which is the oracle.
    backspaces = 0
    plans = clean_demonstrations(DYCK, 1000)
    for demo, clean in zip(demonstrations(DYCK, "ground_truth", 1000), plans, strict=True):
        probs = trajectory_expert_probs(DYCK, demo)
        plan = clean.actions.tolist()  # the sampled sequence, then <eos>
        text: list[int] = []
        for row, chosen, ran in zip(probs, demo.intended_actions, demo.actions, strict=True):
            if row[BKSPC] == 1.0:
                assert chosen == BKSPC
                backspaces += 1
            else:
                assert chosen != BKSPC and row[chosen] > 0.0
                assert text == plan[: len(text)] and chosen == plan[len(text)]
                np.testing.assert_array_equal(row, DYCK.next_token_probs(text))
            if ran == BKSPC:
                text.pop()
            elif ran != DYCK.vocab.eos_id:
                text.append(int(ran))
    assert backspaces > 300


def test_the_oracle_and_the_demonstrator_with_random_noise_on_dyck() -> None:
    # Off the language the oracle puts all mass on <bkspc> (the demonstrator backspaces there
    # too); at valid states it gives the demonstrator's intended action nonzero probability,
    # except right after noise that happens to be valid ("[" in place of "("): the
    # demonstrator, who knows it was noise, deletes it, where the oracle would continue.
    off_states = valid_noise_states = 0
    for demo in demonstrations(DYCK, "random", 1000):
        probs = trajectory_expert_probs(DYCK, demo)
        after_noise = np.concatenate([[False], demo.disturbed[:-1]])
        for row, chosen, repairing in zip(probs, demo.intended_actions, after_noise, strict=True):
            if row[BKSPC] > 0.0:
                np.testing.assert_array_equal(row, backspace_only(7, BKSPC))
                assert chosen == BKSPC and repairing
                off_states += 1
            elif row[chosen] == 0.0:
                assert chosen == BKSPC and repairing
                valid_noise_states += 1
    assert off_states > 200 and valid_noise_states > 100


# --------------------------------------------------------------------------------------------
# The environments


def test_the_single_env_gives_the_oracle_at_its_state() -> None:
    env = gym.make(seqenv.ENV_ID, task="dyck")
    with pytest.raises(RuntimeError, match="reset"):
        env.unwrapped.expert_action_probs()
    env.reset(seed=0)
    np.testing.assert_array_equal(env.unwrapped.expert_action_probs(), DYCK.next_token_probs([]))
    env.step(1)  # (
    np.testing.assert_array_equal(env.unwrapped.expert_action_probs(), DYCK.next_token_probs([1]))
    env.step(4)  # ] does not close (
    np.testing.assert_array_equal(env.unwrapped.expert_action_probs(), backspace_only(7, BKSPC))
    env.step(BKSPC)
    np.testing.assert_array_equal(env.unwrapped.expert_action_probs(), DYCK.next_token_probs([1]))


def test_the_vector_env_batches_the_single_envs() -> None:
    num_envs, kwargs = 4, {"task": "arithmetic", "base": 10, "max_digits": 2}
    vector = SequenceGenVectorEnv(num_envs=num_envs, **kwargs)  # type: ignore[arg-type]
    singles = [gym.make(seqenv.ENV_ID, **kwargs) for _ in range(num_envs)]
    vector.reset(seed=3)
    for i, env in enumerate(singles):
        env.reset(seed=3 + i)
    rng = np.random.default_rng(0)
    vocab = vector.vocab
    for _ in range(4):  # no episode ends: digits and backspaces only
        batch = vector.expert_action_probs()
        assert batch.dtype == torch.float32 and batch.shape == (num_envs, vocab.num_actions)
        for i, env in enumerate(singles):
            np.testing.assert_allclose(batch[i].numpy(), env.unwrapped.expert_action_probs())
        digits = vocab.encode("0123456789")
        actions = [digits[int(rng.integers(10))] for _ in range(num_envs)]
        vector.step(torch.tensor(actions))
        for env, action in zip(singles, actions, strict=True):
            env.step(action)
    sb3 = SB3VecEnv(num_envs=2, **kwargs)  # type: ignore[arg-type]
    sb3.reset()
    probs = sb3.expert_action_probs()
    assert isinstance(probs, np.ndarray) and probs.shape == (2, vocab.num_actions)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_a_task_without_an_oracle_is_one_line_naming_those_with_one(
    task_kwargs: dict[str, dict[str, Any]],
) -> None:
    env = gym.make(seqenv.ENV_ID, task="text", **task_kwargs["text"])
    env.reset(seed=0)
    with pytest.raises(NoOracleError) as err:
        env.unwrapped.expert_action_probs()
    message = str(err.value)
    assert "\n" not in message and "'text'" in message
    assert "arithmetic" in message and "dyck" in message
    with pytest.raises(NoOracleError):
        ExpertPolicy(env)


def test_oracle_task_names() -> None:
    names = oracle_task_names()
    assert "arithmetic" in names and "dyck" in names and "text" not in names


def test_expert_policies_is_expert_policy_row_by_row() -> None:
    generated = [[], [1], [1, 4], [3, 4, 1]]
    batch = DYCK.expert_policies([[0]] * 4, generated)
    assert batch is not None and batch.shape == (4, 7)
    for row, ids in zip(batch, generated, strict=True):
        np.testing.assert_array_equal(row, DYCK.expert_policy([0], ids))
    with pytest.raises(ValueError, match="3 prompts but 4"):
        DYCK.expert_policies([[0]] * 3, generated)


def test_trajectory_expert_probs_is_the_oracle_before_each_action() -> None:
    demo = Trajectory([0], [1, 4, BKSPC, 2, 5], True, False, DYCK.vocab.special)
    probs = trajectory_expert_probs(DYCK, demo)
    states = [[], [1], [1, 4], [1], [1, 2]]
    for row, state in zip(probs, states, strict=True):
        np.testing.assert_array_equal(row, DYCK.expert_policy([0], state))


# --------------------------------------------------------------------------------------------
# ExpertPolicy


@pytest.mark.parametrize("deterministic", [True, False])
def test_expert_policy_scores_on_dyck_through_evaluate_policy(deterministic: bool) -> None:
    env = gym.make(seqenv.ENV_ID, task="dyck")
    policy = ExpertPolicy(env, seed=0)
    mean, _ = evaluate_policy(
        policy,  # type: ignore[arg-type]
        env,
        n_eval_episodes=100,
        deterministic=deterministic,
        warn=False,
    )
    assert mean >= 0.99


def test_expert_policy_on_long_dyck_in_a_vec_env() -> None:
    kwargs = {"task": "dyck", "max_depth": 8, "max_brackets": 40}
    venv = make_vec_env(seqenv.ENV_ID, n_envs=4, seed=0, env_kwargs=kwargs)
    rewards, _ = evaluate_policy(
        ExpertPolicy(venv, seed=1),  # type: ignore[arg-type]
        venv,
        n_eval_episodes=40,
        deterministic=False,
        return_episode_rewards=True,
        warn=False,
    )
    assert np.mean(rewards) >= 0.99  # type: ignore[arg-type]


def test_expert_policy_answers_arithmetic() -> None:
    env = gym.make(seqenv.ENV_ID, task="arithmetic", base=10, max_digits=3)
    mean, _ = evaluate_policy(ExpertPolicy(env), env, n_eval_episodes=30, warn=False)  # type: ignore[arg-type]
    assert mean == 1.0


def test_expert_policy_predict_shapes_draws_and_call() -> None:
    env = gym.make(seqenv.ENV_ID, task="dyck")
    obs, _ = env.reset(seed=0)
    policy = ExpertPolicy(env, seed=0)
    action, state = policy.predict(obs, deterministic=True)
    assert action.shape == () and action.dtype == np.int64 and state is None
    assert int(action) == 1  # the two opening brackets tie: the lowest id
    batch = np.repeat(obs[None], 4000, axis=0)
    actions, _ = policy.predict(torch.from_numpy(batch))
    assert actions.shape == (4000,)
    assert set(actions.tolist()) == {1, 3}  # never a zero-mass action
    assert abs(np.mean(actions == 1) - 0.5) < 0.04
    np.testing.assert_array_equal(policy.action_probs(obs), DYCK.next_token_probs([])[None])
    called, passed = policy(batch[:3], ("memory",), np.ones(3, dtype=bool))  # type: ignore[arg-type]
    assert called.shape == (3,) and passed == ("memory",)
    with pytest.raises(ValueError, match=r"\(L,\) or \(B, L\)"):
        policy.predict(batch[None])


def test_task_of_finds_the_task_behind_every_kind_of_env() -> None:
    env = gym.make(seqenv.ENV_ID, task="dyck")
    assert task_of(DYCK) is DYCK
    assert isinstance(task_of(env), DyckTask)  # through gymnasium's wrappers
    vector = SequenceGenVectorEnv(num_envs=2, task="dyck")
    assert task_of(vector) is vector.task
    assert isinstance(task_of(SB3VecEnv(num_envs=2, task="dyck")), DyckTask)
    assert isinstance(task_of(make_vec_env(seqenv.ENV_ID, n_envs=2)), ArithmeticTask)
    with pytest.raises(TypeError, match="no SequenceGen-v0 task"):
        task_of(object())


def test_prompt_length_reads_the_prompts_of_observations() -> None:
    assert DYCK.prompt_length([0, 1, 2]) == 1
    with pytest.raises(ValueError, match="starts with"):
        DYCK.prompt_length([1, 2])
    task = make_task("arithmetic", base=10, max_digits=1)
    question = task.vocab.encode("In base 10, what is 7 + 5?")
    assert task.prompt_length([*question, *task.vocab.encode("1?")]) == len(question)
    with pytest.raises(ValueError, match="holds no question"):
        task.prompt_length(task.vocab.encode("12"))
