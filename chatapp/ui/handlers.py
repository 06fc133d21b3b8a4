"""What the app does when it is used: chat, regenerate, stop, clear, restore,
compare, the Stats tab and the Model tab (the saved conversations' panel is
conversations_panel's).

Contract: `Handlers(handle, settings)` holds what outlives a call (the
service handle, the per-browser sessions, the token-piece cache, the
Compare order). Each handler returns (or streams) its outputs as a tuple in
the order of CHAT_OUTPUTS, STATS_OUTPUTS or COMPARE_OUTPUTS, so the layout
wires components by those names; generating handlers take ONE
DecodingSettings (sidebar.decoding_endpoint builds it from the inputs).

Every handler catches its own errors and shows one line (a gr.Warning toast
plus a notice line); no traceback ever reaches the page.

What a client sends is untrusted (chatapp.ui.intake): a reply's prompt is
built by `prepare_chat` / `prepare_regenerate`, which the layout runs as the
events' validators, before the request joins the queue for the generation
slot; the handler takes it from the desk (or builds it, when nothing did).
A Stop pressed before a reply starts keeps it from starting. Every reply
holds the handle's generation slot while it runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gradio as gr
import pandas as pd

from .. import zerogpu
from ..autok import AcceptanceTracker
from ..errors import one_line
from ..settings import DecodingSettings, Settings, SettingsError
from .format import (
    COMPARE_COLUMNS,
    CURSOR,
    NO_STATS,
    PICKER_OFF,
    compare_rows,
    compare_verdict,
    live_line,
    model_markdown,
    model_status_line,
    reload_markdown,
    stats_line,
)
from .handle import BusyError, Cancelled, ServiceHandle, Session, Sessions, UnavailableError, session_key
from .intake import Admission, Prepared, PromptDesk, RequestError, build_prompt, check_message, prepare, prompt_key
from .markdown import without_remote_content
from .picker import CUSTOM, DRAFT_OTHER, can_switch, chosen_model, preset_fields
from .sidebar import decoding_settings
from .state import clean_state, history, records, render_chat
from .stats_tab import reply_caption, reply_frame, stats_summary, theory_caption, theory_frame, turns_frame
from .tokens import TokenView

# What /chat, /regenerate, /clear and /restore return, in order (for API clients and tests).
CHAT_OUTPUTS = ("chatbot", "message", "state", "stats", "tokens", "notice", "turns_table", "summary")
STATS_OUTPUTS = ("turn_plot", "theory_plot", "turns_table", "summary")  # what /stats returns
COMPARE_OUTPUTS = ("standard", "speculative", "table", "verdict")  # what /compare returns
MODEL_OUTPUTS = ("model", "status", "timer")  # what the loading timer refreshes
PICKER_INPUTS = ("preset", "target", "draft_kind", "draft", "quantization")  # the Model tab's picker
LOAD_OUTPUTS = ("load_status", "model", "status")  # what loading another pair updates
LOAD_POLL_S = 0.25  # how often a load in progress is shown
Loader = Callable[[Settings, Callable[[str], None]], Any]  # (settings, progress) -> a ready service
MODES = ("standard", "speculative")


class Outputs:
    """Handler results by output name, as the tuple Gradio expects; names not
    given are left as they are on the page (gr.skip())."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)

    def __call__(self, **values: Any) -> tuple:
        unknown = set(values) - set(self.names)
        if unknown:
            raise TypeError(f"not an output: {', '.join(sorted(unknown))}")
        return tuple(values.get(name, gr.skip()) for name in self.names)


def _edited_text(value: Any) -> str:
    """The text of a Chatbot message value (a string, {"text": ...}, or a list of content parts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("text") or value.get("content") or "")
    if isinstance(value, list):
        return "".join(_edited_text(part) for part in value)
    return ""


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _load_service(settings: Settings, progress: Callable[[str], None]) -> Any:
    """The app's own loader (launch.load_service): the pair, then its standard-decoding baseline."""
    from .launch import load_service  # imported on use: launch imports this module (through the layout)

    return load_service(settings, progress)


def _warn(line: str) -> str:
    gr.Warning(line)
    return f"⚠ {line}"


def _start_failure(error: Exception) -> str:
    # Bad input (too long, bad settings), "not loaded" and "busy" say enough; anything else is named.
    if isinstance(error, (ValueError, UnavailableError, BusyError, Cancelled)):
        return one_line(error)
    return f"{type(error).__name__}: {one_line(error)}"


def _last_stats_line(replies: list[dict]) -> str:
    try:
        return stats_line(replies[-1]) if replies else NO_STATS
    except Exception:  # a stored record this version cannot put in words: no stats line rather than no chat
        return NO_STATS


def _user_messages(message: Any, chat_state: Any) -> list[dict]:
    """The stored chat and the new message (RequestError for a message that is not text or too large)."""
    return clean_state(chat_state)["messages"] + [{"role": "user", "content": check_message(message)}]


def _without_reply(chat_state: Any) -> list[dict]:
    """The stored chat up to its last user message (what Regenerate answers again)."""
    messages = clean_state(chat_state)["messages"]
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages


class Handlers:
    """The app's event handlers over one service handle; `refuse_*` answer for a
    handler whose sidebar values the settings refused (see sidebar.decoding_endpoint)."""

    def __init__(self, handle: ServiceHandle, settings: Settings, loader: Loader | None = None):
        self.handle, self.settings = handle, settings
        self.loader = loader or _load_service  # what the Model tab's Load builds a service with
        self.can_switch = can_switch(settings.server)
        self.load_out = Outputs(LOAD_OUTPUTS)
        self.sessions = Sessions()
        self.token_view = TokenView()
        self.chat_out, self.stats_out = Outputs(CHAT_OUTPUTS), Outputs(STATS_OUTPUTS)
        self.compare_out = Outputs(COMPARE_OUTPUTS)
        self._compares = itertools.count()  # Compare alternates which decoding runs first
        self.desk = PromptDesk()  # prompts built before their request queued (see prepare_chat)
        self.admission = Admission(settings.server.max_queue)  # the layout tells it the queue's length
        self.remote_images = settings.server.allow_remote_images

    # --- chat ----------------------------------------------------------------------

    def chat(self, message: str, chat_state: Any, decoding: DecodingSettings, request: gr.Request = None):
        """Send `message`; streams the reply. `chat_state` is the stored chat ({"messages": [...]})."""
        session = self.sessions.get(request)
        try:
            messages = _user_messages(message, chat_state)
        except RequestError as error:  # not text, or too large: the box keeps what was typed
            yield self._failed(error, "Not sent: ")
            return
        text = messages[-1]["content"]
        if not text.strip():
            yield self._failed("the message is empty: type something first")
            return
        yield from self._reply(session, request, messages, decoding, "Not sent: ", clear_box=True, message=text)

    def prepare_chat(
        self, message: Any, chat_state: Any, decoding: DecodingSettings, request: gr.Request = None
    ) -> None:
        """/send's validator: build the prompt before the request queues (the handler refuses what fails)."""
        try:
            self._prepare(request, _user_messages(message, chat_state), decoding)
        except RequestError:
            pass

    def refuse_chat(self, error: Exception, message: str, chat_state: Any) -> tuple:
        return self._failed(error, "Not sent: ", message=message if isinstance(message, str) else gr.skip())

    def regenerate(self, chat_state: Any, decoding: DecodingSettings, request: gr.Request = None):
        """Answer the last user message again (the last reply is replaced)."""
        session = self.sessions.get(request)
        messages = _without_reply(chat_state)
        if not messages:
            yield self._failed("nothing to regenerate yet")
            return
        yield from self._reply(session, request, messages, decoding, "Cannot regenerate: ", clear_box=False)

    def prepare_regenerate(self, chat_state: Any, decoding: DecodingSettings, request: gr.Request = None) -> None:
        """/regenerate's validator: as prepare_chat."""
        messages = _without_reply(chat_state)
        if messages:
            self._prepare(request, messages, decoding)

    def prepare_compare(self, prompt: Any, decoding: DecodingSettings, request: gr.Request = None) -> None:
        """/compare's validator has nothing to build (one short message, a fresh prompt per run)."""

    def refuse_regenerate(self, error: Exception, chat_state: Any) -> tuple:
        return self._failed(error, "Cannot regenerate: ")

    def stop(self, request: gr.Request = None) -> str:
        """Stop this session's running reply after its current round; a reply of this session that has
        not started yet (its prompt being built, or waiting in the queue) does not start."""
        session = self.sessions.get(request)
        session.stops += 1
        if zerogpu.STOPS.request(session.key):  # ZeroGPU: the reply runs in a forked worker
            return "■ Stopping after the current round…"
        turn = session.turn
        if turn is None:
            return "Nothing is being generated."
        try:
            turn.stop()
        except Exception as error:
            return f"⚠ Stop failed: {one_line(error)}"
        return "■ Stopping after the current round…"

    def clear(self, request: gr.Request = None) -> tuple:
        """Forget the conversation (stops a running reply)."""
        session = self.sessions.get(request)
        session.epoch += 1
        zerogpu.STOPS.request(session.key, zerogpu.CLEAR)
        if session.turn is not None:
            session.turn.stop()
        return self._chat_view([], tokens=[], notice="")

    def restore(self, chat_state: Any) -> tuple:
        """Show the chat stored in the browser (on page load). What cannot be read is left out (a reply
        whose record is unreadable keeps its text); should showing it fail, the stored chat stays as it is."""
        try:
            return self.show(clean_state(chat_state)["messages"])
        except Exception as error:
            return self.chat_out(notice=f"⚠ Could not show the saved chat: {one_line(error)}")

    def show(self, messages: list[dict], notice: str = "") -> tuple:
        """Every chat output for a conversation opened from elsewhere (a saved one: conversations_panel)."""
        return self._chat_view(messages, tokens=[], notice=notice)

    def replying(self, request: gr.Request = None) -> bool:
        """Whether this browser session has a reply being generated."""
        return self.sessions.get(request).turn is not None

    # --- the chat's own controls: undo, edit, examples (its retry is regenerate) ----------------

    def undo(self, chat_state: Any, request: gr.Request = None) -> tuple:
        """Take back the last exchange: its user message returns to the input box, its reply is dropped
        (one still running stops and does not write back)."""
        self._drop_running(request)
        messages = clean_state(chat_state)["messages"]
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)
        if last is None:
            return self.chat_out(notice="Nothing to undo.")
        return self._chat_view(messages[:last], message=messages[last]["content"], tokens=[], notice="")

    def edit(self, chat_state: Any, shown: Any, resend: Any, edit: gr.EditData, request: gr.Request = None) -> tuple:
        """A user message edited in the chat: the conversation before it stays, what came after it goes, and
        the new text goes to the input box; `resend` + 1 sends it (see the layout)."""
        text = _edited_text(edit.value)
        if not text.strip():
            raise gr.Error("The edited message is empty: the chat is left as it was.", print_exception=False)
        messages = clean_state(chat_state)["messages"]
        index = edit.index[0] if isinstance(edit.index, (list, tuple)) else edit.index
        # The Chatbot counts its asides too; the user messages before the edited one say which it is.
        before = sum(1 for m in (shown or [])[: int(index)] if isinstance(m, dict) and m.get("role") == "user")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if before >= len(users):
            raise gr.Error("That message is no longer in the chat.", print_exception=False)
        self._drop_running(request)
        kept = messages[: users[before]]
        return (*self._chat_view(kept, message=text, tokens=[], notice=""), _count(resend) + 1)

    @staticmethod
    def example(resend: Any, selection: gr.SelectData) -> tuple[str, int]:
        """An example prompt clicked on the empty chat goes to the input box; `resend` + 1 sends it."""
        return _edited_text(selection.value), _count(resend) + 1

    @staticmethod
    def idle() -> tuple:
        """Send back in Stop's place: nothing is being generated."""
        return gr.update(visible=True), gr.update(visible=False)

    def _drop_running(self, request: Any) -> None:
        """This session's running reply stops and does not write back (as Clear)."""
        session = self.sessions.get(request)
        session.epoch += 1
        if session.turn is not None:
            session.turn.stop()

    def _failed(self, error: BaseException | str, prefix: str = "", **extra: Any) -> tuple:
        return self.chat_out(notice=_warn(f"{prefix}{one_line(error)}"), **extra)

    def _prepare(self, request: Any, messages: list[dict], decoding: DecodingSettings) -> None:
        """Build the prompt of a reply to `messages` now, for its handler to take."""
        session = self.sessions.get(request)
        key = prompt_key(messages, decoding)
        self.desk.put(key, prepare(session_key(request), session.stops, lambda: self._build(messages, decoding)))

    def _build(self, messages: list[dict], decoding: DecodingSettings) -> Any:
        return build_prompt(self.handle.require(), history(messages), decoding)

    def _prepared(self, request: Any, session: Session, messages: list[dict], decoding: DecodingSettings) -> Prepared:
        """The request's prompt from its validator, or built now (its validator did not run)."""
        mine = session_key(request)
        return self.desk.take(prompt_key(messages, decoding), mine, session.stops) or prepare(
            mine, session.stops, lambda: self._build(messages, decoding)
        )

    def _reply(
        self,
        session: Session,
        request: Any,
        messages: list[dict],
        decoding: DecodingSettings,
        refused: str,
        clear_box: bool,
        **kept: Any,
    ) -> Iterator[tuple]:
        """Answer `messages`: the prepared prompt, then the slot, then the reply streamed; `refused`
        starts the line of a reply that could not start (`kept` outputs are left as given)."""
        prepared = self._prepared(request, session, messages, decoding)
        failure = prepared.error
        if failure is None:
            try:
                with self.handle.slot.hold(cancelled=lambda: session.stops != prepared.stops):
                    if session.stops != prepared.stops:
                        raise Cancelled("stopped before the reply started")
                    try:
                        turn = self._start(messages, decoding, prepared.prompt)
                    except Exception as error:
                        failure = error
                    else:
                        yield from self._stream(session, messages, turn, clear_box)
            except (Cancelled, BusyError) as error:
                failure = error
        if failure is not None:
            yield self._failed(_start_failure(failure), "■ " if isinstance(failure, Cancelled) else refused, **kept)

    def _start(self, messages: list[dict], decoding: DecodingSettings, prompt: Any = None) -> Any:
        built = {} if prompt is None else {"prompt": prompt}
        return self.handle.require().start_turn(history(messages), decoding, **built)

    def _render(self, messages: list[dict], streaming: str | None = None, notice: str | None = None) -> list[dict]:
        return render_chat(messages, streaming, notice, remote_images=self.remote_images)

    def _shown(self, text: str) -> str:
        """Model text for a Markdown pane: without remote images unless the settings allow them."""
        return text if self.remote_images else without_remote_content(text)

    def _chat_view(self, messages: list[dict], **extra: Any) -> tuple:
        """Every chat output for a finished conversation (`extra` overrides)."""
        replies = records(messages)
        values = {
            "chatbot": self._render(messages),
            "state": {"messages": messages},
            "stats": _last_stats_line(replies),
            "turns_table": turns_frame(replies),
            "summary": stats_summary(self.handle.service, replies),
        }
        return self.chat_out(**{**values, **extra})

    def _stream(self, session: Session, messages: list[dict], turn: Any, clear_box: bool) -> Iterator[tuple]:
        """Stream one reply into the chat, then store it (with its stats) in the browser state."""
        epoch = session.epoch
        tokenizer = self.handle.service.tokenizer  # the reply's own, even if the pair is swapped meanwhile
        error = yield from self._rounds(session, epoch, messages, turn, clear_box, tokenizer)
        if session.epoch == epoch:  # not cleared meanwhile
            yield self._stored(messages, turn, error, tokenizer)

    def _rounds(self, session: Session, epoch: int, messages: list[dict], turn: Any, clear_box: bool, tokenizer: Any):
        """The live updates of one reply; returns the error that ended it early, if any."""
        pieces, stream = [], self.token_view.stream(tokenizer)
        try:
            with session.running(turn) as events:
                if turn.notice:
                    gr.Info(turn.notice)
                yield self.chat_out(
                    chatbot=self._render(messages, "", turn.notice),
                    message="" if clear_box else gr.skip(),
                    stats=live_line(turn.stats),
                    tokens=[],
                    notice=f"ℹ {turn.notice}" if turn.notice else "",
                )
                for event in events:
                    pieces.extend(stream.push(event.tokens))
                    if session.epoch != epoch:  # cleared meanwhile: end the reply, show nothing more
                        turn.stop()
                        continue
                    yield self.chat_out(
                        chatbot=self._render(messages, turn.text, turn.notice),
                        stats=live_line(turn.stats),
                        tokens=pieces,
                    )
        except Exception as error:  # the engine failed mid-reply: keep what came, say why
            return error
        return None

    def _stored(self, messages: list[dict], turn: Any, error: Exception | None, tokenizer: Any) -> tuple:
        """The last update of a reply: it and its record join the stored chat; the notice says how it ended."""
        record = turn.record()
        messages = messages + [{"role": "assistant", "content": turn.text, "stats": record}]
        notice = "■ Stopped: the reply is cut where it was." if record.get("stop_reason") == "stopped" else ""
        if turn.notice:
            notice = f"ℹ {turn.notice}"
        if record.get("stop_reason") == "out of memory":  # the conversation before it is intact
            notice = _warn(f"{turn.notice}; ↻ Regenerate tries this reply again")
        if error is not None:
            notice = _warn(f"generation failed: {one_line(error)}")
        return self._chat_view(messages, tokens=self.token_view(tokenizer, turn.tokens), notice=notice)

    # --- compare -------------------------------------------------------------------

    def compare(self, prompt: str, decoding: DecodingSettings, request: gr.Request = None):
        """Answer `prompt` with standard and with speculative decoding, one after the other; compare."""
        session = self.sessions.get(request)
        try:
            prompt = check_message(prompt, "the prompt")
        except RequestError as error:
            yield self.refuse_compare(error, "")
            return
        if not prompt.strip():
            gr.Warning("the prompt is empty")
            yield self.compare_out(verdict="⚠ The prompt is empty.")
            return
        try:
            service = self.handle.require()
        except UnavailableError as error:
            yield self.refuse_compare(error, prompt)
            return
        order = MODES if next(self._compares) % 2 == 0 else MODES[::-1]
        yield self.compare_out(
            standard="", speculative="", table=None, verdict=f"Running {order[0]} first, then {order[1]}…"
        )
        turns: dict[str, Any] = {}
        stops = session.stops
        try:
            with self.handle.slot.hold(cancelled=lambda: session.stops != stops):
                error = yield from self._compare_runs(service, session, prompt, decoding, order, turns)
        except (Cancelled, BusyError) as refused:
            error = refused
        yield self.compare_out(
            standard=self._shown(turns["standard"].text) if "standard" in turns else "",
            speculative=self._shown(turns["speculative"].text) if "speculative" in turns else "",
            table=pd.DataFrame(compare_rows(turns, order), columns=COMPARE_COLUMNS),
            verdict=compare_verdict(turns, order, decoding.temperature, decoding.seed, error),
        )

    def refuse_compare(self, error: Exception, prompt: str) -> tuple:
        return self.compare_out(verdict=_warn(one_line(error)))

    def _compare_runs(
        self,
        service: Any,
        session: Session,
        prompt: str,
        decoding: DecodingSettings,
        order: tuple[str, ...],
        turns: dict[str, Any],
    ):
        """Run each decoding in `order` into `turns`, streaming its pane; returns the error that ended the
        comparison early, if any (a Stop ends it too)."""
        conversation = [{"role": "user", "content": prompt}]
        for mode in order:
            try:  # fresh: no keys/values kept from the chat or the other run, so both pay the whole prefill
                turn = turns[mode] = service.start_turn(
                    conversation, dataclasses.replace(decoding, mode=mode), fresh=True
                )
            except Exception as error:
                return error
            try:
                with session.running(turn) as events:
                    for _ in events:
                        yield self.compare_out(**{mode: self._shown(turn.text) + CURSOR})
            except Exception as error:
                return error
            if turn.stats.stop_reason == "stopped":
                return None
        return None

    # --- the Stats and Model tabs ------------------------------------------------------

    def stats(self, chat_state: Any, k: Any) -> tuple:
        """The Stats tab for the stored chat: per-reply plot, theory plot, table, summary."""
        try:
            replies = records(clean_state(chat_state)["messages"])
            service = self.handle.service
            c = service.tracker.cost_ratio if service is not None else AcceptanceTracker.PRIOR_COST_RATIO
            k = decoding_settings(self.settings, {"k": k}).k  # an API client's k: checked as the sidebar's
            theory, colors = theory_frame(replies, c, k)
            return self.stats_out(
                turn_plot=gr.LinePlot(reply_frame(replies), x_lim=None),
                theory_plot=gr.ScatterPlot(theory, x_lim=[0, 1]),  # its colors come with the caption
                turns_table=turns_frame(replies),
                summary=stats_summary(service, replies, k),
            )
        except Exception as error:
            # No gr.Warning: this event is not queued, where Gradio would print the line (the user's value
            # in it) to the server's terminal instead of showing a toast; the summary says it.
            return self.stats_out(summary=f"⚠ Cannot draw the stats: {one_line(error)}")

    def plot_captions(self, chat_state: Any, k: Any) -> tuple:
        """The Stats tab's plot captions (and the theory's colors), sent after their points: a caption that
        changes makes the browser redraw the plot's legend for the series it now has (see stats_tab)."""
        try:
            replies = records(clean_state(chat_state)["messages"])
            service = self.handle.service
            c = service.tracker.cost_ratio if service is not None else AcceptanceTracker.PRIOR_COST_RATIO
            theory, colors = theory_frame(replies, c, int(k or self.settings.decoding.k))
            return (
                gr.update(caption=reply_caption(reply_frame(replies))),
                gr.update(caption=theory_caption(theory, c), color_map=colors),
            )
        except Exception:  # the points are drawn already; a caption is not worth an error
            return gr.skip(), gr.skip()

    @staticmethod
    def zoom(selection: gr.SelectData) -> Any:
        """A plot shows the x range dragged over."""
        low, high = selection.index
        return gr.update(x_lim=[low, high])

    @staticmethod
    def unzoom() -> Any:
        """A plot shows all its points again."""
        return gr.update(x_lim=None)

    # --- the Model tab's picker ----------------------------------------------------------

    def choose_preset(self, name: str) -> tuple:
        """A preset fills the picker's target, draft and quantization (the custom entry changes nothing)."""
        fields = preset_fields(self._serving_model(), self.settings.presets, name)
        if fields is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return fields.target, fields.draft_kind, fields.draft, fields.quantization

    @staticmethod
    def typed_pair() -> str:
        """A target or draft typed in: the preset menu says custom (the pair is no longer the preset's)."""
        return CUSTOM

    @staticmethod
    def draft_kind_changed(kind: str) -> Any:
        """The draft's own model is typed only when the draft is another model."""
        return gr.update(interactive=kind == DRAFT_OTHER)

    def load_model(
        self, preset: str, target: str, draft_kind: str, draft: str, quantization: str, request: gr.Request = None
    ) -> Iterator[tuple]:
        """Load the chosen pair while the current one serves, showing the progress; it replaces the current
        pair once loaded and checked (the vocabulary check included); a failure keeps the current pair."""
        if not self.can_switch:
            yield self.load_out(load_status=_warn(PICKER_OFF))
            return
        try:
            model = chosen_model(self.settings, self._serving_model(), target, draft_kind, draft, quantization)
        except SettingsError as error:
            yield self.load_out(load_status=_warn(f"Not loaded: {one_line(error)}"))
            return
        # Prompts prepared before the swap hold the old tokenizer's ids: the desk drops them once it is done.
        job = self.handle.reload(
            lambda progress: self._load(model, progress),
            label=model,
            swapped=lambda: self.desk.forget(time.monotonic()),
        )
        if job is None:
            yield self.load_out(load_status=_warn("Models are being loaded already: wait for that to end."))
            return
        shown = None
        while not job.wait(LOAD_POLL_S):
            if job.progress != shown:
                shown = list(job.progress)
                yield self.load_out(load_status=reload_markdown(job, self.handle))
        if job.error:
            gr.Warning(f"Not loaded: {job.error}")
        yield self.load_out(
            load_status=reload_markdown(job, self.handle),
            model=model_markdown(self.handle),
            status=model_status_line(self.handle),
        )

    def _load(self, model: Any, progress: Callable[[str], None]) -> Any:
        """A service for `model` (on the handle's reload thread); its vocabulary check is shown before the
        handle swaps it in."""
        service = self.loader(dataclasses.replace(self.settings, model=model), progress)
        progress(f"vocabulary check: {service.pair.compatibility}")
        return service

    def _serving_model(self) -> Any:
        """The [model] settings of the pair serving now (the settings' until the picker loaded another)."""
        return self.handle.loaded_from or self.settings.model

    def model_info(self) -> str:
        """The Model tab's text: both models, compatibility, load time (or the load progress/error)."""
        return model_markdown(self.handle)

    def tick(self) -> tuple:
        """The Model tab and status line while the models load; the timer stops once they are ready."""
        loading = self.handle.status == "loading"
        return model_markdown(self.handle), model_status_line(self.handle), gr.Timer(active=loading)
