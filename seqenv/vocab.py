"""Token <-> id mapping and the special ids: the one source of truth for both.

Layout shared by every vocabulary of the project::

    0 .. num_tokens-1      ordinary tokens (characters, BPE pieces, ...)
    eos_id                 end of sequence: an action that ends the episode
    backspace_id           delete the last generated token: an action
    pad_id = num_actions   fills observations; never an action, never predicted

So the action space is ``Discrete(num_actions)`` and the observation space is
``Box(0, num_actions, (max_length,), int64)`` (the high bound is inclusive, which admits pad).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

EOS_TOKEN = "<eos>"
BACKSPACE_TOKEN = "<bkspc>"
PAD_TOKEN = "<pad>"


class VocabularyError(ValueError):
    """Raised for text or ids that a vocabulary cannot represent."""


@dataclass(frozen=True)
class SpecialIds:
    """The ids the MDP and the policies need; everything else about a vocabulary is text.

    Attributes:
        num_actions: size of the action space (ordinary tokens, ``<eos>`` and ``<bkspc>``).
        eos_id: the terminating action.
        backspace_id: the deleting action.
        pad_id: the id that pads observations and batches; ``num_actions`` for our own vocabularies.
    """

    num_actions: int
    eos_id: int
    backspace_id: int
    pad_id: int

    def __post_init__(self) -> None:
        if self.num_actions < 3:
            raise VocabularyError(f"num_actions must be >= 3, got {self.num_actions}")
        for name in ("eos_id", "backspace_id"):
            value = getattr(self, name)
            if not 0 <= value < self.num_actions:
                raise VocabularyError(
                    f"{name}={value} is not an action id in [0, {self.num_actions})"
                )
        if self.eos_id == self.backspace_id:
            raise VocabularyError("eos_id and backspace_id must differ")
        if 0 <= self.pad_id < self.num_actions:
            raise VocabularyError(f"pad_id={self.pad_id} must not be an action id")

    @property
    def num_embeddings(self) -> int:
        """Rows an embedding table needs to accept every id, pad included."""
        return max(self.num_actions, self.pad_id + 1)

    def is_token(self, token_id: int) -> bool:
        """True for an ordinary token: an action that appends itself."""
        return 0 <= token_id < self.num_actions and token_id not in (self.eos_id, self.backspace_id)


@runtime_checkable
class Vocab(Protocol):
    """What the environment, the agents and the metrics need of a vocabulary."""

    @property
    def special(self) -> SpecialIds:
        """The special ids and the size of the action space."""
        ...

    @property
    def eos_id(self) -> int:
        """The terminating action."""
        ...

    @property
    def backspace_id(self) -> int:
        """The deleting action."""
        ...

    @property
    def pad_id(self) -> int:
        """The id that pads observations and batches; never an action."""
        ...

    @property
    def num_actions(self) -> int:
        """Size of the action space."""
        ...

    def encode(self, text: str) -> list[int]:
        """Ids of the ordinary tokens of ``text``.

        Raises:
            VocabularyError: ``text`` cannot be represented.
        """
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of an action trace: ``<bkspc>`` rendered by name, ``<eos>`` and pad dropped.

        Raises:
            VocabularyError: an id is outside the vocabulary.
        """
        ...

    def to_json(self) -> dict:
        """A JSON-serialisable description; :func:`vocab_from_json` inverts it."""
        ...


class SpecialIdsMixin:
    """``eos_id``, ``backspace_id``, ``pad_id`` and ``num_actions`` read from ``self.special``."""

    special: SpecialIds

    @property
    def eos_id(self) -> int:
        """The terminating action."""
        return self.special.eos_id

    @property
    def backspace_id(self) -> int:
        """The deleting action."""
        return self.special.backspace_id

    @property
    def pad_id(self) -> int:
        """The id that pads observations and batches."""
        return self.special.pad_id

    @property
    def num_actions(self) -> int:
        """Size of the action space."""
        return self.special.num_actions


class CharVocab(SpecialIdsMixin):
    """A character-level vocabulary: one id per character, then ``<eos>``, ``<bkspc>``, pad.

    ``decode`` drops ``<eos>`` and pad and renders ``<bkspc>`` by name, so that an action trace
    stays readable; use the MDP (or :func:`seqenv.trajectory.replay`) to apply backspaces.
    """

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if not chars:
            raise VocabularyError("a character vocabulary needs at least one character")
        if any(len(c) != 1 for c in chars):
            raise VocabularyError(f"every entry must be one character, got {chars!r}")
        if len(set(chars)) != len(chars):
            raise VocabularyError(f"duplicate characters in {chars!r}")
        self.chars: tuple[str, ...] = tuple(chars)
        self._index = {c: i for i, c in enumerate(chars)}
        n = len(chars)
        self.special = SpecialIds(num_actions=n + 2, eos_id=n, backspace_id=n + 1, pad_id=n + 2)

    def encode(self, text: str) -> list[int]:
        """One id per character of ``text``.

        Raises:
            VocabularyError: a character is not in the vocabulary.
        """
        try:
            return [self._index[c] for c in text]
        except KeyError as err:
            allowed = "".join(self.chars)
            raise VocabularyError(
                f"character {err.args[0]!r} is not in the vocabulary {allowed!r}"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Characters of ``ids``, ``<bkspc>`` by name, ``<eos>`` and pad dropped.

        Raises:
            VocabularyError: an id is outside the vocabulary.
        """
        out = []
        for i in ids:
            i = int(i)
            if i < len(self.chars) and i >= 0:
                out.append(self.chars[i])
            elif i == self.backspace_id:
                out.append(BACKSPACE_TOKEN)
            elif i in (self.eos_id, self.pad_id):
                continue
            else:
                raise VocabularyError(f"id {i} is outside the vocabulary (size {self.num_actions})")
        return "".join(out)

    def to_json(self) -> dict:
        """``{"kind": "char", "chars": ...}``."""
        return {"kind": "char", "chars": "".join(self.chars)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharVocab({''.join(self.chars)!r})"


class TokenizerVocab(SpecialIdsMixin):
    """A vocabulary over a `tokenizers` BPE model, whose ids keep their meaning.

    The tokenizer's own ids are the ordinary tokens; ``<eos>``, ``<bkspc>`` and pad follow them.
    """

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer_json = tokenizer_json
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        n = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.special = SpecialIds(num_actions=n + 2, eos_id=n, backspace_id=n + 1, pad_id=n + 2)

    @classmethod
    def from_file(cls, path: str | Path) -> TokenizerVocab:
        """Load from a ``tokenizer.json`` file."""
        return cls(Path(path).read_text(encoding="utf-8"))

    def encode(self, text: str) -> list[int]:
        """The tokenizer's ids for ``text``."""
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of an action trace; see :func:`decode_with`."""
        return decode_with(self.tokenizer.decode, ids, self.special)

    def to_json(self) -> dict:
        """``{"kind": "tokenizer", "tokenizer": ...}`` with the tokenizer's own JSON."""
        return {"kind": "tokenizer", "tokenizer": json.loads(self.tokenizer_json)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenizerVocab) and other.tokenizer_json == self.tokenizer_json

    def __hash__(self) -> int:
        return hash(self.tokenizer_json)


class PretrainedVocab(SpecialIdsMixin):
    """The vocabulary of a pretrained language model's tokenizer (``tokenizers`` JSON).

    Unlike :class:`TokenizerVocab`, ``<eos>`` is the model's own eos token, inside the
    tokenizer's ids, so that the model's learnt end-of-text row keeps its meaning. Layout: the
    tokenizer's ids ``0 .. n-1`` (added tokens included; eos among them), then
    ``backspace_id = n``, then ``pad_id = n + 1``. Text is encoded without the tokenizer's
    post-processing (no BOS).

    Args:
        tokenizer_json: the tokenizer as ``tokenizers`` JSON text (a ``tokenizer.json`` file).
        eos_id: the id of the model's end-of-text token.
    """

    def __init__(self, tokenizer_json: str, eos_id: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer_json = self.tokenizer.to_str()  # canonical: equal vocabularies compare equal
        n = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if not 0 <= eos_id < n:
            raise VocabularyError(
                f"eos id {eos_id} is not a token id of the tokenizer (0..{n - 1})"
            )
        self.special = SpecialIds(num_actions=n + 1, eos_id=eos_id, backspace_id=n, pad_id=n + 1)

    def encode(self, text: str) -> list[int]:
        """The tokenizer's ids for ``text``, without its special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text, in parallel."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of an id sequence; ``<eos>`` and pad dropped, ``<bkspc>`` rendered by name."""
        return decode_with(self.tokenizer.decode, ids, self.special)

    def to_json(self) -> dict:
        """``{"kind": "hf", "tokenizer": ..., "eos_id": ...}`` with the tokenizer's own JSON."""
        return {
            "kind": "hf",
            "tokenizer": json.loads(self.tokenizer_json),
            "eos_id": self.special.eos_id,
        }

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PretrainedVocab)
            and other.tokenizer_json == self.tokenizer_json
            and other.special == self.special
        )

    def __hash__(self) -> int:
        return hash((self.tokenizer_json, self.special))


def decode_with(
    decode_tokens: Callable[[list[int]], str], ids: Iterable[int], special: SpecialIds
) -> str:
    """Text of an action trace over a subword tokenizer.

    Runs of ordinary tokens go through ``decode_tokens`` together (subwords join up),
    ``<bkspc>`` is rendered by name, ``<eos>`` and pad are dropped.
    """
    pieces: list[str] = []
    run: list[int] = []
    for i in (int(i) for i in ids):
        if not 0 <= i <= special.pad_id:
            raise VocabularyError(f"id {i} is outside the vocabulary (size {special.num_actions})")
        if special.is_token(i):
            run.append(i)
            continue
        if run:
            pieces.append(decode_tokens(run))
            run = []
        if i == special.backspace_id:
            pieces.append(BACKSPACE_TOKEN)
    if run:
        pieces.append(decode_tokens(run))
    return "".join(pieces)


def vocab_from_json(data: dict) -> Vocab:
    """Inverse of ``Vocab.to_json`` (checkpoints store vocabularies this way).

    Raises:
        VocabularyError: for anything that is not a stored vocabulary.
    """
    if not isinstance(data, dict):
        raise VocabularyError(f"a stored vocabulary is a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind == "char":
        return CharVocab(list(data["chars"]))
    if kind == "tokenizer":
        return TokenizerVocab(json.dumps(data["tokenizer"]))
    if kind == "hf":
        return PretrainedVocab(json.dumps(data["tokenizer"]), int(data["eos_id"]))
    raise VocabularyError(f"unknown vocabulary kind {kind!r}")
