"""Every output flag against every kind of target a careless user may give it.

Each command either refuses in one line (exit 1), or writes only where it should: through a
symlink into the file it names (the link stays), or new TensorBoard files beside a user's own.
Every byte of the user's files is checked afterwards. The targets: a FIFO nobody reads; a
symlink to a file; the run's own input; a checkpoint's ``latest``; a user's folder named like a
step folder, inside a checkpoint; a user's non-empty folder.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from agents.cli import main
from agents.outputs import LOCK
from agents.training.checkpoint import read_metadata
from tests.integration.conftest import TINY, tiny_checkpoint

DATA = '{"prompt": "^", "completion": "()"}\n{"prompt": "^(", "completion": ")"}\n'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Dyck checkpoint after 2 updates."""
    return tiny_checkpoint(tmp_path_factory.mktemp("safety"))


def _world(root: Path, checkpoint: Path) -> dict[str, Path]:
    """The user's files; returns each kind of target by name."""
    ck = root / "ck"
    shutil.copytree(checkpoint, ck)
    (ck / "step-000000099").mkdir()  # the user's, named like a step folder
    (ck / "step-000000099" / "notes.txt").write_text("mine")
    os.mkfifo(root / "fifo")
    (root / "target.txt").write_text("the link's target")
    (root / "link").symlink_to(root / "target.txt")
    (root / "data.jsonl").write_text(DATA)
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("precious")
    return {
        "fifo": root / "fifo",
        "symlink": root / "link",
        "input": root / "data.jsonl",
        "pointer": ck / "latest",
        "step_folder": ck / "step-000000099",
        "users_folder": root / "mine",
    }


EVAL = ["eval", "--checkpoint", "ck", "--episodes", "2", "--device", "cpu", "--data", "data.jsonl"]
TRAIN = ["train", "--agent", "mle", *TINY, "--steps", "1", "--eval-episodes", "2"]
TRAIN_DATA = [*TRAIN, "--data", "data.jsonl"]

COMPARE = ["compare", "--quick", "--agents", "mle", "--seeds", "1", "--task", "dyck"]
FLAGS: dict[str, Callable[[Path], list[str]]] = {
    "eval --json": lambda t: [*EVAL, "--json", str(t)],
    "eval --output": lambda t: [*EVAL, "--output", str(t)],
    "train --json": lambda t: [*TRAIN_DATA, "--logdir", "", "--json", str(t)],
    "train --save": lambda t: [*TRAIN_DATA, "--logdir", "", "--save", str(t)],
    "train --logdir": lambda t: [*TRAIN_DATA, "--logdir", str(t.parent), "--name", t.name],
    "compare --out": lambda t: [*COMPARE, "--data", "data.jsonl", "--no-progress", "--out", str(t)],
    "export --out": lambda t: ["export", "--checkpoint", "ck", "--out", str(t)],
}
TARGETS = ("fifo", "symlink", "input", "pointer", "step_folder", "users_folder")

WRITES = {
    ("eval --json", "symlink"): "the file the link names",
    ("eval --output", "symlink"): "the file the link names",
    ("train --json", "symlink"): "the file the link names",
    ("train --logdir", "users_folder"): "new TensorBoard files beside the user's",
}
"""The cells that write (all others are refused): where they write."""


def _regular_files(root: Path) -> dict[str, bytes]:
    """Every regular file's bytes (a FIFO is not read: that would block); lock files aside."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name != LOCK
    }


def _kinds(root: Path) -> dict[str, str]:
    """What each path is: a link (and where to), a FIFO, a folder or a file."""
    kinds = {}
    for path in root.rglob("*"):
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            kinds[str(path.relative_to(root))] = f"link to {os.readlink(path)}"
        else:
            kinds[str(path.relative_to(root))] = stat.filemode(mode)[0]
    return kinds


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("flag", list(FLAGS))
def test_every_output_flag_on_every_target(
    flag: str,
    target: str,
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    path = _world(tmp_path, checkpoint)[target]
    if (flag, target) == ("export --out", "input"):  # export reads the checkpoint, not --data
        path = tmp_path / "ck"
    monkeypatch.chdir(tmp_path)
    files, kinds = _regular_files(tmp_path), _kinds(tmp_path)

    code = main(FLAGS[flag](path.relative_to(tmp_path)))
    err = capfd.readouterr().err
    after, kinds_after = _regular_files(tmp_path), _kinds(tmp_path)

    assert read_metadata(tmp_path / "ck")["step"] == 2  # the checkpoint loads as before
    assert (tmp_path / "ck" / "step-000000099" / "notes.txt").read_text() == "mine"
    if (flag, target) not in WRITES:
        assert code == 1, err
        assert len(err.splitlines()) == 1 and err.startswith(f"seqmatch {flag.split()[0]}: error:")
        assert after == files and kinds_after == kinds  # every byte, every kind of file
        return
    assert code == 0, err
    assert {k: v for k, v in kinds_after.items() if k in kinds} == kinds  # links stay links
    if target == "symlink":
        changed = {k for k in files if after.get(k) != files[k]}
        assert changed == {"target.txt"} and set(after) == set(files)
        assert after["target.txt"].startswith(b"{")  # the JSON or JSONL written through it
    else:
        new = set(after) - set(files)
        assert new and all(Path(n).name.startswith("events.out.tfevents") for n in new)
        assert {k: after[k] for k in files} == files
