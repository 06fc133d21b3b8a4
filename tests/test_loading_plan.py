"""The loader's choices on a machine that reports CUDA (patched), and the graph decoder end to end on CPU.

No GPU here: the plan (device, dtype, quantization, decoder) is checked with
torch's CUDA queries patched, and the whole load runs on the CPU with the
kernels switched off, which takes the same graph-decoder path CUDA takes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from chatapp.engine import Generation
from chatapp.graph_llama import GraphLlamaLM
from chatapp.models import load_pair, loading
from tests.test_models import (  # noqa: F401  (the fixture of tiny model folders)
    model_settings,
    tiny,
    tok,  # noqa: F401
)


@pytest.fixture
def reports_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


LLAMA = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)
GPT2 = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)


def test_plan_on_a_cuda_machine(reports_cuda):
    plan = loading._plan(model_settings(device="auto"))
    assert plan.device.type == "cuda" and plan.dtype == torch.bfloat16
    # The INT8 draft is weight-only (bitsandbytes' format, compiled GEMV), not LLM.int8.
    assert plan.quantization == loading.INT8
    assert loading.choose_decoder(LLAMA, plan.device) == loading.GRAPH
    assert loading.choose_decoder(GPT2, plan.device) == loading.HF


def test_llm_int8_is_an_explicit_choice_labelled_as_such(reports_cuda, monkeypatch):
    monkeypatch.setattr(loading, "_bnb_available", lambda: True)
    plan = loading._plan(model_settings(device="cuda", draft_quantization="bnb-int8"))
    assert plan.quantization == loading.BNB
    assert "activations" in loading.BNB_LABEL and "slow at batch 1" in loading.BNB_LABEL


def test_decoder_on_cpu_follows_the_kernels(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(loading, "cpu_kernels", lambda: object())
    assert loading.choose_decoder(LLAMA, cpu) == loading.KERNELS
    monkeypatch.setattr(loading, "cpu_kernels", lambda: None)
    assert loading.choose_decoder(LLAMA, cpu) == loading.GRAPH  # exact torch path, not the dynamic one


def test_graph_pair_loads_and_decodes_exactly(tiny, monkeypatch):  # noqa: F811
    monkeypatch.setattr(loading, "cpu_kernels", lambda: None)
    pair = load_pair(model_settings(target=str(tiny.llama), device="cpu"), progress=lambda m: None)
    target, draft = pair.target, pair.draft
    assert isinstance(target, GraphLlamaLM) and isinstance(draft, GraphLlamaLM)
    assert draft.origin == target.origin and draft.model is not target.model
    assert draft.info.dtype == "int8 weights, float32 activations"
    assert "bitsandbytes row-wise absmax" in draft.info.quantization
    assert "compile_s" in target.info.extra and target.capacity >= target.max_positions
    prompt = [1, 5, 9, 13, 7]
    standard = Generation(target, None, prompt, mode="standard", max_new_tokens=20).run()
    spec = Generation(target, draft, prompt, mode="speculative", k=4, max_new_tokens=20)
    assert [t.id for t in spec.run()] == [t.id for t in standard]
    assert spec.stats.draft_prefill == "copied from the target"


def test_graph_pair_without_quantization_keeps_its_own_cache(tiny, monkeypatch):  # noqa: F811
    monkeypatch.setattr(loading, "cpu_kernels", lambda: None)
    pair = load_pair(model_settings(target=str(tiny.llama), device="cpu", draft_quantization="none"), lambda m: None)
    assert pair.draft is not pair.target and pair.draft.model.keys is not pair.target.model.keys
    gen = Generation(pair.target, pair.draft, [1, 5, 9], k=3, max_new_tokens=12)
    gen.run()
    assert gen.stats.acceptance_rate == 1.0  # the same weights accept everything
