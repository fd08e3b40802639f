"""The output rule (agents.outputs): what a write replaces, what it refuses, the manifest and the
lock. The commands that use it are tested in tests/integration/test_data_safety.py."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agents import outputs
from agents.outputs import (
    LOCK,
    MANIFEST,
    OutputError,
    check_file,
    check_name,
    claimed,
    listed,
    lock_folder,
    mark,
    record,
    remove_listed,
    safe_name,
    write_file,
)
from tests.integration.conftest import REPO, cli_env


def test_a_regular_file_is_replaced_atomically_and_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    target.chmod(0o640)
    write_file(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left
    fresh = tmp_path / "deep" / "new.json"  # folders are made; the mode is the umask's
    write_file(fresh, b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~mask


def test_a_failed_write_leaves_the_old_file_and_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", full)
    with pytest.raises(OutputError, match=r"could not write --json .*the device is full"):
        write_file(target, "new", "--json")
    with pytest.raises(OutputError):
        write_file(tmp_path / "made" / "b.json", "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_symlink_is_followed_and_stays_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real.name)
    check_file(link, "--json")
    write_file(link, "new")
    assert link.is_symlink() and os.readlink(link) == "real.json"
    assert real.read_text() == "new"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to("nowhere/x.json")
    with pytest.raises(FileNotFoundError, match="a symlink to nothing"):
        check_file(dangling, "--json")


def test_devices_are_written_in_place_and_a_full_one_is_one_line() -> None:
    write_file("/dev/null", "discarded")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    if Path("/dev/full").exists():
        with pytest.raises(OutputError, match=r"--json /dev/full .*the device is full"):
            write_file("/dev/full", "x" * 10, "--json")
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_a_fifo_is_written_in_place_and_one_without_reader_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    check_file(fifo, "--json")  # a stat: opening it to write would block
    started = time.monotonic()
    with pytest.raises(OutputError, match="no process reads that named pipe"):
        write_file(fifo, "x", "--json")
    assert time.monotonic() - started < 5.0
    got: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 10.0
    while True:  # the reader opens the pipe at some point: retry until it has
        try:
            write_file(fifo, "through the pipe")
            break
        except OutputError:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    reader.join(10.0)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_stdout_is_written_where_it_goes(tmp_path: Path) -> None:
    """`--json /dev/stdout`, redirected to a file: appended to it, not a replaced file."""
    out = tmp_path / "out.txt"
    code = (
        "import sys; from agents.outputs import write_file, writes_to_stdout; "
        "print('before', flush=True); assert writes_to_stdout('/dev/stdout'); "
        "write_file('/dev/stdout', '{}\\n'); print('after')"
    )
    with open(out, "w") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, env=cli_env(), cwd=REPO, check=True)
    assert out.read_text() == "before\n{}\nafter\n"


def test_inputs_and_seqmatchs_own_files_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text("{}\n")
    with pytest.raises(ValueError, match=r"is this run's input \(--data"):
        check_file(data, "--output", [("--data", str(data))])
    ck = tmp_path / "ck"
    ck.mkdir()
    mark(ck, "checkpoint")
    (ck / "latest").write_text("step-000000001\n")
    record(ck, "step-000000001")
    for name, what in [
        ("latest", "the pointer"),
        ("seqmatch-checkpoint", "the marker"),
        (MANIFEST, "the manifest"),
        (LOCK, "the lock file"),
        ("step-000000001", "a step folder"),
        ("step-000000001/checkpoint.json", "inside a step folder"),
    ]:
        with pytest.raises(FileExistsError, match=what):
            check_file(ck / name, "--json")
    check_file(ck / "notes.json", "--json")  # a new name inside: nothing of seqmatch's
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    mark(cmp, "comparison")
    record(cmp, "results.json")
    with pytest.raises(FileExistsError, match="one of the files of the seqmatch comparison"):
        check_file(cmp / "results.json", "--json")


def test_only_what_the_manifest_lists_is_removed(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    (folder / "step-000000001").mkdir(parents=True)
    (folder / "step-000000099").mkdir()  # a user's, named like a step folder
    (folder / "step-000000099" / "notes.txt").write_text("mine")
    (folder / "ours.png").write_bytes(b"png")
    record(folder, "step-000000001", "ours.png", "never-made")
    remove_listed(folder, keep=["ours.png"])
    assert sorted(p.name for p in folder.iterdir()) == ["ours.png", MANIFEST, "step-000000099"]
    assert listed(folder) == {"ours.png"}
    (folder / MANIFEST).write_text("garbage{")  # an unreadable manifest lists nothing
    remove_listed(folder)
    assert (folder / "ours.png").exists()
    with pytest.raises(ValueError):
        record(folder, "../outside")


def test_names_stay_in_their_folder() -> None:
    for bad in ("../../escape", "/abs", "a/b", "..", "x..y", "."):
        with pytest.raises(ValueError, match="must be a plain name"):
            check_name(bad, "--name")
    check_name("mle-dyck-s0", "--name")
    assert safe_name("sm-s0-data=/etc/passwd") == "sm-s0-data=-etc-passwd"
    assert safe_name("bc-s0-eta=0.5") == "bc-s0-eta=0.5"  # the keys of existing runs stay
    assert "/" not in safe_name("../..") and ".." not in safe_name("../..")


_HOLDER = """
import sys, time
from pathlib import Path
from agents.outputs import lock_folder
lock_folder(Path(sys.argv[1]), "--save")
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_holder_fails_at_once_and_a_killed_holders_lock_is_released(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "ck"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=REPO,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        started = time.monotonic()
        with pytest.raises(
            OutputError, match=rf"--save {folder} is in use by process {holder.pid} "
        ):
            lock_folder(folder, "--save")
        with pytest.raises(OutputError, match=f"process {holder.pid}"):
            outputs.check_unlocked(folder, "--save")
        assert time.monotonic() - started < 5.0
        assert json.loads((folder / LOCK).read_text())["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = lock_folder(folder, "--save")  # the kernel released the dead holder's lock
    assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert (folder / LOCK).exists()  # never deleted


def test_a_claimed_folder_that_got_nothing_is_removed_again(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), claimed(target, "--out"):
        assert (target / LOCK).exists()
        raise RuntimeError("failed start")
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError), claimed(target, "--out"):
        (target / "results.json").write_text("{}")  # work done: kept
        raise RuntimeError("stopped later")
    assert (target / "results.json").exists()
