"""SequenceGen-v0: registration, the checker on every task, the vector env, bad input, SB3."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import SyncVectorEnv

import seqenv
from seqenv.checker import check_sequence_env
from seqenv.env import SequenceGenEnv
from seqenv.mdp import InvalidActionError, PromptTooLongError
from seqenv.tasks import TASK_NAMES, UnknownTaskError
from seqenv.vector import SB3VecEnv, SequenceGenVectorEnv
from seqenv.vocab import VocabularyError


@pytest.fixture(params=TASK_NAMES)
def task_env(request: pytest.FixtureRequest, task_kwargs: dict[str, dict[str, Any]]) -> gym.Env:
    return gym.make(seqenv.ENV_ID, task=request.param, **task_kwargs[request.param])


def test_registered_once_with_vector_entry_point() -> None:
    spec = gym.spec(seqenv.ENV_ID)
    assert spec.entry_point == "seqenv.env:SequenceGenEnv"
    assert spec.vector_entry_point == "seqenv.vector:SequenceGenVectorEnv"


def test_make_without_importing_seqenv() -> None:
    code = (
        "import sys, gymnasium as gym\n"
        "assert 'seqenv' not in sys.modules\n"
        "env = gym.make('seqenv:SequenceGen-v0', task='dyck')\n"
        "obs, info = env.reset(seed=0)\n"
        "print(type(env.unwrapped).__name__, info['text'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("SequenceGenEnv")


def test_checker_passes_for_every_task(task_env: gym.Env) -> None:
    check_sequence_env(task_env, seed=0, num_episodes=10)


def test_observation_info_and_render(task_kwargs: dict[str, dict[str, Any]]) -> None:
    env = gym.make(
        seqenv.ENV_ID, task="arithmetic", render_mode="ansi", **task_kwargs["arithmetic"]
    )
    obs, info = env.reset(seed=3)
    vocab = env.unwrapped.vocab
    assert obs.dtype == np.int64 and obs.shape == env.observation_space.shape
    assert info["text"].startswith("In base 10, what is ")
    assert info["generated"] == ""
    assert info["action_mask"][vocab.backspace_id] == 0
    obs, reward, terminated, truncated, info = env.step(vocab.encode("7")[0])
    assert info["generated"] == "7" and env.render() == info["text"]
    assert info["action_mask"][vocab.backspace_id] == 1
    assert (reward, terminated, truncated) == (0.0, False, False)


def test_task_reward_at_eos(task_kwargs: dict[str, dict[str, Any]]) -> None:
    env = gym.make(seqenv.ENV_ID, task="arithmetic", **task_kwargs["arithmetic"])
    base = env.unwrapped
    env.reset(seed=0, options={"prompt": "In base 10, what is 12 + -5?"})
    for action in [*base.vocab.encode("8"), base.vocab.backspace_id, *base.vocab.encode("7")]:
        env.step(action)
    _, reward, terminated, truncated, info = env.step(base.vocab.eos_id)
    assert (reward, terminated, truncated, info["generated"]) == (1.0, True, False, "7")
    env.reset(seed=0, options={"prompt": "In base 10, what is 12 + -5?"})
    env.step(base.vocab.encode("6")[0])
    assert env.step(base.vocab.eos_id)[1] == 0.0


def test_reward_none_and_callable(task_kwargs: dict[str, dict[str, Any]]) -> None:
    calls = []

    def reward(prompt: str, generated: str, terminated: bool) -> float:
        calls.append((prompt, generated, terminated))
        return 2.5

    env = gym.make(seqenv.ENV_ID, task="dyck", reward=reward)
    env.reset(seed=0)
    vocab = env.unwrapped.vocab
    assert env.step(vocab.eos_id)[1] == 2.5
    assert calls and calls[0][2] is True
    env = gym.make(seqenv.ENV_ID, task="dyck", reward="none")
    env.reset(seed=0)
    assert env.step(vocab.eos_id)[1] == 0.0
    with pytest.raises(ValueError, match="reward must be"):
        gym.make(seqenv.ENV_ID, task="dyck", reward="dense")


def test_truncation_by_length_and_by_budget() -> None:
    env = SequenceGenEnv(task="dyck", max_length=4, max_steps=100)
    env.reset(seed=0)
    token = env.vocab.encode("(")[0]
    results = [env.step(token) for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True]
    assert not results[-1][2]
    env = SequenceGenEnv(task="dyck", max_length=10, max_steps=3)
    env.reset(seed=0)
    results = [env.step(env.vocab.backspace_id) for _ in range(3)]  # no-ops still cost steps
    assert [r[3] for r in results] == [False, False, True]


def test_starting_from_generated_tokens(task_kwargs: dict[str, dict[str, Any]]) -> None:
    env = SequenceGenEnv(task="arithmetic", **task_kwargs["arithmetic"])
    _, info = env.reset(options={"prompt": "In base 10, what is 1 + 1?", "generated": "3"})
    assert info["generated"] == "3" and info["action_mask"][env.vocab.backspace_id] == 1
    _, _, _, _, info = env.step(env.vocab.backspace_id)
    assert info["generated"] == "" and info["text"] == "In base 10, what is 1 + 1?"


def test_bad_input_raises_clear_errors(task_kwargs: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(UnknownTaskError, match="unknown task 'poetry'"):
        gym.make(seqenv.ENV_ID, task="poetry")
    env = SequenceGenEnv(task="arithmetic", max_length=30, **task_kwargs["arithmetic"])
    with pytest.raises(PromptTooLongError, match="max_length is 30"):
        env.reset(options={"prompt": "In base 10, what is 1234567 + 7654321?"})
    with pytest.raises(VocabularyError, match="'Z'"):
        env.reset(options={"prompt": "In base 10, what is Z + 1?"})
    env.reset(seed=0)
    with pytest.raises(InvalidActionError, match="outside the action space"):
        env.step(env.vocab.num_actions)
    with pytest.raises(InvalidActionError, match="outside the action space"):
        env.step(-1)
    with pytest.raises(ValueError, match="no such"):
        SequenceGenEnv(task="text", corpus="/nonexistent/corpus")


def test_step_after_episode_end_needs_reset() -> None:
    env = SequenceGenEnv(task="dyck")
    env.reset(seed=0)
    env.step(env.vocab.eos_id)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


def _random_actions(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One allowed action per row, with backspaces and <eos> drawn often enough to matter."""
    return np.array([rng.choice(np.flatnonzero(m)) for m in masks])


@pytest.mark.parametrize(
    ("task", "disturbance"),
    [
        ("arithmetic", {}),
        ("dyck", {}),
        ("arithmetic", {"disturbance": 0.2, "disturbance_type": "random"}),
        ("dyck", {"disturbance": 0.2, "disturbance_type": "ground_truth"}),
    ],
    ids=["arithmetic", "dyck", "arithmetic-random-noise", "dyck-ground-truth-noise"],
)
def test_vector_env_equals_single_envs(
    task: str, disturbance: dict[str, Any], task_kwargs: dict[str, dict[str, Any]]
) -> None:
    num_envs, seed = 16, 123
    kwargs = {"task": task, **disturbance, **task_kwargs[task]}
    vector = gym.make_vec(seqenv.ENV_ID, num_envs=num_envs, **kwargs)
    assert isinstance(vector.unwrapped, SequenceGenVectorEnv)
    assert vector.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    sync = SyncVectorEnv([lambda: SequenceGenEnv(**kwargs) for _ in range(num_envs)])
    obs_v, info_v = vector.reset(seed=seed)
    obs_s, info_s = sync.reset(seed=seed)
    np.testing.assert_array_equal(obs_v.numpy(), obs_s)
    rng = np.random.default_rng(0)
    episodes = disturbed = 0
    while episodes < 1000:
        masks = info_v["action_mask"].numpy()
        np.testing.assert_array_equal(masks, info_s["action_mask"].astype(bool))
        actions = _random_actions(masks, rng)
        obs_v, rew_v, term_v, trunc_v, info_v = vector.step(torch.from_numpy(actions))
        obs_s, rew_s, term_s, trunc_s, info_s = sync.step(actions)
        np.testing.assert_array_equal(obs_v.numpy(), obs_s)
        np.testing.assert_array_equal(rew_v.numpy(), rew_s.astype(np.float32))
        np.testing.assert_array_equal(term_v.numpy(), term_s)
        np.testing.assert_array_equal(trunc_v.numpy(), trunc_s)
        stepped = info_s["_executed_action"]  # rows that stepped, not reset
        for key in ("intended_action", "executed_action"):
            np.testing.assert_array_equal(info_v[key].numpy()[stepped], info_s[key][stepped])
            assert (info_v[key].numpy()[~stepped] == -1).all()
        disturbed += int((info_s["intended_action"] != info_s["executed_action"]).sum())
        episodes += int((term_s | trunc_s).sum())
    assert (disturbed > 0) == bool(disturbance)


def test_sb3_ppo_runs_on_dyck() -> None:
    from stable_baselines3 import PPO

    model = PPO(
        "MlpPolicy",
        gym.make(seqenv.ENV_ID, task="dyck"),
        n_steps=256,
        batch_size=64,
        n_epochs=1,
        seed=0,
        device="cpu",
    )
    model.learn(1000)
    assert model.num_timesteps >= 1000


def test_sb3_vec_env_adapter() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_checker import check_env  # noqa: F401 (API presence)

    venv = SB3VecEnv(num_envs=8, task="dyck")
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (8, venv.env.max_length)
    eos = venv.env.vocab.eos_id
    _, _, dones, infos = venv.step(np.full(8, eos))
    assert dones.all() and all("terminal_observation" in i for i in infos)
    assert not infos[0]["TimeLimit.truncated"]
    assert infos[0]["intended_action"] == infos[0]["executed_action"] == eos
    model = PPO("MlpPolicy", venv, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(600)


# ------------------------------------------------------------------------------------------------
# Bad actions, arguments and options; render_mode="rgb_array"; SB3's make_vec_env


@pytest.mark.parametrize(
    "action",
    [2.7, 1.0, "3", True, np.bool_(True), np.float32(1), np.array([1.0]), np.array([1, 2]), None],
    ids=repr,
)
def test_step_rejects_non_integer_actions(action: Any) -> None:
    env = SequenceGenEnv(task="dyck")
    env.reset(seed=0)
    with pytest.raises(InvalidActionError, match="an action must be an integer id"):
        env.step(action)


@pytest.mark.parametrize(
    "action",
    [1, np.int64(1), np.uint8(1), np.array(1), np.array([1]), torch.tensor(1), torch.tensor([1])],
    ids=repr,
)
def test_step_accepts_integer_scalars(action: Any) -> None:
    env = SequenceGenEnv(task="dyck")
    env.reset(seed=0)
    assert env.step(action)[4]["intended_action"] == 1


def test_vector_env_rejects_non_integer_actions() -> None:
    env = SequenceGenVectorEnv(num_envs=2, task="dyck")
    env.reset(seed=0)
    for actions in (np.array([1.5, 2.0]), torch.tensor([1.0, 2.0]), np.array([True, False])):
        with pytest.raises(InvalidActionError, match="integer ids"):
            env.step(actions)
    env.step(np.array([1, 2], dtype=np.int32))


def test_vector_env_checks_the_action_shape_and_its_size() -> None:
    env = SequenceGenVectorEnv(num_envs=3, task="dyck")
    env.reset(seed=0)
    for actions in (np.array([1, 2]), np.ones((3, 2), dtype=np.int64), np.int64(1)):
        with pytest.raises(InvalidActionError, match=r"actions must have shape \(3,\), one per"):
            env.step(actions)
    env.step(np.ones((3, 1), dtype=np.int64))  # a column of actions: one per environment
    with pytest.raises(ValueError, match=r"1000000000000 environments need about .* num_envs"):
        gym.make_vec(seqenv.ENV_ID, num_envs=10**12, task="dyck")


def test_import_seqenv_exposes_the_checker() -> None:
    """A fresh interpreter: `import seqenv` alone, then `seqenv.checker`."""
    code = "import seqenv; print(seqenv.checker.check_sequence_env.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "check_sequence_env"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 2.7}, "max_length must be an integer, got 2.7"),
        ({"max_length": True}, "max_length must be an integer, got True"),
        ({"max_length": "20"}, "max_length must be an integer, got '20'"),
        ({"max_length": 1}, "max_length must be >= 2, got 1"),
        ({"max_steps": 0.5}, "max_steps must be an integer, got 0.5"),
        ({"max_steps": False}, "max_steps must be an integer"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"disturbance": 1.5}, r"disturbance must be in \[0, 1\]"),
        ({"disturbance": 0.1, "disturbance_type": "gaussian"}, "disturbance_type must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SequenceGenEnv(task="dyck", **kwargs)
    with pytest.raises(ValueError, match=match):
        SequenceGenVectorEnv(num_envs=2, task="dyck", **kwargs)


def test_integral_arguments_are_accepted() -> None:
    env = SequenceGenEnv(task="dyck", max_length=20.0, max_steps=np.int64(30))
    assert (env.max_length, env.max_steps) == (20, 30)
    assert isinstance(env.max_length, int) and isinstance(env.max_steps, int)
    with pytest.raises(ValueError, match="num_envs must be an integer"):
        SequenceGenVectorEnv(num_envs=2.5, task="dyck")


def test_reset_options_are_checked() -> None:
    env = SequenceGenEnv(task="dyck")
    with pytest.raises(ValueError, match="reset options must be a dict, got list"):
        env.reset(options=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown reset options \['promt'\]; known: prompt"):
        env.reset(options={"promt": "("})
    with pytest.raises(ValueError, match="options\\['split'\\] must be 'train' or 'test'"):
        env.reset(options={"split": "valid"})
    env.reset(options={"split": "test"})
    vector = SequenceGenVectorEnv(num_envs=2, task="dyck")
    with pytest.raises(ValueError, match=r"unknown reset options \['mask'\]; known: reset_mask"):
        vector.reset(options={"mask": [True, False]})
    with pytest.raises(ValueError, match="must be a dict"):
        vector.reset(options="reset_mask")  # type: ignore[arg-type]


def test_rgb_array_render(task_kwargs: dict[str, dict[str, Any]]) -> None:
    assert "rgb_array" in SequenceGenEnv.metadata["render_modes"]
    env = gym.make(
        seqenv.ENV_ID, task="arithmetic", render_mode="rgb_array", **task_kwargs["arithmetic"]
    )
    env.reset(seed=0)
    first = env.render()
    assert isinstance(first, np.ndarray) and first.dtype == np.uint8 and first.ndim == 3
    assert first.shape[2] == 3 and (first < 255).any(), "the prompt is drawn"
    vocab = env.unwrapped.vocab
    env.step(vocab.encode("7")[0])
    second = env.render()
    assert second.shape == first.shape and not np.array_equal(first, second)
    vector = gym.make_vec(seqenv.ENV_ID, num_envs=2, task="dyck", render_mode="rgb_array")
    vector.reset(seed=0)
    frames = vector.render()
    assert len(frames) == 2 and all(f.dtype == np.uint8 and f.ndim == 3 for f in frames)


def test_checker_passes_with_rgb_array_rendering() -> None:
    check_sequence_env(
        gym.make(seqenv.ENV_ID, task="dyck", render_mode="rgb_array"), seed=0, num_episodes=3
    )


def test_sb3_make_vec_env_with_dummy_vec_env() -> None:
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(seqenv.ENV_ID, n_envs=2, seed=0)
    obs = venv.reset()
    assert obs.shape == (2, venv.observation_space.shape[0])
    for _ in range(5):
        obs, _, _, _ = venv.step(np.array([venv.action_space.sample() for _ in range(2)]))
    assert venv.render_mode == "rgb_array"
    images = venv.get_images()
    assert len(images) == 2 and images[0].dtype == np.uint8
    venv.close()


SUBPROC_SCRIPT = """
import numpy as np
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv

import seqenv  # the workers import this main module, so the plain id is registered there too

if __name__ == "__main__":
    for env_id in ("SequenceGen-v0", "seqenv:SequenceGen-v0"):
        venv = make_vec_env(env_id, n_envs=2, seed=0, vec_env_cls=SubprocVecEnv)
        venv.reset()
        for _ in range(5):
            obs, rewards, dones, infos = venv.step(np.array([0, 1]))
        assert obs.shape == (2, venv.observation_space.shape[0])
        assert venv.get_images()[0].dtype == np.uint8
        venv.close()
    print("ok")
"""


def test_sb3_make_vec_env_with_subproc_vec_env(tmp_path: Any) -> None:
    script = tmp_path / "subproc.py"
    script.write_text(SUBPROC_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
