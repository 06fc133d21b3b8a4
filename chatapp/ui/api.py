"""The Gradio API's plain /chat, for other programs: a message, an optional
history and an optional settings object in; the reply and its stats out.

Contract: `add_chat_api(handlers, concurrency)`, called inside the Blocks,
adds the endpoint /chat(message, history=None, settings=None) with two named
outputs, "reply" (the text so far, streamed round by round) and "stats" (the
live stats while it streams; at the end the reply's record,
`service.Turn.record()`). `history` is a list of {"role": "user" |
"assistant", "content": str}; `settings` an object of decoding fields
({"k": 6, "temperature": 0.7, ...}) validated as settings.toml is. No browser
state comes in or goes out. A refusal (a bad value, a message too large, the
models not loaded, a Stop before the start) is a gr.Error of one line naming
what was wrong; no traceback is logged.

Like the page's chat, the prompt is built by the endpoint's validator before
the request joins the queue, and the reply runs in the one generation slot
(Gradio's concurrency id, then the handle's lock); /stop from the same client
session stops it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr
from gradio.components.api_component import Api

from .. import zerogpu
from ..errors import one_line
from .handle import BusyError, Cancelled, UnavailableError, session_key
from .handlers import Handlers
from .intake import RequestError, build_prompt, check_message, decoding_from, plain_history, prepare, prompt_key

API_OUTPUTS = ("reply", "stats")
_SCHEMAS = {
    "message": {"type": "string", "description": "the user's message"},
    "history": {
        "type": "array",
        "description": "earlier messages, oldest first",
        "items": {
            "type": "object",
            "properties": {"role": {"type": "string", "enum": ["user", "assistant"]}, "content": {"type": "string"}},
        },
    },
    "settings": {"type": "object", "description": 'decoding fields, e.g. {"k": 6, "temperature": 0.7}'},
    "reply": {"type": "string", "description": "the reply (so far, while it streams)"},
    "stats": {"type": "object", "description": "the reply's stats record (live while it streams)"},
}


def _refusal(error: BaseException) -> gr.Error:
    """One line for the client; Gradio logs no traceback for it."""
    return gr.Error(one_line(error), print_exception=False)


class PlainChat:
    """The /chat endpoint and its validator, over the page's handlers (their handle, sessions, prompt desk)."""

    def __init__(self, handlers: Handlers):
        self.handlers = handlers

    def _request(self, message: Any, history: Any, settings: Any) -> tuple[list[dict], Any]:
        messages = plain_history(history) + [{"role": "user", "content": check_message(message)}]
        if not messages[-1]["content"].strip():
            raise RequestError("the message is empty")
        return messages, decoding_from(self.handlers.settings, settings)

    def _build(self, messages: list[dict], decoding: Any) -> Any:
        return build_prompt(self.handlers.handle.require(), messages, decoding)

    def prepare(self, message: Any, history: Any = None, settings: Any = None, request: gr.Request = None) -> list:
        """The validator: refuse a request past the queue's limit (busy), and build the prompt before the
        request queues (the endpoint refuses what fails, in its own words)."""
        valid = [gr.validate(True, "")] * 3
        admission = self.handlers.admission
        try:
            admission.enter()
        except BusyError as busy:
            return [gr.validate(False, str(busy)), *valid[1:]]
        try:
            messages, decoding = self._request(message, history, settings)
            session = self.handlers.sessions.get(request)
            self.handlers.desk.put(
                prompt_key(messages, decoding),
                prepare(session_key(request), session.stops, lambda: self._build(messages, decoding)),
            )
        except ValueError:
            pass
        finally:
            admission.leave()
        return valid

    def reply(
        self, message: Any, history: Any = None, settings: Any = None, request: gr.Request = None
    ) -> Iterator[tuple[str, dict]]:
        """Answer `message` after `history`; streams (reply so far, live stats), then (reply, record)."""
        handlers = self.handlers
        session = handlers.sessions.get(request)
        try:
            messages, decoding = self._request(message, history, settings)
        except ValueError as error:
            raise _refusal(error) from None
        mine = session_key(request)
        prepared = handlers.desk.take(prompt_key(messages, decoding), mine, session.stops) or prepare(
            mine, session.stops, lambda: self._build(messages, decoding)
        )
        if prepared.error is not None:
            raise _refusal(prepared.error)
        built = {} if prepared.prompt is None else {"prompt": prepared.prompt}
        try:
            with handlers.handle.slot.hold(cancelled=lambda: session.stops != prepared.stops):
                if session.stops != prepared.stops:
                    raise Cancelled("stopped before the reply started")
                turn = handlers.handle.require().start_turn(messages, decoding, **built)
                yield from self._stream(session, turn)
        except (ValueError, UnavailableError, BusyError, Cancelled) as error:
            raise _refusal(error) from None

    @staticmethod
    def _stream(session: Any, turn: Any) -> Iterator[tuple[str, dict]]:
        error = None
        try:
            with session.running(turn) as events:
                for _ in events:
                    yield turn.text, turn.stats.to_dict()
        except Exception as failure:  # the engine failed mid-reply: what came is kept, and why it ended
            error = failure
        record = turn.record()
        if error is not None:
            record["error"] = f"generation failed: {one_line(error)}"
        yield turn.text, record


def add_chat_api(handlers: Handlers, concurrency: dict[str, Any]) -> PlainChat:
    """Add /chat to the Blocks being built (see the module docstring); `concurrency` holds the
    generation slot's concurrency_id and concurrency_limit."""
    blocks = gr.context.get_blocks_context()
    if blocks is None:
        raise RuntimeError("add_chat_api must be called inside a gr.Blocks")
    chat = PlainChat(handlers)
    inputs = [
        Api(None, _SCHEMAS["message"], "message"),
        Api(None, _SCHEMAS["history"], "history"),
        Api(None, _SCHEMAS["settings"], "settings"),
    ]
    outputs = [Api(None, _SCHEMAS[name], name) for name in API_OUTPUTS]
    blocks.set_event_trigger(
        [],
        zerogpu.gpu_reply()(chat.reply),
        inputs,
        outputs,
        preprocess=False,
        postprocess=False,
        show_progress="hidden",
        api_name="chat",
        api_description=PlainChat.reply.__doc__,
        validator=chat.prepare,
        queue=True,
        **concurrency,
    )
    return chat
