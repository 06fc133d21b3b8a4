"""What a client sends, checked before anything runs, and the prompt of a
reply built before the reply waits for the generation slot.

Contract: plain functions and two small classes over plain values, shared by
the page's handlers, the Gradio API's plain /chat and the OpenAI-compatible
API; no Gradio here.

- `check_message(value, field)` -> the text, or RequestError ("... is too
  large", "... must be text"): one line naming the field.
- `plain_history(value, field)` -> [{"role", "content"}], from an API
  client's list; `decoding_from(settings, value, source)` -> DecodingSettings
  from an API client's settings object, through the settings' own validation.
- `PromptDesk`: prompts built as a request arrives (Gradio's validator runs
  before the request joins the queue), kept until its handler takes them in
  the slot. Building the prompt tokenizes the conversation; done in the slot,
  a client's long history would keep everyone else waiting.
- `Admission`: at most so many requests waiting for the slot at once; past
  it a request is refused as busy before anything is built for it.
- `BodyLimit`: an ASGI middleware that answers 413 to a request body past a
  size, before anything reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..chat import check_history
from ..settings import (
    HISTORY_CHARS_MAX,
    HISTORY_MESSAGES_MAX,
    MESSAGE_CHARS_MAX,
    DecodingSettings,
    Settings,
    with_overrides,
)
from .handle import BusyError

API_SOURCE = "API settings"  # how a bad value's origin is named in its error line
ROLES = ("user", "assistant")
# A request body big enough for the largest history allowed (HISTORY_CHARS_MAX characters, each up
# to 6 bytes as a JSON escape) and its wrapping; anything bigger is refused before it is read.
BODY_BYTES_MAX = 6 * HISTORY_CHARS_MAX + 4 * 2**20


class RequestError(ValueError):
    """A refused request; the message is one line naming the field."""


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "text", list: "a list", dict: "an object"}
    return "nothing" if value is None else names.get(type(value), type(value).__name__)


def check_message(value: Any, field: str = "the message") -> str:
    """`value` as a message's text: a string of at most MESSAGE_CHARS_MAX characters."""
    if not isinstance(value, str):
        raise RequestError(f"{field} must be text, not {_kind(value)}")
    if len(value) > MESSAGE_CHARS_MAX:
        raise RequestError(f"{field} is too large: {len(value)} characters, at most {MESSAGE_CHARS_MAX}")
    return value


def check_size(messages: list[dict], system: str | None) -> None:
    """The history's size limits (messages, characters), as RequestError ("too large")."""
    try:
        check_history(messages, system)
    except ValueError as error:
        raise RequestError(str(error).replace("is too long", "is too large")) from None


def plain_history(value: Any, field: str = "history") -> list[dict]:
    """An API client's history: a list of {"role": "user" | "assistant", "content": str}, nothing else."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"{field} must be a list of {{role, content}} messages, not {_kind(value)}")
    if len(value) > HISTORY_MESSAGES_MAX:
        raise RequestError(f"{field} is too large: {len(value)} messages, at most {HISTORY_MESSAGES_MAX}")
    out = []
    for number, message in enumerate(value):
        where = f"{field}[{number}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be a {{role, content}} object, not {_kind(message)}")
        if message.get("role") not in ROLES:
            raise RequestError(f"{where}.role must be one of {'|'.join(ROLES)}, not {message.get('role')!r:.40}")
        content = message.get("content")
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be text, not {_kind(content)}")
        out.append({"role": message["role"], "content": content})
    return out


def _number_is_finite(value: Any) -> bool:
    return not (isinstance(value, float) and not math.isfinite(value))


def decoding_from(settings: Settings, value: Any, source: str = API_SOURCE) -> DecodingSettings:
    """An API client's settings object ({"k": 6, "temperature": 0.7, ...}; keys may also read
    "decoding.k") over the server's decoding settings, validated as the settings file is."""
    if value is None:
        return settings.decoding
    if not isinstance(value, dict):
        raise RequestError(f"{source}: settings must be an object of decoding fields, not {_kind(value)}")
    overrides = {}
    for key, given in value.items():
        name = str(key).removeprefix("decoding.")
        if not _number_is_finite(given):  # NaN and infinity: no rule would name them well
            raise RequestError(f"{source}: decoding.{name} = {given} is not a finite number")
        overrides[f"decoding.{name}"] = given
    return with_overrides(settings, overrides, source=source).decoding


# --- prompts built before the slot -----------------------------------------------------------


@dataclass
class Prepared:
    """A request's prompt (None: the service builds it itself), or why it cannot be answered."""

    session: str  # whose request it was ("default": one that came without a session)
    stops: int  # the session's Stop count when the request came in: a Stop since cancels it
    prompt: Any = None
    error: Exception | None = None
    made: float = field(default_factory=time.monotonic)


def prompt_key(messages: list[dict], decoding: DecodingSettings) -> str:
    """What a prompt depends on, as one digest (a history may be megabytes: it is not kept)."""
    text = json.dumps([repr(decoding), messages], ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def build_prompt(service: Any, messages: list[dict], decoding: DecodingSettings) -> Any:
    """The prompt of a reply to `messages` after the size checks; None for a service that builds its
    prompt in start_turn only. Raises RequestError or the service's one-line ValueErrors."""
    check_size(messages, decoding.system_prompt)
    prompt = getattr(service, "prompt", None)
    return prompt(messages, decoding) if prompt is not None else None


def prepare(session: str, stops: int, build: Callable[[], Any]) -> Prepared:
    """Run `build` (the prompt) now; what it raises is kept for the handler to say, in its own words."""
    prepared = Prepared(session, stops)
    try:
        prepared.prompt = build()
    except Exception as error:  # refused or failed
        prepared.error = error
    return prepared


class PromptDesk:
    """Prepared requests by key, until their handler takes them (or they age out).

    A request that joins the queue without a session (a plain HTTP client) gets one only after its
    validator ran, so the key leaves the session out: a handler takes its own session's entry, else
    one of an identical request (the same prompt), whose Stop count is then not its own."""

    KEPT = 64  # requests in flight at once; older ones are dropped (their handler builds again)
    MAX_AGE_S = 600.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, list[Prepared]] = OrderedDict()
        self._valid_from = 0.0  # requests prepared before this (monotonic) were built for a pair swapped out

    def put(self, key: str, prepared: Prepared) -> None:
        with self._lock:
            if prepared.made < self._valid_from:  # its prompt may hold the old tokenizer's ids
                return
            self._entries.setdefault(key, []).append(prepared)
            self._entries.move_to_end(key)
            while len(self._entries) > self.KEPT:
                self._entries.popitem(last=False)

    def take(self, key: str, session: str, stops: int) -> Prepared | None:
        """The prepared request for `key`: `session`'s own, else another's re-counted from `stops`."""
        with self._lock:
            waiting = self._entries.get(key) or []
            mine = [p for p in waiting if p.session == session]
            prepared = (mine or waiting or [None])[0]
            if prepared is not None:
                waiting.remove(prepared)
                if not waiting:
                    del self._entries[key]
            now = time.monotonic()
            for stale in [k for k, ps in self._entries.items() if all(now - p.made > self.MAX_AGE_S for p in ps)]:
                del self._entries[stale]
        if prepared is not None and prepared.session != session:
            prepared = Prepared(session, stops, prepared.prompt, prepared.error, prepared.made)
        return prepared

    def forget(self, before: float) -> None:
        """Drop the requests prepared before `before` (time.monotonic()), now and when they are put: the
        Model tab swapped the pair since, and their prompts are the old tokenizer's ids."""
        with self._lock:
            self._valid_from = max(self._valid_from, before)
            for key in list(self._entries):
                kept = [p for p in self._entries[key] if p.made >= self._valid_from]
                if kept:
                    self._entries[key] = kept
                else:
                    del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


class Admission:
    """At most `limit` requests wait at once: those in the queue (`queued()`) and those whose validator
    is still running. Gradio checks its queue's max_size before running validators, so requests that
    arrive together would all pass that check while their prompts are built; this counts them too."""

    def __init__(self, limit: int, queued: Callable[[], int] = lambda: 0):
        self.limit, self.queued = limit, queued
        self._lock = threading.Lock()
        self.arriving = 0

    def enter(self) -> None:
        """Count one more arriving request, or refuse it (BusyError) when the queue is full."""
        with self._lock:
            waiting = self.queued() + self.arriving
            if waiting >= self.limit:
                raise BusyError(f"the server is busy: {waiting} requests are waiting already; try again later")
            self.arriving += 1

    def leave(self) -> None:
        with self._lock:
            self.arriving -= 1


# --- the request body -------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: a request whose body is past `limit` bytes gets 413 before it is read
    (by its Content-Length, or by counting a body sent without one)."""

    def __init__(self, app: Any, limit: int = BODY_BYTES_MAX):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        seen, exceeded, started = 0, False, False

        async def counted() -> dict:
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # the app sees a client gone; the client gets the 413 below
                exceeded = True
                return {"type": "http.disconnect"}
            return message

        async def answer(message: dict) -> None:
            nonlocal started
            if exceeded:  # the app's answer to a body it never got whole: the 413 goes instead
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, answer)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(send)

    async def _refuse(self, send: Callable) -> None:
        body = json.dumps({"error": f"the request is too large: at most {self.limit} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
