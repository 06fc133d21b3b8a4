"""The model interface the engine decodes with, and its generic implementation.

A `DecoderLM` maps token ids written at explicit positions to logits:

    cache = lm.new_cache(capacity)
    logits = lm.forward(ids, start, cache)   # [len(ids), vocab] float32

`forward` writes the keys/values of `ids` at positions start .. start+n-1 and
attends to everything before them.  Calling it with a `start` below what the
cache already holds discards the tail past `start` -- that is how the engine
rolls back rejected draft tokens, with no separate "crop" call.

A target may offer `resume_cache(cache, capacity)`: a cache kept from an
earlier generation, handed to the next (or None when it no longer holds what
it held), so a conversation's next reply prefills only its new tokens.

A draft may also offer `copy_cache_prefix(cache, source, source_cache, n)`:
fill its cache's first n positions from another model's cache instead of a
prefill, returning False when it cannot take that model's keys/values.
`LlamaDecoderLM` takes them from the model it was built from (the int8 draft
from its target); the engine asks before every draft prefill.

`HFDecoderLM` wraps any transformers causal LM (dynamic cache, cropped on
rollback).  `logits=False` skips the LM head (prefill needs only the cache).
`chatapp.llama.LlamaDecoderLM` is the fast static-cache path for
Llama-family models.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class ModelInfo:
    """What the UI and stats say about a loaded model."""

    name: str
    source: str = ""
    dtype: str = ""
    quantization: str = "none"  # e.g. "int8 weight-only per-channel (...)"
    device: str = "cpu"
    parameters: int = 0
    weight_bytes: int = 0
    implementation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class DecoderLM(Protocol):
    vocab_size: int
    max_positions: int
    device: torch.device
    info: ModelInfo

    def new_cache(self, capacity: int) -> Any: ...

    def forward(self, ids: Sequence[int], start: int, cache: Any, *, logits: bool = True) -> torch.Tensor | None: ...


# HF model object -> an id of its weights. Weak keys: a copy (copy.deepcopy,
# a perturbed draft) is a new object and gets its own id.
_ORIGINS: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()
_ORIGIN_COUNTER = itertools.count()


def weights_origin(hf_model: torch.nn.Module) -> int:
    """One id per loaded model object: decoders built from the same object (a
    target and its INT8 copy) hold comparable keys and values."""
    return _ORIGINS.setdefault(hf_model, next(_ORIGIN_COUNTER))


def as_id_tensor(ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.to(device=device, dtype=torch.long).view(-1)
    return torch.tensor(list(ids), dtype=torch.long, device=device)


def count_weights(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of a module's parameters and buffers, tied weights once."""
    seen: set[int] = set()
    params = nbytes = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        nbytes += tensor.numel() * tensor.element_size()
        if tensor.is_floating_point() or tensor.dtype == torch.int8:
            params += tensor.numel()
    return params, nbytes


class HFDecoderLM:
    """Any transformers causal LM behind the DecoderLM interface."""

    def __init__(self, model: torch.nn.Module, info: ModelInfo | None = None):
        from transformers import DynamicCache  # noqa: F401  (fails early if absent)

        self.model = model.eval()
        config = model.config
        self.vocab_size = int(config.vocab_size)
        self.max_positions = int(getattr(config, "max_position_embeddings", 1 << 30))
        self.device = next(model.parameters()).device
        if info is None:
            params, nbytes = count_weights(model)
            info = ModelInfo(
                name=getattr(config, "_name_or_path", "") or type(model).__name__,
                dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                device=str(self.device),
                parameters=params,
                weight_bytes=nbytes,
            )
        info.implementation = info.implementation or "transformers (dynamic KV cache)"
        self.info = info

    def new_cache(self, capacity: int):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def resume_cache(self, cache, capacity: int):
        """A dynamic cache of an earlier generation: forward() crops it to where the next one starts."""
        from transformers import DynamicCache

        return cache if isinstance(cache, DynamicCache) else None

    @torch.inference_mode()
    def forward(self, ids, start: int, cache, *, logits: bool = True) -> torch.Tensor | None:
        held = cache.get_seq_length()
        if start > held:
            raise ValueError(f"forward at position {start} but the cache holds only {held}")
        if start < held:
            cache.crop(start - held)  # transformers 5: a negative count removes that many
        input_ids = as_id_tensor(ids, self.device).view(1, -1)
        positions = torch.arange(start, start + input_ids.shape[1], device=self.device).view(1, -1)
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if logits else 1,
        )
        return out.logits[0].float() if logits else None
