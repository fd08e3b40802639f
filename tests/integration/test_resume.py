"""Resuming is exact: 2N updates in one run give, bit for bit, the weights (and the optimizer, RNG
and replay-buffer state) of N updates, a resume, and N more.

Every leg uses ``--lr-schedule-steps 2N``, the trainer's way to make the learning-rate schedule
independent of where a run stops. The SequenceMatch runs start SequenceMatch before the first
stop, refresh the replay buffer on a period that does not divide the legs (so a refresh falls on
each side of the resume, and the FIFO has dropped old rollouts by then), evaluate on an interval
that does not divide N (evaluation must not touch the course of training), use dropout (torch's
global RNG) and gradient accumulation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agents.cli import main
from agents.training.checkpoint import read_metadata, resolve_checkpoint
from tests.integration.conftest import TINY, snapshot

N = 12

COMMON = [
    *TINY,
    "--lr-schedule-steps", str(2 * N), "--lr-warmup", "5",
    "--eval-interval", "5", "--log-interval", "4", "--dropout", "0.1",
]  # fmt: skip

AGENTS = {
    # SequenceMatch from update 4; buffer refreshes at updates 4, 9, 14, 19 (k_sample 5), 8
    # rollouts each into a FIFO of 12.
    "sequencematch": [
        "--agent", "sequencematch", "--sm-warmup", "4", "--k-sample", "5",
        "--rollouts", "8", "--buffer-size", "12", "--grad-accum", "2",
    ],
    "mle": ["--agent", "mle"],
}  # fmt: skip


def _train(root: Path, agent: str, name: str, steps: int, *extra: str) -> None:
    args = ["train", *AGENTS[agent], *COMMON, "--steps", str(steps)]
    args += ["--logdir", str(root / "runs"), "--name", name, "--save", str(root / name), *extra]
    assert main(args) == 0


def _assert_same_tensors(file: str, a: Path, b: Path) -> None:
    left, right = load_file(str(a / file)), load_file(str(b / file))
    assert left.keys() == right.keys(), file
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, f"{file}: {different} differ after the resume"


@pytest.mark.parametrize("agent", list(AGENTS))
def test_resume_is_bit_for_bit(agent: str, tmp_path: Path, one_thread: None) -> None:
    _train(tmp_path, agent, "straight", 2 * N)
    _train(tmp_path, agent, "resumed", N)
    halfway = read_metadata(tmp_path / "resumed")
    assert halfway["step"] == N
    if agent == "sequencematch":
        assert halfway["config"]["sm_warmup"] < N and len(halfway["buffer"]) == 12
    _train(tmp_path, agent, "resumed", 2 * N, "--resume")
    assert read_metadata(tmp_path / "resumed")["step"] == 2 * N
    assert_same_checkpoint(tmp_path / "straight", tmp_path / "resumed")


def assert_same_checkpoint(straight: Path, resumed: Path) -> None:
    """The current steps of two checkpoints hold the same tensors and training state."""
    straight, resumed = resolve_checkpoint(straight), resolve_checkpoint(resumed)
    _assert_same_tensors("model.safetensors", straight, resumed)
    _assert_same_tensors("optimizer.safetensors", straight, resumed)
    _assert_same_tensors("rng.safetensors", straight, resumed)
    a = json.loads((straight / "checkpoint.json").read_text())
    b = json.loads((resumed / "checkpoint.json").read_text())
    for key in ("step", "num_timesteps", "data_rng", "buffer", "optimizer", "eval"):
        assert a.get(key) == b.get(key), f"checkpoint.json: {key} differs after the resume"


def test_resume_refuses_changed_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    _train(tmp_path, "mle", "run", 2)
    capsys.readouterr()
    before = snapshot(tmp_path)
    checkpoint = (resolve_checkpoint(tmp_path / "run") / "model.safetensors").read_bytes()
    args = ["train", *AGENTS["mle"], *COMMON, "--steps", "4", "--lr", "0.01", "--resume"]
    args += ["--logdir", str(tmp_path / "runs"), "--name", "run", "--save", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot resume with different settings" in err
    assert "lr" in err
    assert snapshot(tmp_path) == before
    assert (resolve_checkpoint(tmp_path / "run") / "model.safetensors").read_bytes() == checkpoint
