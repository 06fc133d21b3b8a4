"""Tests of chatapp.engine: standard and speculative decoding over tiny seeded
Llama models (tests/conftest.py), once per DecoderLM implementation.

What they pin down:
* greedy speculative output is token-for-token the target's greedy decode,
  and the cached standard path matches an uncached full-prefix reference;
* sampled speculative output follows the target's distribution exactly
  (chi-square against the enumerated law of the first two tokens), with
  negative controls proving the test catches wrong accept/reject rules;
* stopping (stop ids, token budget, context, stop()/close()), provenance
  tags, stats bookkeeping, the baseline, input validation, stats theory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import torch

import chatapp.engine as engine
from chatapp.engine import Generation, Token
from chatapp.sampling import SamplingParams, logits_to_probs, sample
from chatapp.stats import Baseline, expected_tokens_per_round
from tests.chisquare import ALPHA, chi_square
from tests.conftest import CHAT, TINY_VOCAB, TinyModels, hf_pair, perturbed

GREEDY = SamplingParams()
T1 = SamplingParams(temperature=1.0)
PROMPT = [5, 17, 42, 8, 23]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: threads only add overhead, and contention on a shared box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers ------------------------------------------------------------------


def prompts(vocab: int, lengths=(1, 2, 3, 5, 8, 13, 21, 30), seed: int = 1234) -> list[list[int]]:
    """Seeded random prompts; length 1 covers the no-prefill path."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (n,), generator=generator).tolist() for n in lengths]


def generate(models, prompt, *, draft: str | None = "draft", **kwargs) -> Generation:
    """A Generation on `models`; draft names the TinyModels field ("draft" or "same") or is None."""
    return Generation(models.target, getattr(models, draft) if draft else None, prompt, **kwargs)


def ids(tokens: list[Token]) -> list[int]:
    return [t.id for t in tokens]


def sources(tokens: list[Token]) -> list[str]:
    return [t.source for t in tokens]


@torch.no_grad()
def reference_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the slow, obvious way: the full prefix every step, no cache."""
    out = list(prompt)
    for _ in range(n):
        logits = hf_model(torch.tensor([out]), use_cache=False).logits[0, -1]
        out.append(int(torch.argmax(logits)))
    return out[len(prompt) :]


# -- 1. greedy equality -------------------------------------------------------

GREEDY_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def greedy_standard(chat_models) -> list[tuple[list[int], list[int]]]:
    """(prompt, standard-mode greedy ids) for 8 prompts."""
    return [
        (p, generate(chat_models, p, mode="standard", max_new_tokens=GREEDY_NEW_TOKENS).run())
        for p in prompts(chat_models.vocab)
    ]


def test_standard_greedy_matches_uncached_reference(chat_models, greedy_standard):
    for prompt, tokens in greedy_standard:
        assert ids(tokens) == reference_greedy(chat_models.target_hf, prompt, GREEDY_NEW_TOKENS), prompt


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_speculative_greedy_matches_standard(chat_models, greedy_standard, k):
    accepted = drafted = 0
    for prompt, expected in greedy_standard:
        gen = generate(chat_models, prompt, k=k, max_new_tokens=GREEDY_NEW_TOKENS)
        assert ids(gen.run()) == ids(expected), prompt
        accepted += gen.stats.accepted
        drafted += gen.stats.drafted
    assert 0 < accepted < drafted  # the draft is really rejected sometimes


@pytest.mark.parametrize("sampling", [GREEDY, T1], ids=["T0", "T1"])
def test_draft_fixture_has_partial_acceptance(chat_models, sampling):
    accepted = drafted = 0
    for prompt in prompts(chat_models.vocab)[:4]:
        gen = generate(chat_models, prompt, k=4, sampling=sampling, max_new_tokens=GREEDY_NEW_TOKENS)
        gen.run()
        accepted += gen.stats.accepted
        drafted += gen.stats.drafted
    assert 0.3 <= accepted / drafted <= 0.9


# -- 2. identical draft ----------------------------------------------------------


@pytest.mark.parametrize("sampling", [GREEDY, T1], ids=["T0", "T1"])
@pytest.mark.parametrize("k, max_new_tokens", [(1, 40), (4, 20), (4, 22), (4, 21)])
def test_identical_draft_accepts_everything(chat_models, sampling, k, max_new_tokens):
    gen = generate(chat_models, PROMPT, draft="same", k=k, sampling=sampling, max_new_tokens=max_new_tokens, seed=3)
    chunks = list(gen)
    assert len(gen.tokens) == max_new_tokens
    assert gen.stats.acceptance_rate == 1.0
    assert set(sources(gen.tokens)) <= {"draft", "bonus"}
    for chunk in chunks[:-1]:  # every round: drafts, then the bonus
        assert sources(chunk) == ["draft"] * (len(chunk) - 1) + ["bonus"]
    # The last round drafts only what fits; a bonus past the budget is dropped.
    last = sources(chunks[-1])
    assert last in (["draft"] * len(last), ["draft"] * (len(last) - 1) + ["bonus"])


# -- 3. distribution equality -------------------------------------------------

N_SAMPLES = 600
DIST_PROMPT = [1, 3, 2]


@dataclass(frozen=True)
class DistCase:
    sampling: SamplingParams
    k: int
    max_new_tokens: int


DIST_CASES = {
    # Two new tokens with k=1: t1 is accepted/resampled at row 0 and t2 is
    # the bonus or a fresh round's token.
    "T1": DistCase(T1, k=1, max_new_tokens=2),
    # Three new tokens with k=2: t2 can also be a residual resample at row 1,
    # or come from a round after a rollback of the draft cache.
    "T0.7-top_p0.9": DistCase(SamplingParams(temperature=0.7, top_p=0.9), k=2, max_new_tokens=3),
}


@dataclass
class Samples:
    counts: torch.Tensor  # [V, V] counts of the first two new tokens
    accepted: int
    drafted: int
    sources: Counter


@torch.no_grad()
def exact_first_two(hf_model, prompt: list[int], sampling: SamplingParams) -> torch.Tensor:
    """P(t1, t2) under the target with `sampling`, from full-prefix forwards."""
    vocab = hf_model.config.vocab_size
    first = hf_model(torch.tensor([prompt]), use_cache=False).logits[:, -1]
    second = hf_model(torch.tensor([prompt + [t] for t in range(vocab)]), use_cache=False).logits[:, -1]
    p1 = logits_to_probs(first, sampling)[0].double()
    p2 = logits_to_probs(second, sampling).double()
    return p1[:, None] * p2


def sample_first_two(models, case: DistCase, mode: str, n: int = N_SAMPLES) -> Samples:
    out = Samples(torch.zeros(models.vocab, models.vocab, dtype=torch.float64), 0, 0, Counter())
    for seed in range(n):
        gen = generate(
            models,
            DIST_PROMPT,
            mode=mode,
            k=case.k,
            sampling=case.sampling,
            max_new_tokens=case.max_new_tokens,
            seed=seed,
        )
        tokens = gen.run()
        out.counts[tokens[0].id, tokens[1].id] += 1
        out.accepted += gen.stats.accepted
        out.drafted += gen.stats.drafted
        out.sources.update(sources(tokens))
    return out


def distribution_p_value(models, case: DistCase, mode: str) -> tuple[float, Samples]:
    exact = exact_first_two(models.target_hf, DIST_PROMPT, case.sampling)
    samples = sample_first_two(models, case, mode)
    statistic, df, p_value = chi_square(exact, samples.counts)
    print(f"\n{mode}: chi2={statistic:.1f} df={df} p={p_value:.3g}", end=" ")
    return p_value, samples


@pytest.mark.parametrize("case", DIST_CASES.values(), ids=DIST_CASES.keys())
def test_speculative_sampling_follows_target_distribution(tiny_vocab_models, case):
    p_value, samples = distribution_p_value(tiny_vocab_models, case, "speculative")
    print(f"acceptance={samples.accepted / samples.drafted:.3f} sources={dict(samples.sources)}", end=" ")
    assert p_value > ALPHA
    # The run really exercised rejection, resampling and bonus tokens.
    assert 0.3 <= samples.accepted / samples.drafted <= 0.9
    assert min(samples.sources[s] for s in ("draft", "target", "bonus")) >= N_SAMPLES // 10


@pytest.mark.parametrize("case", DIST_CASES.values(), ids=DIST_CASES.keys())
def test_standard_sampling_follows_target_distribution(tiny_vocab_models, case):
    p_value, samples = distribution_p_value(tiny_vocab_models, case, "standard")
    assert p_value > ALPHA
    assert set(samples.sources) == {"standard"}


def top_p_really_cuts(models):
    """The top-p case is only a test of truncation if some token pairs are cut."""
    exact = exact_first_two(models.target_hf, DIST_PROMPT, DIST_CASES["T0.7-top_p0.9"].sampling)
    return bool((exact == 0).any())


def test_top_p_case_truncates_tokens(tiny_vocab_models):
    assert top_p_really_cuts(tiny_vocab_models)


def accept_resampling_from_p(p, q, proposals, generator):
    """Wrong: on rejection draws from p instead of normalize(max(0, p - q))."""
    r = torch.rand(len(proposals), generator=generator)
    for i, x in enumerate(proposals):
        if r[i] * q[i, x] >= p[i, x]:
            return i, sample(p[i], generator)
    return len(proposals), sample(p[len(proposals)], generator)


def accept_always(p, q, proposals, generator):
    """Wrong: keeps every draft token (the output then follows the draft)."""
    return len(proposals), sample(p[len(proposals)], generator)


@pytest.mark.parametrize("rule", [accept_resampling_from_p, accept_always], ids=lambda r: r.__name__)
@pytest.mark.parametrize("case", DIST_CASES.values(), ids=DIST_CASES.keys())
def test_wrong_accept_rule_is_detected(tiny_vocab_models, case, rule, monkeypatch):
    monkeypatch.setattr(engine, "speculative_accept", rule)
    p_value, _ = distribution_p_value(tiny_vocab_models, case, "speculative")
    assert p_value < ALPHA


# -- 3b. the draft takes the target's prompt keys/values ----------------------
#
# A draft built from the target's own weights (its int8 copy) skips its
# prefill and copies the target's cache. The output must not notice. These
# tests build static-cache models themselves, so they run once, not per factory.


def llama_models(sizes: dict, *, draft: str, share: bool, noise: float | None = None) -> TinyModels:
    """Static-cache target and int8 draft. draft="copy": the int8 copy of the
    target; "perturbed": of the fixtures' perturbed model (or of one with
    `noise` instead of the fixtures' noise). share=True forces a
    shared origin, so the copy path also runs for a draft whose weights really
    differ from the target's (and is rejected often enough to test)."""
    llama = pytest.importorskip("chatapp.llama")
    target_hf, perturbed_hf = hf_pair(sizes)
    if noise is not None:
        perturbed_hf = perturbed(target_hf, noise)
    target = llama.LlamaDecoderLM.from_hf(target_hf)
    drafted = llama.LlamaDecoderLM.from_hf(target_hf if draft == "copy" else perturbed_hf, quantize=llama.INT8)
    if share:
        drafted.origin = target.origin
    return TinyModels(target_hf, target, drafted, target, sizes["vocab"], sizes["max_positions"])


def test_int8_copy_takes_the_target_prompt_cache():
    models = llama_models(CHAT, draft="copy", share=False)
    gen = generate(models, PROMPT, k=2, max_new_tokens=1)
    next(iter(gen))
    assert gen.stats.draft_prefill == "copied from the target"
    n = len(PROMPT) - 1
    draft_cache, target_cache = gen._draft_cache, gen._target_cache
    for mine, theirs in zip(draft_cache.keys + draft_cache.values, target_cache.keys + target_cache.values):
        assert torch.equal(mine[:, :n], theirs[:, :n])


def test_a_different_model_cache_is_never_taken():
    models = llama_models(CHAT, draft="perturbed", share=False)
    gen = generate(models, PROMPT, k=2, max_new_tokens=4)
    gen.run()
    assert gen.stats.draft_prefill == "computed"


@pytest.fixture(scope="module")
def greedy_reference() -> list[tuple[list[int], list[int]]]:
    target_hf, _ = hf_pair(CHAT)
    return [(p, reference_greedy(target_hf, p, GREEDY_NEW_TOKENS)) for p in prompts(CHAT["vocab"])]


@pytest.mark.parametrize("share", [True, False], ids=["copied", "computed"])
@pytest.mark.parametrize("k", [2, 5])
def test_greedy_equality_with_a_copied_draft_prefix(greedy_reference, share, k):
    models = llama_models(CHAT, draft="perturbed", share=share)
    accepted = drafted = 0
    for prompt, expected in greedy_reference:
        gen = generate(models, prompt, k=k, max_new_tokens=GREEDY_NEW_TOKENS)
        assert ids(gen.run()) == expected, prompt
        copied = share and len(prompt) > 1
        assert gen.stats.draft_prefill == ("copied from the target" if copied else "computed")
        accepted += gen.stats.accepted
        drafted += gen.stats.drafted
    assert 0 < accepted < drafted


@pytest.mark.parametrize("case", DIST_CASES.values(), ids=DIST_CASES.keys())
def test_sampling_with_a_copied_draft_prefix_follows_the_target(case, monkeypatch):
    # Noisier than the fixture: the target's prompt keys/values lift a draft's
    # acceptance, and the test needs plenty of rejections.
    models = llama_models(TINY_VOCAB, draft="perturbed", share=True, noise=0.6)
    p_value, samples = distribution_p_value(models, case, "speculative")
    assert p_value > ALPHA
    assert 0.3 <= samples.accepted / samples.drafted <= 0.9
    # Negative control: the same models with a wrong accept rule fail the test.
    monkeypatch.setattr(engine, "speculative_accept", accept_always)
    bad_p_value, _ = distribution_p_value(models, case, "speculative")
    assert bad_p_value < ALPHA


# -- 4. seeds -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["speculative", "standard"])
def test_seeds_reproduce_and_differ(chat_models, mode):
    def run(seed):
        return generate(chat_models, PROMPT, mode=mode, k=3, sampling=T1, max_new_tokens=20, seed=seed).run()

    assert run(7) == run(7)  # ids and sources
    assert len({tuple(ids(run(seed))) for seed in range(5)}) >= 4


# -- 5. stop ids ------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [GREEDY, T1], ids=["T0", "T1"])
@pytest.mark.parametrize("position", [2, 6])  # with k=4 every round emits 5: both are mid-round
def test_stop_id_inside_an_accepted_run(chat_models, sampling, position):
    k = 4
    settings = dict(draft="same", k=k, sampling=sampling, max_new_tokens=position + 8, seed=1)
    for prompt in prompts(chat_models.vocab):
        full = ids(generate(chat_models, prompt, **settings).run())
        if full[position] not in full[:position]:
            break
    else:
        pytest.fail(f"no prompt whose token {position} is new")
    gen = generate(chat_models, prompt, stop_ids=[full[position]], **settings)
    chunks = list(gen)
    assert gen.token_ids == full[: position + 1]
    assert [len(c) for c in chunks] == [k + 1] * (position // (k + 1)) + [position % (k + 1) + 1]
    assert gen.tokens[-1].source == "draft"
    assert gen.stats.stop_reason == "eos"
    assert gen.stats.new_tokens == sum(gen.stats.source_counts.values()) == position + 1


# -- 6. token budget, context and stats bookkeeping -----------------------------

MODES_K = [("standard", 1), ("speculative", 1), ("speculative", 3), ("speculative", 8)]


def check_stats(gen: Generation, chunks: list[list[Token]], k: int) -> None:
    """Bookkeeping that must hold for any run not cut by a stop id."""
    s = gen.stats
    assert s.new_tokens == len(gen.tokens) == sum(s.source_counts.values()) == sum(map(len, chunks))
    assert Counter(sources(gen.tokens)) == +Counter(s.source_counts)
    assert s.wall_s > 0 and s.prefill_s >= 0
    if gen.mode == "standard":
        assert set(sources(gen.tokens)) == {"standard"}
        assert s.target_forwards == s.new_tokens == len(chunks)
        assert s.rounds == s.drafted == s.accepted == s.draft_forwards == s.k == 0
        assert s.acceptance_rate is None
        return
    assert s.k == k
    assert s.accepted <= s.drafted == s.draft_forwards
    assert s.rounds <= s.drafted <= k * s.rounds
    # Every token of a speculative reply comes out of a round: one target forward each.
    assert s.rounds == s.target_forwards == len(chunks)
    # Each round yields its accepted drafts, then one token of the target's own;
    # only the last round may be cut short by the token budget or the context.
    for chunk in chunks[:-1]:
        assert sources(chunk)[-1] in ("target", "bonus")
        assert set(sources(chunk)[:-1]) <= {"draft"}
    assert s.source_counts["draft"] <= s.accepted
    assert s.source_counts["target"] + s.source_counts["bonus"] in (s.rounds - 1, s.rounds)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 17])
@pytest.mark.parametrize("mode, k", MODES_K)
def test_exact_max_new_tokens(chat_models, mode, k, max_new_tokens):
    gen = generate(chat_models, PROMPT, mode=mode, k=k, sampling=T1, max_new_tokens=max_new_tokens, seed=max_new_tokens)
    chunks = list(gen)
    assert len(gen.tokens) == max_new_tokens
    assert gen.stats.stop_reason == "max_new_tokens"
    assert gen.stats.prompt_tokens == len(PROMPT)
    check_stats(gen, chunks, k)


@pytest.mark.parametrize("room", [1, 5])
@pytest.mark.parametrize("mode, k", MODES_K)
def test_generation_stops_at_the_context_limit(chat_models, mode, k, room):
    [prompt] = prompts(chat_models.vocab, lengths=[chat_models.max_positions - room])
    gen = generate(chat_models, prompt, mode=mode, k=k, sampling=T1, max_new_tokens=40)
    chunks = list(gen)
    assert len(gen.tokens) == room
    assert gen.stats.stop_reason == "context"
    check_stats(gen, chunks, k)


# -- 7. stop() and close() ----------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "break-close"])
@pytest.mark.parametrize("mode", ["speculative", "standard"])
def test_stopping_after_the_first_round(chat_models, mode, how):
    settings = dict(mode=mode, k=4, sampling=T1, max_new_tokens=30, seed=5)
    gen = generate(chat_models, PROMPT, **settings)
    chunks = []
    for chunk in gen:
        chunks.append(chunk)
        if how == "stop":
            gen.stop()  # the loop must then end by itself
        else:
            break
    if how == "break-close":
        gen.close()
    assert len(chunks) == 1
    assert gen.tokens == chunks[0]
    assert list(gen) == []
    assert gen.stats.stop_reason == "stopped"
    assert gen.stats.new_tokens == len(chunks[0])
    assert gen._target_cache is None and gen._draft_cache is None
    # The models are unharmed: a new generation runs in full, same seed same start.
    fresh = generate(chat_models, PROMPT, **settings).run()
    assert len(fresh) == 30
    assert fresh[: len(chunks[0])] == chunks[0]


def test_stop_before_iterating_generates_nothing(chat_models):
    gen = generate(chat_models, PROMPT, max_new_tokens=10)
    gen.stop()
    assert gen.run() == []
    assert gen.stats.stop_reason == "stopped"


@pytest.mark.parametrize("iterator_created", [False, True])
def test_close_before_the_first_round_ends_the_generation(chat_models, iterator_created):
    gen = generate(chat_models, PROMPT, max_new_tokens=10)
    if iterator_created:
        iter(gen)
    gen.close()
    assert gen.run() == []
    assert gen.stats.stop_reason == "stopped"


# -- 8. bad inputs ---------------------------------------------------------------------

BAD_GENERATIONS = {
    "empty prompt": (lambda m: dict(prompt=[]), "prompt is empty"),
    "prompt fills the context": (lambda m: dict(prompt=[1] * m.max_positions), "context holds 96"),
    "k=0": (lambda m: dict(k=0), r"k must be in 1\.\.16, got 0"),
    "k=17": (lambda m: dict(k=17), r"k must be in 1\.\.16, got 17"),
    "k=0 standard": (lambda m: dict(k=0, mode="standard"), r"k must be in 1\.\.16, got 0"),
    "max_new_tokens=0": (lambda m: dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    "unknown mode": (lambda m: dict(mode="turbo"), "mode must be one of .*'turbo'"),
    "speculative without draft": (lambda m: dict(draft=None), "speculative mode needs a draft model"),
}


@pytest.mark.parametrize("make, message", BAD_GENERATIONS.values(), ids=BAD_GENERATIONS.keys())
def test_bad_generation_arguments(chat_models, make, message):
    kwargs = dict(prompt=PROMPT) | make(chat_models)
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValueError, match=message):
        generate(chat_models, prompt, **kwargs)


def test_longest_prompt_that_fits_gets_one_token(chat_models):
    gen = generate(chat_models, [1] * (chat_models.max_positions - 1), max_new_tokens=10)
    assert len(gen.run()) == 1
    assert gen.stats.stop_reason == "context"


# -- 9. provenance ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5])
def test_provenance_of_each_round(chat_models, k):
    max_new_tokens = 60
    gen = generate(chat_models, PROMPT, k=k, sampling=T1, max_new_tokens=max_new_tokens, seed=11)
    produced = 0
    for chunk in gen:
        room = max_new_tokens - produced
        k_round = min(k, room)  # a round drafts no more than fits
        *drafts, last = chunk
        assert set(sources(drafts)) <= {"draft"}
        if last.source == "bonus":
            assert len(drafts) == k_round
        elif last.source == "draft":  # all accepted, the bonus fell past the budget
            assert len(chunk) == room == k_round
        else:
            assert last.source == "target" and len(drafts) < k_round
        produced += len(chunk)
    assert set(sources(gen.tokens)) == {"draft", "target", "bonus"}


# -- 10. baseline and theory -------------------------------------------------------------


def test_speedup_prices_standard_decoding_inside_the_reply(chat_models):
    baseline = Baseline()
    baseline.record(10.0, "calibration at load")
    gen = generate(chat_models, PROMPT, k=3, sampling=T1, max_new_tokens=20, baseline=baseline)
    gen.run()
    s = gen.stats
    assert s.reference_steps == 3 and s.reference_step_s > 0 and s.reference_s > 0
    assert s.standard_estimate_s == pytest.approx(s.prefill_s + s.new_tokens * s.reference_step_s)
    assert s.speedup == pytest.approx(s.standard_estimate_s / s.wall_s)
    # The baseline of earlier turns is kept only as drift, never as the speedup.
    assert s.baseline_tokens_per_s == 10.0 and s.baseline_ratio == pytest.approx(s.tokens_per_s / 10.0)
    assert baseline.tokens_per_s == 10.0  # a speculative turn does not touch the baseline


def test_reference_steps_change_neither_tokens_nor_draws(chat_models):
    for sampling in (GREEDY, T1):
        with_ref = generate(chat_models, PROMPT, k=3, sampling=sampling, max_new_tokens=24, seed=5)
        without = generate(chat_models, PROMPT, k=3, sampling=sampling, max_new_tokens=24, seed=5, reference_steps=0)
        assert ids(with_ref.run()) == ids(without.run())
        assert without.stats.speedup is None and without.stats.reference_steps == 0


def test_a_standard_reply_is_1x_by_definition(chat_models):
    gen = generate(chat_models, PROMPT, mode="standard", max_new_tokens=5)
    gen.run()
    assert gen.stats.speedup == 1.0 and gen.stats.reference_steps == 0
    assert gen.stats.baseline_source == "none" and gen.stats.baseline_ratio is None


def test_standard_turn_records_the_baseline(chat_models):
    baseline = Baseline()
    gen = generate(chat_models, PROMPT, mode="standard", max_new_tokens=16, baseline=baseline)
    gen.run()
    assert gen.stats.baseline_ratio is None  # there was no baseline when the turn began
    assert gen.stats.tokens_per_s > 0
    assert baseline.tokens_per_s == gen.stats.tokens_per_s
    assert "standard-mode turns" in baseline.source


def _stopped_run(gen: Generation) -> None:
    for _ in gen:
        gen.stop()


NOT_RECORDED = {
    "speculative": (dict(mode="speculative"), Generation.run),
    "record_baseline=False": (dict(record_baseline=False), Generation.run),
    "fewer than 8 tokens": (dict(max_new_tokens=7), Generation.run),
    "stopped": (dict(), _stopped_run),
}


@pytest.mark.parametrize("overrides, drive", NOT_RECORDED.values(), ids=NOT_RECORDED.keys())
def test_turns_that_do_not_record_the_baseline(chat_models, overrides, drive):
    baseline = Baseline()
    drive(generate(chat_models, PROMPT, **(dict(mode="standard", max_new_tokens=16, baseline=baseline) | overrides)))
    assert baseline.tokens_per_s is None


@pytest.mark.parametrize("k", [4, 8])
def test_acceptance_rate_is_the_per_token_rate_of_the_theory(chat_models, k):
    """E[tokens/round] = (1 - a^(K+1)) / (1 - a) holds for the reported a; the
    naive accepted/drafted (drafts after a rejection are never checked) fails."""
    round_sizes, accepted, rejected, drafted = [], 0, 0, 0
    for seed in range(12):
        gen = generate(chat_models, PROMPT, k=k, sampling=T1, max_new_tokens=60, seed=seed)
        chunks = list(gen)
        round_sizes += [len(c) for c in chunks[:-1]]  # the last round may be cut by the budget
        accepted, rejected, drafted = (
            accepted + gen.stats.accepted,
            rejected + gen.stats.rejected,
            drafted + gen.stats.drafted,
        )
        assert gen.stats.acceptance_rate == gen.stats.accepted / (gen.stats.accepted + gen.stats.rejected)
    measured = sum(round_sizes) / len(round_sizes)
    a = accepted / (accepted + rejected)
    assert measured == pytest.approx(expected_tokens_per_round(a, k), rel=0.1)
    naive = accepted / drafted
    assert abs(expected_tokens_per_round(naive, k) - measured) / measured > 0.2


def test_measure_forward_costs(chat_models):
    forwards, draft_steps = engine.measure_forward_costs(chat_models.target, chat_models.draft, PROMPT, 6, reps=2)
    assert sorted(forwards) == [1, 2, 3, 4, 5, 6]
    assert all(len(times) == 2 and min(times) > 0 for times in forwards.values())
    assert len(draft_steps) == 2 and min(draft_steps) > 0
    # Out of time budget, only the 1-token step is still timed.
    forwards, _ = engine.measure_forward_costs(chat_models.target, chat_models.draft, PROMPT, 6, reps=2, budget_s=0.0)
    assert sorted(forwards) == [1] and len(forwards[1]) == 2


# -- 11. the conversation's prefix cache ------------------------------------------------


def conversation(models, sampling, *, reuse: bool, turns: int = 4) -> list[list[int]]:
    """Replies of a conversation: each prompt is the previous prompt + reply + a new user message."""
    generator = torch.Generator().manual_seed(11)
    prompt, kept, replies, new_tokens = list(PROMPT), None, [], 3
    for turn in range(turns):
        gen = generate(
            models,
            prompt,
            k=3,
            sampling=sampling,
            max_new_tokens=8,
            seed=turn,
            prefix=kept if reuse else None,
            keep_cache=reuse,
        )
        reply = ids(gen.run())
        replies.append(reply)
        if reuse:
            kept = gen.kept
            assert gen.stats.prefix_reused == (0 if turn == 0 else len(prompt) - 1 - new_tokens)
        prompt = prompt + reply + torch.randint(models.vocab, (new_tokens,), generator=generator).tolist()
    return replies


@pytest.mark.parametrize("sampling", [GREEDY, T1], ids=["T0", "T1"])
def test_a_kept_cache_gives_the_replies_of_fresh_prefills(chat_models, sampling):
    assert conversation(chat_models, sampling, reuse=True) == conversation(chat_models, sampling, reuse=False)


def test_a_kept_cache_is_refused_after_another_generation_took_the_model(chat_models):
    first = generate(chat_models, PROMPT, k=2, max_new_tokens=4, keep_cache=True)
    first.run()
    other = generate(chat_models, [9, 9, 9], k=2, max_new_tokens=4)  # e.g. the compare tab, in between
    other.run()
    again = generate(chat_models, PROMPT + first.token_ids, k=2, max_new_tokens=4, prefix=first.kept)
    fresh = generate(chat_models, PROMPT + first.token_ids, k=2, max_new_tokens=4)
    assert ids(again.run()) == ids(fresh.run())
    # Models that own one cache (the graph decoder) start afresh; the others resume theirs.
    graph = type(chat_models.target).__name__ == "GraphLlamaLM"
    assert (again.stats.prefix_reused == 0) == graph
