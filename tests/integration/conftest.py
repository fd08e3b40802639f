"""Helpers of the command-line tests: tiny training settings, the `seqmatch` command in a
subprocess or in this process, and snapshots of a folder's files.

Every run here is a tiny model on the Dyck task, on the CPU, with one thread per process: the
machines that run the tests are small and shared, and several threads per process fighting over
two cores make each step many times slower.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "--task", "dyck",
    "--layers", "1", "--width", "32", "--heads", "2",
    "--batch-size", "8",
    "--num-demonstrations", "200",
    "--eval-episodes", "8",
    "--device", "cpu",
    "--no-progress",
]  # fmt: skip
"""A tiny model and a small dataset: a run's cost is mostly start-up and rollouts."""


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess: the repository importable, one thread, localhost only."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: Path, timeout: float = 280, **env: str
) -> subprocess.CompletedProcess[str]:
    """``seqmatch ARGS`` in a subprocess (``python -m agents.cli``), output captured as text."""
    # The timeout only guards against a hang; it stays below pytest-timeout's 300 s per test.
    return subprocess.run(
        [sys.executable, "-m", "agents.cli", *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def check_ok(result: subprocess.CompletedProcess[str]) -> None:
    """Fail with the command's output if it did not exit 0."""
    assert result.returncode == 0, (
        f"{' '.join(map(str, result.args))} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_checkpoint(root: Path, steps: int = 2) -> Path:
    """``root/ckpt``: a Dyck checkpoint of a tiny MLE policy after ``steps`` updates, trained
    on one thread."""
    from agents.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main([
            "train", "--agent", "mle", *TINY, "--steps", str(steps), "--eval-episodes", "2",
            "--logdir", str(root / "runs"), "--save", str(root / "ckpt"),
        ])  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert code == 0
    return root / "ckpt"


def snapshot(folder: Path) -> set[str]:
    """Every path under ``folder`` (files and folders, hidden ones included), relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread for the test (restored after), as the subprocesses do."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
