"""The worker pool of `seqmatch compare --jobs N`: spawned processes, and how they stop.

Each task runs in a fresh spawned process (torch threads set there first), which exits by itself
once the parent is gone. A SIGTERM to the parent stops the comparison as Ctrl-C does
(:func:`sigterm_as_interrupt`): the pool terminates its workers, and what finished is kept.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from agents.training.memory import check_memory

T = TypeVar("T")
R = TypeVar("R")

WORKER_BYTES = 300 * 2**20
"""A worker process's memory once it has imported torch and the library (240 MB measured), before
its run: what --jobs multiplies."""


def exit_with_parent(parent: int) -> None:
    """In a worker: exit once ``parent`` is gone, rather than train on for nobody.

    The pool terminates its workers on any exception in the parent, but a SIGKILL (or a
    SIGTERM to the parent alone) leaves no chance to; the worker is then re-parented.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    # On Linux the kernel signals the worker the moment its parent dies, so that an orphan
    # stops before it writes into a folder whose lock its parent no longer holds; the watch is
    # the fallback elsewhere. The kernel also signals when the parent's thread that started the
    # worker ends (the pool's own thread starts the replacement workers): then the parent is
    # still there, and the worker goes on.
    def orphaned(signum: int, frame: Any) -> None:
        if os.getppid() != parent:
            os._exit(1)

    with contextlib.suppress(OSError, AttributeError, ValueError):
        import ctypes

        signal.signal(signal.SIGUSR1, orphaned)
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGUSR1))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the lines above
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def run_parallel(
    worker: Callable[[T], R], tasks: Sequence[T], jobs: int, finish: Callable[[R], None]
) -> None:
    """Run ``worker`` on each of ``tasks`` in ``jobs`` spawned processes; ``finish`` each result.

    ``worker`` is a module-level function (a spawned process imports it). On any exception here
    (Ctrl-C included) the workers are terminated: the tasks in progress are lost, those finished
    already went through ``finish``.
    """
    context = multiprocessing.get_context("spawn")
    jobs = min(jobs, len(tasks))  # never more processes than tasks
    check_memory(jobs * WORKER_BYTES, torch.device("cpu"), f"--jobs {jobs} worker processes",
                 "use fewer --jobs")  # fmt: skip
    # A fresh process per task, which exits by itself once this process is gone (killed).
    pool = context.Pool(
        jobs, initializer=exit_with_parent, initargs=(os.getpid(),), maxtasksperchild=1
    )
    try:
        for result in pool.imap_unordered(worker, tasks):
            finish(result)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, `kill` (SIGTERM) raises KeyboardInterrupt, as Ctrl-C does.

    The caller then stops as on Ctrl-C: workers terminated, partial results kept. Only the main
    thread may install a handler; elsewhere this does nothing.
    """
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if on_main:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        if on_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")
