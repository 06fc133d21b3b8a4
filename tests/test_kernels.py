"""Tests of the CPU kernels (chatapp/kernels/cpu_kernels.cpp) against plain torch,
once per variant this CPU runs (avx512, avxvnni, avx2, portable: on an
AVX-512 machine all four, so the AVX2 paths stay tested where CI runs).

What they pin down:
* float32 and int8 linears compute x @ W.T (int8: the dequantized W) for any
  row count and any output count, padding included;
* batch invariance: a row's result is bit-identical whatever rows share the
  call, the property greedy speculative == standard rests on; and greedy
  speculative decoding equals standard decoding on every variant;
* the int8 path's int16 activations: error far below the int8 weights' own,
  no int32 overflow on the worst input the bound allows, zeros stay zeros;
* a whole int8 draft built from a tiny model agrees with its fp32 target;
* the loader: which variants a CPU runs, the best one by default, and
  $SPECCHAT_KERNEL_VARIANT forcing another; each module says what it is;
* never slower than the plain path: at load the kernels and torch ops are
  timed on one decode step and the faster path is kept, unless named.

Each variant is compiled once into the cache folder (~15 s each the first
time); the shapes stay tiny.
"""

from __future__ import annotations

import os

import pytest
import torch

import chatapp.kernels as loader
import chatapp.kernels.choice as choice
from chatapp.kernels import cpu_kernels, supported_variants
from chatapp.llama import LlamaDecoderLM, quantize_int8

HERE = supported_variants()


@pytest.fixture(scope="module", params=HERE)
def kernels(request):
    """The compiled module of one variant this CPU runs."""
    module = cpu_kernels(request.param)
    if module is None:
        pytest.skip(f"the {request.param} kernels could not be built here")
    return module


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


def packed_weight(kernels, dtype: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, scale, packed) for a seeded Gaussian [n, k] weight: float32 with
    an empty scale, or int8 rows with their scales."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    scale = torch.empty(0)
    if dtype == "int8":
        weight, scale = quantize_int8(weight)
    return weight, scale, kernels.pack_weight(weight)


def test_kernels_use_every_torch_thread(kernels):
    # The kernels' own team follows torch's thread setting, up and down:
    # on one core, decode reads weights at about half the speed.
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU")
    before = torch.get_num_threads()
    try:
        for threads in (2, 3, 1, 2):
            torch.set_num_threads(threads)
            assert kernels.parallel_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_panels_give_the_same_bits(kernels, dtype, threads):
    # 9 panels (576 outputs): threads split them in half-panel units, so one
    # panel is shared; results must not depend on how the columns were split.
    n, k = 576, 96
    weight, scale, packed = packed_weight(kernels, dtype, n, k, seed=4)
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
def test_float_linear_matches_torch(kernels, n, k):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    x = activations(7, k)
    y = kernels.linear(x, kernels.pack_weight(weight), torch.empty(0), n)
    assert relative_error(y, reference(x, weight)) < 1e-5


@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_linear_matches_the_dequantized_weight(kernels, n, k):
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
def test_rows_do_not_change_each_others_results(kernels, dtype):
    # 14 rows: several row blocks (4 or 6 rows each), with every tail size; 200
    # inputs: weight chunks of 64 steps (int8: 64 pairs) and a partial last one.
    n, k = 200, 200
    _, scale, packed = packed_weight(kernels, dtype, n, k, seed=2)
    x = activations(14, k)
    full = kernels.linear(x, packed, scale, n)
    for rows in range(1, 14):
        for start in (0, 14 - rows):
            part = kernels.linear(x[start : start + rows].contiguous(), packed, scale, n)
            assert torch.equal(part, full[start : start + rows]), (rows, start)


def test_int8_sums_cannot_overflow(kernels):
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


def test_int8_zero_row_gives_zeros(kernels):
    q, scale = quantize_int8(torch.randn(64, 32))
    y = kernels.linear(torch.zeros(3, 32), kernels.pack_weight(q), scale, 64)
    assert torch.equal(y, torch.zeros(3, 64))


def test_int8_needs_an_even_input_count(kernels):
    with pytest.raises(RuntimeError, match="even number of inputs"):
        kernels.pack_weight(torch.zeros(64, 31, dtype=torch.int8))


def test_int8_draft_agrees_with_its_target(kernels):
    from tests.conftest import tiny_llama

    hf = tiny_llama(vocab=256, init_std=0.05)
    target = LlamaDecoderLM(hf, variant=kernels.variant())
    draft = LlamaDecoderLM(hf, quantize="int8-weight-only", variant=kernels.variant())
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
def test_attention_matches_torch_and_is_batch_invariant(kernels, d, heads, kv_heads):
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
def test_silu_mul_matches_torch(kernels, inter):
    gate = torch.linspace(-120, 120, 3 * inter).view(3, inter)
    gate[1] = torch.randn(inter, generator=torch.Generator().manual_seed(5)) * 4
    up = torch.randn(3, inter, generator=torch.Generator().manual_seed(6))
    out = kernels.silu_mul(torch.cat([gate, up], dim=1).contiguous())
    expected = torch.nn.functional.silu(gate.double()) * up.double()
    assert torch.allclose(out.double(), expected, rtol=2e-6, atol=1e-30)
    alone = kernels.silu_mul(torch.cat([gate[1:2], up[1:2]], dim=1).contiguous())
    assert torch.equal(alone[0], out[1])


def test_blocks_checks_its_weights(kernels):
    with pytest.raises(RuntimeError, match="tensors per layer"):
        kernels.Blocks([torch.zeros(1)] * 5, 4, 2, 8, 1e-5)


# -- whole models, per variant -------------------------------------------------


def head64_llama(seed: int = 3):
    """A 2-layer Llama with 64-wide heads (the compiled attention width, as
    SmolLM2's) and an intermediate size that leaves a partial panel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=160, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("quantize", [None, "int8-weight-only"], ids=["fp32", "int8"])
def test_verify_gives_the_bits_of_single_steps(kernels, quantize):
    # The property greedy equality rests on, through every kernel of a block:
    # 9 tokens in one forward give bit-identical logits to 9 one-token steps.
    lm = LlamaDecoderLM(head64_llama(), quantize=quantize, variant=kernels.variant())
    ids = torch.randint(160, (30,), generator=torch.Generator().manual_seed(7)).tolist()
    cache = lm.new_cache(40)
    lm.forward(ids[:21], 0, cache, logits=False)  # a prefill of 21 rows: several row blocks
    verify = lm.forward(ids[21:30], 21, cache)
    for i in range(9):
        step = lm.forward(ids[21 + i : 22 + i], 21 + i, cache)
        assert torch.equal(step[0], verify[i]), i


def test_greedy_speculative_equals_standard(kernels):
    # Both modes share the prefill; a round's verify equals single steps. On
    # each variant, the speculative reply is the standard one, token for token.
    from chatapp.engine import Generation
    from tests.conftest import perturbed

    hf = head64_llama()
    variant = kernels.variant()
    target = LlamaDecoderLM(hf, variant=variant)
    draft = LlamaDecoderLM(perturbed(hf, 0.05), quantize="int8-weight-only", variant=variant)
    generator = torch.Generator().manual_seed(11)
    drafted = accepted = 0
    for length in (1, 7, 23):
        prompt = torch.randint(160, (length,), generator=generator).tolist()
        standard = Generation(target, None, prompt, mode="standard", max_new_tokens=24).run()
        for k in (3, 8):
            gen = Generation(target, draft, prompt, k=k, max_new_tokens=24)
            assert [t.id for t in gen.run()] == [t.id for t in standard], (length, k)
            drafted += gen.stats.drafted
            accepted += gen.stats.accepted
    assert 0 < accepted < drafted  # the draft is really rejected sometimes


def test_each_module_says_what_it_is(kernels):
    expected_isa = {"avx512": "avx512", "avxvnni": "avx2+fma+avxvnni", "avx2": "avx2+fma", "portable": "portable"}
    assert kernels.isa().startswith(expected_isa[kernels.variant()])
    if kernels.variant() == "avx2":
        assert "vnni" not in kernels.isa()
    lm = LlamaDecoderLM(tiny_model(), variant=kernels.variant())
    assert lm.info.implementation.endswith(f"+ CPU kernels ({kernels.variant()})")


def tiny_model():
    from tests.conftest import tiny_llama

    return tiny_llama(vocab=32, max_positions=16)


# -- the loader's choice (no builds) --------------------------------------------

AVX512_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "avx_vnni"})


@pytest.mark.parametrize(
    "flags, expected",
    [
        (AVX512_FLAGS, ["avx512", "avxvnni", "avx2", "portable"]),
        (frozenset({"avx2", "fma", "avx_vnni"}), ["avxvnni", "avx2", "portable"]),  # Alder Lake
        (frozenset({"avx2", "fma"}), ["avx2", "portable"]),  # Zen 2/3
        (frozenset({"avx512f", "avx2", "fma"}), ["avx2", "portable"]),  # AVX-512 without BW (Knights Landing)
        (frozenset({"avx"}), ["portable"]),
    ],
)
def test_variants_follow_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(loader.platform, "machine", lambda: "x86_64")
    assert supported_variants(flags) == expected
    monkeypatch.setattr(loader.platform, "machine", lambda: "aarch64")
    assert supported_variants(flags) == ["portable"]


def test_the_best_variant_unless_the_environment_names_one(monkeypatch):
    monkeypatch.setattr(loader, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(loader.platform, "machine", lambda: "x86_64")
    for name in (loader.VARIANT_ENV, "SPECCHAT_DISABLE_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    assert loader.chosen_variant() == "avx2" and not loader.variant_forced()
    monkeypatch.setenv(loader.VARIANT_ENV, "portable")
    assert loader.chosen_variant() == "portable" and loader.variant_forced()
    monkeypatch.setenv(loader.VARIANT_ENV, "torch")
    assert loader.chosen_variant() is None and cpu_kernels() is None
    monkeypatch.setenv(loader.VARIANT_ENV, "avx512")  # this (pretended) CPU cannot run it
    with pytest.raises(ValueError, match="cannot run"):
        loader.chosen_variant()
    monkeypatch.setenv(loader.VARIANT_ENV, "sse9")
    with pytest.raises(ValueError, match="expected one of"):
        loader.chosen_variant()
    monkeypatch.delenv(loader.VARIANT_ENV)
    monkeypatch.setenv("SPECCHAT_DISABLE_KERNELS", "1")
    assert loader.chosen_variant() is None


def test_avx2_leaves_out_avx_vnni_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(loader, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx_vnni"}))
    assert "-mno-avxvnni" in loader.variant_flags("avx2") and "-mno-avx512f" in loader.variant_flags("avx2")
    monkeypatch.setattr(loader, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert "-mno-avxvnni" not in loader.variant_flags("avx2")  # GCC < 11 does not know the flag


def test_a_variant_that_does_not_build_falls_back_to_the_next(monkeypatch):
    monkeypatch.setattr(loader, "cpu_flags", lambda: AVX512_FLAGS)
    monkeypatch.setattr(loader.platform, "machine", lambda: "x86_64")
    for name in (loader.VARIANT_ENV, "SPECCHAT_DISABLE_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    built = []
    monkeypatch.setattr(loader, "_load", lambda name: built.append(name) or (name if name == "avx2" else None))
    assert cpu_kernels() == "avx2" and built == ["avx512", "avxvnni", "avx2"]
    monkeypatch.setenv(loader.VARIANT_ENV, "avx512")  # a named variant gets no substitute
    assert cpu_kernels() is None


def test_this_cpu_runs_its_default_variant():
    best = loader.chosen_variant()
    if best is None:
        pytest.skip("the environment turned the kernels off")
    module = cpu_kernels()
    assert module is not None and module.variant() == best
    lm = LlamaDecoderLM(tiny_model())
    assert f"({best})" in lm.info.implementation


# -- never slower than the plain path: the load-time choice ----------------------


def fake_steps(monkeypatch, costs: dict[str, float]) -> dict:
    """Steps that advance a fake clock by their cost, so the timing is exact."""
    clock = [0.0]
    monkeypatch.setattr(choice.time, "perf_counter", lambda: clock[0])

    def step(cost):
        return lambda: clock.__setitem__(0, clock[0] + cost)

    return {name: step(cost) for name, cost in costs.items()}


def test_the_first_path_stays_unless_another_is_clearly_faster(monkeypatch):
    chosen, medians = choice.faster(fake_steps(monkeypatch, {"kernels": 0.010, "torch": 0.004}))
    assert chosen == "torch" and medians == pytest.approx({"kernels": 10.0, "torch": 4.0})
    chosen, _ = choice.faster(fake_steps(monkeypatch, {"kernels": 0.010, "torch": 0.0095}))
    assert chosen == "kernels"  # 5% is within the margin: the batch-invariant path stays
    chosen, _ = choice.faster(fake_steps(monkeypatch, {"kernels": 0.004, "torch": 0.010}))
    assert chosen == "kernels"


def test_a_rival_variant_needs_only_a_small_margin_and_the_fastest_clear_one_wins():
    medians = {"avx512": 10.0, "avx2": 9.5, "torch": 9.0}
    assert choice.pick(medians) == "avx512"  # one margin for all: nobody clears 10%
    assert choice.pick(medians, margins={"avx2": choice.VARIANT_MARGIN}) == "avx2"
    assert choice.pick({"avx512": 10.0, "avx2": 9.9, "torch": 9.0}, margins={"avx2": 0.03}) == "avx512"
    assert choice.pick({"avx512": 10.0, "avx2": 9.5, "torch": 5.0}, margins={"avx2": 0.03}) == "torch"


def test_the_rival_of_avx512_is_the_best_256_bit_build():
    every = frozenset({"avx512f", "avx512bw", "avx2", "fma", "avx_vnni"})
    if loader.supported_variants(every)[:1] != ["avx512"]:
        pytest.skip("x86-64 only")
    assert loader.rival_variants("avx512", every) == ["avxvnni"]
    assert loader.rival_variants("avx512", every - {"avx_vnni"}) == ["avx2"]
    assert loader.rival_variants("avx2", every) == [] and loader.rival_variants("portable", every) == []


def test_loading_times_both_paths_and_keeps_the_faster(monkeypatch):
    import chatapp.llama as llama

    monkeypatch.delenv(loader.VARIANT_ENV, raising=False)
    monkeypatch.delenv("SPECCHAT_DISABLE_KERNELS", raising=False)
    if loader.chosen_variant() is None or cpu_kernels() is None:
        pytest.skip("no kernels here")
    lm = LlamaDecoderLM.from_hf(tiny_model())
    timings = lm.info.extra["decode_paths_ms"]
    rivals = [v for v in loader.rival_variants(loader.chosen_variant()) if cpu_kernels(v) is not None]
    assert set(timings) == {f"CPU kernels ({v})" for v in [loader.chosen_variant(), *rivals]} | {"torch ops"}
    assert all(ms > 0 for ms in timings.values())
    assert lm.path_name in timings and lm.path_name in lm.info.implementation
    if rivals:  # the rival, when it times faster, is the decoder returned
        rival = f"CPU kernels ({rivals[0]})"
        monkeypatch.setattr(llama, "faster", lambda candidates, **margins: (rival, dict.fromkeys(candidates, 1.0)))
        lm = LlamaDecoderLM.from_hf(tiny_model(), quantize="int8-weight-only")
        assert lm.path_name == rival and lm.info.implementation.endswith(f"({rivals[0]})")
        assert "int16 activations" in lm.info.dtype

    def torch_wins(candidates, **margins):
        for step in candidates.values():
            step()  # the steps really run
        return "torch ops", {name: 1.0 for name in candidates}

    monkeypatch.setattr(llama, "faster", torch_wins)
    lm = LlamaDecoderLM.from_hf(tiny_model(), quantize="int8-weight-only")
    assert lm.info.implementation.endswith("(torch ops)") and "torch fallback" in lm.info.quantization
    assert lm.info.extra["decode_paths_ms"]["torch ops"] == 1.0


def test_a_named_variant_or_little_memory_skips_the_timing(monkeypatch):
    import chatapp.llama as llama

    def never(candidates, **margins):
        raise AssertionError("timed although the path was given")

    monkeypatch.setattr(llama, "faster", never)
    lm = LlamaDecoderLM.from_hf(tiny_model(), variant="portable")
    assert lm.info.implementation.endswith("(portable)") and "decode_paths_ms" not in lm.info.extra
    monkeypatch.setenv(loader.VARIANT_ENV, "torch")  # as on a CPU where the kernels cannot be built
    assert LlamaDecoderLM.from_hf(tiny_model()).info.implementation.endswith("(torch ops)")
    monkeypatch.delenv(loader.VARIANT_ENV)
    monkeypatch.delenv("SPECCHAT_DISABLE_KERNELS", raising=False)
    monkeypatch.setattr(llama, "memory_allows", lambda nbytes: False)
    lm = LlamaDecoderLM.from_hf(tiny_model())
    assert "not timed" in lm.info.extra["decode_paths_ms"]


def test_the_variant_table_measures_every_path():
    from chatapp.kernels import measure
    from tests.conftest import tiny_llama

    variant = loader.chosen_variant() or "portable"
    result = measure.measure(
        tiny_llama(vocab=64, max_positions=48), [variant], reps=2, context=8, verify=3, prefill=12, bandwidth_mb=8
    )
    assert list(result["rows"]) == [variant, "torch"] or cpu_kernels(variant) is None
    for row in result["rows"].values():
        assert all(row[f"{job}_s"] > 0 for job in ("target_step", "draft_step", "verify", "prefill"))
    assert result["bandwidth_gb_s"] > 0 and 0 < result["draft_bound_s"] < result["target_bound_s"]
    table = measure.format_table(result)
    assert f"| {variant} (" in table and "| torch (torch ops)" in table and "verify 3 / step" in table


def test_a_model_of_few_positions_is_timed_within_them_and_an_empty_forward_is_refused(monkeypatch):
    from tests.conftest import tiny_llama

    monkeypatch.delenv(loader.VARIANT_ENV, raising=False)
    monkeypatch.delenv("SPECCHAT_DISABLE_KERNELS", raising=False)
    lm = LlamaDecoderLM.from_hf(tiny_llama(8, max_positions=8))  # the load-time timing fits 8 positions
    with pytest.raises(ValueError, match="at least one token"):
        lm.forward([], 0, lm.new_cache(8))
    with pytest.raises(ValueError, match="at least one token"):
        lm.forward([1], -1, lm.new_cache(8))
