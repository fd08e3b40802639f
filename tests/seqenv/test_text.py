"""The text task: split by document, byte-level BPE round trip and cache, passages, bad corpora."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from seqenv.tasks import text as text_module
from seqenv.tasks.text import CorpusError, TextTask, austen_corpus, normalise
from seqenv.trajectory import replay

AUSTEN = austen_corpus()
NOVELS = [
    "emma.txt",
    "mansfieldpark.txt",
    "northangerabbey.txt",
    "prideprejudice.txt",
    "sensesensibility.txt",
]
# Small, so the BPE trains fast; the behaviour under test does not depend on the size.
SMALL_VOCAB = 400


WORDS = [
    *("the", "of", "and", "to", "a", "in", "was", "her", "it", "that", "she", "he", "his"),
    *("had", "as", "with", "for", "not", "be", "you", "but", "at", "on", "said", "my", "mr"),
    *("mrs", "miss", "have", "all", "which", "by", "so", "this", "very", "no", "could"),
    *("would", "from", "been", "were", "what", "any", "elinor", "marianne", "colonel"),
    *("house", "letter", "morning", "sister", "mother", "evening", "walk"),
]


def _paragraphs(rng: np.random.Generator, num: int) -> list[str]:
    """Fake prose, each paragraph wrapped into printed lines as in the real corpus."""
    out = []
    for _ in range(num):
        words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(20, 60)))]
        lines = [" ".join(words[i : i + 9]) for i in range(0, len(words), 9)]
        out.append("\n".join(lines) + ".")
    return out


def write_corpus(folder: Path, docs: dict[str, int], seed: int = 0) -> Path:
    """Write one file of ``num`` paragraphs per entry of ``docs``; return the folder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, num in docs.items():
        (folder / name).write_text("\n\n".join(_paragraphs(rng, num)) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def austen(tmp_path_factory: pytest.TempPathFactory) -> TextTask:
    """The Austen task, built once for the module (the BPE trains once)."""
    path = tmp_path_factory.mktemp("tokenizers") / "austen.json"
    return TextTask(corpus=AUSTEN, vocab_size=SMALL_VOCAB, tokenizer_path=path)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private tokenizer cache for the test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SEQMATCH_CACHE", str(folder))
    return folder


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus", {"a.txt": 30, "b.txt": 30, "c.txt": 30})


# ------------------------------------------------------------------------------------------------
# The real corpus


def test_austen_is_split_by_novel(austen: TextTask) -> None:
    train = [d.name for d in austen.documents["train"]]
    test = [d.name for d in austen.documents["test"]]
    assert train == NOVELS[:-1]
    assert test == ["sensesensibility.txt"]
    # No text of the held-out novel is in the train split (short lines such as chapter headings
    # recur in every novel, so compare the substantial paragraphs).
    train_paragraphs = {p for d in austen.documents["train"] for p in d.paragraphs}
    test_paragraphs = [p for p in austen.documents["test"][0].paragraphs if len(p) > 80]
    assert len(test_paragraphs) > 500
    assert not train_paragraphs.intersection(test_paragraphs)


def test_austen_passages_come_from_their_split(austen: TextTask) -> None:
    train_text = "\n".join(d.text for d in austen.documents["train"])
    test_text = austen.documents["test"][0].text
    rng = np.random.default_rng(0)
    for split, inside, outside in (("test", test_text, train_text), ("train", train_text, None)):
        for _ in range(10):
            example = austen.sample(rng, split)
            passage = austen.vocab.decode([*example.prompt, *example.completion])
            assert passage in inside
            if outside is not None:
                assert passage not in outside


def test_austen_whitespace_is_normalised(austen: TextTask) -> None:
    emma = austen.documents["train"][0]
    assert emma.paragraphs[0] == "EMMA"
    assert emma.paragraphs[4].startswith("Emma Woodhouse, handsome, clever, and rich, with a")
    # The printed line breaks inside the paragraph are gone; paragraphs are one line each.
    assert "comfortable home and happy disposition" in emma.paragraphs[4]
    assert all("\n" not in p and "  " not in p for p in emma.paragraphs)


def test_austen_round_trip(austen: TextTask) -> None:
    vocab = austen.vocab
    held_out = austen.documents["test"][0].text  # never seen by the BPE
    assert vocab.decode(vocab.encode(held_out)) == held_out
    raw = (AUSTEN / "emma.txt").read_text(encoding="utf-8")[:50_000]  # printed line breaks
    assert vocab.decode(vocab.encode(raw)) == raw
    odd = "  Tabs\tand  double  spaces,\nnewlines\n\n, café, naïve, 日本語, 🙂 and \u00a0 too.  "
    assert vocab.decode(vocab.encode(odd)) == odd
    assert vocab.num_actions == SMALL_VOCAB + 2
    assert (vocab.eos_id, vocab.backspace_id, vocab.pad_id) == (400, 401, 402)


def test_austen_tokenizer_is_reused(austen: TextTask, monkeypatch: pytest.MonkeyPatch) -> None:
    assert austen.trained
    assert austen.tokenizer_path is not None
    saved = austen.tokenizer_path.read_text(encoding="utf-8")
    mtime = austen.tokenizer_path.stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> str:
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(text_module, "train_tokenizer", fail)
    again = TextTask(**austen.config())
    assert not again.trained
    assert again.vocab == austen.vocab
    assert austen.tokenizer_path.read_text(encoding="utf-8") == saved
    assert austen.tokenizer_path.stat().st_mtime_ns == mtime


def test_austen_sampling(austen: TextTask) -> None:
    n, c = austen.prompt_tokens, austen.continuation_tokens
    assert austen.default_max_length == n + c
    first = austen.examples("test", 8, seed=3)
    assert first == austen.examples("test", 8, seed=3)
    assert first != austen.examples("test", 8, seed=4)
    assert austen.examples("train", 8, seed=3) != first
    for example in first:
        assert len(example.prompt) == n and len(example.completion) == c
        assert not example.terminal
    demo = austen.demonstration(first[0], austen.default_max_length)
    assert demo.truncated and demo.num_steps == c
    assert replay([demo], austen.default_max_length, 2 * austen.default_max_length) == [
        list(first[0].completion)
    ]


def test_austen_ground_truth_noise(austen: TextTask) -> None:
    rng = np.random.default_rng(0)
    special = austen.vocab.special
    comma = austen.vocab.encode(",")
    assert len(comma) == 1
    draws = [austen.ground_truth_noise(rng, [0], [], comma[0]) for _ in range(2000)]
    assert comma[0] not in draws
    assert all(special.is_token(t) for t in draws)
    # Drawn by frequency: " the" is common in Austen, a rare byte is not.
    the = austen.vocab.encode(" the")
    assert len(the) == 1 and draws.count(the[0]) > 20
    assert austen.score([0], [1, 2], terminated=True) == 0.0


def test_austen_bpe_trains_in_seconds(austen: TextTask) -> None:
    # The recipe at the default vocabulary size on the whole train split (about 1 s here; the
    # bound leaves room for a slow CI machine).
    paragraphs = [p for d in austen.documents["train"] for p in d.paragraphs]
    start = time.perf_counter()
    text_module.train_tokenizer(paragraphs, 2000)
    assert time.perf_counter() - start < 60


# ------------------------------------------------------------------------------------------------
# Small corpora: split rules, cache, errors


def test_folder_holds_out_whole_files(small_corpus: Path, cache: Path) -> None:
    task = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB, prompt_tokens=4)
    assert [d.name for d in task.documents["train"]] == ["a.txt", "b.txt"]
    assert [d.name for d in task.documents["test"]] == ["c.txt"]
    task = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB, test_fraction=0.5)
    assert [d.name for d in task.documents["test"]] == ["b.txt", "c.txt"]
    task = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB, test_fraction=0.0)
    assert len(task.documents["train"]) == 3
    with pytest.raises(ValueError, match="no test split"):
        task.sample(np.random.default_rng(0), "test")


def test_folder_is_searched_recursively_in_sorted_order(tmp_path: Path, cache: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", {"b.txt": 20, "notes.md": 5, ".hidden.txt": 5})
    write_corpus(corpus / "z", {"a.txt": 20}, seed=1)
    task = TextTask(corpus=corpus, vocab_size=SMALL_VOCAB)
    assert [d.name for d in task.documents["train"]] == ["b.txt"]
    assert [d.name for d in task.documents["test"]] == ["z/a.txt"]


def test_single_file_is_cut_at_a_paragraph(tmp_path: Path, cache: Path) -> None:
    corpus = write_corpus(tmp_path, {"one.txt": 100}) / "one.txt"
    paragraphs = normalise(corpus.read_text(encoding="utf-8"))
    task = TextTask(corpus=corpus, vocab_size=SMALL_VOCAB, test_fraction=0.25)
    (train,), (test,) = task.documents["train"], task.documents["test"]
    assert (train.name, test.name) == ("one.txt[train]", "one.txt[test]")
    assert list(train.paragraphs + test.paragraphs) == paragraphs  # contiguous, first then last
    share = len(test.text) / (len(train.text) + len(test.text))
    assert 0.15 < share <= 0.25


def test_default_cache_is_reused(
    small_corpus: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted(p.name for p in small_corpus.iterdir())
    first = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB)
    assert first.trained
    assert first.tokenizer_path is not None and first.tokenizer_path.parent == cache / "tokenizers"
    assert [p.name for p in (cache / "tokenizers").iterdir()] == [first.tokenizer_path.name]
    assert sorted(p.name for p in small_corpus.iterdir()) == before  # nothing beside the corpus

    monkeypatch.setattr(text_module, "train_tokenizer", None)  # any call would fail
    second = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB, prompt_tokens=3)
    assert not second.trained and second.tokenizer_path == first.tokenizer_path
    assert second.vocab == first.vocab


def test_changed_settings_or_text_train_a_new_tokenizer(small_corpus: Path, cache: Path) -> None:
    first = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB)
    other_size = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB + 20)
    assert other_size.trained and other_size.tokenizer_path != first.tokenizer_path
    with (small_corpus / "a.txt").open("a", encoding="utf-8") as f:
        f.write("\nA new paragraph.\n")
    edited = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB)
    assert edited.trained and edited.tokenizer_path != first.tokenizer_path
    # Only the train split feeds the BPE: editing the test file keeps the tokenizer.
    with (small_corpus / "c.txt").open("a", encoding="utf-8") as f:
        f.write("\nAnother paragraph.\n")
    assert not TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB).trained


def test_damaged_cache_entry_is_retrained(small_corpus: Path, cache: Path) -> None:
    first = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB)
    assert first.tokenizer_path is not None
    first.tokenizer_path.write_text("{not json", encoding="utf-8")
    again = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB)
    assert again.trained and again.vocab == first.vocab  # training is deterministic


def test_unwritable_cache_warns_and_still_works(
    small_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    monkeypatch.setenv("SEQMATCH_CACHE", str(blocker))  # a file where a folder should be
    with pytest.warns(UserWarning, match="could not cache the tokenizer"):
        task = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB)
    assert task.tokenizer_path is None
    assert task.vocab.decode(task.vocab.encode("a walk")) == "a walk"


def test_explicit_tokenizer_path(small_corpus: Path, tmp_path: Path) -> None:
    path = tmp_path / "deep" / "bpe.json"
    task = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB, tokenizer_path=path)
    assert task.trained and path.is_file()
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed into place
    assert not TextTask(**task.config()).trained
    bad = tmp_path / "bad.json"
    bad.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json.*not a tokenizers JSON file"):
        TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB, tokenizer_path=bad)


def test_config_rebuilds_the_task(small_corpus: Path, cache: Path) -> None:
    task = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB, prompt_tokens=5, seed=2)
    rebuilt = TextTask(**task.config())
    assert rebuilt.config() == task.config()
    assert rebuilt.vocab == task.vocab
    assert rebuilt.examples("train", 4, seed=1) == task.examples("train", 4, seed=1)


def test_normalise() -> None:
    text = "\ufeffTitle\r\n\r\nOne line\r\nand  the\tnext.\n  \n\n\nSecond\n"
    assert normalise(text) == ["Title", "One line and the next.", "Second"]
    assert normalise(" \n\n \t\n") == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompt_tokens": 0}, ValueError, "prompt_tokens must be >= 1"),
        ({"continuation_tokens": 0}, ValueError, "continuation_tokens must be >= 1"),
        ({"vocab_size": 256}, ValueError, "vocab_size must be > 256"),
        ({"test_fraction": 1.0}, ValueError, r"test_fraction must be in \[0, 1\)"),
        ({"test_fraction": -0.1}, ValueError, r"test_fraction must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(
    small_corpus: Path, kwargs: dict, error: type[Exception], match: str
) -> None:
    kwargs = {"corpus": small_corpus, **kwargs}
    with pytest.raises(error, match=match):
        TextTask(**kwargs)


def test_default_corpus_is_the_shipped_austen(austen: TextTask) -> None:
    """Without ``corpus`` the task reads the novels shipped as package data."""
    assert austen_corpus().is_dir()
    default = TextTask(vocab_size=SMALL_VOCAB, tokenizer_path=austen.tokenizer_path)
    assert default.corpus == austen.corpus == austen_corpus().resolve()
    assert [d.name for d in default.documents["test"]] == ["sensesensibility.txt"]


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"nowhere\.txt: no such file or folder"):
        TextTask(corpus=tmp_path / "nowhere.txt")


def test_empty_corpora(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n\t\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"empty\.txt: holds no text"):
        TextTask(corpus=empty)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "README.md").write_text("not a .txt file", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"holds no \.txt files"):
        TextTask(corpus=folder)
    (folder / "blank.txt").write_text("", encoding="utf-8")
    with pytest.raises(CorpusError, match="holds no text"):
        TextTask(corpus=folder)


def test_non_utf8_file_is_named(small_corpus: Path) -> None:
    (small_corpus / "b.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"b\.txt: not UTF-8 text"):
        TextTask(corpus=small_corpus)


def test_corpus_too_small(tmp_path: Path, cache: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", {"long.txt": 30, "short.txt": 1})
    with pytest.raises(CorpusError, match=r"too small for a passage: the longest test document"):
        TextTask(corpus=corpus, vocab_size=SMALL_VOCAB, continuation_tokens=200)
    with pytest.raises(CorpusError, match="too small for a passage: the longest train document"):
        TextTask(corpus=corpus, vocab_size=SMALL_VOCAB, continuation_tokens=10_000)
    one = tmp_path / "one.txt"
    one.write_text("Just one paragraph\nover two lines.\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="one paragraph, which cannot be cut"):
        TextTask(corpus=one, vocab_size=SMALL_VOCAB)


def test_unknown_split(small_corpus: Path, cache: Path) -> None:
    task = TextTask(corpus=small_corpus, vocab_size=SMALL_VOCAB)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        task.sample(np.random.default_rng(0), "valid")  # type: ignore[arg-type]
