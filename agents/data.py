"""Your own records for evaluation: prompts, with or without the expected completion.

Training reads demonstrations with :func:`seqenv.trajectory.load_demonstrations`; ``seqmatch eval
--data`` also accepts prompt-only records, and writes one generation per record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seqenv.trajectory import DemonstrationError, iter_records
from seqenv.vocab import Vocab, VocabularyError


@dataclass(frozen=True)
class PromptRecord:
    """One record of an evaluation file.

    Attributes:
        prompt: the prompt's text.
        prompt_ids: its token ids (at least one).
        completion: the expected completion's text, None for a prompt-only record.
    """

    prompt: str
    prompt_ids: tuple[int, ...]
    completion: str | None = None


def load_prompt_records(path: str | Path, vocab: Vocab, max_length: int) -> list[PromptRecord]:
    """Read ``{"prompt"}`` or ``{"prompt", "completion"}`` records (JSONL or a `datasets` folder).

    Every record is checked before any is returned, so a bad file writes nothing.

    Raises:
        DemonstrationError: naming the file, line and cause.
    """
    path = Path(path)
    if not path.exists():
        raise DemonstrationError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix not in (".jsonl", ".json"):
        raise DemonstrationError(f"{path}: evaluation records are JSONL (.jsonl) or a folder")
    records = []
    for where, record in iter_records(path, "auto"):
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str):
            raise DemonstrationError(f"{where}: expected a string `prompt`, got {sorted(record)}")
        if completion is not None and not isinstance(completion, str):
            raise DemonstrationError(f"{where}: `completion` must be a string")
        try:
            ids = vocab.encode(prompt)
        except VocabularyError as err:
            raise DemonstrationError(f"{where}: {err}") from None
        if not ids:
            raise DemonstrationError(f"{where}: the prompt is empty")
        if len(ids) >= max_length:
            raise DemonstrationError(
                f"{where}: the prompt has {len(ids)} tokens, the checkpoint's buffer {max_length}"
            )
        records.append(PromptRecord(prompt, tuple(ids), completion))
    if not records:
        raise DemonstrationError(f"{path}: no records found")
    return records
