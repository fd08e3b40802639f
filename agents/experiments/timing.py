"""Timing helpers shared by the throughput benchmarks: interleaved measurements.

A change of load on a shared machine then hits every side of a ratio alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def interleaved_fastest(
    fns: dict[str, Callable[[], Any]], iters: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Fastest seconds per call of each function, calling them in turn ``iters`` times.

    The fastest call, not the median: on a shared machine other work only ever slows a call down.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


def interleaved_rates(
    steppers: dict[str, Callable[[], int]], seconds: float, rounds: int = 20
) -> dict[str, float]:
    """Steps per second of each stepper (which returns the steps it took).

    Measured in alternating slices of ``seconds / rounds``.
    """
    steps = dict.fromkeys(steppers, 0)
    elapsed = dict.fromkeys(steppers, 0.0)
    for _ in range(rounds):
        for name, step in steppers.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                steps[name] += step()
            elapsed[name] += time.perf_counter() - start
    return {name: steps[name] / elapsed[name] for name in steppers}
