"""The text task: passages of a plain-text corpus under a byte-level BPE trained on its train split.

The corpus is any UTF-8 text file or folder of ``.txt`` files; by default the five Jane Austen
novels shipped with the package (:func:`austen_corpus`, public domain). An example is a window
of ``prompt_tokens + continuation_tokens`` tokens: the first part is the prompt, the rest the
expert's continuation, and the episode is truncated at ``max_length``
(there is no natural end of a passage, so no ``<eos>``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar

import numpy as np

from seqenv.tasks.base import Example, Split, Task
from seqenv.vocab import PretrainedVocab, TokenizerVocab

# Bump when the tokenizer's configuration or the text normalisation changes: the cache key
# includes it, so an old cached tokenizer is never reused for the new recipe.
_TOKENIZER_FORMAT = "bytelevel-bpe-v1"
# BPE training cost grows with the text it counts; beyond this many characters of train text we
# train on a random sample of paragraphs (chosen by ``seed``) so training stays within seconds.
# The Austen train split (2.9 M characters) is used whole.
MAX_TOKENIZER_TRAIN_CHARS = 10_000_000
# A byte-level BPE starts from the 256 byte symbols; a smaller vocabulary has no merges at all.
_NUM_BYTES = 256
_BLANK_LINE = re.compile(r"\n[ \t\f\v\u00a0]*\n")


def austen_corpus() -> Path:
    """The folder of the five Austen novels shipped as package data of :mod:`seqenv`."""
    return Path(str(resources.files("seqenv") / "data" / "austen"))


class CorpusError(ValueError):
    """A corpus that cannot serve as the text task's data (missing, empty, not UTF-8, too small)."""


@dataclass(frozen=True)
class Document:
    """One document of a split, after whitespace normalisation.

    Attributes:
        name: where it came from: the file's path relative to the corpus folder, or for a single
            file cut in two, the file name with the part (``"emma.txt[train]"``).
        paragraphs: the paragraphs, each one line of single-spaced text.
    """

    name: str
    paragraphs: tuple[str, ...]

    @property
    def text(self) -> str:
        """The document as the tokenizer sees it: paragraphs joined by one newline."""
        return "\n".join(self.paragraphs)


def normalise(text: str) -> list[str]:
    """Split ``text`` into paragraphs and single-space each one.

    Paragraphs are separated by blank lines. Inside a paragraph every run of whitespace (the line
    breaks of a printed page, tabs, repeated spaces) becomes one space, because the corpus keeps
    lines as printed and those breaks carry no meaning. Everything else (punctuation, underscores
    for italics, chapter headings) is kept as it is.
    """
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = (" ".join(block.split()) for block in _BLANK_LINE.split(text))
    return [p for p in paragraphs if p]


def default_cache_dir() -> Path:
    """``$SEQMATCH_CACHE`` if set, else ``~/.cache/seqmatch``."""
    root = os.environ.get("SEQMATCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "seqmatch"


def train_tokenizer(paragraphs: Sequence[str], vocab_size: int) -> str:
    """Train a byte-level BPE on ``paragraphs``; return the tokenizer as JSON text.

    Byte-level, so every UTF-8 string encodes without an unknown token and ``decode(encode(s))``
    gives ``s`` back exactly, spaces and newlines included. No special tokens: ``TokenizerVocab``
    appends ``<eos>``, ``<bkspc>`` and pad after the tokenizer's ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(paragraphs, trainer, length=len(paragraphs))
    return tokenizer.to_str()


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename it into place.

    A reader (another process building the same task) never sees a half-written tokenizer.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_documents(corpus: Path) -> list[Document]:
    """The non-empty documents of a file (one) or a folder (its ``.txt`` files, sorted)."""
    if not corpus.exists():
        raise CorpusError(f"corpus {corpus}: no such file or folder")
    if corpus.is_dir():
        files = sorted(
            (p for p in corpus.rglob("*.txt") if p.is_file()),
            key=lambda p: p.relative_to(corpus).as_posix(),
        )
        files = [
            p
            for p in files
            if not any(part.startswith(".") for part in p.relative_to(corpus).parts)
        ]
        if not files:
            raise CorpusError(f"corpus {corpus}: the folder holds no .txt files")
    else:
        files = [corpus]
    documents = []
    for file in files:
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise CorpusError(
                f"corpus file {file}: not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
        paragraphs = normalise(text)
        if paragraphs:
            name = file.relative_to(corpus).as_posix() if corpus.is_dir() else file.name
            documents.append(Document(name, tuple(paragraphs)))
    if not documents:
        raise CorpusError(f"corpus {corpus}: holds no text")
    return documents


def split_documents(
    documents: Sequence[Document], test_fraction: float
) -> dict[Split, list[Document]]:
    """Hold out whole documents, or with one document, its last part (see ``TextTask``)."""
    if test_fraction == 0:
        return {"train": list(documents), "test": []}
    if len(documents) > 1:
        num_test = min(len(documents) - 1, max(1, round(test_fraction * len(documents))))
        return {"train": list(documents[:-num_test]), "test": list(documents[-num_test:])}
    (document,) = documents
    paragraphs = document.paragraphs
    if len(paragraphs) < 2:
        raise CorpusError(
            f"corpus too small: {document.name} is one paragraph, which cannot be cut into a "
            "train and a test part (add text, or pass test_fraction=0)"
        )
    # Cut at the first paragraph boundary that leaves at least (1 - test_fraction) of the
    # characters before it, but never before the first or after the last paragraph.
    sizes = np.cumsum([len(p) + 1 for p in paragraphs])
    cut = int(np.searchsorted(sizes, (1 - test_fraction) * sizes[-1])) + 1
    cut = min(max(cut, 1), len(paragraphs) - 1)
    return {
        "train": [Document(f"{document.name}[train]", paragraphs[:cut])],
        "test": [Document(f"{document.name}[test]", paragraphs[cut:])],
    }


class TextTask(Task):
    """Continue a passage of real text: the prompt is its first tokens, the expert's the rest.

    **Data.** ``corpus`` is a UTF-8 text file or a folder of ``.txt`` files (searched recursively,
    hidden ones skipped, read in sorted order of their relative paths). Whitespace is normalised
    (:func:`normalise`): paragraphs are separated by blank lines, the line breaks inside a paragraph
    become spaces, and the paragraphs of a document are joined by one newline.

    **Split, by document and never by line** (neighbouring lines leak into each other):

    - A folder: each file is a document; the last ``max(1, round(test_fraction * n))`` of the n
      files in sorted order (at most n - 1) are the test documents, whole. For the five Austen
      novels and the default, that is ``sensesensibility.txt``.
    - A single file (or a folder with a single non-empty file): one contiguous cut, the first
      ``1 - test_fraction`` of the characters for training, the rest for testing, at the first
      paragraph boundary after that point.
    - ``test_fraction=0``: no test split.

    **Tokenizer.** A byte-level BPE of ``vocab_size`` tokens, trained on the train split only
    (on a random sample of its paragraphs, chosen by ``seed``, when the train text exceeds
    ``MAX_TOKENIZER_TRAIN_CHARS`` characters), so ``decode(encode(text)) == text``. It is saved as
    ``tokenizers`` JSON at ``tokenizer_path`` and reused when that file exists; the default path is
    ``<cache>/tokenizers/bpe<vocab_size>-<hash>.json`` with ``<cache>`` = ``$SEQMATCH_CACHE`` or
    ``~/.cache/seqmatch`` and the hash taken over the training text and the tokenizer recipe, so a
    changed corpus or setting trains a new one. Nothing is ever written beside the corpus.

    **Examples.** A uniformly random window of ``prompt_tokens + continuation_tokens`` tokens of a
    document of the split (each split is tokenized once and kept in memory); the episode is
    truncated at ``default_max_length = prompt_tokens + continuation_tokens``.

    **Score** is 0: text has no built-in reward (the environment accepts a reward callable).
    **Ground-truth noise**: text has no known source grammar, so a plausible mistake is a token
    drawn from the unigram distribution of the train split, other than the true next token.

    Args:
        corpus: path of the text file or folder; the shipped Austen novels if unset.
        vocab_size: tokens of the BPE (> 256: the byte alphabet comes first).
        prompt_tokens: tokens of the prompt, >= 1.
        continuation_tokens: tokens of the expert's continuation, >= 1.
        test_fraction: share of the corpus held out for the test split, in [0, 1).
        tokenizer_path: where to load the tokenizer from, or save it to after training.
        seed: chooses the training sample of an oversized corpus.
        vocab: a pretrained model's vocabulary to tokenize with instead of training a BPE
            (``vocab_size`` and ``tokenizer_path`` are then unused). Not part of :meth:`config`.

    Raises:
        CorpusError: a missing path, an empty corpus or folder without ``.txt`` files, a file that
            is not UTF-8 (named), or a split with no document long enough for one passage.
        ValueError: a missing ``corpus`` or an argument out of range.
    """

    name: ClassVar[str] = "text"
    vocab: TokenizerVocab | PretrainedVocab

    def __init__(
        self,
        corpus: str | os.PathLike[str] | None = None,
        vocab_size: int = 2000,
        prompt_tokens: int = 16,
        continuation_tokens: int = 48,
        test_fraction: float = 0.1,
        tokenizer_path: str | os.PathLike[str] | None = None,
        seed: int = 0,
        vocab: PretrainedVocab | None = None,
    ) -> None:
        if corpus is None:
            corpus = austen_corpus()
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
        if continuation_tokens < 1:
            raise ValueError(f"continuation_tokens must be >= 1, got {continuation_tokens}")
        if vocab_size <= _NUM_BYTES:
            raise ValueError(
                f"vocab_size must be > {_NUM_BYTES} (the BPE's byte alphabet), got {vocab_size}"
            )
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        self.corpus = Path(corpus).expanduser().resolve()
        self.vocab_size = vocab_size
        self.prompt_tokens = prompt_tokens
        self.continuation_tokens = continuation_tokens
        self.test_fraction = test_fraction
        self.seed = seed
        self._tokenizer_path_arg = tokenizer_path
        self.default_max_length = prompt_tokens + continuation_tokens

        self.documents = split_documents(_read_documents(self.corpus), test_fraction)
        if vocab is None:
            self.vocab, self.tokenizer_path, self.trained = self._load_or_train(tokenizer_path)
        else:
            self.vocab, self.tokenizer_path, self.trained = vocab, None, False

        self._tokens: dict[Split, list[np.ndarray]] = {}
        self._cumulative: dict[Split, np.ndarray] = {}
        for split, documents in self.documents.items():
            self._tokenize(split, documents)
        # Unigram distribution of the train split over the ordinary tokens, for ground-truth
        # noise (a pretrained tokenizer's eos is among its ids: it never counts as a token).
        special = self.vocab.special
        counts = np.zeros(special.num_actions, dtype=np.int64)
        for ids in self._tokens["train"]:
            counts += np.bincount(ids, minlength=special.num_actions)[: special.num_actions]
        counts[[special.eos_id, special.backspace_id]] = 0
        self._unigram_counts = counts
        self._unigram_cdf = np.cumsum(counts) / counts.sum()

    # ----------------------------------------------------------------------------------------
    # Tokenizer

    def _load_or_train(
        self, tokenizer_path: str | os.PathLike[str] | None
    ) -> tuple[TokenizerVocab, Path | None, bool]:
        """Return (vocabulary, where it is saved, whether it was trained now)."""
        if tokenizer_path is not None:
            path = Path(tokenizer_path).expanduser()
            if path.exists():
                try:
                    return TokenizerVocab.from_file(path), path, False
                except Exception as err:  # tokenizers raises a bare Exception for bad JSON
                    raise ValueError(
                        f"tokenizer_path {path}: not a tokenizers JSON file ({err})"
                    ) from None
            tokenizer_json = train_tokenizer(self._training_text(), self.vocab_size)
            _write_atomic(path, tokenizer_json)
            return TokenizerVocab(tokenizer_json), path, True

        paragraphs = self._training_text()
        digest = hashlib.sha256()
        digest.update(json.dumps([_TOKENIZER_FORMAT, self.vocab_size]).encode())
        for paragraph in paragraphs:
            digest.update(paragraph.encode("utf-8"))
            digest.update(b"\n")
        name = f"bpe{self.vocab_size}-{digest.hexdigest()[:20]}.json"
        path = default_cache_dir() / "tokenizers" / name
        if path.exists():
            try:
                return TokenizerVocab.from_file(path), path, False
            except Exception:  # a damaged cache entry: train again and overwrite it
                pass
        tokenizer_json = train_tokenizer(paragraphs, self.vocab_size)
        try:
            _write_atomic(path, tokenizer_json)
        except OSError as err:
            # An unwritable cache must not stop the task: it only costs training next time.
            warnings.warn(
                f"could not cache the tokenizer at {path} ({err}); set SEQMATCH_CACHE to a "
                "writable folder to reuse it",
                stacklevel=3,
            )
            return TokenizerVocab(tokenizer_json), None, True
        return TokenizerVocab(tokenizer_json), path, True

    def _training_text(self) -> list[str]:
        """The train paragraphs the BPE learns from: all, or a seeded sample if there are many."""
        paragraphs = [p for d in self.documents["train"] for p in d.paragraphs]
        total = sum(len(p) for p in paragraphs)
        if total <= MAX_TOKENIZER_TRAIN_CHARS:
            return paragraphs
        order = np.random.default_rng(self.seed).permutation(len(paragraphs))
        sizes = np.cumsum([len(paragraphs[i]) for i in order])
        chosen = np.sort(order[: int(np.searchsorted(sizes, MAX_TOKENIZER_TRAIN_CHARS)) + 1])
        return [paragraphs[i] for i in chosen]

    # ----------------------------------------------------------------------------------------
    # Passages

    def _tokenize(self, split: Split, documents: Sequence[Document]) -> None:
        """Token ids of every document of ``split``, and the window counts used by ``sample``."""
        # Encoding paragraph by paragraph (each but the last with its newline) gives the same ids
        # as encoding the whole document, since the byte-level pre-tokenizer always cuts at a
        # newline followed by text, and it runs in parallel over the batch.
        pieces = [
            p + "\n" if i < len(d.paragraphs) - 1 else p
            for d in documents
            for i, p in enumerate(d.paragraphs)
        ]
        tokenizer = self.vocab.tokenizer
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        encodings = iter(encode(pieces, add_special_tokens=False))
        window = self.default_max_length
        arrays = []
        for document in documents:
            chunk = itertools.islice(encodings, len(document.paragraphs))
            # int32 halves the memory of a large corpus; vocabularies stay far below 2**31.
            ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in chunk), dtype=np.int32)
            if len(ids) >= window:
                arrays.append(ids)
        if documents and not arrays:
            longest = max(len(self.vocab.encode(d.text)) for d in documents)
            raise CorpusError(
                f"corpus {self.corpus} too small for a passage: the longest {split} document has "
                f"{longest} tokens, a passage needs prompt_tokens + continuation_tokens = {window}"
            )
        self._tokens[split] = arrays
        self._cumulative[split] = np.cumsum([len(ids) - window + 1 for ids in arrays])

    def sample(self, rng: np.random.Generator, split: Split = "train") -> Example:
        """A passage drawn uniformly from all windows of the split's documents."""
        if split not in self._tokens:
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
        if not self._tokens[split]:
            raise ValueError(f"the text task has no {split} split (test_fraction=0)")
        cumulative = self._cumulative[split]
        k = int(rng.integers(int(cumulative[-1])))
        index = int(np.searchsorted(cumulative, k, side="right"))
        start = k - (int(cumulative[index - 1]) if index else 0)
        window = self._tokens[split][index][start : start + self.default_max_length].tolist()
        return Example(
            prompt=tuple(window[: self.prompt_tokens]),
            completion=tuple(window[self.prompt_tokens :]),
            terminal=False,
        )

    def score(self, prompt: Sequence[int], generated: Sequence[int], terminated: bool) -> float:
        """0: text has no built-in reward; give the environment a reward callable instead."""
        return 0.0

    def ground_truth_noise(
        self,
        rng: np.random.Generator,
        prompt: Sequence[int],
        generated: Sequence[int],
        true_next: int,
    ) -> int:
        """A token drawn from the train split's unigram distribution, other than ``true_next``."""
        cdf = self._unigram_cdf
        # Rejection keeps each draw O(log V); it rarely needs a second try, since no single token
        # carries much of the mass of a real corpus.
        for _ in range(32):
            token = min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)
            if token != true_next and self._unigram_counts[token] > 0:
                return token
        special = self.vocab.special
        others = [i for i in range(len(cdf)) if i != true_next and special.is_token(i)]
        return int(rng.choice(others))

    def config(self) -> dict:
        """The keyword arguments that rebuild this task."""
        return {
            "corpus": str(self.corpus),
            "vocab_size": self.vocab_size,
            "prompt_tokens": self.prompt_tokens,
            "continuation_tokens": self.continuation_tokens,
            "test_fraction": self.test_fraction,
            "tokenizer_path": (
                None if self._tokenizer_path_arg is None else str(self._tokenizer_path_arg)
            ),
            "seed": self.seed,
        }
