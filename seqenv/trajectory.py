"""Demonstrations: the ``Trajectory`` type, loaders, disturbances and noise (docs/method.md §5).

A trajectory is one episode of the backspace MDP: a prompt, then the actions taken (ordinary
tokens, ``<bkspc>`` and a final ``<eos>`` when the episode terminated). Replaying its actions
through :class:`seqenv.mdp.SequenceMDP` gives the final text; :func:`replay` does exactly that.
In a disturbed MDP a trajectory also keeps the actions its agent intended.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch

from seqenv.disturbance import (
    KEY_BOUND,
    LOW32,
    Disturbance,
    NoiseFn,
    counter_hash,
    draw_below,
    ground_truth_token,
)
from seqenv.mdp import SequenceMDP
from seqenv.rules import deletable_append, out_of_room, step_budget
from seqenv.vocab import SpecialIds, Vocab, VocabularyError

LabelKind = Literal["intended", "executed"]


class DemonstrationError(ValueError):
    """A demonstration file or record that cannot be read as trajectories."""


def _frozen_ids(values: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    array = np.array(values, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class Trajectory:
    """One episode of the backspace MDP.

    Attributes:
        prompt: (P,) int64, P >= 1, ordinary token ids; never deleted.
        actions: (N,) int64, N >= 1, the actions the MDP executed (what replay and the collate
            functions use); ``<eos>`` only as the last action.
        terminated: the episode ended with ``<eos>``.
        truncated: the episode ended at the step budget or at ``max_length``; its last state
            still has a value (docs/method.md §3). Exactly one of the two holds.
        special: the special ids of the vocabulary the ids belong to.
        intended: (N,) int64 or None, the actions the agent chose, where a disturbance may have
            replaced an ordinary token by another (there, both are ordinary tokens). ``None``
            means the agent's actions were all executed as chosen.
    """

    prompt: np.ndarray
    actions: np.ndarray
    terminated: bool
    truncated: bool
    special: SpecialIds = field(repr=False)
    intended: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", _frozen_ids(self.prompt, "prompt"))
        object.__setattr__(self, "actions", _frozen_ids(self.actions, "actions"))
        if self.intended is not None:
            object.__setattr__(self, "intended", _frozen_ids(self.intended, "intended"))
            self._check_intended()
        s = self.special
        if len(self.prompt) == 0:
            raise ValueError("a trajectory needs a prompt of at least one token")
        bad_prompt = [int(t) for t in self.prompt if not s.is_token(int(t))]
        if bad_prompt:
            raise ValueError(f"prompt holds id {bad_prompt[0]}, which is not an ordinary token")
        if len(self.actions) == 0:
            raise ValueError("a trajectory needs at least one action")
        out_of_range = (self.actions < 0) | (self.actions >= s.num_actions)
        if out_of_range.any():
            value = int(self.actions[out_of_range][0])
            raise ValueError(f"action {value} is outside the action space [0, {s.num_actions})")
        if self.terminated == self.truncated:
            raise ValueError("exactly one of terminated and truncated must hold")
        eos_at = np.flatnonzero(self.actions == s.eos_id)
        if self.terminated and (len(eos_at) != 1 or eos_at[0] != len(self.actions) - 1):
            raise ValueError("a terminated trajectory has exactly one <eos>, as its last action")
        if self.truncated and len(eos_at):
            raise ValueError("a truncated trajectory holds no <eos>")
        # Backspaces never reach into the prompt: the generated length never goes below zero.
        delta = np.where(self.actions == s.backspace_id, -1, 1)
        delta[self.actions == s.eos_id] = 0
        if (np.cumsum(delta) < 0).any():
            raise ValueError("a backspace would delete the prompt")

    def _check_intended(self) -> None:
        assert self.intended is not None
        if len(self.intended) != len(self.actions):
            raise ValueError(
                f"intended holds {len(self.intended)} actions, actions {len(self.actions)}"
            )
        differ = np.flatnonzero(self.intended != self.actions)
        for i in differ.tolist():
            chosen, executed = int(self.intended[i]), int(self.actions[i])
            if not (self.special.is_token(chosen) and self.special.is_token(executed)):
                raise ValueError(
                    f"step {i}: intended {chosen} but executed {executed}; a disturbance only "
                    "replaces an ordinary token by another"
                )

    @property
    def num_steps(self) -> int:
        """Number of actions taken."""
        return len(self.actions)

    @property
    def num_backspaces(self) -> int:
        """Number of executed backspaces."""
        return int((self.actions == self.special.backspace_id).sum())

    @property
    def intended_actions(self) -> np.ndarray:
        """(N,) int64: the actions the agent chose (``actions`` when ``intended`` is None)."""
        return self.actions if self.intended is None else self.intended

    @property
    def disturbed(self) -> np.ndarray:
        """(N,) bool: the steps where the executed action differs from the intended one."""
        return self.intended_actions != self.actions

    @property
    def num_disturbances(self) -> int:
        """Number of steps the disturbance changed."""
        return int(self.disturbed.sum())

    def labels(self, kind: LabelKind = "executed") -> np.ndarray:
        """(N,) int64 training targets: the ``"intended"`` or the ``"executed"`` actions."""
        if kind == "intended":
            return self.intended_actions
        if kind == "executed":
            return self.actions
        raise ValueError(f"label kind must be 'intended' or 'executed', got {kind!r}")

    def generated(self) -> list[int]:
        """The generated tokens left after every backspace (the MDP's final state, minus prompt)."""
        return replay([self])[0]

    def to_json(self) -> dict:
        """A JSON-ready dict; ``intended`` appears only when it is not None."""
        data = {
            "prompt": self.prompt.tolist(),
            "actions": self.actions.tolist(),
            "terminated": self.terminated,
            "truncated": self.truncated,
        }
        if self.intended is not None:
            data["intended"] = self.intended.tolist()
        return data

    @classmethod
    def from_json(cls, data: dict, special: SpecialIds) -> Trajectory:
        """The inverse of :meth:`to_json` (an absent ``intended`` is None)."""
        return cls(
            prompt=data["prompt"],
            actions=data["actions"],
            terminated=bool(data["terminated"]),
            truncated=bool(data["truncated"]),
            special=special,
            intended=data.get("intended"),
        )

    def __eq__(self, other: object) -> bool:
        """Equal episodes: same ids, ends, executed and intended actions (None = executed)."""
        return (
            isinstance(other, Trajectory)
            and self.special == other.special
            and self.terminated == other.terminated
            and self.truncated == other.truncated
            and np.array_equal(self.prompt, other.prompt)
            and np.array_equal(self.actions, other.actions)
            and np.array_equal(self.intended_actions, other.intended_actions)
        )

    __hash__ = None  # type: ignore[assignment]


def from_completion(
    prompt: Sequence[int], completion: Sequence[int], special: SpecialIds, max_length: int
) -> Trajectory:
    """A clean demonstration: append ``completion`` after ``prompt``, then ``<eos>``.

    Raises:
        DemonstrationError: if prompt and completion do not fit in ``max_length``.
    """
    if len(prompt) + len(completion) >= max_length:
        raise DemonstrationError(
            f"prompt ({len(prompt)} tokens) and completion ({len(completion)} tokens) do not fit "
            f"in max_length={max_length} (the buffer must keep one free slot for <eos>)"
        )
    return Trajectory(
        prompt=np.asarray(prompt, dtype=np.int64),
        actions=np.asarray([*completion, special.eos_id], dtype=np.int64),
        terminated=True,
        truncated=False,
        special=special,
    )


def from_text(
    ids: Sequence[int], special: SpecialIds, prompt_tokens: int, max_length: int
) -> Trajectory:
    """A passage read as an episode: its first ``prompt_tokens`` are the prompt.

    A passage that fits ends with ``<eos>``; a longer one is the episode truncated at
    ``max_length``, exactly as the MDP would truncate it.
    """
    if not 1 <= prompt_tokens < max_length:
        raise DemonstrationError(
            f"prompt_tokens={prompt_tokens} must be at least 1 and leave room to generate within "
            f"max_length={max_length}"
        )
    if len(ids) <= prompt_tokens:
        raise DemonstrationError(
            f"a passage of {len(ids)} tokens has no continuation after "
            f"{prompt_tokens} prompt tokens"
        )
    prompt, rest = list(ids[:prompt_tokens]), list(ids[prompt_tokens:])
    if len(ids) < max_length:
        return from_completion(prompt, rest, special, max_length)
    return Trajectory(
        prompt=np.asarray(prompt, dtype=np.int64),
        actions=np.asarray(rest[: max_length - prompt_tokens], dtype=np.int64),
        terminated=False,
        truncated=True,
        special=special,
    )


def replay(
    trajectories: Sequence[Trajectory],
    max_length: int | None = None,
    max_steps: int | None = None,
) -> list[list[int]]:
    """Run each trajectory's actions through the MDP; return the generated ids left at the end.

    With ``max_length`` and ``max_steps`` given, also checks that each trajectory is an episode of
    that MDP: it ends exactly when the MDP says it ends, and the same way.
    """
    if not trajectories:
        return []
    special = trajectories[0].special
    if any(t.special != special for t in trajectories):
        raise ValueError("trajectories from different vocabularies cannot be replayed together")
    longest = max(len(t.prompt) + t.num_steps for t in trajectories) + 1
    capacity = longest if max_length is None else max_length
    budget = max(t.num_steps for t in trajectories) if max_steps is None else max_steps
    mdp = SequenceMDP(
        special, max_length=max(capacity, 2), max_steps=budget, batch_size=len(trajectories)
    )
    mdp.reset([t.prompt.tolist() for t in trajectories])
    num_steps = max(t.num_steps for t in trajectories)
    padded = np.full((len(trajectories), num_steps), special.eos_id, dtype=np.int64)
    for i, t in enumerate(trajectories):
        padded[i, : t.num_steps] = t.actions
    actions = torch.from_numpy(padded)
    check = max_length is not None and max_steps is not None
    for step in range(num_steps):
        live_before = ~mdp.done
        mdp.step(actions[:, step])
        if check:
            for i, t in enumerate(trajectories):
                if step >= t.num_steps or not bool(live_before[i]):
                    continue
                last = step == t.num_steps - 1
                ended = bool(mdp.terminated[i] or mdp.truncated[i])
                if ended != last or (last and bool(mdp.terminated[i]) != t.terminated):
                    raise DemonstrationError(
                        f"trajectory {i} is not an episode of this MDP: it ends at step "
                        f"{t.num_steps} ({'terminated' if t.terminated else 'truncated'}), the MDP "
                        f"ended it at step {step + 1}"
                        if ended
                        else f"trajectory {i} ends at step {t.num_steps} but the MDP does not"
                    )
    return [mdp.generated(i) for i in range(len(trajectories))]


def check_episodes(
    trajectories: Sequence[Trajectory], max_length: int, max_steps: int, chunk: int = 1024
) -> None:
    """Check that each trajectory is an episode of the MDP (``max_length``, ``max_steps``).

    :func:`replay` in chunks of ``chunk`` rows, so that a large demonstration set is checked in
    bounded memory.

    Raises:
        DemonstrationError: naming the first trajectory that is not such an episode.
    """
    for start in range(0, len(trajectories), chunk):
        try:
            replay(trajectories[start : start + chunk], max_length, max_steps)
        except DemonstrationError as err:
            message = str(err)
            match = re.match(r"trajectory (\d+) ", message)
            if match:  # the index within the chunk -> within the whole set
                index = start + int(match.group(1))
                message = f"trajectory {index} " + message[match.end() :]
            raise DemonstrationError(message) from None


# --------------------------------------------------------------------------------------------
# Demonstrations in the disturbed MDP (docs/method.md §5, the disturbance view)


def disturbed_demonstrations(
    clean: Sequence[Trajectory],
    disturbance: Disturbance,
    max_length: int,
    max_steps: int | None = None,
    noise_fn: NoiseFn | None = None,
    rng: np.random.Generator | None = None,
    keys: Sequence[int] | None = None,
    check: bool = True,
) -> list[Trajectory]:
    """The expert of each clean trajectory, acting in the disturbed MDP (like DART).

    The expert intends its next action; where the MDP disturbs it (a noise token runs instead),
    the expert intends ``<bkspc>`` (never disturbed), then the same action again (which can be
    disturbed again). The disturbance is the environments' own: the same counter-based draws
    (:func:`seqenv.disturbance.counter_hash` of the row's key and step) and the same rules as
    :meth:`seqenv.mdp.SequenceMDP.step`, so a demonstration is exactly what the expert would do
    in ``SequenceGen-v0`` with that key. The draws of all rows and steps are computed in one
    tensor operation and each row is then walked in plain Python (stepping a batched MDP costs
    tensor operations per step). With random noise, a fraction p/(1+p) of the token steps are
    backspaces. The result keeps the executed actions in ``actions`` and the expert's in
    ``intended``; it replays to the clean text, or is cut where the step budget runs out (a
    truncated episode of the MDP).

    Args:
        clean: expert episodes of the MDP (``max_length``, ``max_steps``) without disturbance.
        disturbance: the environment's disturbance.
        max_length: the MDP's buffer size.
        max_steps: the MDP's step budget; ``None``: ``2 * max_length``.
        noise_fn: the noise of a ``ground_truth`` disturbance (the task's).
        rng: draws one key per trajectory when ``keys`` is None.
        keys: one key in [0, 2**63) per trajectory (the random stream of its episode).
        check: first check that each clean trajectory is an episode of that MDP (a caller that
            draws many batches from checked demonstrations passes False).

    Raises:
        DemonstrationError: if ``check`` and a clean trajectory is not an episode of that MDP.
    """
    if not clean:
        return []
    special = clean[0].special
    budget = step_budget(max_length, max_steps)
    if check:
        replay(clean, max_length=max_length, max_steps=budget)
    if disturbance.disturbance_type == "ground_truth" and disturbance.active and noise_fn is None:
        raise ValueError("a ground_truth disturbance needs noise_fn (the task's noise)")
    if keys is None:
        rng = np.random.default_rng() if rng is None else rng
        keys = rng.integers(KEY_BOUND, size=len(clean), dtype=np.int64).tolist()
    tokens = [a for a in range(special.num_actions) if special.is_token(a)]
    if disturbance.active and len(tokens) < 2:
        raise ValueError("a disturbance needs at least two ordinary tokens to draw noise")
    token_index = {a: i for i, a in enumerate(tokens)}
    # Every draw a row could need: (B, budget) 64-bit hashes of (key, step), as in the MDP.
    bits = counter_hash(
        torch.as_tensor(list(keys), dtype=torch.int64).reshape(-1, 1),
        torch.arange(budget, dtype=torch.int64).reshape(1, -1),
    )
    hit = (((bits >> 32) & LOW32) < disturbance.threshold).tolist()
    draws = draw_below(bits, max(len(tokens) - 1, 1)).tolist()
    eos, backspace = special.eos_id, special.backspace_id
    out = []
    for row, t in enumerate(clean):
        plan, state = t.actions.tolist(), t.prompt.tolist()
        start = len(state)
        position, step, repairing = 0, 0, False
        intended: list[int] = []
        executed: list[int] = []
        terminated = truncated = False
        while not (terminated or truncated):
            # Adding disturbances only adds steps, so the MDP ends each row by its last action.
            assert position < len(plan), "a clean episode outlived its actions"
            chosen = backspace if repairing else plan[position]
            ran = chosen
            # Eligible: an ordinary token whose append leaves room to delete it.
            if (
                chosen not in (eos, backspace)
                and deletable_append(len(state), max_length)
                and hit[row][step]
            ):
                draw = draws[row][step]
                ran = tokens[draw + (draw >= token_index[chosen])]
                if disturbance.disturbance_type == "ground_truth":
                    assert noise_fn is not None
                    ran = ground_truth_token(
                        noise_fn, int(keys[row]), step, state[:start], state[start:], chosen, ran,
                        special.is_token,
                    )  # fmt: skip
            intended.append(chosen)
            executed.append(ran)
            step += 1
            if ran == eos:
                terminated = True
            elif ran == backspace:
                if len(state) > start:
                    state.pop()
            else:
                state.append(ran)
            truncated = not terminated and out_of_room(step, len(state), budget, max_length)
            if repairing:
                repairing = False
            elif ran != chosen:
                repairing = True
            else:
                position += 1
        out.append(
            Trajectory(
                t.prompt,
                np.asarray(executed, dtype=np.int64),
                terminated,
                truncated,
                special,
                intended=np.asarray(intended, dtype=np.int64),
            )
        )
    return out


def disturbed_demonstration(
    clean: Trajectory,
    disturbance: Disturbance,
    max_length: int,
    max_steps: int | None = None,
    noise_fn: NoiseFn | None = None,
    rng: np.random.Generator | None = None,
    key: int | None = None,
) -> Trajectory:
    """:func:`disturbed_demonstrations` of one trajectory."""
    keys = None if key is None else [key]
    (result,) = disturbed_demonstrations(
        [clean], disturbance, max_length, max_steps, noise_fn, rng=rng, keys=keys
    )
    return result


# --------------------------------------------------------------------------------------------
# Noise augmentation, the paper's scheme (docs/method.md §5)


def random_noise(special: SpecialIds) -> NoiseFn:
    """Noise tokens drawn uniformly from the ordinary tokens."""
    tokens = np.array([i for i in range(special.num_actions) if special.is_token(i)])

    def draw(
        rng: np.random.Generator, prompt: Sequence[int], generated: Sequence[int], true_next: int
    ) -> int:
        return int(rng.choice(tokens))

    return draw


def augment(
    trajectory: Trajectory,
    noise: NoiseFn,
    p: float,
    k: int = 1,
    rng: np.random.Generator | None = None,
    max_length: int | None = None,
    max_steps: int | None = None,
) -> Trajectory:
    """Insert, before each action with probability ``p``, ``k`` noise tokens then ``k`` backspaces.

    The result replays to the same final text. Insertions that would overflow ``max_length`` or
    the step budget ``max_steps`` are skipped, so the result is still an episode of that MDP.

    This is the paper's scheme, trained with the noise tokens as targets. It is close to
    :func:`disturbed_demonstrations` read with executed labels (``labels("executed")``), which
    with ``k=1`` differ in that a disturbance can recur before the same token and that ``<eos>``
    and ``<bkspc>`` are never disturbed.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"noise level p must be in [0, 1], got {p}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rng = np.random.default_rng() if rng is None else rng
    special = trajectory.special
    prompt = trajectory.prompt.tolist()
    generated: list[int] = []
    actions: list[int] = []
    remaining = trajectory.num_steps
    for action in trajectory.actions.tolist():
        fits_length = max_length is None or len(prompt) + len(generated) + k < max_length
        fits_budget = max_steps is None or len(actions) + 2 * k + remaining <= max_steps
        if fits_length and fits_budget and rng.random() < p:
            noise_tokens: list[int] = []
            for _ in range(k):
                token = noise(rng, prompt, generated + noise_tokens, action)
                if not special.is_token(token):
                    raise ValueError(f"noise function returned {token}, not an ordinary token")
                noise_tokens.append(token)
            actions += noise_tokens + [special.backspace_id] * k
        actions.append(action)
        remaining -= 1
        if action == special.backspace_id:
            generated.pop()
        elif action != special.eos_id:
            generated.append(action)
    return Trajectory(
        trajectory.prompt,
        np.asarray(actions, dtype=np.int64),
        trajectory.terminated,
        trajectory.truncated,
        special,
    )


# --------------------------------------------------------------------------------------------
# Loading demonstrations from files

Format = Literal["auto", "text", "jsonl", "hf"]


def iter_records(path: Path, fmt: Format) -> Iterator[tuple[str, dict]]:
    """Yield (where, record) pairs; a record has `prompt`+`completion` or `text`."""
    sniff = False
    if fmt == "auto":
        if path.is_dir():
            fmt = "hf"
        elif path.suffix in (".jsonl", ".json"):
            fmt = "jsonl"
        else:
            fmt = "text"
            # A pipe (`<(...)`, /dev/stdin) has no telling name: its first line says which.
            sniff = not path.is_file()
    if fmt == "hf":
        try:
            from datasets import load_from_disk
        except ImportError as err:  # pragma: no cover - depends on the install
            raise DemonstrationError(
                "reading a Hugging Face dataset folder needs the `datasets` package "
                "(pip install 'seqmatch[hf]')"
            ) from err
        try:
            dataset = load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DemonstrationError(f"{path}: not a saved Hugging Face dataset ({err})") from None
        if hasattr(dataset, "keys"):  # a DatasetDict: take the train split
            if "train" not in dataset:
                raise DemonstrationError(f"{path}: a DatasetDict without a 'train' split")
            dataset = dataset["train"]
        for i, row in enumerate(dataset):
            yield f"{path}[{i}]", dict(row)
        return
    with path.open("rb") as f:
        yield from _file_records(f, path, fmt, sniff)


MAX_LINE_BYTES = 16 * 2**20
"""The longest line a demonstration file may hold (16 MiB)."""

MAX_JSON_DEPTH = 64
"""The deepest nesting of arrays and objects a JSONL record may hold (a record needs 1)."""

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def _json_depth(line: str) -> int:
    """How deeply the arrays and objects of one JSON text nest (strings are skipped)."""
    if line.count("[") + line.count("{") <= MAX_JSON_DEPTH:
        return 0  # cannot nest deeper than the limit: no need to scan
    codes = np.frombuffer(_JSON_STRING.sub("", line).encode("utf-8"), dtype=np.uint8)
    step = np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
    step -= np.isin(codes, (ord("]"), ord("}")))
    return int(step.cumsum().max(initial=0))


def _file_records(
    f: IO[bytes], path: Path, fmt: Format, sniff: bool = False
) -> Iterator[tuple[str, dict]]:
    r"""Yield (where, record) pairs from a text or JSONL file, one line at a time.

    Lines end at ``\n`` only (a U+2028 or U+0085 inside a JSON string is part of its line).
    With ``sniff``, a first line that starts with ``{`` makes it JSONL.
    """
    number = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        where = f"{path}:{number}"
        if len(raw) > MAX_LINE_BYTES:
            raise DemonstrationError(f"{where}: line longer than {MAX_LINE_BYTES:,} bytes")
        try:
            line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError as err:
            raise DemonstrationError(
                f"{where}: not UTF-8 text ({err.reason} at byte {err.start} of the line)"
            ) from None
        if not line.strip():
            continue
        if sniff:
            fmt, sniff = ("jsonl" if line.lstrip().startswith("{") else "text"), False
        if fmt == "text":
            yield where, {"text": line}
            continue
        if _json_depth(line) > MAX_JSON_DEPTH:
            raise DemonstrationError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DemonstrationError(f"{where}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise DemonstrationError(f"{where}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise DemonstrationError(
                f"{where}: expected a JSON object, got {type(record).__name__}"
            )
        yield where, record


def load_demonstrations(
    path: str | Path,
    vocab: Vocab,
    max_length: int,
    prompt_tokens: int | None = None,
    fmt: Format = "auto",
) -> list[Trajectory]:
    """Read demonstrations from a file or folder.

    Formats: JSONL (one object a line, with ``prompt`` and ``completion`` strings, or ``text``),
    a plain text file (one ``text`` record a line), or a folder saved by ``datasets``'
    ``save_to_disk`` (columns as in JSONL). A ``text`` record needs ``prompt_tokens``: its first
    that many tokens are the prompt.

    Raises:
        DemonstrationError: naming the file, line and cause, for anything that cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise DemonstrationError(f"{path}: no such file or folder")
    trajectories = []
    for where, record in iter_records(path, fmt):
        try:
            if "prompt" in record and "completion" in record:
                prompt, completion = record["prompt"], record["completion"]
                if not isinstance(prompt, str) or not isinstance(completion, str):
                    raise DemonstrationError("`prompt` and `completion` must be strings")
                trajectories.append(
                    from_completion(
                        vocab.encode(prompt), vocab.encode(completion), vocab.special, max_length
                    )
                )
            elif "text" in record:
                if not isinstance(record["text"], str):
                    raise DemonstrationError("`text` must be a string")
                if prompt_tokens is None:
                    raise DemonstrationError(
                        "a plain passage (`text`) needs prompt_tokens (a task that splits "
                        'passages); give {"prompt", "completion"} records as JSONL '
                        "(a .jsonl file)"
                    )
                ids = vocab.encode(record["text"])
                trajectories.append(from_text(ids, vocab.special, prompt_tokens, max_length))
            else:
                raise DemonstrationError(
                    f"expected `prompt` and `completion` fields, or `text`; got {sorted(record)}"
                )
        except (DemonstrationError, VocabularyError, ValueError) as err:
            raise DemonstrationError(f"{where}: {err}") from None
    if not trajectories:
        raise DemonstrationError(f"{path}: no demonstrations found")
    return trajectories
