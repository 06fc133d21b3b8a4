"""The chat as the browser stores it, and as the Chatbot shows it.

Contract: the stored state is `{"messages": [...]}`, each message
`{"role": "user" | "assistant", "content": str}`, a reply adding `"stats"`:
its record (`service.Turn.record()`). It lives in the browser's localStorage,
so it is read with suspicion: `clean_state` keeps only well-formed messages
and never raises. `render_chat` turns messages into Chatbot messages (each
reply followed by its stats as a collapsed aside); `history` gives the
model-facing messages. Nothing here talks to the service.
"""

from __future__ import annotations

import json
from typing import Any

from .format import CURSOR, stats_line, stats_title

STORAGE_KEY = "specchat-chat-v1"  # the browser's localStorage key: records of older versions must still read
EMPTY_STATE: dict = {"messages": []}
ROLES = ("user", "assistant")
DROPPED_TURNS_TEXT = (
    "The conversation no longer fits the model's context: the oldest turns were left out "
    "of the prompt for this reply (they stay visible here)."
)


def clean_state(value: Any) -> dict:
    """The stored chat, tolerating missing or foreign localStorage data."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    messages = value.get("messages") if isinstance(value, dict) else None
    return {"messages": [_clean_message(m) for m in messages if _is_message(m)] if isinstance(messages, list) else []}


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)


def _clean_message(m: dict) -> dict:
    entry = {"role": m["role"], "content": m["content"]}
    stats = m.get("stats")
    if m["role"] == "assistant" and isinstance(stats, dict) and isinstance(stats.get("mode"), str):
        entry["stats"] = stats
    return entry


def history(messages: list[dict]) -> list[dict]:
    """The model-facing history: plain {"role", "content"} messages."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def records(messages: list[dict]) -> list[dict]:
    """The stats records of the replies, in order."""
    return [m["stats"] for m in messages if m["role"] == "assistant" and m.get("stats")]


def render_chat(messages: list[dict], streaming: str | None = None, notice: str | None = None) -> list[dict]:
    """Chatbot messages: every reply followed by its stats as a collapsed aside;
    `streaming` is the text of a reply still coming (shown with a cursor)."""
    out: list[dict] = []
    for m in messages:
        stats = m.get("stats") if m["role"] == "assistant" else None
        if stats and stats.get("notice"):
            out.append(notice_aside(stats["notice"]))
        out.append({"role": m["role"], "content": m["content"]})
        if stats:
            out.append(stats_aside(stats))
    if streaming is not None:
        if notice:
            out.append(notice_aside(notice))
        out.append({"role": "assistant", "content": streaming + CURSOR})
    return out


def stats_aside(record: dict) -> dict:
    return {
        "role": "assistant",
        "content": stats_line(record),
        "metadata": {"title": stats_title(record), "status": "done"},
    }


def notice_aside(notice: str) -> dict:
    return {
        "role": "assistant",
        "content": DROPPED_TURNS_TEXT,
        "metadata": {"title": f"ℹ {notice}", "status": "done"},
    }
