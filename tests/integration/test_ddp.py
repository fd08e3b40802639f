"""Several processes: `torchrun --nproc_per_node 2` on the CPU (gloo, localhost) with batch B per
rank takes the same steps as one process with batch 2B.

The ranks draw the same global batch from the same seeded stream and keep their slice; the
gradients are averaged. The weights must agree to float tolerance (the all-reduce sums in another
order), and so must the gradient norms that rank 0 logs: Adam would hide a gradient scaled by a
constant, the norm does not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.cli import main
from agents.training.checkpoint import resolve_checkpoint
from tests.integration.conftest import TINY, check_ok, cli_env, free_port

STEPS = 10
COMMON = [
    *TINY, "--steps", str(STEPS), "--lr-warmup", "2",
    "--eval-interval", "0", "--eval-episodes", "4", "--log-interval", "1",
]  # fmt: skip


def _torchrun(root: Path, *args: str, timeout: float = 240) -> None:
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "agents.cli", *args,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=root, env=cli_env(), capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    check_ok(result)


def _grad_norms(run_dir: Path) -> list[float]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars("train/grad_norm")]


def _compare(root: Path, agent_args: list[str], batch: int, ddp_extra: list[str]) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the torchrun workers
    try:
        code = main([
            "train", *agent_args, *COMMON, "--batch-size", str(2 * batch),
            "--logdir", str(root / "runs"), "--name", "one", "--save", str(root / "one"),
        ])  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert code == 0
    _torchrun(
        root, "train", *agent_args, *COMMON, "--batch-size", str(batch), *ddp_extra,
        "--logdir", "runs", "--name", "two", "--save", "two",
    )  # fmt: skip

    one, two = (
        load_file(str(resolve_checkpoint(root / "one") / "model.safetensors")),
        load_file(str(resolve_checkpoint(root / "two") / "model.safetensors")),
    )
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    # Only rank 0 writes: one event file, one checkpoint.
    assert len(list((root / "runs" / "two").glob("events.out.tfevents.*"))) == 1
    norms_one, norms_two = _grad_norms(root / "runs" / "one"), _grad_norms(root / "runs" / "two")
    assert len(norms_one) == len(norms_two) == STEPS
    torch.testing.assert_close(torch.tensor(norms_two), torch.tensor(norms_one), rtol=1e-4, atol=0)


def test_ddp_two_ranks_match_one_process_bc(tmp_path: Path) -> None:
    """BC: noise-augmented data, each rank augmenting its own slice of the global batch."""
    _compare(tmp_path, ["--agent", "bc", "--disturbance", "0.2"], batch=4, ddp_extra=[])


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process_mle_grad_accum(tmp_path: Path) -> None:
    """MLE with gradient accumulation on the ranks (DDP's no_sync on all but the last)."""
    _compare(tmp_path, ["--agent", "mle"], batch=4, ddp_extra=["--grad-accum", "2"])


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process_sequencematch(tmp_path: Path) -> None:
    """SequenceMatch: every rank samples the same rollouts (same weights, same seeded stream)
    and keeps its slice of the global model batch. Sampling could in principle flip on a
    float-level difference of the weights; with these seeds it does not."""
    agent = ["--agent", "sequencematch", "--sm-warmup", "4", "--k-sample", "3",
             "--rollouts", "16", "--buffer-size", "32"]  # fmt: skip
    _compare(tmp_path, agent, batch=4, ddp_extra=[])
