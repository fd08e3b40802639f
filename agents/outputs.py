"""Where seqmatch writes: one rule for every output path, and the folders seqmatch owns.

Every path a command writes (``--json``, ``--output``, ``--out``, ``--save``, ``--logdir`` with
``--name``, the files of an export) is checked here before any work starts, and written here.

Files (:func:`check_file` before the work, :func:`write_file` after it):

- A regular file is replaced through a temporary file in its (resolved) folder and an atomic
  rename; it keeps its mode (a new file gets the mode the umask gives). A reader never sees half
  a file, and a failed write leaves the old one.
- A file that is not regular is never replaced: a character device (``/dev/null``,
  ``/dev/stdout``) or a named pipe is written in place. A pipe is opened without blocking, so one
  that no process reads is refused in one line instead of hanging. A full device (ENOSPC) is one
  line. A block device or a socket is refused.
- A symlink is followed: the file it names is written by the rules above, the link stays. A link
  that names nothing is refused.
- A target that is one of the run's inputs (``--data``, ``--checkpoint``, ``--model``, compared
  with :func:`os.path.samefile`) is refused.
- A target that is one of seqmatch's own files is refused (:func:`refuse_own`): the marker,
  manifest or lock of a folder seqmatch owns, a checkpoint's pointer and its step folders (and
  anything in them), and a file that the folder's manifest lists.

Folders (:func:`check_folder`, :func:`claimed`): a checkpoint (``--save``), a comparison
(``compare --out``), an export (``export --out``) and a scan (the ``--out`` of the regime scan
and the sensitivity sweep) belong to seqmatch once it has made them::

    FOLDER/
      seqmatch-checkpoint       the marker (or seqmatch-comparison, -export, -scan): JSON, format
      seqmatch-manifest.json    {"format": 1, "written": [...]}: the paths, relative to FOLDER,
                                that seqmatch wrote (recorded before each is written)
      seqmatch.lock             {"pid", "command", "started"} of the process holding the lock

An unmarked folder that holds anything is refused (each command says which folders of its own it
recognises). ``--overwrite`` and a checkpoint's pruning delete only what the manifest lists
(:func:`remove_listed`), never a name that merely looks like one of seqmatch's.

One writer per folder: the command holds an advisory ``fcntl.flock`` on the lock file for its whole
run, and writes its PID and command into it (flock cannot say who holds it), so a second process
fails at once in one line naming them. The lock file is never deleted while its folder stays:
deleting it would let the next process lock a new file while the old one is still held. The
operating system releases the lock of a process that is killed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO

FORMAT = 1
MANIFEST = "seqmatch-manifest.json"
"""The manifest's name: what seqmatch wrote in a folder it owns."""
LOCK = "seqmatch.lock"
"""The lock file's name, inside the folder it locks."""
MARKERS = {
    "checkpoint": "seqmatch-checkpoint",
    "comparison": "seqmatch-comparison",
    "export": "seqmatch-export",
    "scan": "seqmatch-scan",
}
"""The marker file of each kind of folder seqmatch owns."""
POINTER = "latest"
"""A checkpoint's pointer file: it names the current step folder."""
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
_MANIFEST_TMP = f".{MANIFEST}.tmp"
CONTROL = frozenset({*MARKERS.values(), MANIFEST, _MANIFEST_TMP, LOCK})
"""The files that make a folder seqmatch's: never an output, never deleted by a listing."""

Inputs = Sequence[tuple[str, "str | os.PathLike[str] | None"]]
"""A run's inputs as (flag, path) pairs; an unset one is None."""

_LOCK_PATIENCE = 0.2
"""Seconds a lock is retried before it counts as held (another process may be probing it)."""


class OutputError(RuntimeError):
    """An output that cannot be written, or a folder another process writes; one line."""


# -- paths -----------------------------------------------------------------------------------
def resolved(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute, with every symlink on the way followed (a missing tail kept)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path`` or its nearest ancestor that exists."""
    found = Path(os.path.abspath(path))
    while not found.exists() and found != found.parent:
        found = found.parent
    return found


def first_missing(path: str | os.PathLike[str]) -> Path | None:
    """The outermost folder on the way to ``path`` that does not exist yet (None if it does).

    Removing it undoes a ``mkdir(parents=True)`` of ``path``.
    """
    path = Path(os.path.abspath(path))
    existing = nearest_existing(path)
    if existing == path:
        return None
    return existing / path.relative_to(existing).parts[0]


def check_writable_dir(folder: Path, option: str) -> None:
    """Create and remove a probe file in ``folder``; one-line PermissionError if that fails."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"{option} {folder}: cannot write there ({reason(err)})") from None


def reason(err: OSError) -> str:
    """An OSError in words, the common ones said plainly."""
    if err.errno == errno.ENOSPC:
        return "the device is full"
    if err.errno == errno.EPIPE:
        return "the reader closed the pipe"
    return err.strerror or str(err) or type(err).__name__


def owner(folder: str | os.PathLike[str]) -> str | None:
    """The kind of folder seqmatch owns that ``folder`` is (its marker), or None."""
    for kind, marker in MARKERS.items():
        if os.path.isfile(os.path.join(folder, marker)):
            return kind
    return None


def has_content(folder: Path) -> bool:
    """Whether ``folder`` holds anything but a lock file.

    A lock file alone is what a failed start that could not remove its folder leaves.
    """
    return any(entry.name != LOCK for entry in folder.iterdir())


def check_name(name: str, flag: str) -> None:
    """Refuse a name that would leave its folder: a path separator, ``..`` or a NUL."""
    separators = {"/", "\\", os.sep, os.altsep or "/", "\0"}
    if any(s in name for s in separators) or ".." in name or name == ".":
        raise ValueError(
            f"{flag} {name!r} must be a plain name (no path separator, no '..'): it names a "
            "folder inside its parent"
        )


def safe_name(text: str) -> str:
    """``text`` as a file name that stays in its folder.

    Path characters (``/``, ``:``, NUL, ...: anything but letters, digits and ``_.=+-``) become
    ``-``, and leading dots and dashes go, so no name climbs out of its folder or hides. Run keys
    and TensorBoard names are made from agent and task names, which may be ``module:Class``;
    the keys of existing runs (``bc-s0-eta=0.5``) stay as they were.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-.")
    return cleaned or "_"


# -- the checks before the work --------------------------------------------------------------
def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "regular"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISCHR(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "pipe"
    return "block device" if stat.S_ISBLK(mode) else "socket"


def refuse_inputs(path: str | os.PathLike[str], flag: str, inputs: Inputs) -> None:
    """ValueError (one line) where ``path`` is one of the run's inputs."""
    for input_flag, value in inputs:
        if value is None or str(value) == "":
            continue
        with contextlib.suppress(OSError):
            if os.path.samefile(path, value):
                raise ValueError(
                    f"{flag} {path} is this run's input ({input_flag} {value}); writing it would "
                    "replace it: choose another path"
                )


def _listed_under(folder: Path, relative: Path) -> bool:
    """Whether ``relative`` (inside ``folder``) is, or is inside, a path the manifest lists."""
    return any(relative == Path(name) or Path(name) in relative.parents for name in listed(folder))


def refuse_own(path: str | os.PathLike[str], flag: str, *, listed_too: bool = True) -> None:
    """FileExistsError (one line) where ``path`` is one of seqmatch's own files.

    Inside a folder seqmatch owns: its marker, manifest or lock; a checkpoint's pointer, step
    folders and temporary folders, and anything in them; and, with ``listed_too``, a path its
    manifest lists (a file an output would replace). Writing anywhere else inside such a folder
    stays allowed: a TensorBoard run inside ``--save``, a comparison's trainers under its
    ``runs/``.
    """
    target = resolved(path)
    for folder in target.parents:
        kind = owner(folder)
        if kind is None:
            continue
        relative = target.relative_to(folder)
        first = relative.parts[0]
        what = None
        if first in CONTROL:
            what = {MANIFEST: "the manifest", LOCK: "the lock file"}.get(first, "the marker")
        elif kind == "checkpoint" and first == POINTER:
            what = "the pointer"
        elif kind == "checkpoint" and first.startswith((STEP_PREFIX, TMP_PREFIX)):
            what = "a step folder" if len(relative.parts) == 1 else "inside a step folder"
        elif listed_too and _listed_under(folder, relative):
            what = "one of the files"
        if what is not None:
            raise FileExistsError(
                f"{flag} {path}: that is {what} of the seqmatch {kind} {folder} (seqmatch keeps "
                "it); choose another path"
            )


def check_file(path: str | os.PathLike[str], flag: str, inputs: Inputs = ()) -> None:
    """Refuse, before any work, a file output that :func:`write_file` could not or must not write.

    One line: IsADirectoryError, NotADirectoryError, FileExistsError, FileNotFoundError,
    PermissionError or ValueError.
    """
    if str(path) == "":
        raise ValueError(f"{flag}: the path is empty")
    target = Path(path)
    try:
        info: os.stat_result | None = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):  # not there (a file on the way: below)
        if os.path.islink(target):
            raise FileNotFoundError(
                f"{flag} {path}: a symlink to nothing ({os.readlink(target)})"
            ) from None
        info = None
    except OSError as err:
        raise PermissionError(f"{flag} {path}: cannot be used ({reason(err)})") from None
    if info is not None:
        kind = _kind(info.st_mode)
        if kind == "folder":
            raise IsADirectoryError(f"{flag} {path}: a folder is there")
        if kind not in ("regular", "device", "pipe"):
            raise FileExistsError(
                f"{flag} {path}: a {kind} is there; seqmatch writes regular files, character "
                "devices and pipes only"
            )
        refuse_inputs(target, flag, inputs)
        if kind != "regular":
            return  # written in place: no folder, no temporary file
    real = resolved(target)
    existing = nearest_existing(real.parent)
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {existing} is a file, not a folder")
    refuse_own(target, flag)
    check_writable_dir(existing, flag)


_ARTICLES = {"export": "an"}


def check_folder(
    path: str | os.PathLike[str],
    flag: str,
    kind: str | None,
    inputs: Inputs = (),
    probe: bool = True,
) -> None:
    """The checks every output folder shares, before any work (one line each).

    Not a file; not a folder seqmatch owns as another kind (``kind`` None: a TensorBoard run,
    which may be no owned folder at all); not one of seqmatch's own entries (:func:`refuse_own`);
    not an input; its nearest existing part a writable folder; and, with ``probe``, not locked by
    another process (off where this process holds the lock). Whether a folder that exists may
    be written into is each kind's own rule.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{flag} {path}: a file is there, not a folder")
    real = resolved(target)
    found = owner(real) if real.is_dir() else None
    if found is not None and found != kind:
        wanted = f"{_ARTICLES.get(kind, 'a')} {kind} folder" if kind else "a TensorBoard run"
        raise FileExistsError(f"{flag} {path}: a seqmatch {found} is there, not {wanted}")
    refuse_own(target, flag, listed_too=False)
    refuse_inputs(target, flag, inputs)
    existing = nearest_existing(real)
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {existing} is a file, not a folder")
    check_writable_dir(existing, flag)
    if probe and kind is not None and real.is_dir():
        check_unlocked(target, flag)


# -- writing a file --------------------------------------------------------------------------
def _new_file_mode() -> int:
    """The mode ``open`` gives a new file under this process's umask."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o022)  # where /proc is not there: read it by setting it
    os.umask(mask)
    return 0o666 & ~mask


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _std_stream(info: os.stat_result) -> IO[str] | None:
    """This process's stdout or stderr where ``info`` is the file it writes to, else None."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            own = os.fstat(stream.fileno())
            if (own.st_dev, own.st_ino) == (info.st_dev, info.st_ino):
                return stream
    return None


def writes_to_stdout(path: str | os.PathLike[str] | None) -> bool:
    """Whether writing ``path`` writes this process's stdout (``--json /dev/stdout | jq``)."""
    if not path:
        return False
    try:
        return _std_stream(os.stat(path)) is sys.stdout
    except OSError:
        return False


def _replace(path: Path, data: bytes, label: str, mode: int | None, tmp_name: str = "") -> None:
    """Write ``path`` through a temporary file beside it and an atomic rename.

    ``tmp_name``: a fixed temporary name (a folder's own control file, which one writer holds);
    a fresh one otherwise. Folders made for the file, and the temporary file, are removed again
    when the write fails.
    """
    created = first_missing(path.parent)
    tmp = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp_name:
            tmp = str(path.parent / tmp_name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, _new_file_mode() if mode is None else mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(err, OSError):
            raise OutputError(f"could not write {label} ({reason(err)})") from None
        raise


def _write_in_place(path: Path, info: os.stat_result, data: bytes, label: str) -> None:
    """Write a device or a pipe where it is: never replaced, a pipe opened without blocking."""
    kind = _kind(info.st_mode)
    if kind not in ("device", "pipe"):
        raise OutputError(f"could not write {label}: a {kind} is there")
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_NONBLOCK if kind == "pipe" else 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ENXIO:
            raise OutputError(
                f"could not write {label}: no process reads that named pipe (start its reader "
                "first)"
            ) from None
        raise OutputError(f"could not write {label} ({reason(err)})") from None
    try:
        if kind == "pipe":  # opened: a reader is there; now let writes wait for it as usual
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        _write_all(fd, data)
    except OSError as err:
        raise OutputError(f"could not write {label} ({reason(err)})") from None
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike[str], data: bytes | str, flag: str | None = None) -> None:
    """Write ``data`` to ``path`` by the output rule (module docstring); OutputError in one line.

    Args:
        path: the file; a symlink is followed, a device or pipe written in place.
        data: the whole content (text is UTF-8 encoded).
        flag: the option that named ``path``, for messages (``--json``).
    """
    label = f"{flag} {path}" if flag else str(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    target = Path(path)
    try:
        info: os.stat_result | None = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        info = None
    except OSError as err:
        raise OutputError(f"could not write {label} ({reason(err)})") from None
    stream = _std_stream(info) if info is not None else None
    if stream is not None:  # this process's stdout or stderr (a pipe, a terminal, a redirect)
        try:
            stream.flush()
            _write_all(stream.fileno(), payload)
        except OSError as err:
            raise OutputError(f"could not write {label} ({reason(err)})") from None
        return
    if info is not None and _kind(info.st_mode) == "folder":
        raise OutputError(f"could not write {label}: a folder is there")
    if info is not None and not stat.S_ISREG(info.st_mode):
        _write_in_place(target, info, payload, label)
        return
    mode = None if info is None else stat.S_IMODE(info.st_mode)
    _replace(resolved(target), payload, label, mode)


def write_json(
    path: str | os.PathLike[str], content: object, flag: str | None = None, indent: int = 1
) -> None:
    """:func:`write_file` of ``content`` as indented JSON.

    Serialised first: content that is not JSON writes nothing.
    """
    write_file(path, json.dumps(content, indent=indent) + "\n", flag)


# -- folders seqmatch owns: marker and manifest ----------------------------------------------
def mark(folder: Path, kind: str) -> None:
    """Make ``folder`` (which exists) one seqmatch owns as ``kind``; nothing if it is already."""
    path = folder / MARKERS[kind]
    if path.is_file():
        return
    # Its presence is what counts: a kill while writing it leaves a marked, empty folder.
    with open(path, "w", encoding="utf-8") as file:
        file.write(json.dumps({"format": FORMAT, "kind": kind}) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _is_relative_name(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts


def listed(folder: Path) -> set[str]:
    """The paths (relative to ``folder``) its manifest lists; none if it has none.

    An unreadable manifest lists nothing: then nothing counts as seqmatch's, and nothing is
    deleted.
    """
    try:
        document = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    written = document.get("written") if isinstance(document, dict) else None
    if not isinstance(written, list):
        return set()
    return {n for n in written if isinstance(n, str) and _is_relative_name(n)}


def _write_manifest(folder: Path, names: Iterable[str]) -> None:
    document = {"format": FORMAT, "written": sorted(set(names))}
    text = json.dumps(document, indent=1) + "\n"
    _replace(folder / MANIFEST, text.encode(), str(folder / MANIFEST), None, _MANIFEST_TMP)


def record(folder: Path, *names: str) -> None:
    """Add ``names`` (paths relative to ``folder``) to its manifest, before they are written.

    Written ahead, a kill never leaves something of seqmatch's that the manifest does not list
    (it may list a name that was never made: removing that is a no-op).
    """
    for name in names:
        if not _is_relative_name(name):
            raise ValueError(f"not a path inside the folder: {name!r}")
    current = listed(folder)
    if set(names) <= current and (folder / MANIFEST).is_file():
        return
    _write_manifest(folder, current | set(names))


def forget(folder: Path, *names: str) -> None:
    """Take ``names`` off ``folder``'s manifest where nothing is there (a write that failed)."""
    current = listed(folder)
    gone = {n for n in names if n in current and not os.path.lexists(folder / n)}
    if gone:
        _write_manifest(folder, current - gone)


def remove_listed(folder: Path, keep: Iterable[str] = ()) -> None:
    """Delete what ``folder``'s manifest lists, except ``keep``; nothing it does not list.

    The manifest then lists ``keep`` and whatever could not be removed.
    """
    kept = set(keep)
    names = listed(folder)
    left = set()
    for name in sorted(names - kept, reverse=True):  # a folder's entries before the folder
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        if os.path.lexists(entry):
            left.add(name)
    _write_manifest(folder, (names & kept) | left)


# -- one writer per folder: the lock ---------------------------------------------------------
class FolderLock:
    """The advisory lock this process holds on a folder (:func:`lock_folder`)."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = folder
        self._fd: int | None = fd

    def release(self) -> None:
        """Release the lock (closing the file releases it); the file stays."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _try_flock(fd: int, operation: int, patience: float) -> bool:
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the file (it may still be writing)."""
    deadline = time.monotonic() + 0.5
    while True:
        with contextlib.suppress(OSError, ValueError):
            document = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            return f"process {int(document['pid'])} ({document.get('command', '?')})"
        if time.monotonic() >= deadline:
            return "another process"
        time.sleep(0.05)


def _busy(flag: str, folder: Path, fd: int) -> OutputError:
    return OutputError(
        f"{flag} {folder} is in use by {_holder(fd)}: wait for it to end, or choose another folder"
    )


def _command() -> str:
    args = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    if args[0] in ("cli.py", "__main__.py"):
        args[0] = "seqmatch"
    text = " ".join(args)
    return text if len(text) <= 200 else text[:197] + "..."


def lock_folder(folder: Path, flag: str) -> FolderLock:
    """Take the lock of ``folder`` (which exists) for this process, or fail at once.

    Raises:
        OutputError: another process holds it (the message names its PID and command).
    """
    path = folder / LOCK
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise OutputError(
                f"{flag} {folder}: cannot open its lock file ({reason(err)})"
            ) from None
        if not _try_flock(fd, fcntl.LOCK_EX, _LOCK_PATIENCE):
            error = _busy(flag, folder, fd)
            os.close(fd)
            raise error
        # The file may have been removed with its folder (a failed start of another process)
        # between opening and locking: the lock counts only on the file that is there now.
        try:
            now = os.stat(path)
            mine = os.fstat(fd)
            same = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise OutputError(f"{flag} {folder}: its lock file keeps being replaced; try again")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    holder = {"pid": os.getpid(), "command": _command(), "started": started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return FolderLock(folder, fd)


def check_unlocked(folder: str | os.PathLike[str], flag: str) -> None:
    """OutputError (one line, at once) where another process holds ``folder``'s lock.

    A probe before the work; the lock itself is taken later, by :func:`claimed`.
    """
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(flag, Path(folder), fd) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _only_control(created: Path, folder: Path) -> bool:
    """Whether everything under ``created`` is the way to ``folder`` and its control files."""
    for entry in created.rglob("*"):
        if entry.is_dir() and not entry.is_symlink():
            if entry not in (folder, *folder.parents):
                return False
        elif not (entry.parent == folder and entry.name in CONTROL):
            return False
    return True


@contextlib.contextmanager
def claimed(folder: str | os.PathLike[str], flag: str) -> Iterator[FolderLock]:
    """Hold ``folder``'s lock for the block, making the folder first if it is missing.

    The caller re-checks the folder once the lock is held (another process may have written it
    between the checks and the lock). If the block fails while the folder holds nothing but
    seqmatch's control files, a folder that this made is removed again, under the lock: a failed
    start leaves no files.

    Raises:
        OutputError: another process holds the lock.
    """
    path = Path(os.path.abspath(folder))
    created = first_missing(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{flag} {folder}: cannot make the folder ({reason(err)})") from None
    held = lock_folder(path, flag)
    try:
        yield held
    except BaseException:
        if created is not None and _only_control(created, path):
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        held.release()
