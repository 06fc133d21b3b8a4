"""Chat prompts: text in, token ids out, and token ids back to text.

Contract: this is the only module that tokenizes. `build_prompt` turns a chat
history into prompt ids with the tokenizer's chat template, dropping the
oldest turns when the prompt would not fit; `StreamDecoder` turns the reply's
token ids, as the engine yields them, into text deltas for the UI. The engine
knows nothing about text.

A `Message` is a plain dict {"role": "user" | "assistant", "content": str}.
`normalize_history` makes them from Gradio chat history.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from .settings import HISTORY_CHARS_MAX, HISTORY_MESSAGES_MAX

__all__ = [
    "EmptyPromptError",
    "Message",
    "PromptResult",
    "PromptTooLongError",
    "StreamDecoder",
    "build_prompt",
    "check_history",
    "decode",
    "normalize_history",
]


class Message(TypedDict):
    role: str  # "user" | "assistant" ("system" only inside build_prompt)
    content: str


ROLES = ("user", "assistant")
_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
_HOLD = "\ufffd"  # what a partial UTF-8 sequence decodes to
_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: Python strings may hold one, UTF-8 cannot


class EmptyPromptError(ValueError):
    """The latest user message is empty or whitespace."""


class PromptTooLongError(ValueError):
    """The latest user message (with the system prompt) does not fit the context by itself."""


@dataclass(frozen=True)
class PromptResult:
    ids: list[int]
    dropped_turns: int
    notice: str | None


# --- history -------------------------------------------------------------------


def _field(message: Any, name: str, default: Any = None) -> Any:
    if isinstance(message, Mapping):
        return message.get(name, default)
    return getattr(message, name, default)


def _text(content: Any) -> str:
    """The text of a Gradio message content: a string, a text block, or a list of blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        parts = (_text(block) for block in content if isinstance(block, (str, Mapping)))
        return "\n".join(part for part in parts if part)
    return ""  # a file, an image, a component: not text


def _is_aside(message: Any) -> bool:
    """Gradio's collapsible "thought"/status messages (metadata with a title) are not dialogue."""
    metadata = _field(message, "metadata") or {}
    return bool(_field(metadata, "title"))


def normalize_history(history: Iterable[Any]) -> list[Message]:
    """Gradio 6 chat history -> plain Messages.

    Content may be a string or a list of blocks like {"type": "text", "text": ...};
    non-text blocks, messages without text, roles other than user/assistant and
    messages with a metadata title are left out. Consecutive messages of one
    role are joined, so the roles alternate as chat templates expect.
    """
    messages: list[Message] = []
    for message in history or ():
        role = _field(message, "role")
        text = _text(_field(message, "content"))
        if role not in ROLES or not text or _is_aside(message):
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


# --- prompt ---------------------------------------------------------------------


def _ids(encoded: Any) -> list[int]:
    """apply_chat_template's result (a list, a batch list, or a dict/BatchEncoding) as ids."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], (list, tuple)):
        encoded = encoded[0]
    return [int(i) for i in encoded]


def _plain_prompt(messages: Sequence[Message]) -> str:
    """A prompt for tokenizers without a chat template (base models)."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def _encode(tokenizer, messages: list[Message]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer.encode(_plain_prompt(messages)))
    try:
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    except Exception:
        # Some templates reject a system role: fold it into the first user message.
        if not messages or messages[0]["role"] != "system":
            raise
        system, first, *rest = messages
        merged = {"role": "user", "content": f"{system['content']}\n\n{first['content']}"}
        return _ids(tokenizer.apply_chat_template([merged, *rest], add_generation_prompt=True, tokenize=True))


def _turns(earlier: Sequence[Message]) -> list[list[Message]]:
    """Group earlier messages into turns, each a user message and the replies to it."""
    turns: list[list[Message]] = []
    for message in earlier:
        if message["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return turns


def _messages(system: str | None, turns: Sequence[list[Message]], latest: Message) -> list[Message]:
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    return head + [m for turn in turns for m in turn] + [latest]


def _latest(history: Sequence[Message]) -> Message:
    if not history or history[-1].get("role") != "user":
        raise ValueError("the chat history must end with a user message")
    latest = history[-1]
    if not str(latest.get("content", "")).strip():
        raise EmptyPromptError("the message is empty")
    return {"role": "user", "content": str(latest["content"])}


def _unencodable(field: str, text: str) -> None:
    """Refuse text the tokenizer cannot take (a lone UTF-16 surrogate: no UTF-8 for it), naming the field."""
    found = _SURROGATE.search(text)
    if found:
        raise ValueError(
            f"{field} contains characters that cannot be encoded (lone surrogate U+{ord(found.group()):04X})"
        )


def check_history(history: Sequence[Message], system: str | None) -> None:
    """Refuse, before any tokenizing, a history past the size limits or with text that cannot be
    encoded: one-line ValueErrors naming the field. Costs one pass over the characters."""
    if len(history) > HISTORY_MESSAGES_MAX:
        raise ValueError(f"the chat history is too long: {len(history)} messages, at most {HISTORY_MESSAGES_MAX}")
    chars = len(system or "")
    for number, message in enumerate(history, 1):
        content = message.get("content", "") if isinstance(message, Mapping) else None
        if not isinstance(content, str):
            raise ValueError(f"message {number} of the chat history is not a text message")
        chars += len(content)
    if chars > HISTORY_CHARS_MAX:
        raise ValueError(
            f"the chat history is too long: {chars} characters with the system prompt, at most {HISTORY_CHARS_MAX}"
        )
    _unencodable("the system prompt", system or "")
    for number, message in enumerate(history, 1):
        _unencodable(
            "the message" if number == len(history) else f"message {number} of the chat history", message["content"]
        )


def _most_turns_that_fit(encode: Callable[[int], list[int]], available: int, limit: int, ids: list[int]):
    """(m, ids): the most of the `available` newest turns whose prompt has at most `limit` tokens,
    given `ids`, the prompt with none of them, which fits.

    A prompt grows with every turn it keeps, so this gallops back from the newest turn (1, 2, 4, ...
    kept) and then bisects: each prompt encoded is at most twice the one that fits, and a long
    history costs no more than a short one (dropping one turn at a time re-encoded the whole rest
    of the history per turn, a cost that grew with the square of its length)."""
    fits, too_many = 0, None
    kept = 1
    while kept <= available:
        candidate = encode(kept)
        if len(candidate) > limit:
            too_many = kept
            break
        fits, ids = kept, candidate
        if kept == available:
            break
        kept = min(2 * kept, available)
    if too_many is None:
        return fits, ids
    while too_many - fits > 1:
        kept = (fits + too_many) // 2
        candidate = encode(kept)
        if len(candidate) > limit:
            too_many = kept
        else:
            fits, ids = kept, candidate
    return fits, ids


def _too_long(tokenizer, system: str | None, needed: int, limit: int) -> PromptTooLongError:
    """Blame the system prompt when it does not fit by itself, else the message."""
    if system:
        try:
            alone = len(_encode(tokenizer, _messages(system, [], {"role": "user", "content": ""})))
        except Exception:  # a template that refuses an empty message: blame the message, as below
            alone = 0
        if alone > limit:
            return PromptTooLongError(
                f"the system prompt is too long: {alone} prompt tokens by itself, "
                f"but the context leaves room for {limit}"
            )
    return PromptTooLongError(
        f"the message is too long: {needed} prompt tokens{' with the system prompt' if system else ''}, "
        f"but the context leaves room for {limit}"
    )


def build_prompt(tokenizer, history: Sequence[Message], system: str | None, max_prompt_tokens: int) -> PromptResult:
    """The prompt ids for `history` (ending with the user's latest message) in at most max_prompt_tokens.

    Oldest turns (a user message and its replies) are dropped until the prompt
    fits; the system prompt and the latest user message are always kept. A
    history past the limits of `check_history` is refused before any tokenizing.
    """
    check_history(history, system)
    latest = _latest(history)
    system = system if system and system.strip() else None
    earlier = [m for m in history[:-1] if m.get("role") in ROLES]
    turns = _turns(earlier)

    def encode(kept: int) -> list[int]:
        return _encode(tokenizer, _messages(system, turns[len(turns) - kept :] if kept else [], latest))

    ids = encode(0)
    if len(ids) > max_prompt_tokens:
        raise _too_long(tokenizer, system, len(ids), max_prompt_tokens)
    kept, ids = _most_turns_that_fit(encode, len(turns), max_prompt_tokens, ids)
    dropped = len(turns) - kept
    notice = f"{dropped} earlier turn(s) dropped to fit the context" if dropped else None
    return PromptResult(ids, dropped, notice)


# --- decoding ---------------------------------------------------------------------


def decode(tokenizer, ids: Sequence[int]) -> str:
    """Text of `ids`, special tokens left out."""
    return tokenizer.decode(list(ids), **_DECODE)


class StreamDecoder:
    """Incremental detokenizer: `push(ids)` returns the text the new ids add.

    Each push decodes only a short window: the tokens of the previous delta
    (the prefix, so merges and leading spaces come out as in a full decode)
    plus the new ones. While the window's text ends in U+FFFD -- a character
    whose bytes are split across tokens -- the text is held back until the
    rest arrives. `flush()` returns whatever is still held at the end.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # everything returned so far
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # end of what has been turned into text

    def _window_text(self, end: int) -> str:
        return self.tokenizer.decode(self.ids[self._prefix_offset : end], **_DECODE)

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        prefix = self._window_text(self._read_offset)
        window = self._window_text(len(self.ids))
        if len(window) <= len(prefix) or window.endswith(_HOLD):
            return ""
        delta = window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The held-back rest (e.g. a reply cut inside a multi-byte character)."""
        prefix = self._window_text(self._read_offset)
        window = self._window_text(len(self.ids))
        self._prefix_offset = self._read_offset = len(self.ids)
        delta = window[len(prefix) :] if len(window) > len(prefix) else ""
        self.text += delta
        return delta
