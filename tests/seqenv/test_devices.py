"""A CUDA device on a machine without one is one clear ValueError, not torch's AssertionError."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

import seqenv  # noqa: F401  (registers SequenceGen-v0)
from seqenv.devices import check_device

NO_CUDA = "no CUDA device is available"


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine, as far as torch can tell, has no CUDA device (also on a GPU machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_vector_env_on_cuda_without_cuda_is_one_clear_error(device: str | torch.device) -> None:
    with pytest.raises(ValueError, match=NO_CUDA) as info:
        gym.make_vec("SequenceGen-v0", num_envs=4, device=device)
    assert "\n" not in str(info.value) and "device='cpu'" in str(info.value)


def test_check_device() -> None:
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu9'") as info:
        check_device("tpu9")
    assert "\n" not in str(info.value)


def test_check_device_counts_cuda_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"only 1 CUDA device\(s\) are present"):
        check_device("cuda:1")


def test_vector_env_on_the_cpu_still_works() -> None:
    envs = gym.make_vec("SequenceGen-v0", num_envs=2, device="cpu")
    obs, info = envs.reset(seed=0)
    assert obs.device.type == "cpu" and info["action_mask"].shape[0] == 2
    envs.close()
