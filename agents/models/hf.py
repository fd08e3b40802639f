"""The policy interface (:class:`agents.interface.PolicyModel`) over a transformers causal LM.

Works with GPT-2 and Llama-style models, loaded from a local folder (:func:`load_hf`; nothing is
downloaded) or built from a config (:meth:`HFPolicy.from_config`). The vocabulary is the
tokenizer's: its tokens are the ordinary tokens and its eos is ``<eos>``; ``<bkspc>`` is a new
id after them, with a new embedding row and output row (``resize_token_embeddings``); pad is the
next id, outside the action space, and is fed to the model as eos (pad rows are never read).

Masks reach the model as *additive* float masks (0 where attention is allowed, the dtype's
minimum elsewhere) of shape (B, 1, Tq, Tk): transformers uses a 4D mask as given, and its eager
attention adds the mask to the scores, so a boolean mask there would be silently wrong.

The KV cache is :class:`SlotCache`, a transformers ``Cache`` addressed by position as
:mod:`agents.models.interface` describes: each call writes its keys and values at the slots given by
its position ids, so rolling back is feeding the token returned to at its old position.

Shapes: B rows, T positions, N new positions of a decoding call, S cache slots read, A actions.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agents.collate import RefeedMask, TrajectoryBatch
from agents.models.interface import cache_visibility
from seqenv.vocab import SpecialIds, SpecialIdsMixin, VocabularyError, decode_with

try:
    from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
    from transformers.cache_utils import Cache
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "agents.models.hf needs the `transformers` package: pip install 'seqmatch[hf]'"
    ) from err


class HFVocab(SpecialIdsMixin):
    """The vocabulary of a transformers tokenizer, with ``<bkspc>`` and pad appended.

    Layout: the tokenizer's ids ``0 .. len(tokenizer)-1`` (its eos among them is ``<eos>``), then
    ``backspace_id = len(tokenizer)``, then ``pad_id = len(tokenizer) + 1``.
    """

    def __init__(self, tokenizer: Any) -> None:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise VocabularyError("the tokenizer has no eos token, which <eos> needs")
        self.tokenizer = tokenizer
        n = len(tokenizer)
        self.special = SpecialIds(num_actions=n + 1, eos_id=int(eos), backspace_id=n, pad_id=n + 1)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of an id sequence; ``<eos>`` and pad dropped, ``<bkspc>`` rendered by name."""
        return decode_with(self.tokenizer.decode, ids, self.special)

    def to_json(self) -> dict:
        return {"kind": "hf", "name_or_path": str(getattr(self.tokenizer, "name_or_path", ""))}


class SlotCache(Cache):
    """A transformers ``Cache`` whose slot p of each row holds the keys and values of position p.

    :meth:`HFPolicy.decode` sets ``slots`` (B, N) and ``num_slots`` before each call; each
    layer's ``update`` then writes there and returns the first ``num_slots`` slots (B, H, S, D).
    """

    def __init__(self, batch_size: int, capacity: int) -> None:
        super().__init__(layers=[])
        self.num_rows = batch_size
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots: torch.Tensor | None = None
        self.num_slots = 0

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slots is None:
            raise RuntimeError("SlotCache is written through HFPolicy.decode only")
        while len(self.keys) <= layer_idx:  # allocated on first use: the shapes come from the model
            _, H, _, D = key_states.shape
            shape = (self.num_rows, H, self.capacity, D)  # (B, H, capacity, D)
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros((*shape[:3], value_states.shape[-1])))
        index = self.slots[:, None, :, None]  # (B, 1, N, 1)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.scatter_(2, index.expand_as(key_states), key_states)
        values.scatter_(2, index.expand_as(value_states), value_states)
        return keys[:, :, : self.num_slots], values[:, :, : self.num_slots]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_slots


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Tq, Tk) bool -> (B, 1, Tq, Tk) float: 0 where allowed, the dtype's minimum elsewhere."""
    blocked = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return blocked.masked_fill(allowed, 0.0)[:, None]


class HFPolicy(nn.Module):
    """A transformers causal LM as a policy over tokens, ``<eos>`` and ``<bkspc>``.

    Args:
        model: a causal LM (``...ForCausalLM``).
        eos_id: the id of ``<eos>`` (the tokenizer's eos).
        num_tokens: the ordinary ids are ``0 .. num_tokens-1`` (default: the embedding's rows);
            the embedding and output layers are resized to ``num_tokens + 1`` rows, the last one
            for ``<bkspc>``, unless ``has_backspace`` says they hold it already.
        has_backspace: the model already has the ``<bkspc>`` row (e.g. one trained here).
    """

    model: Any  # a transformers PreTrainedModel; typed loosely, as transformers' own stubs are

    def __init__(
        self,
        model: nn.Module,
        eos_id: int,
        num_tokens: int | None = None,
        has_backspace: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        rows = self.model.get_input_embeddings().num_embeddings
        if num_tokens is None:
            num_tokens = rows - 1 if has_backspace else rows
        if not has_backspace:
            # One new row for <bkspc> (rows beyond the tokenizer's, if any, are dropped).
            self.model.resize_token_embeddings(num_tokens + 1)
        elif rows != num_tokens + 1:
            raise ValueError(
                f"the model has {rows} embedding rows, not {num_tokens} tokens + <bkspc>"
            )
        self.special = SpecialIds(
            num_actions=num_tokens + 1,
            eos_id=eos_id,
            backspace_id=num_tokens,
            pad_id=num_tokens + 1,
        )
        parameters = inspect.signature(self.model.forward).parameters
        # transformers 5 renames `past_key_values` to `cache`; pass whichever this one takes.
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"

    @classmethod
    def from_config(cls, config: PretrainedConfig, eos_id: int | None = None) -> HFPolicy:
        """A freshly initialised model of ``config`` (eos: ``eos_id`` or the config's)."""
        model = AutoModelForCausalLM.from_config(config)
        eos = config.eos_token_id if eos_id is None else eos_id
        if eos is None:
            raise ValueError("no eos id: pass eos_id or set config.eos_token_id")
        return cls(model, int(eos))

    @property
    def max_positions(self) -> int | None:
        value = getattr(self.model.config, "max_position_embeddings", None)
        return None if value is None else int(value)

    def _model_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Pad has no row in the model: feed eos there (pad rows are never read)."""
        return input_ids.masked_fill(input_ids == self.special.pad_id, self.special.eos_id)

    def _dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention: RefeedMask | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, A); ``attention``: None (causal), a re-feed mask, or a (B, T, T) bool."""
        if isinstance(attention, RefeedMask):
            attention = attention.dense()
        mask = None if attention is None else additive_mask(attention, self._dtype())
        out = self.model(
            input_ids=self._model_ids(input_ids),
            position_ids=position_ids,
            attention_mask=mask,
            use_cache=False,
        )
        return out.logits

    def forward_batch(self, batch: TrajectoryBatch) -> torch.Tensor:
        """Logits (B, T, A) of a re-feed batch in one pass; plain causal without backspaces."""
        return self(batch.input_ids, batch.position_ids, batch.forward_attention)

    def init_cache(self, batch_size: int, capacity: int) -> SlotCache:
        if self.max_positions is not None and capacity > self.max_positions:
            raise ValueError(
                f"a cache of {capacity} positions exceeds the model's {self.max_positions}"
            )
        return SlotCache(batch_size, capacity)

    def decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: SlotCache
    ) -> torch.Tensor:
        """Feed (B, N) tokens at their positions through ``cache``; logits (B, N, A)."""
        num_slots, visible = cache_visibility(position_ids)  # visible: (B, N, S)
        cache.slots, cache.num_slots = position_ids, num_slots
        out = self.model(
            input_ids=self._model_ids(input_ids),
            position_ids=position_ids,
            attention_mask=additive_mask(visible, self._dtype()),
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return out.logits


def load_hf(
    path: str | Path,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[HFPolicy, HFVocab]:
    """Load a causal LM and its tokenizer from a local folder (never from the network).

    A folder that this project saved with ``<bkspc>`` already in the model is recognised by a
    ``seqmatch.json`` file beside the weights holding ``{"has_backspace": true}``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab = HFVocab(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
    )
    marker = path / "seqmatch.json"
    has_backspace = marker.exists() and bool(json.loads(marker.read_text()).get("has_backspace"))
    policy = HFPolicy(model, vocab.eos_id, num_tokens=len(tokenizer), has_backspace=has_backspace)
    return policy, vocab
