"""``device="cuda"`` without CUDA: one clear line from the CLI, a ValueError from the library.

torch.cuda.is_available is patched to False, so these hold on a GPU machine too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agents.agent import MLE, SequenceMatch
from agents.cli import main
from agents.config import resolve_device
from tests.integration.conftest import TINY, tiny_checkpoint

NO_CUDA = "no CUDA device is available"
ON_CUDA = [a if a != "cpu" else "cuda" for a in TINY]  # TINY with --device cuda


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Dyck checkpoint of a tiny MLE policy after 1 update, on the CPU."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), steps=1)


def _one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"seqmatch {command}: error:") and NO_CUDA in err, err
    return err


@pytest.mark.usefixtures("no_cuda")
def test_train_with_device_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "train",
        "--agent",
        "sequencematch",
        *ON_CUDA,
        "--steps",
        "1",
        "--logdir",
        str(tmp_path / "runs"),
    ]
    assert main([*args, "--save", str(tmp_path / "ckpt")]) == 1
    _one_error_line(capsys, "train")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()


@pytest.mark.usefixtures("no_cuda")
def test_eval_and_generate_with_device_cuda(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--checkpoint", str(checkpoint), "--device", "cuda"]) == 1
    _one_error_line(capsys, "eval")
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "(", "--device", "cuda"]
    assert main(args) == 1
    _one_error_line(capsys, "generate")


@pytest.mark.usefixtures("no_cuda")
def test_agent_facade_with_device_cuda(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=NO_CUDA):
        SequenceMatch("SequenceGen-v0", device="cuda")
    with pytest.raises(ValueError, match=NO_CUDA):
        MLE.load(checkpoint, device="cuda")


def test_resolve_device_counts_cuda_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"--device cuda:1 asked for, but only 1 CUDA"):
        resolve_device("cuda:1")
