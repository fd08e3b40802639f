"""Checkpoints survive a kill at every file-system step of a save, and never touch a user's files.

A kill is simulated by failing one file-system call of a save (mkdir, rename, replace, fsync,
a file write, a tensor file, a folder removal) and every call after it, so that no clean-up runs
either, as when the process dies.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import agents.training.checkpoint as ck
from agents.outputs import MANIFEST
from agents.training.checkpoint import (
    MARKER,
    POINTER,
    CheckpointError,
    check_save_target,
    load_training_state,
    load_weights,
    read_metadata,
    resolve_checkpoint,
    save_checkpoint,
    tensors_writer,
)


class Killed(BaseException):
    """The process died here (a BaseException: nothing catches it as an error)."""


def _model(value: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(path: Path, step: int) -> None:
    model, optimizer = _model(float(step))
    save_checkpoint(path, model, optimizer, {"step": step, "note": f"step {step}"})


def _loaded_step(path: Path) -> int:
    """The step of the checkpoint that loads, after checking its weights are that step's."""
    metadata = read_metadata(path)
    model, optimizer = _model(-1.0)
    load_weights(path, model)
    load_training_state(path, optimizer, metadata)
    step = int(metadata["step"])
    expected, _ = _model(float(step))
    assert torch.equal(model.bias, expected.bias) and metadata["note"] == f"step {step}"
    return step


# The file-system calls a save makes, patched where the checkpoint module finds them.
_POINTS: list[tuple[Any, str]] = [
    (os, "mkdir"),
    (os, "rename"),
    (os, "replace"),
    (os, "fsync"),
    (shutil, "rmtree"),
    (ck, "save_file"),
    (ck, "save_model"),
    (ck, "_write_bytes"),
]


@contextmanager
def _kill_at(monkeypatch: pytest.MonkeyPatch, point: int | None) -> Iterator[list[str]]:
    """Count the file-system calls (their names go into the yielded list); fail call number
    ``point`` and every later one (None: count only)."""
    calls: list[str] = []
    with monkeypatch.context() as patch:
        for owner, name in _POINTS:
            original: Callable[..., Any] = getattr(owner, name)

            def wrapped(
                *args: Any, _f: Callable[..., Any] = original, _n: str = name, **kwargs: Any
            ) -> Any:
                calls.append(_n)
                if point is not None and len(calls) > point:
                    raise Killed(_n)
                return _f(*args, **kwargs)

            patch.setattr(owner, name, wrapped)
        yield calls


def _count_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: bool) -> list[str]:
    path = tmp_path / "count"
    if not first:
        _save(path, 1)
    with _kill_at(monkeypatch, None) as calls:
        _save(path, 2)
    shutil.rmtree(path)
    return calls


def test_a_kill_at_any_point_of_a_save_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_points(tmp_path, monkeypatch, first=False)
    assert {"mkdir", "rename", "replace", "fsync", "save_file", "save_model"} <= set(calls)
    outcomes = []
    for point in range(len(calls)):
        path = tmp_path / f"kill-{point}"
        _save(path, 1)
        with pytest.raises(Killed), _kill_at(monkeypatch, point):
            _save(path, 2)
        # The last complete checkpoint loads: step 1 before the pointer moved, step 2 after.
        outcomes.append(_loaded_step(path))
        # The next save removes whatever the kill left (temporary and stale step folders).
        _save(path, 3)
        assert _loaded_step(path) == 3
        assert {p.name for p in path.iterdir()} == {MARKER, MANIFEST, POINTER, "step-000000003"}
    assert outcomes[0] == 1 and outcomes[-1] == 2  # both sides of the pointer were hit


def test_a_kill_during_the_first_save_leaves_nothing_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_points(tmp_path, monkeypatch, first=True)
    for point in range(len(calls)):
        path = tmp_path / f"kill-{point}"
        with pytest.raises(Killed), _kill_at(monkeypatch, point):
            _save(path, 2)
        if path.exists() and (path / POINTER).exists():
            assert _loaded_step(path) == 2
        else:
            with pytest.raises(CheckpointError):
                read_metadata(path)
            # What is there is a checkpoint folder (marker) or empty, so a new save may go in.
            assert not path.exists() or (path / MARKER).exists() or not any(path.iterdir())
        _save(path, 3)
        assert {p.name for p in path.iterdir()} == {MARKER, MANIFEST, POINTER, "step-000000003"}


def test_a_full_disk_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ck"
    _save(path, 1)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        _save(path, 2)
    monkeypatch.undo()
    assert _loaded_step(path) == 1
    assert {p.name for p in path.iterdir()} == {MARKER, MANIFEST, POINTER, "step-000000001"}


def test_saving_the_same_step_twice_and_loading_a_step_folder(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    _save(path, 4)
    _save(path, 4)
    assert resolve_checkpoint(path).name == "step-000000004.2"
    assert len([p for p in path.iterdir() if p.name.startswith("step-")]) == 1
    assert _loaded_step(resolve_checkpoint(path)) == 4  # a step folder given directly


def test_save_never_writes_into_a_users_folder(tmp_path: Path) -> None:
    users = tmp_path / "mine"
    users.mkdir()
    (users / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a seqmatch checkpoint"):
        _save(users, 1)
    afile = tmp_path / "afile"
    afile.write_text("precious")
    with pytest.raises(FileExistsError):
        _save(afile, 1)
    assert (users / "thesis.tex").read_text() == "precious" and afile.read_text() == "precious"
    assert sorted(p.name for p in users.iterdir()) == ["thesis.tex"]


def test_check_save_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    check_save_target(tmp_path / "new" / "deeper")  # nothing there: fine
    (tmp_path / "empty").mkdir()
    check_save_target(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a seqmatch checkpoint"):
        check_save_target(".")
    with pytest.raises(FileExistsError, match="a file is there"):
        check_save_target("notes.txt")
    with pytest.raises(NotADirectoryError, match=r"notes\.txt is not a folder"):
        check_save_target("notes.txt/ck")
    _save(tmp_path / "ck", 1)
    with pytest.raises(FileExistsError, match=r"--resume .* --overwrite"):
        check_save_target("ck")
    check_save_target("ck", resume=True)
    check_save_target("ck", overwrite=True)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        check_save_target("missing", resume=True)
    # A folder whose first save never finished holds nothing to keep: it starts afresh, and
    # --resume says so (the two agree).
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / MARKER).write_text('{"format": 2}')
    check_save_target("killed")
    with pytest.raises(CheckpointError, match="run without --resume to start it afresh"):
        check_save_target("killed", resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "empty", "killed", "notes.txt"]


def test_pruning_removes_only_what_seqmatch_wrote(tmp_path: Path) -> None:
    """A user's folders named like step or temporary folders survive every save."""
    path = tmp_path / "ck"
    _save(path, 1)
    for name in ("step-000000099", ".tmp-mine"):
        (path / name).mkdir()
        (path / name / "notes.txt").write_text("mine")
    _save(path, 2)
    _save(path, 99)  # the same step as the user's folder: saved beside it
    assert resolve_checkpoint(path).name == "step-000000099.2"
    names = {p.name for p in path.iterdir()}
    assert names == {MARKER, MANIFEST, POINTER, "step-000000099", ".tmp-mine", "step-000000099.2"}
    assert (path / "step-000000099" / "notes.txt").read_text() == "mine"
    assert _loaded_step(path) == 99


def test_a_checkpoint_from_before_the_manifest_prunes_its_own_step_only(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    _save(path, 1)
    (path / MANIFEST).unlink()  # as the library wrote it before the manifest
    (path / "step-000000000").mkdir()  # left by a save killed then, or a user's: not known
    _save(path, 2)
    names = {p.name for p in path.iterdir()}
    assert names == {MARKER, MANIFEST, POINTER, "step-000000000", "step-000000002"}


def test_a_step_folder_that_links_outside_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    _save(path, 1)
    step = resolve_checkpoint(path)
    step.rename(tmp_path / "elsewhere")
    step.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="links outside the checkpoint"):
        read_metadata(path)


def test_empty_or_mismatched_optimizer_state_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    _save(path, 5)
    metadata = read_metadata(path)
    file = resolve_checkpoint(path) / "optimizer.safetensors"
    save_file({}, str(file))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_training_state(path, _model(0.0)[1], metadata)
    save_file({"0.exp_avg": torch.zeros(7), "0.exp_avg_sq": torch.zeros(7)}, str(file))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_training_state(path, _model(0.0)[1], metadata)


def test_negative_step_and_non_finite_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    _save(path, 5)
    document = resolve_checkpoint(path) / "checkpoint.json"
    document.write_text(document.read_text().replace('"step": 5', '"step": -100'))
    with pytest.raises(CheckpointError, match="step -100"):
        read_metadata(path)
    model, _ = _model(float("nan"))
    save_checkpoint(tmp_path / "nan", model, None, {"step": 1})
    with pytest.raises(CheckpointError, match="non-finite weights"):
        load_weights(tmp_path / "nan", _model(0.0)[0])


def test_a_model_payload_of_plain_tensors(tmp_path: Path) -> None:
    """Another model kind (e.g. LoRA adapters) writes its own files through the hook."""
    adapters = {"adapter_model.safetensors": {"lora_A": torch.ones(2, 4)}}
    folder = save_checkpoint(tmp_path / "ck", tensors_writer(adapters), None, {"step": 0})
    assert read_metadata(tmp_path / "ck")["files"] == [
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "checkpoint.json",
    ]
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing adapter_model\.safetensors"):
        read_metadata(tmp_path / "ck")
