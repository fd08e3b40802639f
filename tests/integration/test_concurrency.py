"""One writer per folder: two trains on one --save, two compares on one --out.

Exactly one runs; the other fails at once, in one line naming the first one's PID, and nothing
of the first is lost. A lock left by a killed process is released by the operating system, and
a comparison's workers cannot write once their parent is gone.

The first process waits at a gate (a file the test creates) while it holds the lock, so that the
second one surely starts while the first runs; each is a real process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agents.outputs import LOCK
from agents.training.checkpoint import read_metadata
from tests.integration.conftest import REPO, TINY, cli_env

TRAIN_AT_A_GATE = """
import sys, time
from pathlib import Path
import agents.training.trainer as trainer
gate = Path(sys.argv[1])
real = trainer.Trainer.train_step
def gated(self, logger):
    while self.step == 1 and not gate.exists():
        time.sleep(0.05)
    real(self, logger)
trainer.Trainer.train_step = gated
from agents.cli import main
raise SystemExit(main(sys.argv[2:]))
"""

COMPARE_AT_A_GATE = """
import sys, time
from pathlib import Path
from agents.experiments import single_run
gate = Path(sys.argv[1])
def run_one(config, task, agent, seed, out, *args, **kwargs):
    gate.with_suffix(".reached").touch()
    while not gate.exists():
        time.sleep(0.05)
    return {"agent": agent, "seed": seed, "metrics": {"accuracy": 0.5}, "episode_values": {},
            "curves": [], "train_seconds": 0.0, "eval_seconds": 0.0}
single_run.run_one = run_one
from agents.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def _start(script: str, gate: Path, args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, str(gate), *args],
        cwd=cwd,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lock(folder: Path, holder: subprocess.Popen[str], timeout: float = 120.0) -> None:
    """Until ``holder`` has written its PID into ``folder``'s lock file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert holder.poll() is None, holder.communicate()
        try:
            if json.loads((folder / LOCK).read_text())["pid"] == holder.pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{folder} was not locked by {holder.pid}")


def _second(
    args: list[str], cwd: Path, script: str, gate: Path
) -> subprocess.CompletedProcess[str]:
    """The second process: the same command; it must not get past the lock."""
    return subprocess.run(
        [sys.executable, "-c", script, str(gate), *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )


def _finish(first: subprocess.Popen[str], gate: Path) -> subprocess.CompletedProcess[str]:
    gate.touch()
    out, err = first.communicate(timeout=200)
    return subprocess.CompletedProcess(first.args, first.returncode, out, err)


def test_two_trains_on_one_save(tmp_path: Path) -> None:
    args = ["train", "--agent", "mle", *TINY, "--steps", "3", "--eval-episodes", "2"]
    args += ["--save", "ck", "--logdir", "runs"]
    first = _start(TRAIN_AT_A_GATE, tmp_path / "gate", args, tmp_path)
    try:
        _wait_for_lock(tmp_path / "ck", first)
        for extra in ([], ["--resume"], ["--overwrite"]):
            second = _second([*args, *extra], tmp_path, TRAIN_AT_A_GATE, tmp_path / "never")
            assert second.returncode == 1, second.stderr
            assert second.stderr.splitlines() == [
                f"seqmatch train: error: --save ck is in use by process {first.pid} "
                f"({json.loads((tmp_path / 'ck' / LOCK).read_text())['command']}): wait for it "
                "to end, or choose another folder"
            ]
        assert first.poll() is None  # still at its gate: the refusals came at once
        done = _finish(first, tmp_path / "gate")
    finally:
        first.kill()
    assert done.returncode == 0, done.stderr
    assert read_metadata(tmp_path / "ck")["step"] == 3  # nothing of the first run lost


@pytest.mark.slow  # the lock's release itself: tests/agents/test_outputs.py
def test_a_killed_trains_lock_is_released_and_its_folder_starts_afresh(tmp_path: Path) -> None:
    """SIGKILL before the first save: the kernel drops the lock; the folder (marked, no
    checkpoint yet) is started afresh by the same command, as --resume's message says."""
    args = ["train", "--agent", "mle", *TINY, "--steps", "3", "--eval-episodes", "2"]
    args += ["--save", "ck", "--logdir", ""]
    first = _start(TRAIN_AT_A_GATE, tmp_path / "gate", args, tmp_path)
    try:
        _wait_for_lock(tmp_path / "ck", first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = _second([*args, "--resume"], tmp_path, TRAIN_AT_A_GATE, tmp_path / "gate")
    assert resumed.returncode == 1
    assert "run without --resume to start it afresh" in resumed.stderr
    (tmp_path / "gate").touch()
    again = _second(args, tmp_path, TRAIN_AT_A_GATE, tmp_path / "gate")
    assert again.returncode == 0, again.stderr
    assert read_metadata(tmp_path / "ck")["step"] == 3


def test_two_compares_on_one_out(tmp_path: Path) -> None:
    args = ["compare", "--quick", "--agents", "mle", "--seeds", "1", "--out", "cmp"]
    args += ["--no-progress"]
    first = _start(COMPARE_AT_A_GATE, tmp_path / "gate", args, tmp_path)
    try:
        _wait_for_lock(tmp_path / "cmp", first)
        deadline = time.monotonic() + 120.0  # at its gate: its outputs settled
        while not (tmp_path / "gate.reached").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
        for other in (args, [*args, "--task", "dyck"]):  # the same comparison, or another task
            second = _second(other, tmp_path, COMPARE_AT_A_GATE, tmp_path / "never")
            assert second.returncode == 1, second.stderr
            lines = second.stderr.splitlines()
            assert len(lines) == 1 and f"--out cmp is in use by process {first.pid}" in lines[0]
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
        assert first.poll() is None
        done = _finish(first, tmp_path / "gate")
    finally:
        first.kill()
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert results["complete"] and results["runs_done"] == 1
    assert (tmp_path / "cmp" / "runs" / "mle-s0.json").is_file()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux: PR_SET_PDEATHSIG")
def test_an_orphaned_worker_writes_nothing_after_its_parent_is_gone(tmp_path: Path) -> None:
    """The worker dies with its parent (the kernel kills it), not at its next watch (2 s)."""
    heartbeat = tmp_path / "heartbeat"
    worker = (
        "import sys, time, pathlib; from agents.experiments.pool import exit_with_parent; "
        "exit_with_parent(int(sys.argv[1])); beat = pathlib.Path(sys.argv[2]); n = 0\n"
        "while True:\n    n += 1; beat.write_text(str(n)); time.sleep(0.01)"
    )
    parent = (
        "import os, subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {worker!r}, str(os.getpid()), "
        f"{str(heartbeat)!r}]); print(p.pid, flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    deadline = time.monotonic() + 60.0
    while not heartbeat.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert heartbeat.exists()
    proc.kill()
    proc.wait()
    time.sleep(0.3)
    last = heartbeat.read_text()
    time.sleep(0.5)
    assert heartbeat.read_text() == last  # no write after the parent was gone
    assert (
        not Path(f"/proc/{child}").exists()
        or "State:\tZ" in Path(f"/proc/{child}/status").read_text()
    )
