"""The chat as the browser stores it, and as the Chatbot shows it.

Contract: the stored state is `{"messages": [...]}`, each message
`{"role": "user" | "assistant", "content": str}`, a reply adding `"stats"`:
its record (`service.Turn.record()`). It lives in the browser's localStorage,
and API clients send it as they like, so it is read with suspicion:
`clean_state` keeps only well-formed messages, and of a reply's record only
the fields of the right type (a record without a readable mode is left out;
the reply's text stays), and never raises. `render_chat` turns messages into
Chatbot messages (each reply followed by its stats as a collapsed aside; the
text without remote images unless they are allowed; the newest
SHOWN_MESSAGES_MAX only); `history` gives the model-facing messages. Nothing
here talks to the service.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from ..stats import TurnStats
from .format import CURSOR, stats_line, stats_title
from .markdown import without_remote_content

STORAGE_KEY = "specchat-chat-v1"  # the browser's localStorage key: records of older versions must still read
EMPTY_STATE: dict = {"messages": []}
ROLES = ("user", "assistant")
DROPPED_TURNS_TEXT = (
    "The conversation no longer fits the model's context: the oldest turns were left out "
    "of the prompt for this reply (they stay visible here)."
)
# What a reply's notice means, by what it says (the service joins several with "; ").
NOTICE_TEXTS = {
    "dropped to fit the context": DROPPED_TURNS_TEXT,
    "draft failed": "The draft model failed during this reply, so the target finished it alone (standard "
    "decoding): the text is still the target's own, only the speedup is gone from there on.",
    "out of": "Memory ran out during this reply: it ends where it was cut. The conversation before it is "
    "kept; ↻ Regenerate tries this reply again.",
    "time limit": "This reply reached the server's time limit for one reply and ends there.",
}
# A reply's record as stored: the type each field must have to be read (others are left out).
_RECORD_NUMBERS = {f.name for f in dataclasses.fields(TurnStats) if f.type.split(" |")[0] in ("int", "float")} | set(
    TurnStats.DERIVED
)
_RECORD_TEXTS = {f.name for f in dataclasses.fields(TurnStats) if f.type == "str"} | {"notice"}
RECORD_TEXT_MAX = 2000  # characters of one text field kept (a notice, a baseline source)
# Messages the chat shows, the newest: every streamed update sends the whole chat, so its cost must
# not grow with a history that a client may make as long as the limits allow (all of it stays stored).
SHOWN_MESSAGES_MAX = 400
MODES = ("speculative", "standard")


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
    stats = clean_record(m.get("stats")) if m["role"] == "assistant" else None
    if stats is not None:
        entry["stats"] = stats
    return entry


def _readable(name: str, value: Any) -> bool:
    if name in _RECORD_NUMBERS:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return value is None or (number and math.isfinite(value))
    if name in _RECORD_TEXTS:
        return value is None or isinstance(value, str)
    if name == "source_counts":
        return isinstance(value, dict) and all(isinstance(n, int) and not isinstance(n, bool) for n in value.values())
    if name == "k_choice":  # a KChoice's dict, or the previous version's words
        return value is None or isinstance(value, (dict, str))
    return False  # not a field of a record: left out


def clean_record(value: Any) -> dict | None:
    """A stored reply record with only the fields that read as their type; None when it has no
    readable mode (the reply is then shown without stats)."""
    if not isinstance(value, dict) or value.get("mode") not in MODES:
        return None
    record = {name: v for name, v in value.items() if name == "mode" or _readable(name, v)}
    for name in _RECORD_TEXTS & record.keys():
        if isinstance(record[name], str):
            record[name] = record[name][:RECORD_TEXT_MAX]
    return record


def history(messages: list[dict]) -> list[dict]:
    """The model-facing history: plain {"role", "content"} messages."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def records(messages: list[dict]) -> list[dict]:
    """The stats records of the replies, in order."""
    return [m["stats"] for m in messages if m["role"] == "assistant" and m.get("stats")]


def render_chat(
    messages: list[dict], streaming: str | None = None, notice: str | None = None, *, remote_images: bool = False
) -> list[dict]:
    """Chatbot messages: every reply followed by its stats as a collapsed aside;
    `streaming` is the text of a reply still coming (shown with a cursor). Images
    from other addresses show as links unless `remote_images`."""
    shown = (lambda text: text) if remote_images else without_remote_content
    out: list[dict] = []
    hidden = len(messages) - SHOWN_MESSAGES_MAX
    if hidden > 0:
        out.append(
            {
                "role": "assistant",
                "content": f"{hidden} earlier messages are kept in this chat but not "
                "shown; they still go to the model while they fit its context.",
                "metadata": {"title": f"⋯ {hidden} earlier messages not shown", "status": "done"},
            }
        )
        messages = messages[hidden:]
    for m in messages:
        stats = m.get("stats") if m["role"] == "assistant" else None
        if stats and stats.get("notice"):
            out.append(notice_aside(stats["notice"]))
        out.append({"role": m["role"], "content": shown(m["content"])})
        aside = stats_aside(stats) if stats else None
        if aside is not None:
            out.append(aside)
    if streaming is not None:
        if notice:
            out.append(notice_aside(notice))
        out.append({"role": "assistant", "content": shown(streaming) + CURSOR})
    return out


def stats_aside(record: dict) -> dict | None:
    """The collapsed stats under a reply; None when its record cannot be put in words (skipped)."""
    try:
        return {
            "role": "assistant",
            "content": stats_line(record),
            "metadata": {"title": stats_title(record), "status": "done"},
        }
    except Exception:  # a record this version cannot read: the reply is shown without its stats
        return None


def notice_aside(notice: str) -> dict:
    meanings = [text for words, text in NOTICE_TEXTS.items() if words in notice]
    return {
        "role": "assistant",
        "content": " ".join(meanings) or notice,
        "metadata": {"title": f"ℹ {notice}", "status": "done"},
    }
