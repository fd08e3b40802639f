"""Shared fixtures: the Austen corpus shipped with seqenv, small task settings, a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from seqenv.tasks.text import austen_corpus

AUSTEN = austen_corpus()


@pytest.fixture(scope="session")
def austen_dir() -> Path:
    return AUSTEN


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="session")
def task_kwargs(austen_dir: Path, tokenizer_cache: Path) -> dict[str, dict[str, Any]]:
    """Small settings of each task, for environment-level tests."""
    return {
        "arithmetic": {"base": 10, "min_digits": 1, "max_digits": 2},
        "dyck": {},
        "text": {
            "corpus": str(austen_dir),
            "vocab_size": 300,
            "prompt_tokens": 4,
            "continuation_tokens": 12,
            "tokenizer_path": str(tokenizer_cache / "austen-300.json"),
        },
    }
