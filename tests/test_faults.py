"""Faults and hostile values in a reply (issue 11): what the engine, the service and the command line do
when sampling would meet NaN, a seed is out of range, the draft fails, memory runs out, or a reply runs
too long.

The faults come from `Faulty`, a DecoderLM that wraps a tiny seeded Llama (tests/conftest.py) and
raises, slows down or corrupts its logits on chosen forward calls.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

import chatapp.service as service_module
from chatapp import cli
from chatapp.engine import Generation
from chatapp.lm import HFDecoderLM
from chatapp.models import load_pair
from chatapp.sampling import NonFiniteProbabilitiesError, SamplingParams
from chatapp.service import ChatService
from chatapp.settings import SEED_MAX, DecodingSettings, LimitsSettings
from tests.conftest import CHAT, hf_pair
from tests.test_models import model_settings, tiny, tok  # noqa: F401  (fixtures: tiny model folders)

GREEDY = SamplingParams()
T1 = SamplingParams(temperature=1.0)
PROMPT = [5, 17, 42, 8, 23]


class Faulty:
    """A DecoderLM that delegates to `inner`; from forward call number `fail_at` on (1-based) it raises
    `error`, every call sleeps `delay_s`, and with `corrupt` its logits carry +inf and NaN."""

    def __init__(
        self,
        inner,
        *,
        fail_at: int | None = None,
        error: BaseException | None = None,
        corrupt: bool = False,
        delay_s: float = 0.0,
    ):
        self.inner, self.fail_at, self.corrupt, self.delay_s = inner, fail_at, corrupt, delay_s
        self.error = error or RuntimeError("simulated fault\nwith a second line")
        self.calls = 0
        self.vocab_size, self.max_positions = inner.vocab_size, inner.max_positions
        self.device, self.info = inner.device, inner.info

    def arm(self, calls_from_now: int, error: BaseException | None = None) -> None:
        """Fail from the `calls_from_now`-th call after this one on."""
        self.fail_at, self.error = self.calls + calls_from_now, error or self.error

    def disarm(self) -> None:
        self.fail_at = None

    def new_cache(self, capacity: int):
        return self.inner.new_cache(capacity)

    def forward(self, ids, start: int, cache, *, logits: bool = True):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise self.error
        if self.delay_s:
            time.sleep(self.delay_s)
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
    generation = Generation(Faulty(target, corrupt=True), draft, PROMPT, mode=mode, k=3, sampling=T1, max_new_tokens=8)
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


# --- faults in a reply: the draft fails -------------------------------------------------------------

FALLBACK = "draft failed: simulated fault with a second line; finished with standard decoding"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared box
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("fail_at", [1, 2, 7])  # the draft's prefill, its first step, a later round
def test_a_draft_failing_mid_reply_finishes_with_the_targets_greedy_tokens(chat_models, fail_at):
    """On every decoder: the reply goes on in standard mode, token for token the target's greedy decode."""
    expected = Generation(chat_models.target, None, PROMPT, mode="standard", max_new_tokens=24).run()
    draft = Faulty(chat_models.draft, fail_at=fail_at)
    generation = Generation(chat_models.target, draft, PROMPT, k=3, max_new_tokens=24)
    tokens = generation.run()
    assert [t.id for t in tokens] == [t.id for t in expected]
    stats = generation.stats
    assert stats.fallback == FALLBACK and stats.mode == "speculative" and stats.stop_reason == "max_new_tokens"
    assert stats.source_counts["standard"] > 0 and draft.calls == fail_at  # never called again
    speculative = sum(n for source, n in stats.source_counts.items() if source != "standard")
    assert (speculative > 0) == (fail_at > 2) and stats.to_dict()["fallback"] == FALLBACK


def test_a_sampled_reply_survives_a_failing_draft(hf_models):
    target, draft = hf_models
    generation = Generation(target, Faulty(draft, fail_at=4), PROMPT, k=2, sampling=T1, max_new_tokens=16, seed=3)
    assert len(generation.run()) == 16 and generation.stats.fallback == FALLBACK


def test_non_finite_draft_probabilities_are_a_draft_failure(hf_models):
    target, draft = hf_models
    generation = Generation(target, Faulty(draft, corrupt=True), PROMPT, k=2, sampling=T1, max_new_tokens=10)
    assert len(generation.run()) == 10
    assert generation.stats.fallback.startswith("draft failed: the draft's probabilities are not finite")


def test_a_target_failure_propagates(hf_models):
    target, draft = hf_models
    generation = Generation(Faulty(target, fail_at=3), draft, PROMPT, k=2, max_new_tokens=16)
    with pytest.raises(RuntimeError, match="simulated fault"):
        generation.run()
    assert generation.stats.stop_reason == "error" and generation.stats.fallback == ""


def test_out_of_memory_in_the_draft_is_not_a_fallback(hf_models):
    target, draft = hf_models
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    generation = Generation(target, Faulty(draft, fail_at=3, error=oom), PROMPT, k=2, max_new_tokens=16)
    with pytest.raises(torch.OutOfMemoryError):
        generation.run()
    assert generation.stats.stop_reason == "out of memory"


# --- faults in a reply: a wall-clock limit -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["standard", "speculative"])
def test_a_reply_stops_at_its_time_limit(hf_models, mode):
    target, draft = hf_models
    slow = Faulty(target, delay_s=0.05)
    started = time.perf_counter()
    generation = Generation(slow, draft, PROMPT, mode=mode, k=2, max_new_tokens=80, max_seconds=0.4)
    tokens = generation.run()
    elapsed = time.perf_counter() - started
    assert generation.stats.stop_reason == "time limit" and 0 < len(tokens) < 80
    assert 0.4 <= elapsed < 0.4 + 3.0  # one round past the limit at most (generous for a shared CPU)


def test_no_time_limit_by_default_and_with_zero(hf_models):
    target, draft = hf_models
    for limit in (None, 0):
        generation = Generation(target, draft, PROMPT, max_new_tokens=12, max_seconds=limit)
        generation.run()
        assert generation.stats.stop_reason == "max_new_tokens"
    with pytest.raises(ValueError, match="max_seconds must be >= 0"):
        Generation(target, draft, PROMPT, max_seconds=-1)


# --- faults in a reply, through the service: memory and the time limit ---------------------------------

HISTORY = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def faulty_service(tiny):  # noqa: F811
    """A ChatService over a tiny pair whose target can be made to fail or slow down."""
    pair = load_pair(model_settings(target=str(tiny.llama), device="cpu"), lambda message: None)
    pair.target = Faulty(pair.target)
    return ChatService(pair)


def test_out_of_memory_ends_the_reply_with_a_notice_and_the_next_reply_works(faulty_service, monkeypatch):
    service, target = faulty_service, faulty_service.pair.target
    decoding = DecodingSettings(max_new_tokens=12, k=3)
    reference = service.start_turn(HISTORY, decoding)
    list(reference)
    assert service._kept is not None  # the target's cache, kept for the next reply
    collected = []
    monkeypatch.setattr(service_module.gc, "collect", lambda *a: collected.append(True) or 0)
    history = [dict(m) for m in HISTORY]
    target.arm(3, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 1 GiB free)"))
    turn = service.start_turn(history, decoding)
    events = list(turn)  # no exception: the reply ends
    target.disarm()
    assert turn.stats.stop_reason == "out of memory" and collected
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB" in turn.notice
    assert turn.notice.endswith("; the reply was cut here") and "\n" not in turn.notice
    assert turn.text == "".join(event.text for event in events)
    record = json.loads(json.dumps(turn.record()))
    assert record["notice"] == turn.notice and record["stop_reason"] == "out of memory"
    assert history == HISTORY and service._kept is None  # nothing of the user's lost; the cache let go
    after = service.start_turn(HISTORY, decoding)
    list(after)
    assert after.stats.stop_reason == "max_new_tokens" and [t.id for t in after.tokens] == [
        t.id for t in reference.tokens
    ]


def test_other_errors_still_propagate_from_the_turn(faulty_service):
    service, target = faulty_service, faulty_service.pair.target
    target.arm(2, RuntimeError("kernel exploded"))
    turn = service.start_turn(HISTORY, DecodingSettings(max_new_tokens=12), fresh=True)
    try:
        with pytest.raises(RuntimeError, match="kernel exploded"):
            list(turn)
    finally:
        target.disarm()
    assert turn.stats.stop_reason == "error"


def test_the_service_applies_the_time_limit_from_the_settings(faulty_service, monkeypatch):
    service, target = faulty_service, faulty_service.pair.target
    assert service.max_reply_seconds == LimitsSettings().max_reply_seconds == 300
    monkeypatch.setattr(service, "max_reply_seconds", 0.3)
    monkeypatch.setattr(target, "delay_s", 0.05)
    turn = service.start_turn(HISTORY, DecodingSettings(max_new_tokens=200, k=2), fresh=True)
    list(turn)
    assert turn.stats.stop_reason == "time limit" and turn.stats.new_tokens < 200
    assert turn.notice and "time limit of 0.3 s" in turn.notice


# --- no user text or model output in logs ---------------------------------------------------------------

CANARY = "zebra-canary-7431"


def test_no_user_text_or_model_output_reaches_logs_or_the_terminal(faulty_service, caplog, capfd):
    """The non-UI layers log nothing of what the user wrote or the model said, on the happy path and
    on the faults (their error lines name fields and counts, never the text)."""
    service, target = faulty_service, faulty_service.pair.target
    caplog.set_level(logging.DEBUG)  # stricter than the default level (WARNING)
    history = [{"role": "user", "content": f"{CANARY} the quick brown fox"}]
    decoding = DecodingSettings(max_new_tokens=12, system_prompt=f"system {CANARY}")
    turn = service.start_turn(history, decoding)
    list(turn)
    replies = [turn.text]
    target.arm(2, torch.OutOfMemoryError("CUDA out of memory"))
    turn = service.start_turn(history, decoding)
    list(turn)
    target.disarm()
    errors = []
    for bad in ([{"role": "user", "content": f"{CANARY} \ud800"}], [{"role": "user", "content": f"{CANARY} " * 5000}]):
        with pytest.raises(ValueError) as caught:
            service.start_turn(bad, decoding)
        errors.append(str(caught.value))
    out, err = capfd.readouterr()
    seen = caplog.text + out + err + " ".join(errors) + (turn.notice or "")
    assert CANARY not in seen
    assert all(reply.strip() not in seen for reply in replies if len(reply.strip()) >= 6)
