"""An OpenAI-compatible chat API beside the page: POST /v1/chat/completions
(streamed as server-sent events, or not) and GET /v1/models.

Contract: `openai_routes(handle, settings, credentials)` returns the FastAPI
routes; chatapp.ui.launch puts them on Gradio's own app (as the app's first
routes, through launch's app_kwargs) when settings.server.openai_api is on.
A request carries OpenAI's fields: `messages` (system/developer messages make
the system prompt; the rest, user and assistant, the conversation),
`stream`, `temperature`, `top_p`, `max_tokens` (or `max_completion_tokens`),
`seed`, and SpecChat's own `top_k`, `mode`, `k` and `auto_k`, top level or
in a `specchat` object; a field left out takes the server's setting. Every
response carries the reply's stats record (`service.Turn.record()`:
acceptance_rate, k, speedup, mode, ...) in an extra field "specchat": the
completion's, or the last chunk's when streamed.

A reply runs in the one generation slot that the page's replies hold too
(`handle.slot`); its prompt is built before it waits for the slot. Refusals
are OpenAI-style errors ({"error": {"message", "type", ...}}): 400 for a bad
request, 401 without the credentials when the server has authentication
(send "user:password" as the API key), 503 while the models load or when too
many requests wait. A client that leaves stops its reply after the round.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from ..errors import one_line
from ..settings import DecodingSettings, Settings
from .handle import BusyError, Cancelled, ServiceHandle, UnavailableError
from .intake import RequestError, build_prompt, check_message, decoding_from

SOURCE = "request"  # how a bad value's origin is named in its error line
SYSTEM_ROLES = ("system", "developer")
# OpenAI's request fields -> DecodingSettings fields (SpecChat's own are named as in settings.toml).
FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "seed": "seed",
    "top_k": "top_k",
    "mode": "mode",
    "k": "k",
    "auto_k": "auto_k",
}
IGNORED = (
    "model",
    "stream",
    "stream_options",
    "n",
    "user",
    "messages",
    "specchat",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "metadata",
    "store",
)
LENGTH_REASONS = ("max_new_tokens", "context", "time limit")  # stop reasons OpenAI calls "length"
# Worker threads for replies of this API: few, and apart from the ones Gradio's handlers run in.
WORKERS = anyio.CapacityLimiter(4)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind

    def response(self) -> JSONResponse:
        return JSONResponse(_error_body(str(self), self.kind), status_code=self.status)


def _error_body(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _refused(error: BaseException) -> ApiError:
    """What a failure before the reply starts answers."""
    if isinstance(error, (UnavailableError, BusyError)):
        return ApiError(503, one_line(error), "server_error")
    if isinstance(error, ValueError):  # a bad value, a message too large, a prompt that does not fit
        return ApiError(400, one_line(error))
    return ApiError(500, f"{type(error).__name__}: {one_line(error)}", "server_error")


# --- the request ---------------------------------------------------------------------------------


def _content(value: Any, where: str) -> str:
    """A message's content: text, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list):
        parts = []
        for number, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"{where}.content[{number}] must be a text part (images and files are not read)")
            parts.append(part["text"])
        value = "\n".join(parts)
    return check_message(value, f"{where}.content")


def conversation(messages: Any) -> tuple[list[dict], str | None]:
    """(the user/assistant messages, the system prompt or None) from OpenAI's `messages`."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} messages")
    chat, system = [], []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be a {{role, content}} object")
        role = message.get("role")
        if role not in ("user", "assistant", *SYSTEM_ROLES):
            raise RequestError(f"{where}.role must be one of user|assistant|system|developer, not {role!r:.40}")
        text = _content(message.get("content"), where)
        if role in SYSTEM_ROLES:
            system.append(text)
        else:
            chat.append({"role": role, "content": text})
    if not chat or chat[-1]["role"] != "user":
        raise RequestError("messages must end with a user message")
    return chat, "\n\n".join(system) if system else None


def decoding_of(settings: Settings, body: dict, system: str | None) -> DecodingSettings:
    """The reply's decoding settings: the server's, with the request's fields (and its system prompt,
    if it has one) over them."""
    extra = body.get("specchat") or {}
    if not isinstance(extra, dict):
        raise RequestError("specchat must be an object of SpecChat's decoding fields")
    unknown = sorted(set(body) - set(FIELDS) - set(IGNORED))
    if unknown:
        raise RequestError(f"unsupported field {unknown[0]!r} (supported: {', '.join(sorted(FIELDS))})")
    if body.get("n") not in (None, 1):
        raise RequestError("n must be 1: one reply per request")
    given = {FIELDS[name]: value for name, value in body.items() if name in FIELDS and value is not None}
    given.update(extra)
    if system is not None:
        given["system_prompt"] = system
    return decoding_from(settings, given, SOURCE)


# --- the reply ----------------------------------------------------------------------------------


class Reply:
    """One completion: the prompt built, the slot held, then the turn's rounds."""

    def __init__(self, handle: ServiceHandle, settings: Settings, body: dict):
        messages, system = conversation(body.get("messages"))
        decoding = decoding_of(settings, body, system)
        self.handle, self.messages, self.decoding = handle, messages, decoding
        self.service = handle.require()
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.model = str(body.get("model") or self.service.pair.target.info.name)
        self.left = threading.Event()  # the client went away
        self.prompt: Any = None
        self.turn: Any = None

    def build(self) -> None:
        self.prompt = build_prompt(self.service, self.messages, self.decoding)

    def start(self) -> None:
        built = {} if self.prompt is None else {"prompt": self.prompt}
        self.turn = self.service.start_turn(self.messages, self.decoding, **built)

    def rounds(self) -> Iterator[str]:
        """The text each round adds (the slot is held by the caller)."""
        events = iter(self.turn)
        try:
            for event in events:
                if self.left.is_set():
                    self.turn.stop()
                if event.text:
                    yield event.text
        finally:
            events.close()

    def finish_reason(self) -> str:
        return "length" if self.turn.stats.stop_reason in LENGTH_REASONS else "stop"

    def usage(self) -> dict:
        prompt = self.turn.stats.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.turn.stats.new_tokens,
            "total_tokens": prompt + self.turn.stats.new_tokens,
        }

    def completion(self) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.turn.text},
                    "finish_reason": self.finish_reason(),
                }
            ],
            "usage": self.usage(),
            "specchat": self.turn.record(),
        }

    def chunk(self, delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _authorized(request: Request, credentials: list[tuple[str, str]] | None) -> bool:
    if not credentials:
        return True
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return any(secrets.compare_digest(given.encode(), f"{user}:{password}".encode()) for user, password in credentials)


async def _watch(request: Request, reply: Reply) -> None:
    """Mark the reply as left when its client disconnects."""
    while not reply.left.is_set():
        if await request.is_disconnected():
            reply.left.set()
            return
        await asyncio.sleep(0.25)


async def _in_thread(function, *args):
    return await anyio.to_thread.run_sync(function, *args, limiter=WORKERS)


def openai_routes(
    handle: ServiceHandle, settings: Settings, credentials: list[tuple[str, str]] | None = None
) -> list[APIRoute]:
    """The API's routes (see the module docstring)."""

    async def completions(request: Request):
        if not _authorized(request, credentials):
            return ApiError(
                401, 'this server needs authentication: send "user:password" as the API key', "authentication_error"
            ).response()
        try:
            body = await request.json()
        except ValueError:
            return ApiError(400, "the request body must be a JSON object").response()
        if not isinstance(body, dict):
            return ApiError(400, "the request body must be a JSON object").response()
        try:
            reply = Reply(handle, settings, body)
            await _in_thread(reply.build)  # before the slot: a long history keeps nobody waiting
        except Exception as error:
            return _refused(error).response()
        if body.get("stream"):
            if handle.slot.full:
                return _refused(
                    BusyError("the server is busy: too many requests wait for a reply; try again later")
                ).response()
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(request, handle, reply, include_usage), media_type="text/event-stream")
        watcher = asyncio.create_task(_watch(request, reply))
        try:
            await handle.slot.acquire_async(cancelled=_left(reply))
        except (BusyError, Cancelled) as error:
            watcher.cancel()
            return _refused(error).response()
        try:
            await _in_thread(reply.start)
            await _in_thread(lambda: [None for _ in reply.rounds()])
        except Exception as error:  # refused at the start, or the engine failed mid-reply
            failure = (
                _refused(error)
                if reply.turn is None
                else ApiError(500, f"generation failed: {one_line(error)}", "server_error")
            )
            return failure.response()
        finally:
            handle.slot.release()
            watcher.cancel()
        return JSONResponse(reply.completion())

    async def models(request: Request):
        if not _authorized(request, credentials):
            return ApiError(401, "this server needs authentication", "authentication_error").response()
        service = handle.service
        names = [] if service is None else [service.pair.target.info.name]
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": name, "object": "model", "created": 0, "owned_by": "specchat"} for name in names],
            }
        )

    return [
        APIRoute("/v1/chat/completions", completions, methods=["POST"], include_in_schema=False),
        APIRoute("/v1/models", models, methods=["GET"], include_in_schema=False),
    ]


def _left(reply: Reply):
    async def left() -> bool:
        return reply.left.is_set()

    return left


async def _stream(request: Request, handle: ServiceHandle, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """The reply as server-sent events: it waits for the slot, and releases it however it ends (a
    failure is an error event, which OpenAI's clients raise)."""
    watcher = asyncio.create_task(_watch(request, reply))
    held, rounds = False, None
    try:
        await handle.slot.acquire_async(cancelled=_left(reply))
        held = True
        await _in_thread(reply.start)
        rounds = reply.rounds()
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            text = await _in_thread(next, rounds, None)
            if text is None:
                break
            yield reply.chunk({"content": text})
        usage = {"usage": reply.usage()} if include_usage else {}
        yield reply.chunk({}, reply.finish_reason(), specchat=reply.turn.record(), **usage)
        yield "data: [DONE]\n\n"
    except Exception as error:
        failure = (
            _refused(error)
            if reply.turn is None
            else ApiError(500, f"generation failed: {one_line(error)}", "server_error")
        )
        yield f"data: {json.dumps(_error_body(str(failure), failure.kind))}\n\n"
    finally:
        reply.left.set()  # a client gone mid-stream: the reply stops after its round
        with anyio.CancelScope(shield=True):
            if rounds is not None:
                await _in_thread(rounds.close)
        if held:
            handle.slot.release()
        watcher.cancel()
