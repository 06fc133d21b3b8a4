"""Model specs: what the user writes in model.target / model.draft, as a folder.

Contract: `resolve_model(spec)` returns a transformers folder (config.json,
*.safetensors, tokenizer files) for one of

    "embedded:smollm2-135m-instruct"  the embedded model (chatapp.models.gguf)
    "/path/to/folder"                 a transformers folder, used where it is
    "/path/to/model.gguf"             a GGUF file, converted once into the cache
    "org/name"                        a Hugging Face hub repository (weights as
                                      safetensors only; *.py only when
                                      trust_remote_code is true)

and `display_name(spec)` a short name for the UI. Every failure is a one-line
`ModelLoadError`. Nothing here loads weights or tokenizers.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import progress_to_stderr
from .cache import Progress
from .errors import ModelLoadError
from .gguf import EMBEDDED, EMBEDDED_NAME, convert_gguf_cached, ensure_embedded_model

# huggingface_hub is imported inside the functions that use it: only hub ids need it.

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]
_HUB_SKIP = ["consolidated*", "original/*"]  # second copies of the weights in other layouts


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
    say = progress or progress_to_stderr("specchat")
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
            return convert_gguf_cached(path, say)
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
