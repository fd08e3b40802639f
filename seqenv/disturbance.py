"""Disturbance: the environment replaces a token action by a noise token (docs/method.md §5).

With probability p (``disturbance``) an ordinary token action is replaced, before it runs, by a
noise token that differs from it, as the Arcade Learning Environment's sticky actions or DART's
injected noise. ``<eos>`` and ``<bkspc>`` are never replaced, nor is an append that fills the
buffer (nothing could delete it). The noise (``disturbance_type``) is ``random`` (uniform over
the other ordinary tokens) or ``ground_truth`` (the task's plausible mistake,
:meth:`seqenv.tasks.Task.ground_truth_noise`).

Randomness is counter-based: each row holds a key, drawn from its seeded generator at reset, and
the draw of step ``t`` is a hash of (key, t). So a batched MDP needs no generator per row and
per step, and a row of the vector env sees the same disturbances as a single env with its seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

NoiseFn = Callable[[np.random.Generator, Sequence[int], Sequence[int], int], int]
"""(rng, prompt, generated so far, the true next action) -> one noise token id."""

DisturbanceKind = Literal["random", "ground_truth"]
DISTURBANCE_KINDS: tuple[str, ...] = get_args(DisturbanceKind)

KEY_BOUND = 2**63
"""Row keys are drawn from [0, KEY_BOUND), so that they fit an int64 tensor."""


@dataclass(frozen=True)
class Disturbance:
    """How the environment disturbs token actions.

    The names are the environment's and TrainConfig's: ``disturbance`` is p, the chance, and
    ``disturbance_type`` the kind of noise.

    Attributes:
        disturbance: p, the probability that an eligible token action (an ordinary token whose
            append does not fill the buffer) is replaced by a noise token; 0 leaves the dynamics
            unchanged.
        disturbance_type: ``"random"`` (uniform over the other ordinary tokens) or
            ``"ground_truth"`` (the task's noise function, redrawn until it differs from the
            intended token).
    """

    disturbance: float
    disturbance_type: DisturbanceKind = "random"

    def __post_init__(self) -> None:
        check_disturbance(self.disturbance, self.disturbance_type)
        object.__setattr__(self, "disturbance", float(self.disturbance))

    @property
    def p(self) -> float:
        """Deprecated (one release): ``disturbance``."""
        warnings.warn("Disturbance.p is deprecated, use .disturbance", FutureWarning, stacklevel=2)
        return self.disturbance

    @property
    def kind(self) -> DisturbanceKind:
        """Deprecated (one release): ``disturbance_type``."""
        message = "Disturbance.kind is deprecated, use .disturbance_type"
        warnings.warn(message, FutureWarning, stacklevel=2)
        return self.disturbance_type

    @property
    def active(self) -> bool:
        """True when some action can be disturbed (p > 0)."""
        return self.disturbance > 0.0

    @property
    def threshold(self) -> int:
        """The chance scaled to 2**32: a step is disturbed when its hash's top 32 bits are below."""
        return min(round(self.disturbance * 2**32), 2**32)


def resolve_disturbance(
    disturbance: float | Disturbance | None, disturbance_type: str | None = None
) -> Disturbance:
    """A :class:`Disturbance` from the environment's ``disturbance`` and ``disturbance_type``."""
    if isinstance(disturbance, Disturbance):
        if disturbance_type is not None and disturbance_type != disturbance.disturbance_type:
            raise ValueError(
                f"disturbance_type={disturbance_type!r} contradicts the Disturbance's "
                f"{disturbance.disturbance_type!r}"
            )
        return disturbance
    kind = "random" if disturbance_type is None else disturbance_type
    return Disturbance(0.0 if disturbance is None else disturbance, kind)  # type: ignore[arg-type]


def check_disturbance(disturbance: object, disturbance_type: object) -> None:
    """Raise ValueError (one line) unless p is a number in [0, 1] and the type a known kind.

    The one check of a disturbance, wherever it is given: the environment's ``disturbance`` and
    ``disturbance_type``, :class:`Disturbance`, TrainConfig and the command line.
    """
    if isinstance(disturbance, bool) or not isinstance(disturbance, int | float | np.floating):
        raise ValueError(f"disturbance must be a number in [0, 1], got {disturbance!r}")
    if not 0.0 <= float(disturbance) <= 1.0:
        raise ValueError(f"disturbance must be in [0, 1], got {disturbance}")
    if disturbance_type not in DISTURBANCE_KINDS:
        raise ValueError(
            f"disturbance_type must be one of {', '.join(DISTURBANCE_KINDS)}, "
            f"got {disturbance_type!r}"
        )


# --------------------------------------------------------------------------------------------
# Counter-based random numbers: SplitMix64 on int64 tensors (wrapping arithmetic).

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
LOW32 = 0xFFFFFFFF


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of the 64-bit patterns in an int64 tensor."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def counter_hash(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """SplitMix64 output number ``counter + 1`` of the stream started at ``key``.

    Args:
        keys: (B,) int64, one key per row.
        counters: (B,) int64, the step counter of each row.

    Returns:
        (B,) int64 holding 64 random bits per row (as a two's-complement pattern).
    """
    z = keys + (counters + 1) * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def draw_below(bits: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) int64 in [0, n) from the low 32 bits of ``bits`` (multiply-shift, n < 2**31)."""
    return ((bits & LOW32) * n) >> 32


def step_generator(key: int, counter: int) -> np.random.Generator:
    """The numpy generator of one (row key, step) pair, for noise functions that take one."""
    return np.random.default_rng([key, counter])


def ground_truth_token(
    noise_fn: NoiseFn,
    key: int,
    step: int,
    prompt: Sequence[int],
    generated: Sequence[int],
    target: int,
    fallback: int,
    is_token: Callable[[int], bool],
) -> int:
    """The task's noise at a disturbed step of the row with ``key``, at its step ``step``.

    Drawn from :func:`step_generator`; a draw equal to the intended ``target`` is redrawn a few
    times, then replaced by ``fallback`` (random noise), so that the noise always differs from
    the intended token.

    Raises:
        ValueError: if the noise function returns something other than an ordinary token.
    """
    rng = step_generator(key, step)
    for _ in range(8):
        token = int(noise_fn(rng, prompt, generated, target))
        if not is_token(token):
            raise ValueError(f"noise function returned {token}, not an ordinary token")
        if token != target:
            return token
    return fallback


__all__ = [
    "DISTURBANCE_KINDS",
    "KEY_BOUND",
    "Disturbance",
    "DisturbanceKind",
    "NoiseFn",
    "check_disturbance",
    "counter_hash",
    "draw_below",
    "ground_truth_token",
    "resolve_disturbance",
    "step_generator",
]
