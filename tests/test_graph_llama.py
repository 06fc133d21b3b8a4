"""Tests of chatapp.graph_llama, the static-shape decoder for CUDA, as far as a CPU allows.

The engine tests (tests/test_engine.py) already run every decoding test on it
through conftest's "graph" factory (eager). Here:
* padded rows: a real row's logits are bit-identical whatever the other rows
  hold and wherever the row sits, in bf16;
* compiled (traced with fullgraph=True, so a graph break fails) gives the same
  tokens as eager and as the kernels' decoder;
* the bitsandbytes-format INT8 matmul equals dequantize-then-matmul, and our
  quantizer equals bitsandbytes' own;
* the INT8 copy takes the target's prompt keys/values, and stale caches are refused;
* on a machine with CUDA (marker `cuda`), the same checks on the GPU with CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch

from chatapp.engine import Generation
from chatapp.graph_llama import INT8, TARGET_ROWS, GraphLlamaLM, Linear, quantize_rowwise
from chatapp.llama import LlamaDecoderLM
from tests.conftest import tiny_llama

PROMPT = [5, 17, 42, 8, 23, 9, 31]


@pytest.fixture(scope="module")
def hf():
    return tiny_llama(64, max_positions=96)


def greedy(target, draft, prompt=PROMPT, mode="speculative", k=4, n=24) -> list[int]:
    return [t.id for t in Generation(target, draft, prompt, mode=mode, k=k, max_new_tokens=n).run()]


def row_logits(lm: GraphLlamaLM, tokens: list[int], start: int, row: int) -> torch.Tensor:
    cache = lm.new_cache(96)
    lm.forward(PROMPT, 0, cache, logits=False)
    return lm.forward(tokens, start, cache)[row]


def test_padded_rows_are_bit_identical_in_bf16(hf):
    lm = GraphLlamaLM.from_hf(hf, dtype=torch.bfloat16)
    assert lm.rows == (TARGET_ROWS,) and lm.dtype == torch.bfloat16
    n = len(PROMPT)
    alone = row_logits(lm, [3], n, 0)  # a standard step: 1 real row, 16 padding rows
    for others in ([3, 7, 11], [3, 60, 2, 2, 2, 9, 14, 1]):  # a verify: the same token first, others after
        assert torch.equal(row_logits(lm, others, n, 0), alone)
    # The same position reached as the 3rd row of a verify that starts two tokens earlier.
    cache = lm.new_cache(96)
    lm.forward(PROMPT[:-2], 0, cache, logits=False)
    lm.forward(PROMPT[-2:] + [3], n - 2, cache)
    shifted = lm.forward(PROMPT[-2:] + [3, 50, 51], n - 2, cache)[2]
    assert torch.equal(shifted, alone)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_steps_have_no_graph_breaks_and_the_same_tokens(hf, backend):
    eager_target = GraphLlamaLM.from_hf(hf)
    eager_draft = GraphLlamaLM.from_hf(hf, quantize=INT8)
    target = GraphLlamaLM.from_hf(hf, compile_mode=backend)  # fullgraph=True: a graph break raises
    draft = GraphLlamaLM.from_hf(hf, quantize=INT8, compile_mode=backend)
    target.prepare()
    draft.prepare()
    assert set(target._steps) == {TARGET_ROWS} and set(draft._steps) == {1, 2}
    for k in (1, 3, 6):
        expected = greedy(eager_target, eager_draft, k=k)
        assert greedy(target, draft, k=k) == expected
    assert greedy(target, None, mode="standard") == greedy(eager_target, None, mode="standard")


def test_inductor_compiled_target_matches_the_kernels_decoder(hf):
    # The real compiler (as on a GPU, minus the CUDA graphs): ~20 s on 2 cores.
    target = GraphLlamaLM.from_hf(hf, compile_mode="default")
    reference = LlamaDecoderLM.from_hf(hf)
    for prompt in (PROMPT, [1], [9, 9, 9, 9]):
        assert greedy(target, None, prompt, mode="standard") == greedy(reference, None, prompt, mode="standard")


def test_int8_matmul_is_dequantize_then_matmul():
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(48, 32, generator=generator), torch.randn(5, 32, generator=generator)
    layer = Linear(weight, None, torch.float32, int8=True)
    cb, scb, _ = quantize_rowwise(weight)
    dequantized = cb.float() * (scb / 127.0)[:, None]
    assert torch.allclose(layer(x), x @ dequantized.T, rtol=1e-5, atol=1e-5)
    assert (dequantized - weight).abs().max() <= scb.max() / 127.0  # within one int8 step of the weight


def test_our_quantizer_is_bitsandbytes_format():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    cb, scb, _ = bnbf.int8_vectorwise_quant(weight)
    ours_cb, ours_scb, how = quantize_rowwise(weight)
    assert how == "quantized by bitsandbytes"
    assert torch.equal(ours_cb, cb) and torch.equal(ours_scb, scb.float())
    # The torch fallback (no bitsandbytes) writes the same numbers.
    scale = weight.abs().amax(dim=1)
    fallback = torch.round(weight * (127.0 / scale)[:, None]).clamp(-127, 127).to(torch.int8)
    assert (fallback.int() - cb.int()).abs().max() <= 1  # rounding of exact halves may differ
    assert torch.allclose(scale, scb)


def test_int8_copy_takes_the_target_prompt_and_keeps_greedy_output(hf):
    target = GraphLlamaLM.from_hf(hf)
    draft = target.int8_copy()
    assert draft.origin == target.origin and "bitsandbytes row-wise absmax" in draft.info.quantization
    assert draft.info.weight_bytes < target.info.weight_bytes / 2
    gen = Generation(target, draft, PROMPT, k=4, max_new_tokens=24)
    tokens = [t.id for t in gen.run()]
    assert gen.stats.draft_prefill == "copied from the target"
    assert tokens == greedy(target, None, mode="standard")
    assert gen.stats.accepted > 0


def test_a_stale_cache_is_refused(hf):
    lm = GraphLlamaLM.from_hf(hf)
    first = lm.new_cache(32)
    lm.new_cache(32)
    with pytest.raises(RuntimeError, match="later generation"):
        lm.forward([1], 0, first)
    with pytest.raises(ValueError, match="another model"):
        GraphLlamaLM.from_hf(hf).forward([1], 0, lm.new_cache(32))


def test_loading_frees_the_source_layer_by_layer(hf):
    import copy

    source = copy.deepcopy(hf)
    lm = GraphLlamaLM.from_hf(source, free_source=True)
    assert all(p.numel() == 0 for block in source.model.layers for p in block.parameters())
    assert greedy(lm, None, mode="standard") == greedy(GraphLlamaLM.from_hf(hf), None, mode="standard")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_graphs_greedy_equality_in_bf16(hf):
    gpu = tiny_llama(64, max_positions=96).to("cuda", torch.bfloat16)
    target = GraphLlamaLM.from_hf(gpu)
    draft = target.int8_copy()
    assert target.compile_mode == "reduce-overhead"
    target.prepare()
    draft.prepare()
    standard = greedy(target, None, mode="standard", n=40)
    for k in (1, 4, 8, 16):
        assert greedy(target, draft, k=k, n=40) == standard
