"""Tests of chatapp.service: a chat turn over a real (tiny) pair, the K choice it runs, the one turn record."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from chatapp.autok import KChoice
from chatapp.models import load_pair
from chatapp.service import ChatService
from chatapp.settings import DecodingSettings
from tests.test_models import model_settings, tiny, tok  # noqa: F401  (fixtures: tiny model folders)

HISTORY = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def service(tiny):  # noqa: F811
    return ChatService(load_pair(model_settings(target=str(tiny.llama), device="cpu"), lambda m: None))


def decoding(**changes) -> DecodingSettings:
    return dataclasses.replace(DecodingSettings(max_new_tokens=12), **changes)


def test_a_fixed_k_turn_and_its_record(service):
    turn = service.start_turn(HISTORY, decoding(k=3))
    assert turn.k_choice == KChoice(k=3, auto=False)
    text = "".join(event.text for event in turn)
    record = turn.record()
    assert record["mode"] == "speculative" and record["k"] == 3 and record["new_tokens"] == len(turn.tokens)
    assert record["k_choice"] == {
        "k": 3,
        "auto": False,
        "acceptance_rate": None,
        "cost_ratio": None,
        "verify_slope": None,
        "expected_speedup": None,
    }
    assert text == turn.text
    json.dumps(record, allow_nan=False)


def test_a_standard_turn_has_no_k_choice(service):
    turn = service.start_turn(HISTORY, decoding(mode="standard"))
    list(turn)
    assert turn.k_choice is None and turn.record()["k_choice"] is None and turn.stats.mode == "standard"


def test_auto_k_runs_what_it_chose(service):
    service.calibrate(new_tokens=8)
    turn = service.start_turn(HISTORY, decoding(auto_k=True))
    list(turn)
    choice = turn.k_choice
    assert choice.auto and choice.acceptance_rate is not None and choice.cost_ratio > 0
    assert turn.stats.k == choice.k if choice.speculative else turn.stats.mode == "standard"


def test_auto_k_that_expects_a_loss_runs_standard_decoding(service, monkeypatch):
    monkeypatch.setattr(service.tracker, "choose", lambda k, auto: KChoice(k=0, auto=True, expected_speedup=0.8))
    turn = service.start_turn(HISTORY, decoding(auto_k=True))
    list(turn)
    assert turn.stats.mode == "standard" and turn.record()["k_choice"]["k"] == 0
    # The same prompt in standard mode gives the same greedy tokens.
    standard = service.start_turn(HISTORY, decoding(mode="standard"))
    list(standard)
    assert [t.id for t in standard.tokens] == [t.id for t in turn.tokens]


def test_speculative_turns_feed_the_tracker(service):
    before = service.tracker.drafted
    list(service.start_turn(HISTORY, decoding(k=2)))
    assert service.tracker.drafted > before


def test_the_next_reply_prefills_only_what_is_new(service):
    first = service.start_turn(HISTORY, decoding(k=3))
    list(first)
    history = HISTORY + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "and then?"}]
    second = service.start_turn(history, decoding(k=3))
    list(second)
    assert second.stats.prefix_reused > len(service.tokenizer.encode(HISTORY[0]["content"]))
    fresh = service.start_turn(history, decoding(k=3), fresh=True)
    list(fresh)
    assert fresh.stats.prefix_reused == 0
    assert [t.id for t in fresh.tokens] == [t.id for t in second.tokens]


def test_the_prompt_is_built_before_and_without_the_generation_lock(service):
    """A caller with one generation slot builds the prompt first, outside it: a hostile history is
    refused at once, and a prompt is built even while another reply holds the lock."""
    huge = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}] * 10_000 + HISTORY
    built: list = []
    with service.lock:  # another reply is running
        worker = threading.Thread(target=lambda: built.append(service.prompt(HISTORY, decoding())))
        worker.start()
        worker.join(timeout=30)
        with pytest.raises(ValueError, match="the chat history is too long: 20001 messages"):
            service.prompt(huge, decoding())
    assert built and built[0].ids
    turn = service.start_turn(HISTORY, decoding(k=3), prompt=built[0], fresh=True)
    reference = service.start_turn(HISTORY, decoding(k=3), fresh=True)
    list(turn), list(reference)
    assert turn.tokens and [t.id for t in turn.tokens] == [t.id for t in reference.tokens]
