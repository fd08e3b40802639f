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

import errno
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import agents.training.checkpoint as checkpoint_module
import agents.training.trainer as trainer_module
from agents.cli import main
from agents.objectives import LossOutput, MLELoss
from agents.outputs import LOCK, MANIFEST
from agents.training.checkpoint import read_metadata, resolve_checkpoint
from agents.training.trainer import Trainer
from tests.integration.conftest import TINY, snapshot

N = 12
CONTROL_FILES = {"seqmatch-checkpoint", MANIFEST, LOCK}

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


def test_resume_keeps_the_bucketed_model_batches_and_checks_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    """The model batches drawn by length and not yet served are part of the checkpoint."""
    _train(tmp_path, "sequencematch", "run", N)
    metadata = tmp_path / "run" / "latest"
    folder = resolve_checkpoint(tmp_path / "run")
    record = json.loads((folder / "checkpoint.json").read_text())
    assert record["model_pool"] and all(isinstance(b, list) for b in record["model_pool"])
    record["model_pool"] = [[10_000]]  # no such rollout in the saved buffer
    (folder / "checkpoint.json").write_text(json.dumps(record))
    capsys.readouterr()
    args = ["train", *AGENTS["sequencematch"], *COMMON, "--steps", str(2 * N), "--resume"]
    args += ["--logdir", str(tmp_path / "runs"), "--name", "run", "--save", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_pool" in err
    assert metadata.exists()


def assert_same_checkpoint(straight: Path, resumed: Path) -> None:
    """The current steps of two checkpoints hold the same tensors and training state."""
    straight, resumed = resolve_checkpoint(straight), resolve_checkpoint(resumed)
    _assert_same_tensors("model.safetensors", straight, resumed)
    _assert_same_tensors("optimizer.safetensors", straight, resumed)
    _assert_same_tensors("rng.safetensors", straight, resumed)
    a = json.loads((straight / "checkpoint.json").read_text())
    b = json.loads((resumed / "checkpoint.json").read_text())
    for key in ("step", "num_timesteps", "data_rng", "buffer", "optimizer", "eval"):
        same = json.dumps(a.get(key), sort_keys=True) == json.dumps(b.get(key), sort_keys=True)
        assert same, f"checkpoint.json: {key} differs after the resume"  # NaN equals NaN here


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


def test_a_checkpoint_from_before_a_setting_resumes_as_it_was_trained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    _train(tmp_path, "mle", "run", 2)
    meta_path = resolve_checkpoint(tmp_path / "run") / "checkpoint.json"
    metadata = json.loads(meta_path.read_text())
    del metadata["config"]["level_penalty"]  # written before the setting existed
    meta_path.write_text(json.dumps(metadata))
    capsys.readouterr()
    args = ["train", *AGENTS["mle"], *COMMON, "--steps", "4", "--resume"]
    args += ["--logdir", str(tmp_path / "runs"), "--name", "run", "--save", str(tmp_path / "run")]
    assert main(args) == 1  # today's default is not what it trained with
    assert "level_penalty (checkpoint 0.0, now 0.01)" in capsys.readouterr().err
    assert main([*args, "--level-penalty", "0"]) == 0
    assert read_metadata(tmp_path / "run")["step"] == 4


# -- interruptions: a kill during a save, Ctrl-C, a full disk, a diverged loss ------------------
class Killed(BaseException):
    """The process died here (nothing catches it as an error, nothing cleans up after it)."""


@pytest.fixture(scope="module")
def straight_mle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted MLE run of 2N updates that the interrupted ones must match."""
    root = tmp_path_factory.mktemp("straight")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(root, "mle", "straight", 2 * N)
    finally:
        torch.set_num_threads(before)
    return root / "straight"


@pytest.mark.parametrize(
    ("operation", "survivor"),
    [("rename", 4), ("replace", 4), ("rmtree", 8)],  # before / at / after the pointer moves
)
def test_a_kill_during_a_save_resumes_exactly(
    operation: str,
    survivor: int,
    straight_mle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    """The save of update 8 dies at one file-system step; the last complete checkpoint loads
    and ``--resume`` from it ends, bit for bit, where the uninterrupted run ends."""
    saves = 0
    real_save = trainer_module.save_checkpoint

    def dying_save(*args: Any, **kwargs: Any) -> Any:
        nonlocal saves
        saves += 1
        if saves != 2:
            return real_save(*args, **kwargs)
        owner = shutil if operation == "rmtree" else os
        real_op = getattr(owner, operation)

        def die(*a: Any, **k: Any) -> Any:
            raise Killed(operation)

        monkeypatch.setattr(owner, operation, die)
        try:
            return real_save(*args, **kwargs)
        finally:
            monkeypatch.setattr(owner, operation, real_op)

    monkeypatch.setattr(trainer_module, "save_checkpoint", dying_save)
    with pytest.raises(Killed):
        _train(tmp_path, "mle", "resumed", 2 * N, "--save-interval", "4")
    monkeypatch.undo()
    assert read_metadata(tmp_path / "resumed")["step"] == survivor
    _train(tmp_path, "mle", "resumed", 2 * N, "--save-interval", "4", "--resume")
    assert_same_checkpoint(straight_mle, tmp_path / "resumed")
    # The next saves removed what the kill left behind.
    names = {p.name for p in (tmp_path / "resumed").iterdir()}
    assert names == {*CONTROL_FILES, "latest", f"step-{2 * N:09d}"}


def test_ctrl_c_saves_and_resumes_exactly(
    straight_mle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    real_step = Trainer.train_step

    def step_then_ctrl_c(self: Trainer, logger: Any) -> None:
        real_step(self, logger)
        if self.step == 5:  # in the middle of a run, off every interval
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    args = ["train", *AGENTS["mle"], *COMMON, "--steps", str(2 * N), "--name", "resumed"]
    args += ["--logdir", str(tmp_path / "runs"), "--save", str(tmp_path / "resumed")]
    capsys.readouterr()
    assert main(args) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"seqmatch train: interrupted after update 5; checkpoint saved to {tmp_path / 'resumed'}"
        " (--resume continues it)"
    ]
    assert read_metadata(tmp_path / "resumed")["step"] == 5
    monkeypatch.undo()
    _train(tmp_path, "mle", "resumed", 2 * N, "--resume")
    assert_same_checkpoint(straight_mle, tmp_path / "resumed")


def test_a_full_disk_is_one_line_and_keeps_the_checkpoint(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    _train(tmp_path, "mle", "run", 2)

    def checkpoint_files() -> dict[Path, bytes]:
        """Every byte of the checkpoint; not the lock file, which names its latest holder."""
        files = (p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != LOCK)
        return {p: p.read_bytes() for p in files}

    before = checkpoint_files()

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    capsys.readouterr()
    args = ["train", *AGENTS["mle"], *COMMON, "--steps", "3", "--overwrite", "--name", "run"]
    args += ["--logdir", str(tmp_path / "runs"), "--save", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "the disk is full" in err[0] and "previous checkpoint" in err[0]
    assert checkpoint_files() == before


def test_a_non_finite_loss_stops_before_the_weights(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    real_call = MLELoss.__call__
    calls = 0

    def nan_from_update_4(self: MLELoss, policy: Any, batch: Any) -> LossOutput:
        nonlocal calls
        calls += 1
        out = real_call(self, policy, batch)
        return LossOutput(out.loss * float("nan"), out.metrics) if calls >= 4 else out

    monkeypatch.setattr(MLELoss, "__call__", nan_from_update_4)
    capsys.readouterr()
    args = ["train", *AGENTS["mle"], *COMMON, "--steps", "8", "--save-interval", "2"]
    args += ["--logdir", str(tmp_path / "runs"), "--save", str(tmp_path / "run")]
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert "update 4: non-finite loss" in err[0]
    assert f"last good checkpoint: {tmp_path / 'run'} (step 2)" in err[0]
    assert read_metadata(tmp_path / "run")["step"] == 2
    weights = load_file(str(resolve_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_overwrite_replaces_a_checkpoint_and_a_failed_start_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    _train(tmp_path, "mle", "run", 2)
    _train(tmp_path, "mle", "run", 3, "--overwrite")
    assert read_metadata(tmp_path / "run")["step"] == 3
    # A run refused at its start (a resume that does not fit) creates no TensorBoard run.
    before = snapshot(tmp_path)
    args = ["train", *AGENTS["mle"], *COMMON, "--steps", "4", "--width", "64", "--resume"]
    args += ["--logdir", str(tmp_path / "new-runs"), "--name", "x", "--save", str(tmp_path / "run")]
    assert main(args) == 1
    assert "cannot resume with different settings" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_save_into_the_empty_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """`--save .` in an empty folder: the TensorBoard run written inside does not make it a
    user's folder at the save."""
    monkeypatch.chdir(tmp_path)
    args = ["train", *AGENTS["mle"], *COMMON, "--steps", "2", "--logdir", "runs", "--save", "."]
    assert main(args) == 0
    assert read_metadata(tmp_path)["step"] == 2


def test_a_failure_before_any_save_leaves_no_files(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    def nan_loss(self: MLELoss, policy: Any, batch: Any) -> LossOutput:
        return LossOutput(torch.tensor(float("nan"), requires_grad=True), {})

    monkeypatch.setattr(MLELoss, "__call__", nan_loss)
    monkeypatch.chdir(tmp_path)
    args = ["train", *AGENTS["mle"], *COMMON, "--steps", "4", "--logdir", "runs/deep"]
    assert main([*args, "--save", "ck/new"]) == 1
    err = capsys.readouterr().err
    assert "update 1: non-finite loss" in err and "last good checkpoint: none was saved" in err
    assert snapshot(tmp_path) == set()
