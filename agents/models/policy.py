"""A decoder-only transformer policy over the extended vocabulary (tokens, ``<eos>``, ``<bkspc>``).

One file, in the manner of GPT-2: token embedding ``wte``, optional learned position embedding
``wpe`` (or rotary positions, RoFormer), a stack of pre-norm blocks (``ln_1``, ``attn``, ``ln_2``,
``mlp``), a final ``ln_f`` and the output head. ``forward`` returns logits and computes no loss:
the logits are the soft Q-function of docs/method.md §2.

Positions come from explicit position ids, which the re-feed scheme of docs/method.md §6 needs (a
re-fed token takes its old position again). Attention backends:

- ``attention=None``: plain causal attention, SDPA's ``is_causal`` fast path (a batch without
  backspaces, padded on the right);
- a :class:`agents.collate.RefeedMask`: FlexAttention with its ``mask_mod`` on a GPU, SDPA with
  the dense boolean mask elsewhere (``TransformerConfig.attention_backend`` overrides);
- a prepared dense mask (B, T, T) or FlexAttention ``BlockMask``, built once outside a compiled
  model by :meth:`TransformerPolicy.prepare_attention`.

Shapes: B batch, T positions, N new positions of a decoding call, C width, H heads, D = C // H,
A = num_actions, E = num_embeddings (A plus the pad id).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from agents.collate import RefeedMask, TrajectoryBatch
from agents.models.interface import cache_visibility
from seqenv.vocab import SpecialIds

Positions = Literal["learned", "rotary"]
AttentionBackend = Literal["auto", "sdpa", "flex"]
PreparedAttention = torch.Tensor | BlockMask | None
"""None: causal; a bool tensor (B, 1, Tq, Tk): dense mask; a BlockMask: FlexAttention."""


@dataclass
class TransformerConfig:
    """Shape and options of :class:`TransformerPolicy`."""

    num_layers: int = 4  # the tasks (arithmetic, dyck) are learnt by small models in minutes
    width: int = 256  # C; a multiple of num_heads, and of 64 for fast matrix kernels
    num_heads: int = 4  # D = width / num_heads = 64, the head size of GPT-2
    context_length: int = 512  # largest position + 1 (learned positions); rows may exceed it
    dropout: float = 0.0  # imitation data is small but noisy already; 0 keeps logits exact
    positions: Positions = "learned"  # GPT-2's choice; "rotary" extrapolates beyond training
    rotary_base: float = 10000.0  # RoFormer's base wavelength
    tie_embeddings: bool = True  # the head reuses the first A rows of wte, as GPT-2 does
    attention_backend: AttentionBackend = "auto"  # auto: FlexAttention on CUDA, else dense SDPA

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', got {self.positions!r}")
        if self.attention_backend not in ("auto", "sdpa", "flex"):
            raise ValueError(f"unknown attention_backend {self.attention_backend!r}")
        if self.positions == "rotary" and (self.width // self.num_heads) % 2:
            raise ValueError("rotary positions need an even head size")


@dataclass
class KVCache:
    """Keys and values by position (see :mod:`agents.models.interface` for the rollback rule).

    Attributes:
        keys, values: one (B, H, capacity, D) tensor per layer.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def capacity(self) -> int:
        """Number of positions the cache holds."""
        return self.keys[0].shape[2]

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (1-D int64), in that order."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


_compiled_flex: object | None = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention, compiled on a GPU (its eager form is a slow reference implementation)."""
    global _compiled_flex
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        # On the CPU (tests) the eager form is enough; inside a compiled model, the model's
        # compilation compiles FlexAttention with it.
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, block_mask=block_mask)  # type: ignore[operator]


def rotary_angles(
    position_ids: torch.Tensor, head_size: int, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin of the rotary angles, each (B, 1, T, D/2), in float32."""
    inv_freq = base ** (
        -torch.arange(0, head_size, 2, device=position_ids.device, dtype=torch.float32) / head_size
    )  # (D/2,)
    angles = position_ids.float()[:, None, :, None] * inv_freq  # (B, 1, T, D/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head of x (B, H, T, D) by the angles of its positions."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, D/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, D)
    return rotated.to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the rows the mask allows, with an optional KV cache."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.c_attn = nn.Linear(config.width, 3 * config.width, bias=False)
        self.c_proj = nn.Linear(config.width, config.width, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        attention: PreparedAttention,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        num_slots: int = 0,
    ) -> torch.Tensor:
        """Attend over the positions ``attention`` allows; ``x`` and the result are (B, T, C).

        ``attention`` comes from :meth:`TransformerPolicy.prepare_attention` (None: causal);
        ``rotary`` is (cos, sin) from :func:`rotary_angles` (None with learned positions). With
        ``cache``, this layer's (keys, values), this call's keys and values are written at
        ``position_ids`` (B, T) and the first ``num_slots`` slots are attended over.
        """
        B, T, C = x.shape
        H = self.num_heads
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            # Write this call's keys and values at their positions, then read the first
            # num_slots slots: the mask hides every slot beyond each query's own position.
            assert position_ids is not None
            cache_k, cache_v = cache
            slots = position_ids[:, None, :, None].expand(B, H, T, C // H)  # (B, H, T, D)
            cache_k.scatter_(2, slots, k)
            cache_v.scatter_(2, slots, v)
            k, v = cache_k[:, :, :num_slots], cache_v[:, :, :num_slots]  # (B, H, S, D)
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(attention, BlockMask):
            y = _flex(q, k, v, attention)  # (B, H, T, D); FlexAttention has no attention dropout
        elif attention is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network, 4x wide, GELU."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.width, 4 * config.width, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.width, config.width, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the network at every position of x (B, T, C)."""
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.width)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        attention: PreparedAttention,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        num_slots: int = 0,
    ) -> torch.Tensor:
        """Apply the block to x (B, T, C); arguments as :meth:`SelfAttention.forward`."""
        x = x + self.attn(self.ln_1(x), attention, rotary, cache, position_ids, num_slots)
        return x + self.mlp(self.ln_2(x))


class TransformerPolicy(nn.Module):
    """Decoder-only transformer whose logits over the A actions are the policy's Q-values.

    Implements :class:`agents.interface.PolicyModel`. The embedding table has
    ``special.num_embeddings`` rows, so pad is a valid input; the head predicts the A actions.

    Args:
        special: the vocabulary's special ids.
        config: the shape; defaults to :class:`TransformerConfig`.
    """

    def __init__(self, special: SpecialIds, config: TransformerConfig | None = None) -> None:
        super().__init__()
        self.special = special
        self.config = config = TransformerConfig() if config is None else config
        self.wte = nn.Embedding(special.num_embeddings, config.width)
        self.wpe = (
            nn.Embedding(config.context_length, config.width)
            if config.positions == "learned"
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.width)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.width, special.num_actions, bias=False)
        )
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * num_layers) at initialisation.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def max_positions(self) -> int | None:
        """The context length with learned positions; None (no limit) with rotary ones."""
        return self.config.context_length if self.config.positions == "learned" else None

    def num_parameters(self) -> int:
        """Number of parameters (tied ones counted once)."""
        return sum(p.numel() for p in self.parameters())

    def prepare_attention(
        self, attention: RefeedMask | torch.Tensor | BlockMask | None
    ) -> PreparedAttention:
        """Turn a re-feed mask into what the backend runs on: a BlockMask or a dense mask.

        Call it outside a compiled model and pass the result to ``forward`` to keep the mask
        construction out of the compiled graph. A :class:`RefeedMask` caches its BlockMask, so
        a batch's BlockMask is built once (:meth:`RefeedMask.block_mask`). Dense masks
        (B, T, T) gain the head axis.
        """
        if isinstance(attention, RefeedMask):
            backend = self.config.attention_backend
            device = attention.alive_until.device
            if backend == "flex" or (backend == "auto" and device.type == "cuda"):
                return attention.block_mask()  # built once per mask, reused by later passes
            attention = attention.dense()
        if isinstance(attention, torch.Tensor) and attention.ndim == 3:
            return attention[:, None]  # (B, 1, T, T)
        return attention

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)  # (B, T, C)
        return self.drop(x)

    def _rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.positions != "rotary":
            return None
        head_size = self.config.width // self.config.num_heads
        return rotary_angles(position_ids, head_size, self.config.rotary_base)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_f(x)  # (B, T, C)
        if self.lm_head is None:
            return F.linear(x, self.wte.weight[: self.special.num_actions])  # (B, T, A)
        return self.lm_head(x)  # (B, T, A)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention: RefeedMask | torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, A) of input_ids (B, T) at position_ids (B, T).

        ``attention``: None for plain causal attention (right padding only), else the re-feed
        mask, or its prepared form (:meth:`prepare_attention`).
        """
        return self._head(self.hidden_states(input_ids, position_ids, attention))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention: RefeedMask | torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        """The last block's output (B, T, C), before the final norm and the head.

        The representation of each state, for a features extractor (agents/sb3.py).
        """
        prepared = self.prepare_attention(attention)
        rotary = self._rotary(position_ids)
        x = self._embed(input_ids, position_ids)  # (B, T, C)
        for block in self.h:
            x = block(x, prepared, rotary)
        return x

    def forward_batch(self, batch: TrajectoryBatch) -> torch.Tensor:
        """Logits (B, T, A) of every row of a re-feed batch, in one pass.

        A batch without backspaces is plain causal attention and takes the fast path.
        """
        return self(batch.input_ids, batch.position_ids, batch.forward_attention)

    def init_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty cache of ``capacity`` positions, in the dtype and device of the weights."""
        if self.max_positions is not None and capacity > self.max_positions:
            raise ValueError(
                f"a cache of {capacity} positions exceeds context_length={self.max_positions}"
            )
        weight = self.wte.weight
        H = self.config.num_heads
        shape = (batch_size, H, capacity, self.config.width // H)  # (B, H, capacity, D)
        return KVCache(
            keys=[weight.new_zeros(shape) for _ in self.h],
            values=[weight.new_zeros(shape) for _ in self.h],
        )

    def decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """Feed (B, N) tokens at their positions through the cache; logits (B, N, A).

        Position p of row b writes cache slot p and attends to slots 0..p of its row.
        """
        num_slots, visible = cache_visibility(position_ids)  # visible: (B, N, S)
        visible = visible[:, None]  # (B, 1, N, S)
        rotary = self._rotary(position_ids)
        x = self._embed(input_ids, position_ids)  # (B, N, C)
        for layer, block in enumerate(self.h):
            layer_cache = (cache.keys[layer], cache.values[layer])
            x = block(x, visible, rotary, layer_cache, position_ids, num_slots)
        return self._head(x)
