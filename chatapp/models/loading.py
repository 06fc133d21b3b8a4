"""Loading the target and the draft: [model] settings in, a ModelPair out.

Contract: `load_pair(model_settings)` resolves both specs (chatapp.models.specs),
checks the draft speaks the target's vocabulary (chatapp.models.tokenizers),
loads the weights (safetensors only; remote code only when
model.trust_remote_code is true) on the chosen device and dtype, checks both
models have an embedding row for every id the tokenizer produces, and returns
a `ModelPair`: a target and a draft `DecoderLM` sharing one tokenizer, both
capped at model.max_context, ready for chatapp.engine. Nothing here decodes
text or generates. Every failure is a one-line `ModelLoadError`.

Which decoder runs a model (`choose_decoder`):

    Llama family on CUDA            chatapp.graph_llama (static shapes, CUDA graphs)
    Llama family on CPU, kernels    chatapp.llama (batch-invariant CPU kernels)
    Llama family on CPU, no kernels chatapp.graph_llama, eager (exact by padded rows)
    any other architecture          HFDecoderLM (transformers, dynamic cache)

The draft: an empty model.draft means an INT8 copy of the target, built from
the target's own weights. model.draft_quantization:

    auto              int8-weight-only
    int8-weight-only  int8 weights in the activation dtype (Llama family only):
                      bitsandbytes' row-wise format on CUDA, our kernels on CPU
    bnb-int8          bitsandbytes LLM.int8 run by transformers (CUDA only):
                      int8 activations too, and slow at batch 1 (many small
                      kernels, a host sync per layer): for comparison only
    none              the draft in the target's dtype, for comparisons

On CUDA the HF model's layers are released as they are fused, so loading
peaks near the pair's own size; the graph decoders compile at load
(`prepare`), and the seconds it took are in info.extra["compile_s"].

For non-Llama models int8-weight-only is not available: asked for explicitly
it is a `ModelLoadError`; chosen by "auto" the draft runs unquantized
(float32) and its `ModelInfo` says so (quantization starts with "none",
extra["warning"] explains).
"""

from __future__ import annotations

import gc
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import graph_llama, llama
from ..errors import one_line, progress_to_stderr
from ..kernels import cpu_kernels
from ..lm import DecoderLM, HFDecoderLM, ModelInfo, count_weights
from .cache import Progress
from .errors import MESSAGE_LIMIT, ModelLoadError, load_error
from .specs import display_name, resolve_model
from .tokenizers import check_compatible, check_vocab_sizes, load_tokenizer

# transformers is imported inside the functions that use it: it takes seconds to import.

INT8 = "int8-weight-only"
BNB = "bnb-int8"
BNB_LABEL = "bitsandbytes LLM.int8: int8 weights and activations, fp16 outlier columns (slow at batch 1)"
GRAPH, KERNELS, HF = "graph", "kernels", "hf"  # the decoders choose_decoder picks from


@dataclass
class ModelPair:
    """What load_pair returns: two DecoderLMs over one vocabulary, and the target's tokenizer.
    `draft` is None only when load_pair(draft_fallback=True) could not load it; `draft_error` says why."""

    target: DecoderLM
    draft: DecoderLM | None
    tokenizer: Any
    compatibility: str
    load_s: float
    draft_error: str = ""


# --- devices, dtypes, quantization ------------------------------------------------


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device = cuda, but torch sees no CUDA GPU (CPU-only build or no driver)")
    return torch.device(setting)


def resolve_target_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _bnb_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("bitsandbytes", "accelerate"))


def resolve_draft_quantization(setting: str, device: torch.device) -> str:
    """'bnb-int8', 'int8-weight-only' or 'none' for this device."""
    if setting == "auto":
        return INT8
    if setting == BNB and device.type != "cuda":
        raise ModelLoadError("model.draft_quantization = bnb-int8 needs a CUDA GPU; use int8-weight-only on CPU")
    if setting == BNB and not _bnb_available():
        raise ModelLoadError("model.draft_quantization = bnb-int8 needs the bitsandbytes and accelerate packages")
    return setting


@dataclass
class _Plan:
    """The settings resolved against this machine."""

    device: torch.device
    dtype: torch.dtype
    quantization: str
    explicit_quantization: bool
    trust_remote_code: bool
    max_context: int


def _plan(settings) -> _Plan:
    device = resolve_device(settings.device)
    return _Plan(
        device=device,
        dtype=resolve_target_dtype(settings.target_dtype, device),
        quantization=resolve_draft_quantization(settings.draft_quantization, device),
        explicit_quantization=settings.draft_quantization != "auto",
        trust_remote_code=bool(settings.trust_remote_code),
        max_context=int(settings.max_context),
    )


# --- loading and wrapping -------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _load_hf(folder: Path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool, **extra):
    """A transformers causal LM from a folder, on `device`, safetensors only."""
    from transformers import AutoModelForCausalLM

    on_cuda_with_accelerate = device.type == "cuda" and importlib.util.find_spec("accelerate")
    placement = {"device_map": {"": device}} if on_cuda_with_accelerate else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **placement, **extra
        )
    except Exception as error:
        raise load_error(f"cannot load the model in {folder}: {type(error).__name__}: {error}") from None
    if not placement and "quantization_config" not in extra:
        model = model.to(device)
    return model.eval()


def _info(spec: str, model, device: torch.device, dtype: str, quantization: str = "none") -> ModelInfo:
    params, nbytes = count_weights(model)
    return ModelInfo(
        name=display_name(spec),
        source=spec,
        dtype=dtype,
        quantization=quantization,
        device=str(device),
        parameters=params,
        weight_bytes=nbytes,
    )


def choose_decoder(config, device: torch.device) -> str:
    """GRAPH, KERNELS or HF: which decoder runs a model of this config on this device."""
    if not llama.supports(config):
        return HF
    if device.type == "cpu" and cpu_kernels() is not None:
        return KERNELS
    return GRAPH


def _wrap(model, spec: str, device: torch.device, quantize: str | None) -> DecoderLM:
    """The model behind the DecoderLM interface, by choose_decoder. The graph decoder takes the
    HF model's layers as it goes (the caller must not use `model` afterwards)."""
    info = _info(spec, model, device, _dtype_name(next(model.parameters()).dtype))
    kind = choose_decoder(model.config, device)
    if kind == GRAPH:
        return graph_llama.GraphLlamaLM.from_hf(model, quantize=quantize, info=info, free_source=True)
    if kind == KERNELS:
        return llama.LlamaDecoderLM.from_hf(model, quantize=quantize, info=info)
    if quantize is not None:
        raise ModelLoadError(
            f"{quantize} quantization needs a Llama-family model; '{spec}' is {model.config.model_type}"
        )
    return HFDecoderLM(model, info=info)


def _unquantized_draft(model, spec: str, device: torch.device) -> DecoderLM:
    """Auto quantization of a model the int8 path cannot take: run it as it is, and say so."""
    draft = _wrap(model, spec, device, None)
    reason = (
        f"int8 weight-only needs a Llama-family model ({model.config.model_type} is not); the draft is not quantized"
    )
    draft.info.quantization = "none (" + reason + ")"
    draft.info.extra["warning"] = reason
    return draft


def _bnb_draft(folder: Path, spec: str, device: torch.device, trust: bool) -> DecoderLM:
    from transformers import BitsAndBytesConfig

    # float16, LLM.int8's own dtype: from bf16 bitsandbytes would warn of a cast on every call.
    dtype = torch.float16
    model = _load_hf(folder, dtype, device, trust, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    dtypes = f"int8 weights, int8 activations ({_dtype_name(dtype)} outliers)"
    return HFDecoderLM(model, info=_info(spec, model, device, dtypes, BNB_LABEL))


def _int8_draft(model, spec: str, device: torch.device, explicit: bool, progress: Progress) -> DecoderLM:
    if llama.supports(model.config):
        return _wrap(model, spec, device, INT8)
    if explicit:
        raise ModelLoadError(
            f"model.draft_quantization = int8-weight-only needs a Llama-family model; '{spec}' is "
            f"{model.config.model_type} (use none, or bnb-int8 on CUDA)"
        )
    draft = _unquantized_draft(model, spec, device)
    progress(f"warning: {draft.info.extra['warning']}")
    return draft


def _build_draft(
    plan: _Plan, spec: str, folder: Path, copy_of_target: bool, target_model, target: DecoderLM, progress: Progress
) -> DecoderLM:
    """The draft from `folder`. When it is a copy of the target, `target_model` is the target's HF
    model, or None once the graph decoder has taken its layers (the copy then comes from `target`)."""
    if plan.quantization == BNB:
        return _bnb_draft(folder, spec, plan.device, plan.trust_remote_code)
    if isinstance(target, graph_llama.GraphLlamaLM) and copy_of_target:
        return target.copy(int8=plan.quantization == INT8, info=ModelInfo(target.info.name, target.info.source))
    if plan.quantization == "none":
        if target_model is not None:
            return target  # the same weights in the same dtype: the target itself
        return _wrap(_load_hf(folder, plan.dtype, plan.device, plan.trust_remote_code), spec, plan.device, None)
    # The CPU kernels quantize from float32 weights; the graph decoder from the activation dtype.
    float32_source = plan.device.type == "cpu"
    model = target_model if target_model is not None and (plan.dtype == torch.float32 or not float32_source) else None
    if model is None:
        dtype = torch.float32 if float32_source else plan.dtype
        model = _load_hf(folder, dtype, plan.device, plan.trust_remote_code)
    return _int8_draft(model, spec, plan.device, plan.explicit_quantization, progress)


def _free() -> None:
    """Return the memory of dropped HF models (after the caller dropped its references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cap_context(lm: DecoderLM, max_context: int) -> None:
    lm.max_positions = min(int(lm.max_positions), max_context)


# --- the pair ---------------------------------------------------------------------------


def _draft_source(settings, target_spec: str, target_folder: Path, tokenizer, plan: _Plan, say: Progress):
    """(folder, spec, compatibility) of the draft; an empty spec means a copy of the target."""
    draft_spec = settings.draft.strip()
    if not draft_spec:
        return target_folder, target_spec, "compatible: the draft is a copy of the target (same tokenizer)"
    folder = resolve_model(draft_spec, say, trust_remote_code=plan.trust_remote_code)
    draft_tokenizer = load_tokenizer(folder, plan.trust_remote_code)
    return folder, draft_spec, check_compatible(tokenizer, draft_tokenizer, target_spec, draft_spec)


def _draft_failed(error: Exception, say: Progress) -> str:
    """The one line that says why the draft is missing; the memory it took is given back."""
    _free()
    why = f"the draft could not be loaded: {one_line(error, limit=MESSAGE_LIMIT)}"
    say(f"warning: {why}; standard decoding only")
    return why


def load_pair(model_settings, progress: Progress | None = None, *, draft_fallback: bool = False) -> ModelPair:
    """Load the target and the draft that `model_settings` ([model] settings) describe.

    A draft that cannot be loaded (not found, another vocabulary, too few embeddings, out of memory,
    ...) is an error, unless draft_fallback: then the pair has draft=None and draft_error says why,
    for a caller that can run standard decoding only (ChatService can). The target never falls back."""
    say = progress or progress_to_stderr("specchat")
    start = time.perf_counter()
    plan = _plan(model_settings)
    target_spec = model_settings.target.strip()
    target_folder = resolve_model(target_spec, say, trust_remote_code=plan.trust_remote_code)
    tokenizer = load_tokenizer(target_folder, plan.trust_remote_code)
    source, draft_error = None, ""
    try:
        source = _draft_source(model_settings, target_spec, target_folder, tokenizer, plan, say)
    except ModelLoadError as error:
        if not draft_fallback:
            raise
        draft_error = _draft_failed(error, say)
    say(f"loading {display_name(target_spec)} on {plan.device} in {_dtype_name(plan.dtype)}")
    target_model = _load_hf(target_folder, plan.dtype, plan.device, plan.trust_remote_code)
    target = _wrap(target_model, target_spec, plan.device, None)
    check_vocab_sizes(tokenizer, target.vocab_size, None, target_spec, "")
    copy_of_target = not model_settings.draft.strip()
    taken = isinstance(target, graph_llama.GraphLlamaLM)  # its layers now live in `target`
    copy_source = target_model if copy_of_target and not taken else None
    del target_model  # the wrappers keep only what they use
    draft = None
    if source is not None:
        draft_folder, draft_spec, compatibility = source
        say(f"preparing the draft ({plan.quantization})")
        try:
            draft = _build_draft(plan, draft_spec, draft_folder, copy_of_target, copy_source, target, say)
            check_vocab_sizes(tokenizer, target.vocab_size, draft.vocab_size, target_spec, draft_spec)
        except Exception as error:
            if not draft_fallback:
                raise
            draft, copy_source = None, None
            draft_error = _draft_failed(error, say)
    del copy_source
    _free()
    for lm in {id(target): target, id(draft): draft}.values():
        if lm is None:
            continue
        _cap_context(lm, plan.max_context)
        if isinstance(lm, graph_llama.GraphLlamaLM):
            lm.info.extra["compile_s"] = round(lm.prepare(say), 1)
    compatibility = source[2] if draft is not None else f"no draft: {draft_error}"
    return ModelPair(target, draft, tokenizer, compatibility, time.perf_counter() - start, draft_error)
