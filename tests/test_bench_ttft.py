"""chatapp.bench.ttft: the chat of several turns, cached and fresh, on a tiny real pair."""

from __future__ import annotations

from chatapp.bench.ttft import conversation_ttft, report, summarize
from chatapp.models import load_pair
from chatapp.service import ChatService
from tests.test_models import model_settings, tiny, tok  # noqa: F401  (fixtures: tiny model folders)


def test_cached_turns_reuse_the_conversation_and_fresh_ones_do_not(tiny):  # noqa: F811
    service = ChatService(load_pair(model_settings(target=str(tiny.llama), device="cpu"), lambda m: None))
    records = conversation_ttft({"cached": service, "fresh": service}, turns=3, max_new_tokens=6)
    cached, fresh = records["cached"], records["fresh"]
    assert [r["turn"] for r in cached] == [1, 2, 3] and all(r["first_token_s"] > 0 for r in cached + fresh)
    assert cached[0]["prefix_reused"] == 0 and all(r["prefix_reused"] > 0 for r in cached[1:])
    assert all(r["prefix_reused"] == 0 for r in fresh)
    assert [r["prompt_tokens"] for r in cached] == [r["prompt_tokens"] for r in fresh]  # the same chat
    summary = summarize(records)
    assert summary["goal"]["cached_last_over_first"] == cached[-1]["first_token_s"] / cached[0]["first_token_s"]
    assert "| 3 |" in report(records, summary)
