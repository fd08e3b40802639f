"""The policy interface (:class:`agents.interface.PolicyModel`) over a transformers causal LM.

Works with GPT-2 and Llama-style models, loaded from a local folder or a GGUF file
(:func:`load_hf`; nothing is downloaded) or built from a config (:meth:`HFPolicy.from_config`).
Fine-tuning is full or LoRA (:meth:`HFPolicy.enable_lora`, through ``peft``), with the new
``<bkspc>`` rows trainable either way (:class:`BackspaceRows`); checkpoints hold the weights or
the adapters (:func:`save_payload`), and :func:`export_pretrained` merges them into a plain
transformers folder. The vocabulary is the
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

import functools
import importlib
import inspect
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agents.collate import RefeedMask, TrajectoryBatch
from agents.models.interface import cache_visibility
from seqenv.vocab import PretrainedVocab, SpecialIds, VocabularyError

try:
    from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
    from transformers.cache_utils import Cache
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "agents.models.hf needs the `transformers` package: pip install 'seqmatch[hf]'"
    ) from err


class HFVocab(PretrainedVocab):
    """The vocabulary of a transformers tokenizer, with ``<bkspc>`` and pad appended.

    Layout: the tokenizer's ids ``0 .. len(tokenizer)-1`` (its eos among them is ``<eos>``), then
    ``backspace_id = len(tokenizer)``, then ``pad_id = len(tokenizer) + 1``. It is the
    :class:`seqenv.vocab.PretrainedVocab` of the tokenizer's ``tokenizers`` backend, so tasks,
    environments and checkpoints built on either agree on every id.
    """

    def __init__(self, tokenizer: Any) -> None:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise VocabularyError("the tokenizer has no eos token, which <eos> needs")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise VocabularyError("a fast (tokenizers-backed) tokenizer is needed")
        super().__init__(backend.to_str(), int(eos))
        if self.backspace_id != len(tokenizer):
            raise VocabularyError(
                f"the tokenizer has {len(tokenizer)} tokens but its backend {self.backspace_id}"
            )
        self.hf_tokenizer = tokenizer


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters of a fine-tuning run.

    Attributes:
        r: rank of the adapters (> 0).
        alpha: scale numerator; the update is ``alpha / r * B @ A``.
        dropout: dropout on the adapters' input.
        target_modules: names of the linear layers to adapt; empty: the family's default
            (:func:`default_lora_targets`).
    """

    r: int
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


# Every projection of attention and MLP: the QLoRA recipe the paper follows.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
# Families that name their layers as Llama does.
for _family in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite"):
    LORA_TARGETS[_family] = LORA_TARGETS["llama"]


def default_lora_targets(config: PretrainedConfig) -> list[str]:
    """The layers LoRA adapts by default in a model family (all projections)."""
    family = getattr(config, "model_type", "")
    if family not in LORA_TARGETS:
        raise ValueError(
            f"no default LoRA target modules for model type {family!r}; known: "
            f"{', '.join(sorted(LORA_TARGETS))}"
        )
    return list(LORA_TARGETS[family])


def _tied(model: Any) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


@torch.no_grad()
def _init_mean_row(model: Any, row: int) -> None:
    """Set embedding and output row ``row`` to the mean of the rows before it."""
    embedding = model.get_input_embeddings().weight
    embedding[row] = embedding[:row].float().mean(0).to(embedding.dtype)
    head = model.get_output_embeddings()
    if head is not None and not _tied(model):
        head.weight[row] = head.weight[:row].float().mean(0).to(head.weight.dtype)
        if getattr(head, "bias", None) is not None:
            head.bias[row] = head.bias[:row].float().mean().to(head.bias.dtype)


class BackspaceRows(nn.Module):
    """The ``<bkspc>`` embedding and output rows as parameters of their own, for LoRA runs.

    Under LoRA the embedding and the output head are frozen, yet their ``<bkspc>`` rows are new
    and must learn. Forward hooks put :attr:`embedding` where the input is ``<bkspc>`` and
    compute the ``<bkspc>`` logit from :attr:`head`; the frozen rows are never read. A model
    whose head is tied to its embedding gets one parameter, used for both, as in the model.

    Args:
        model: the (adapted) causal LM; its rows ``backspace_id`` initialise the parameters.
        backspace_id: the id of ``<bkspc>``, the last row of embedding and head.
    """

    def __init__(self, model: Any, backspace_id: int) -> None:
        super().__init__()
        embedding = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if head is None or embedding.weight.shape[0] != backspace_id + 1:
            raise ValueError("<bkspc> must be the last row of the embedding and the output head")
        self.backspace_id = backspace_id
        self.tied = _tied(model)
        self.embedding = nn.Parameter(embedding.weight[backspace_id].detach().clone().float())
        self.head = (
            None if self.tied else nn.Parameter(head.weight[backspace_id].detach().clone().float())
        )
        self.bias = None
        if getattr(head, "bias", None) is not None:
            self.bias = nn.Parameter(head.bias[backspace_id].detach().clone().float())
        embedding.register_forward_hook(self._embed_hook)
        head.register_forward_hook(self._head_hook)

    def _embed_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        is_backspace = (args[0] == self.backspace_id)[..., None]  # (B, T, 1)
        return torch.where(is_backspace, self.embedding.to(output.dtype), output)

    def _head_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        hidden = args[0]  # (B, T, C)
        row = self.embedding if self.head is None else self.head
        logit = hidden @ row.to(hidden.dtype)  # (B, T)
        if self.bias is not None:
            logit = logit + self.bias.to(logit.dtype)
        return torch.cat([output[..., : self.backspace_id], logit[..., None].to(output.dtype)], -1)

    @torch.no_grad()
    def write_into(self, model: Any) -> None:
        """Copy the trained rows into ``model``'s embedding and head (for a merged export)."""
        b = self.backspace_id
        embedding = model.get_input_embeddings().weight
        embedding[b] = self.embedding.to(embedding.dtype)
        head = model.get_output_embeddings()
        if self.head is not None:
            head.weight[b] = self.head.to(head.weight.dtype)
        if self.bias is not None:
            head.bias[b] = self.bias.to(head.bias.dtype)


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
        """Write this layer's keys and values at ``slots``; return the first ``num_slots``."""
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
        """The number of slots the current decode step reads."""
        return self.num_slots

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (1-D int64), in that order."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.num_rows = int(index.numel())


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
            for ``<bkspc>``, initialised at the mean input embedding and at the mean output row
            (a neutral start: its logit begins near the average token's), unless
            ``has_backspace`` says they hold it already. ``<eos>`` is the model's own.
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
            # One new row for <bkspc> (rows beyond the tokenizer's, if any, are dropped),
            # initialised at the mean input embedding and the mean output row.
            self.model.resize_token_embeddings(num_tokens + 1, mean_resizing=False)
            _init_mean_row(self.model, num_tokens)
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
        self.lora: LoraSettings | None = None
        self.backspace_rows: BackspaceRows | None = None
        self.base_path: str | None = None  # where the pretrained weights came from
        self.tokenizer: Any = None  # the transformers tokenizer, saved with checkpoints

    def enable_lora(self, settings: LoraSettings) -> None:
        """Freeze the model and add LoRA adapters (``peft``) to ``settings.target_modules``.

        The ``<bkspc>`` rows stay trainable as two small parameters (one for a model whose
        output head is tied to its embedding), see :class:`BackspaceRows`.
        """
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError("LoRA needs the `peft` package: pip install 'seqmatch[hf]'") from err
        targets = list(settings.target_modules) or default_lora_targets(self.model.config)
        self.lora = LoraSettings(settings.r, settings.alpha, settings.dropout, tuple(targets))
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=targets,
            bias="none",
            # GPT-2's Conv1D layers store their weights transposed.
            fan_in_fan_out=self.model.config.model_type == "gpt2",
        )
        with warnings.catch_warnings():  # peft asks transformers for a renamed attribute
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            self.model = get_peft_model(self.model, config)
        self.backspace_rows = BackspaceRows(self.model, self.special.backspace_id)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint must hold.

        Every weight without LoRA, else the adapters and the ``<bkspc>`` rows (the frozen base
        is reloaded from ``base_path``).
        """
        if self.lora is None:
            return {k: v.detach() for k, v in self.state_dict().items()}
        return {k: p.detach() for k, p in self.named_parameters() if p.requires_grad}

    def merged_model(self) -> Any:
        """The plain transformers model, adapters merged and ``<bkspc>`` rows written in.

        Changes this policy (its adapters are merged away): use it to export, then discard.
        """
        model = self.model
        if self.lora is not None:
            model = model.merge_and_unload()
        if self.backspace_rows is not None:
            self.backspace_rows.write_into(model)
        return model

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
        """The model's ``max_position_embeddings``; None where its config has none."""
        value = getattr(self.model.config, "max_position_embeddings", None)
        return None if value is None else int(value)

    def _model_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Pad has no row in the model: feed eos there (pad rows are never read)."""
        return input_ids.masked_fill(input_ids == self.special.pad_id, self.special.eos_id)

    def _dtype(self) -> torch.dtype:
        """The dtype of the attention scores: autocast's when it is on, else the weights'."""
        device = self.model.get_input_embeddings().weight.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
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
        """An empty :class:`SlotCache` of ``capacity`` positions per row."""
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
"""Files of which a model folder needs one: the tokenizer (its vocabulary is the task's)."""
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelFolderError(ValueError):
    """A ``--model`` folder or file that cannot be loaded; the message names the file."""


def _model_source(path: Path, weights: bool = True) -> tuple[Path, dict[str, Any]]:
    """(folder, extra from_pretrained arguments) of a model folder or GGUF file, checked.

    A folder must hold config.json, a tokenizer and (with ``weights``) the weights: each missing
    part is named in one line, before transformers reads anything.
    """
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder or .gguf file")
    fix = "--model takes a folder written by save_pretrained (model and tokenizer) or a .gguf file"
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"{path}: no config.json, not a transformers model folder; {fix}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(
            f"{path}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the tokenizer beside "
            "the model (tokenizer.save_pretrained)"
        )
    if weights and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelFolderError(f"{path}: no weights ({' or '.join(WEIGHT_FILES[:2])}); {fix}")
    return path, {}


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines[:2]) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _loading(what: Path, load: Any, *args: Any, **kwargs: Any) -> Any:
    """``load(*args, **kwargs)``; any failure as one ModelFolderError line naming ``what``.

    transformers raises many kinds (OSError, ValueError, TypeError, its own validation errors,
    safetensors' SafetensorError) with messages many lines long.
    """
    try:
        return load(*args, **kwargs)
    except (MemoryError, ImportError):
        raise
    except Exception as err:  # every loader failure here is a bad model file
        raise ModelFolderError(
            f"{what} cannot be loaded ({type(err).__name__}: {_first_line(err)}); save the model "
            "again, or point --model at a complete copy"
        ) from None


def _weights_file(folder: Path, extra: dict[str, Any]) -> Path:
    if "gguf_file" in extra:
        return folder / extra["gguf_file"]
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), folder)


def _from_pretrained(path: Path, **kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of a local folder or a GGUF file (dequantised by transformers).

    Config, tokenizer and weights are read one after the other, so that a failure names the
    file it comes from.
    """
    folder, extra = _model_source(path)
    config = _load_config(folder, extra)
    tokenizer = _load_tokenizer(folder, extra)
    with _gguf_bar_follows_switch(gguf=bool(extra)):
        model = _loading(
            _weights_file(folder, extra),
            AutoModelForCausalLM.from_pretrained,
            folder,
            config=config,
            local_files_only=True,
            **extra,
            **kwargs,
        )
    return model, tokenizer


@contextmanager
def _gguf_bar_follows_switch(gguf: bool) -> Iterator[None]:
    """Within: the GGUF loader's bar is off when transformers' progress bars are (--no-progress).

    Its "Converting and de-quantizing GGUF tensors" bar calls tqdm itself, past
    ``transformers.utils.logging.disable_progress_bar``. Should the loader stop calling tqdm by
    that name, nothing is changed.
    """
    from transformers.utils import logging as hf_logging

    if not gguf or hf_logging.is_progress_bar_enabled():
        yield
        return
    loader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(loader, "tqdm", None)
    if bar is None:
        yield
        return
    setattr(loader, "tqdm", functools.partial(bar, disable=True))  # noqa: B010
    try:
        yield
    finally:
        setattr(loader, "tqdm", bar)  # noqa: B010


def _load_config(folder: Path, extra: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    what = folder / extra["gguf_file"] if extra else folder / "config.json"
    return _loading(what, AutoConfig.from_pretrained, folder, local_files_only=True, **extra)


def _load_tokenizer(folder: Path, extra: dict[str, Any]) -> Any:
    if extra:
        what = folder / extra["gguf_file"]
    else:
        what = next(folder / n for n in TOKENIZER_FILES if (folder / n).is_file())
    return _loading(what, AutoTokenizer.from_pretrained, folder, local_files_only=True, **extra)


def load_hf(
    path: str | Path,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[HFPolicy, HFVocab]:
    """Load a causal LM and its tokenizer from a local folder or GGUF file (never the network).

    A GGUF file (``model.Q4_1.gguf``) is dequantised by transformers' GGUF loader (needs the
    ``gguf`` package); its tokenizer comes from the same file. A folder that this project saved
    with ``<bkspc>`` already in the model is recognised by a ``seqmatch.json`` file beside the
    weights holding ``{"has_backspace": true}``. Otherwise ``<bkspc>`` gets a new embedding and
    output row, initialised at the mean embedding and the mean output row.
    """
    path = Path(path).expanduser()
    model, tokenizer = _from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    vocab = HFVocab(tokenizer)
    marker = path / "seqmatch.json"
    has_backspace = marker.exists() and bool(json.loads(marker.read_text()).get("has_backspace"))
    policy = HFPolicy(model, vocab.eos_id, num_tokens=len(tokenizer), has_backspace=has_backspace)
    policy.base_path = str(path.resolve())
    policy.tokenizer = tokenizer
    return policy, vocab


def load_hf_vocab(path: str | Path) -> HFVocab:
    """The vocabulary of a model folder or GGUF file (reads the tokenizer only)."""
    path = Path(path).expanduser()
    folder, extra = _model_source(path)
    _load_config(folder, extra)  # a bad config.json is named as such, not as the tokenizer
    return HFVocab(_load_tokenizer(folder, extra))


# --------------------------------------------------------------------------------------------
# Checkpoint payload and export

PAYLOAD_FOLDER = "hf"  # in a checkpoint: the model's config.json and the tokenizer's files


def save_payload(policy: HFPolicy, folder: Path) -> dict[str, Any]:
    """Write a pretrained LM's payload into a checkpoint folder.

    Writes ``model.safetensors`` (all weights, or adapters and ``<bkspc>`` rows) and ``hf/``
    (config and tokenizer); returns the metadata that reloads them.
    """
    from safetensors.torch import save_file

    if policy.lora is None:
        from safetensors.torch import save_model

        save_model(policy, str(folder / "model.safetensors"))  # tied weights stored once
    else:
        tensors = {k: v.cpu().contiguous() for k, v in policy.trainable_state().items()}
        save_file(tensors, str(folder / "model.safetensors"))
    hf = folder / PAYLOAD_FOLDER
    hf.mkdir(exist_ok=True)
    base = policy.model.get_base_model() if policy.lora is not None else policy.model
    base.config.save_pretrained(hf)
    if policy.tokenizer is not None:
        policy.tokenizer.save_pretrained(hf)
    return payload_metadata(policy)


def payload_metadata(policy: HFPolicy) -> dict[str, Any]:
    """What :func:`payload_policy` needs besides the files (stored in ``checkpoint.json``)."""
    lora = policy.lora
    return {
        "kind": "hf",
        "base": policy.base_path,
        "num_tokens": policy.special.backspace_id,
        "eos_id": policy.special.eos_id,
        "lora": None
        if lora is None
        else {
            "r": lora.r,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": list(lora.target_modules),
        },
    }


def payload_policy(folder: Path, metadata: dict[str, Any]) -> HFPolicy:
    """The policy of a checkpoint written by :func:`save_payload`, before its weights are read.

    Full weights rebuild the model from ``hf/config.json`` alone; adapters need the pretrained
    model they were trained on, at ``metadata["base"]``. The checkpoint module then loads
    ``model.safetensors`` into it (every weight, or the adapters and the ``<bkspc>`` rows).

    Raises:
        ValueError: the base model of the adapters is gone or has another vocabulary.
    """
    from transformers import AutoConfig

    num_tokens, eos = int(metadata["num_tokens"]), int(metadata["eos_id"])
    lora = metadata.get("lora")
    hf = folder / PAYLOAD_FOLDER
    tokenizer = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    if lora is None:
        config = AutoConfig.from_pretrained(hf, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        policy = HFPolicy(model, eos, num_tokens=num_tokens, has_backspace=True)
    else:
        base = metadata.get("base")
        if not base or not Path(base).exists():
            raise ValueError(
                f"{folder}: the LoRA adapters need their base model, {base}, which is not there"
            )
        policy, _ = load_hf(base)
        if policy.special.backspace_id != num_tokens or policy.special.eos_id != eos:
            raise ValueError(f"{folder}: the base model {base} has a different vocabulary")
        policy.enable_lora(
            LoraSettings(lora["r"], lora["alpha"], lora["dropout"], tuple(lora["target_modules"]))
        )
    policy.base_path = metadata.get("base")
    policy.tokenizer = tokenizer
    return policy


def export_pretrained(policy: HFPolicy, out: str | Path) -> Path:
    """Save ``policy`` as a plain transformers folder.

    Adapters merged, ``<bkspc>`` the last row of embedding and head, the tokenizer beside it,
    and ``seqmatch.json`` marking the row (so :func:`load_hf` and ``--model`` read it back
    without adding another).

    Changes ``policy`` (its adapters are merged): call it last.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = policy.merged_model()
    model.save_pretrained(out)
    if policy.tokenizer is not None:
        policy.tokenizer.save_pretrained(out)
    marker = {"has_backspace": True, "backspace_id": policy.special.backspace_id}
    (out / "seqmatch.json").write_text(json.dumps(marker, indent=1) + "\n")
    return out
