"""The models a bench runs, and the transformers baselines it compares with.

Contract: `load_models(settings, options, progress)` loads our pair exactly
as the app does (models.load_pair) and, only when an hf mode is selected,
the transformers models those modes need, into one `Models`. `run_hf` runs
one reply with transformers `generate()` ("hf-generate") or assisted
generation ("hf-assisted", transformers' own draft-length defaults) and
returns its measurements. For an int8 draft the assistant is a float copy of
its source model fake-quantized to int8 per output row (`fake_quantize_int8`),
so both sides decode with the same numbers. Knows nothing about our engine's
runs, summaries or reports.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from ..engine import clock
from ..llama import quantize_int8
from ..lm import HFDecoderLM
from ..models import Progress, load_pair, resolve_model, resolve_target_dtype, stop_token_ids
from .machine import peak_cuda_bytes, peak_rss_bytes
from .options import HF_MODES, Options


@dataclass
class Models:
    """What the bench runs: our pair, and (for the hf modes) transformers models."""

    target: Any
    draft: Any
    stop_ids: tuple[int, ...] = ()
    hf_target: Any = None  # transformers model of the target (hf-generate, hf-assisted)
    hf_draft: Any = None  # transformers assistant (hf-assisted)
    hf_draft_note: str = ""
    pad_id: int | None = None
    descriptions: dict = field(default_factory=dict)
    tokenizer: Any = None
    peak_rss_pair_bytes: int | None = None
    peak_cuda_pair_bytes: int | None = None
    load_s: float = 0.0


def fake_quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """In place: every Linear and embedding weight -> int8 per output row, dequantized.

    The same rounding as chatapp.llama.quantize_int8, which our int8 draft uses
    for each matrix (fused QKV and gate/up rows are quantized row by row, so
    quantizing the separate projections gives the same values). Tied weights
    are quantized once.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                continue
            weight = module.weight
            if weight.data_ptr() in seen or weight.dim() != 2:
                continue
            seen.add(weight.data_ptr())
            q, scale = quantize_int8(weight.detach())
            weight.copy_((q.float() * scale[:, None]).to(weight.dtype))
    return model


def load_models(settings, options: Options, progress: Progress) -> Models:
    """Our pair (load_pair), plus the transformers models the hf modes need."""
    start = time.perf_counter()
    pair = load_pair(settings.model, progress=progress)
    device = pair.target.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tokenizer = pair.tokenizer
    models = Models(
        target=pair.target,
        draft=pair.draft,
        stop_ids=tuple(stop_token_ids(tokenizer)),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        descriptions={
            "target": dict(vars(pair.target.info)),
            "draft": dict(vars(pair.draft.info)),
            "compatibility": pair.compatibility,
        },
        tokenizer=tokenizer,
        peak_rss_pair_bytes=peak_rss_bytes(),
        peak_cuda_pair_bytes=peak_cuda_bytes(device),
    )
    if any(m in options.modes for m in HF_MODES):
        models.hf_target = _hf_target(settings, pair, progress)
        if "hf-assisted" in options.modes:
            models.hf_draft, models.hf_draft_note = _hf_assistant(settings, pair, models.hf_target, progress)
    models.load_s = time.perf_counter() - start
    return models


def _load_hf_model(folder, dtype: torch.dtype, device: torch.device, trust: bool):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust)
    return model.to(device).eval()


def _hf_target(settings, pair, progress: Progress):
    """The target as a transformers model: the pair's own when it is one, else loaded from its source."""
    if isinstance(pair.target, HFDecoderLM):
        return pair.target.model
    device = pair.target.device
    trust = bool(settings.model.trust_remote_code)
    dtype = resolve_target_dtype(settings.model.target_dtype, device)
    folder = resolve_model(settings.model.target, progress, trust_remote_code=trust)
    progress("loading the target's transformers model for the hf modes")
    return _load_hf_model(folder, dtype, device, trust)


def _hf_assistant(settings, pair, hf_target, progress: Progress):
    """The transformers assistant for hf-assisted, and a sentence saying what it is."""
    if isinstance(pair.draft, HFDecoderLM):
        return pair.draft.model, f"the pair's own draft model ({pair.draft.info.quantization})"
    device = pair.target.device
    draft_spec = settings.model.draft.strip()
    int8 = pair.draft.info.quantization.startswith("int8")
    needs_fp32 = int8 or next(hf_target.parameters()).dtype != torch.float32
    if draft_spec or needs_fp32:
        trust = bool(settings.model.trust_remote_code)
        folder = resolve_model(draft_spec or settings.model.target, progress, trust_remote_code=trust)
        source = _load_hf_model(folder, torch.float32, device, trust)
    else:
        source = copy.deepcopy(hf_target)
    if int8:
        progress("fake-quantizing an HF copy of the draft to int8 per output row for hf-assisted")
        return fake_quantize_int8(source), (
            "a transformers float32 copy of the draft's source model with every Linear and embedding weight "
            "fake-quantized to int8 per output row (dequantized fp32 values: the numerics of our int8 draft, "
            "run by transformers at fp32 speed)"
        )
    return source, "a transformers copy of the draft's source model (unquantized, like our draft)"


def hf_generate_kwargs(models: Models, temperature: float, options: Options, max_new_tokens: int) -> dict:
    """generate() arguments matching our engine's sampling: stop ids, top-k off when 0, no other processors."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": list(models.stop_ids) or None,
        "pad_token_id": models.pad_id,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=options.top_k, top_p=options.top_p)
    return kwargs


def run_hf(
    models: Models,
    mode: str,
    temperature: float,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    seed: int,
    options: Options,
) -> dict:
    """One reply of hf-generate or hf-assisted from fresh caches: new tokens, wall seconds, token ids."""
    model = models.hf_target
    if model is None:
        raise ValueError(f"{mode} needs the target's transformers model")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    kwargs = hf_generate_kwargs(models, temperature, options, max_new_tokens)
    if mode == "hf-assisted":
        if models.hf_draft is None:
            raise ValueError("hf-assisted needs a transformers assistant model")
        kwargs["assistant_model"] = models.hf_draft
    torch.manual_seed(seed)
    start = clock(device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    wall = clock(device) - start
    new = out[0, ids.shape[1] :].tolist()
    return {"new_tokens": len(new), "wall_s": wall, "token_ids": new, "k_choice": None}


def hf_assisted_defaults() -> dict:
    """transformers' default assisted-generation parameters (what hf-assisted runs with)."""
    try:
        defaults = GenerationConfig()._get_default_generation_params()
    except Exception:  # a private helper of transformers: another version may lack it; only a report line
        return {}
    keys = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    return {k: defaults.get(k) for k in keys}
