"""Faults and hostile values in a reply (issue 11): what the engine, the service and the command line do
when sampling would meet NaN, a seed is out of range, the draft fails, memory runs out, or a reply runs
too long.

The faults come from `Faulty`, a DecoderLM that wraps a tiny seeded Llama (tests/conftest.py) and
raises, slows down or corrupts its logits on chosen forward calls.
"""

from __future__ import annotations

import pytest

from chatapp import cli
from chatapp.engine import Generation
from chatapp.lm import HFDecoderLM
from chatapp.sampling import NonFiniteProbabilitiesError, SamplingParams
from chatapp.settings import SEED_MAX
from tests.conftest import CHAT, hf_pair

GREEDY = SamplingParams()
T1 = SamplingParams(temperature=1.0)
PROMPT = [5, 17, 42, 8, 23]


class Faulty:
    """A DecoderLM that delegates to `inner`; from forward call number `fail_at` on (1-based) it raises
    `error`, and with `corrupt` its logits carry +inf and NaN."""

    def __init__(self, inner, *, fail_at: int | None = None, error: BaseException | None = None,
                 corrupt: bool = False):
        self.inner, self.fail_at, self.corrupt = inner, fail_at, corrupt
        self.error = error or RuntimeError("simulated fault\nwith a second line")
        self.calls = 0
        self.vocab_size, self.max_positions = inner.vocab_size, inner.max_positions
        self.device, self.info = inner.device, inner.info

    def new_cache(self, capacity: int):
        return self.inner.new_cache(capacity)

    def forward(self, ids, start: int, cache, *, logits: bool = True):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise self.error
        out = self.inner.forward(ids, start, cache, logits=logits)
        if out is not None and self.corrupt:
            out = out.clone()
            out[:, 3], out[:, 7] = float("inf"), float("nan")
        return out


@pytest.fixture(scope="module")
def hf_models():
    """(target, draft) of the CHAT sizes behind the transformers decoder."""
    target, draft = hf_pair(CHAT)
    return HFDecoderLM(target), HFDecoderLM(draft)


# --- defect 3: never sample from NaN --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["standard", "speculative"])
def test_non_finite_target_probabilities_raise_instead_of_emitting(hf_models, mode):
    target, draft = hf_models
    generation = Generation(Faulty(target, corrupt=True), draft, PROMPT, mode=mode, k=3, sampling=T1,
                            max_new_tokens=8)
    with pytest.raises(NonFiniteProbabilitiesError, match="target's probabilities are not finite"):
        generation.run()
    assert generation.tokens == []


def test_greedy_decoding_does_not_need_probabilities(hf_models):
    target, draft = hf_models
    tokens = Generation(target, draft, PROMPT, sampling=GREEDY, max_new_tokens=4).run()
    assert len(tokens) == 4


def test_the_command_line_refuses_a_temperature_below_the_floor(capsys):
    assert cli.main(["generate", "--prompt", "hi", "--temperature", "1e-40"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "decoding.temperature = 1e-40" in err and "must be 0 (greedy) or at least 0.01" in err


# --- defect 5: seeds past 2^64-1 ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**70, 1.5, "7", True])
def test_the_engine_refuses_a_seed_out_of_range(hf_models, seed):
    target, draft = hf_models
    with pytest.raises(ValueError, match=r"seed must be an integer in 0\.\.18446744073709551615, got ") as caught:
        Generation(target, draft, PROMPT, sampling=T1, seed=seed)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("mode", ["standard", "speculative"])
def test_the_largest_seed_samples_a_whole_reply(hf_models, mode):
    target, draft = hf_models
    generation = Generation(target, draft, PROMPT, mode=mode, sampling=T1, seed=SEED_MAX, max_new_tokens=6)
    assert len(generation.run()) == 6 and generation.stats.reference_steps == (3 if mode == "speculative" else 0)


def test_the_command_line_refuses_a_seed_past_2_64(capsys):
    assert cli.main(["generate", "--prompt", "hi", "--seed", str(2**64)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and f"decoding.seed = {2**64}" in err
