"""Tests of the CPU kernels (chatapp/kernels/cpu_kernels.cpp) against plain torch.

What they pin down:
* float32 and int8 linears compute x @ W.T (int8: the dequantized W) for any
  row count and any output count, padding included;
* batch invariance: a row's result is bit-identical whatever rows share the
  call, the property greedy speculative == standard rests on;
* the int8 path's int16 activations: error far below the int8 weights' own,
  no int32 overflow on the worst input the bound allows, zeros stay zeros;
* a whole int8 draft built from a tiny model agrees with its fp32 target.
"""

from __future__ import annotations

import os

import pytest
import torch

from chatapp.kernels import cpu_kernels
from chatapp.llama import LlamaDecoderLM, quantize_int8

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="CPU kernels could not be built here")

SHAPES = [(100, 32), (960, 576), (576, 1536), (64, 64)]  # n outputs x k inputs; 100 pads a panel


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.double() @ weight.double().T).float()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


def activations(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with one outlier feature, as in real hidden states."""
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 30
    return x


def packed_weight(dtype: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, scale, packed) for a seeded Gaussian [n, k] weight: float32 with
    an empty scale, or int8 rows with their scales."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    scale = torch.empty(0)
    if dtype == "int8":
        weight, scale = quantize_int8(weight)
    return weight, scale, kernels.pack_weight(weight)


def test_kernels_use_every_torch_thread():
    # Built without OpenMP, at::parallel_for runs serially: decode then reads
    # weights on one core (measured 27 ms vs 20 ms a step on 2 cores).
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert kernels.parallel_threads() == 2
        torch.set_num_threads(1)
        assert kernels.parallel_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_panels_give_the_same_bits(dtype, threads):
    # 9 panels (576 outputs): threads split them in half-panel units, so one
    # panel is shared; results must not depend on how the columns were split.
    n, k = 576, 96
    weight, scale, packed = packed_weight(dtype, n, k, seed=4)
    x = activations(6, k)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = kernels.linear(x, packed, scale, n)
        torch.set_num_threads(threads)
        split = kernels.linear(x, packed, scale, n)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(split, serial)
    dequantized = weight.float() * scale[:, None] if dtype == "int8" else weight
    assert relative_error(split, reference(x, dequantized)) < 1e-3


@pytest.mark.parametrize("n,k", SHAPES)
def test_float_linear_matches_torch(n, k):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    x = activations(7, k)
    y = kernels.linear(x, kernels.pack_weight(weight), torch.empty(0), n)
    assert relative_error(y, reference(x, weight)) < 1e-5


@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_linear_matches_the_dequantized_weight(n, k):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    q, scale = quantize_int8(weight)
    x = activations(7, k)
    y = kernels.linear(x, kernels.pack_weight(q), scale, n)
    dequantized = q.float() * scale[:, None]
    activation_error = relative_error(y, reference(x, dequantized))
    weight_error = relative_error(reference(x, dequantized), reference(x, weight))
    assert activation_error < 1e-3
    # The int16 activations must cost far less than int8 weights already do.
    assert activation_error < weight_error / 10


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_rows_do_not_change_each_others_results(dtype):
    n, k = 200, 96
    _, scale, packed = packed_weight(dtype, n, k, seed=2)
    x = activations(12, k)
    full = kernels.linear(x, packed, scale, n)
    for rows in range(1, 12):
        for start in (0, 12 - rows):
            part = kernels.linear(x[start : start + rows].contiguous(), packed, scale, n)
            assert torch.equal(part, full[start : start + rows]), (rows, start)


def test_int8_sums_cannot_overflow():
    # All weights at +127 and every input at the row's largest value: the sum
    # is 127 * k * 32767 > 2^31 unless the activation scale backs off.
    n, k = 64, 1536
    q = torch.full((n, k), 127, dtype=torch.int8)
    scale = torch.full((n,), 0.01)
    x = torch.full((2, k), 3.0)
    x[1] = -3.0
    y = kernels.linear(x, kernels.pack_weight(q), scale, n)
    expected = 3.0 * 127 * 0.01 * k
    assert torch.allclose(y[0], torch.full((n,), expected), rtol=1e-4)
    assert torch.allclose(y[1], torch.full((n,), -expected), rtol=1e-4)


def test_int8_zero_row_gives_zeros():
    q, scale = quantize_int8(torch.randn(64, 32))
    y = kernels.linear(torch.zeros(3, 32), kernels.pack_weight(q), scale, 64)
    assert torch.equal(y, torch.zeros(3, 64))


def test_int8_needs_an_even_input_count():
    with pytest.raises(RuntimeError, match="even number of inputs"):
        kernels.pack_weight(torch.zeros(64, 31, dtype=torch.int8))


def test_int8_draft_agrees_with_its_target():
    from tests.conftest import tiny_llama

    hf = tiny_llama(vocab=256, init_std=0.05)
    target = LlamaDecoderLM.from_hf(hf)
    draft = LlamaDecoderLM.from_hf(hf, quantize="int8-weight-only")
    assert "int16 per-row activations" in draft.info.quantization
    prompt = list(range(1, 40))
    target_logits = target.forward(prompt, 0, target.new_cache(64))
    draft_logits = draft.forward(prompt, 0, draft.new_cache(64))
    agreement = (target_logits.argmax(-1) == draft_logits.argmax(-1)).float().mean().item()
    assert agreement >= 0.9
    assert relative_error(draft_logits, target_logits) < 0.05


def sdpa_reference(q, keys, values, start):
    """Causal attention of q [n, heads, d] at positions start.. against [kv_heads, >= start+n, d] caches, in float64."""
    n, heads, d = q.shape
    group = heads // keys.shape[0]
    k = keys[:, : start + n].double().repeat_interleave(group, 0)
    v = values[:, : start + n].double().repeat_interleave(group, 0)
    scores = torch.einsum("nhd,hjd->hnj", q.double(), k) / d**0.5
    mask = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hnj,hjd->nhd", probs, v).float()


@pytest.mark.parametrize("d", [64, 128, 24])  # the two compiled widths and the generic path
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4)])
def test_attention_matches_torch_and_is_batch_invariant(d, heads, kv_heads):
    generator = torch.Generator().manual_seed(d + heads)
    capacity, start, n = 80, 37, 9
    keys = torch.randn(kv_heads, capacity, d, generator=generator)
    values = torch.randn(kv_heads, capacity, d, generator=generator)
    q = torch.randn(n, heads, d, generator=generator) * 2
    out = kernels.attention(q, keys, values, start)
    assert relative_error(out, sdpa_reference(q, keys, values, start)) < 1e-5
    for i in (0, 4, n - 1):  # each row alone, at its own position: the same bits
        alone = kernels.attention(q[i : i + 1].contiguous(), keys, values, start + i)
        assert torch.equal(alone[0], out[i]), i


@pytest.mark.parametrize("inter", [1536, 40])  # 40: a scalar tail after the vector lanes
def test_silu_mul_matches_torch(inter):
    gate = torch.linspace(-120, 120, 3 * inter).view(3, inter)
    gate[1] = torch.randn(inter, generator=torch.Generator().manual_seed(5)) * 4
    up = torch.randn(3, inter, generator=torch.Generator().manual_seed(6))
    out = kernels.silu_mul(torch.cat([gate, up], dim=1).contiguous())
    expected = torch.nn.functional.silu(gate.double()) * up.double()
    assert torch.allclose(out.double(), expected, rtol=2e-6, atol=1e-30)
    alone = kernels.silu_mul(torch.cat([gate[1:2], up[1:2]], dim=1).contiguous())
    assert torch.equal(alone[0], out[1])


def test_blocks_checks_its_weights():
    with pytest.raises(RuntimeError, match="tensors per layer"):
        kernels.Blocks([torch.zeros(1)] * 5, 4, 2, 8, 1e-5)
