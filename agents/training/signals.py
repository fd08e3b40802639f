"""Ctrl-C during training: stop between updates, where the state is consistent."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[threading.Event]:
    """Turn the first SIGINT into a flag the loop checks between updates.

    The state is then consistent, so the checkpoint resumes exactly; a second SIGINT interrupts
    at once.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
