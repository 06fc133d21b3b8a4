"""Shared fixtures: tiny seeded Llama models behind every DecoderLM implementation.

`MODEL_FACTORIES` lists the ways to turn a transformers model into a
`DecoderLM`; every fixture built on `lm_factory` runs once per entry, so a new
implementation is covered by the engine tests by adding one line here.

The draft of each pair is the target plus seeded weight noise: similar enough
that the target accepts many of its tokens, different enough that it rejects
some (tests/test_engine.py checks the acceptance rate lies in 0.3..0.9).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from chatapp.lm import DecoderLM, HFDecoderLM

# Tests assert CPU facts (float32, the kernels' labels, bit-exact kernels): on a machine with a GPU,
# device "auto" would pick CUDA. CUDA tests (marker `cuda`) place their models themselves.
os.environ.setdefault("SPECCHAT_MODEL_DEVICE", "cpu")
# The browser-state secret and the user's auth file live in the config folder: tests keep theirs apart.
os.environ.setdefault("SPECCHAT_CONFIG_DIR", tempfile.mkdtemp(prefix="specchat-test-config-"))
# Saved conversations and the desktop's instance lock live in the data folder: never the user's.
os.environ.setdefault("SPECCHAT_DATA_DIR", tempfile.mkdtemp(prefix="specchat-test-data-"))


def tiny_llama(vocab: int, *, seed: int = 0, max_positions: int = 96, init_std: float = 0.2):
    """A 2-layer Llama with seeded random weights (fp32, CPU, eval mode).

    init_std is far above the usual 0.02 so the logits are spread out: peaked
    distributions and no near-ties between the top tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def perturbed(model: torch.nn.Module, scale: float, *, seed: int = 1) -> torch.nn.Module:
    """A copy of `model` with seeded Gaussian noise of `scale` x each tensor's std added."""
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in noisy.parameters():
            spread = param.std() if param.numel() > 1 else param.abs()
            param.add_(torch.randn(param.shape, generator=generator) * scale * spread)
    return noisy


def _static_llama(hf_model) -> DecoderLM:
    # find_spec, not importorskip: once chatapp/llama.py exists, an error while
    # importing it must fail the tests, not skip them.
    if importlib.util.find_spec("chatapp.llama") is None:
        pytest.skip("chatapp.llama (LlamaDecoderLM) is not there yet")
    from chatapp.llama import LlamaDecoderLM

    return LlamaDecoderLM.from_hf(hf_model)


def _graph_llama(hf_model) -> DecoderLM:
    from chatapp.graph_llama import GraphLlamaLM

    return GraphLlamaLM.from_hf(hf_model)  # eager on CPU; tests/test_graph_llama.py compiles it


MODEL_FACTORIES: dict[str, Callable[[Any], DecoderLM]] = {
    "hf": HFDecoderLM,
    "llama": _static_llama,
    "graph": _graph_llama,
}


@dataclass(frozen=True)
class TinyModels:
    """A target, a similar-but-different draft, and an exact copy of the target
    as a draft, all wrapped by one factory; `target_hf` is the raw transformers
    target for reference computations (full prefix, no cache)."""

    target_hf: Any
    target: DecoderLM
    draft: DecoderLM
    same: DecoderLM
    vocab: int
    max_positions: int


@functools.cache
def _hf_pair(vocab: int, max_positions: int, noise: float):
    target = tiny_llama(vocab, seed=0, max_positions=max_positions)
    return target, perturbed(target, noise, seed=1)


def _wrap(factory, vocab: int, max_positions: int, noise: float) -> TinyModels:
    target_hf, draft_hf = _hf_pair(vocab, max_positions, noise)
    return TinyModels(
        target_hf=target_hf,
        target=factory(target_hf),
        draft=factory(draft_hf),
        same=factory(target_hf),
        vocab=vocab,
        max_positions=max_positions,
    )


@pytest.fixture(scope="session", params=list(MODEL_FACTORIES))
def lm_factory(request) -> Callable[[Any], DecoderLM]:
    """hf_model -> DecoderLM, once per implementation in MODEL_FACTORIES."""
    factory = MODEL_FACTORIES[request.param]
    factory(tiny_llama(8, max_positions=8))  # skips here if the implementation is absent
    return factory


CHAT = dict(vocab=64, max_positions=96, noise=0.06)
TINY_VOCAB = dict(vocab=8, max_positions=32, noise=0.3)


@pytest.fixture(scope="session")
def chat_models(lm_factory) -> TinyModels:
    """Vocabulary 64, context 96: for decoding, stopping and stats tests."""
    return _wrap(lm_factory, **CHAT)


@pytest.fixture(scope="session")
def tiny_vocab_models(lm_factory) -> TinyModels:
    """Vocabulary 8: small enough to enumerate the joint law of two tokens."""
    return _wrap(lm_factory, **TINY_VOCAB)


def hf_pair(sizes: dict):
    """(target, perturbed draft) transformers models of CHAT or TINY_VOCAB sizes."""
    return _hf_pair(sizes["vocab"], sizes["max_positions"], sizes["noise"])
