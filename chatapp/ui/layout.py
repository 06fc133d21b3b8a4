"""The page: the Blocks layout and which handler each event calls.

Contract: `build_app(service_or_factory, settings, loader=None, conversations=None)` returns
the gr.Blocks (not launched; launch.launch_app adds the theme and CSS). The models are
reached only through the service handle that the handlers hold, so tests
can pass a scripted fake; `service_or_factory` is a ChatService-like object,
a ServiceHandle, or `factory(progress) -> service` (loaded in a background
thread while the page is already up). `loader(settings, progress) -> service`
is what the Model tab's Load builds another pair with (default: the app's own,
launch.load_service). Components are named by the handlers'
output names (handlers.CHAT_OUTPUTS, ...); this module decides only where
they sit and what triggers what. API names: /chat (the plain one, for other
programs: chatapp.ui.api), /send (the page's own chat, with the browser
state), /regenerate, /stop, /clear, /compare, /restore, /stats, /model_info;
undocumented: /undo and /load_model (the page's own controls).

Where this server keeps conversations (conversations_panel.saves_conversations:
settings.server.save_conversations), the Chat tab has the saved conversations'
panel beside the chat, over one ConversationStore per app: `conversations`,
or the data folder's (chatapp.paths: SPECCHAT_DATA_DIR). Elsewhere there is
no panel and no store, and nothing is written. The panel's events are private
(no API names) and never queued; the saves follow the events that change the
chat (`.then`), so the chat's own outputs and API stay as they are.

All generation shares one queue slot (concurrency id GENERATION), so waiting
users see their position in the queue; the queue holds at most
settings.server.max_queue requests (past it a client is told the queue is
full). The events that take browser or API values take them raw
(preprocess=False): the handlers check them and answer one line naming the
field, where Gradio's own checks would log a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from .. import zerogpu
from ..conversations import ConversationStore
from ..paths import state_secret
from ..settings import MESSAGE_CHARS_MAX, Settings, load_settings
from .api import add_chat_api
from .conversations_panel import (
    ASK_DELETE_OUTPUTS,
    CANCEL_DELETE_OUTPUTS,
    DELETE_OUTPUTS,
    LOCK_JS,
    LOCKED,
    OPEN_OUTPUTS,
    REPLY_DONE_OUTPUTS,
    SAVE_OUTPUTS,
    ConversationPanel,
    build_panel,
    saves_conversations,
)
from .format import COMPARE_COLUMNS, NO_STATS, PICKER_OFF, SPEEDUP_METHOD, model_markdown, model_status_line
from .handle import ServiceHandle
from .handlers import (
    CHAT_OUTPUTS,
    COMPARE_OUTPUTS,
    LOAD_OUTPUTS,
    MODEL_OUTPUTS,
    PICKER_INPUTS,
    STATS_OUTPUTS,
    Handlers,
    Loader,
)
from .picker import DRAFT_KINDS, DRAFT_OTHER, QUANTIZATIONS, can_switch, picker_fields, preset_choices
from .sidebar import SIDEBAR_FIELDS, build_sidebar, decoding_endpoint, decoding_validator, without
from .state import EMPTY_STATE, STORAGE_KEY
from .stats_tab import REPLY_COLORS, REPLY_PLOT, THEORY_PLOT, stats_summary, turns_frame

GENERATION = "generation"  # the one concurrency slot that every model call shares
SOURCE_COLORS = {  # token view categories -> colors (Gradio HighlightedText color_map)
    "draft": "#22c55e",  # accepted draft tokens
    "target": "#f97316",  # the target's correction after a rejected draft token
    "bonus": "#3b82f6",  # the target's extra token after all K drafts were accepted
    "standard": "#94a3b8",  # standard (target-only) decoding
}
SOURCE_HELP = {
    "draft": "draft token the target accepted",
    "target": "target's correction of a rejected draft",
    "bonus": "target's bonus token after all K drafts were accepted",
    "standard": "standard decoding (target only)",
}
INTRO = (
    "# ⚡ SpecChat\n"
    "An INT8 draft proposes K tokens, the full-precision target verifies them in one pass: "
    "the reply is exactly the target's own, only faster."
)
EXAMPLE_PROMPTS = (  # shown on an empty chat
    "Explain speculative decoding in three sentences.",
    "Write a haiku about a small draft model and a careful target.",
    "Give me three tips for writing clear Python code.",
    "What makes a good unit test?",
)
# Send gives way to Stop at once, in the browser, when a reply is asked for (the server's answer comes later).
BUSY_JS = "() => [{__type__: 'update', visible: false}, {__type__: 'update', visible: true}]"
PICKER_INTRO = (
    "The new pair loads while the current one keeps serving, and replaces it only once it is loaded and its "
    "vocabulary checked against the target's; a failed load keeps the current pair. For this run of the app "
    "only: the settings file is not changed."
)
COMPARE_INTRO = (
    "One prompt, answered by standard decoding and by speculative decoding with the sidebar's "
    "settings (same seed, same device, fresh caches for each run). The order alternates each click."
)


def build_app(
    service_or_factory: Any,
    settings: Settings | None = None,
    *,
    loader: Loader | None = None,
    conversations: ConversationStore | None = None,
) -> gr.Blocks:
    """The Blocks app (see the module docstring)."""
    settings = settings if settings is not None else load_settings()
    handle = ServiceHandle.of(service_or_factory)
    handlers = Handlers(handle, settings, loader)
    panel = None
    if saves_conversations(settings.server):
        panel = ConversationPanel(conversations if conversations is not None else ConversationStore(), handlers)
    with gr.Blocks(title="SpecChat · speculative decoding", analytics_enabled=False, fill_width=True) as demo:
        page = {"state": gr.BrowserState(EMPTY_STATE, storage_key=STORAGE_KEY, secret=state_secret())}
        sidebar = build_sidebar(settings.decoding)
        with gr.Column(elem_id="app-header"):
            gr.Markdown(INTRO)
            page["status"] = gr.Markdown(model_status_line(handle), elem_id="model-status")
        with gr.Tabs():
            page.update(_chat_tab(with_panel=panel is not None))
            page.update(_stats_tab(handle))
            page.update(_compare_tab())
            page.update(_model_tab(handle, settings))
        page["timer"] = gr.Timer(1.0, active=handle.status == "loading")
        demo.specchat_chat_event = _wire(demo, page, sidebar, handlers, settings, panel)
        demo.queue(default_concurrency_limit=1, max_size=settings.server.max_queue)
    handle.slot.max_waiting = settings.server.max_queue  # for requests from outside the queue (OpenAI API)
    demo.specchat_handle, demo.specchat_settings = handle, settings  # for tests, launch_app and serve()
    demo.specchat_handlers, demo.specchat_conversations = handlers, panel  # for tests
    return demo


def _chat_tab(with_panel: bool) -> dict[str, Any]:
    """The chat, with the saved conversations' panel on its left (above it on a narrow screen) when there
    is one."""
    with gr.Tab("Chat", id="chat"), gr.Row(equal_height=False):
        panel = {}
        if with_panel:
            with gr.Column(scale=1, min_width=240, elem_id="conversations-column"):
                panel = build_panel()
        with gr.Column(scale=4, min_width=360, elem_id="chat-column"):
            return {**panel, **_chat_column()}


def _chat_column() -> dict[str, Any]:
    chatbot = gr.Chatbot(
        label="Chat",
        show_label=False,
        height=460,
        elem_id="chatbot",
        render_markdown=True,
        buttons=["copy", "copy_all"],
        feedback_options=None,
        editable="user",
        placeholder="**Ask anything.** Replies stream round by round; the stats and the "
        "colored token view below show what the draft contributed.",
        examples=[{"text": prompt} for prompt in EXAMPLE_PROMPTS],
    )
    notice = gr.Markdown("", elem_id="chat-notice")
    with gr.Row(equal_height=True):
        message = gr.Textbox(
            placeholder="Type a message and press Enter (Shift+Enter for a new line)",
            show_label=False,
            lines=1,
            max_lines=10,
            scale=8,
            elem_id="chat-input",
            autofocus=True,
            max_length=MESSAGE_CHARS_MAX,
        )
        send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="send-btn")
        # In Send's place while a reply is generated (see _stop_while_generating).
        stop = gr.Button("■ Stop", variant="stop", scale=1, min_width=90, elem_id="stop-btn", visible=False)
    with gr.Row():
        regenerate = gr.Button("↻ Regenerate", variant="secondary", size="sm", elem_id="regenerate-btn")
        clear = gr.Button("✕ Clear", variant="secondary", size="sm", elem_id="clear-btn")
    stats = gr.Markdown(NO_STATS, elem_id="turn-stats")
    with gr.Accordion("ℹ How the speedup and the first-token time are measured", open=False, elem_id="speedup-method"):
        gr.Markdown(SPEEDUP_METHOD)
    tokens = gr.HighlightedText(
        value=[],
        label="Tokens of the last reply, by origin",
        color_map=SOURCE_COLORS,
        show_legend=True,
        show_inline_category=False,
        combine_adjacent=False,
        elem_id="token-view",
    )
    gr.HTML(_token_legend())
    resend = gr.State(0)  # bumped by an edit or an example: sends the input box (see _wire)
    return dict(
        chatbot=chatbot,
        notice=notice,
        message=message,
        send=send,
        stop=stop,
        regenerate=regenerate,
        clear=clear,
        stats=stats,
        tokens=tokens,
        resend=resend,
    )


def _token_legend() -> str:
    swatches = (
        f"<span class='swatch' style='background:{SOURCE_COLORS[s]}'></span><b>{s}</b>: {SOURCE_HELP[s]}"
        for s in SOURCE_COLORS
    )
    return "<div id='token-legend'>" + "".join(swatches) + "</div>"


def _stats_tab(handle: ServiceHandle) -> dict[str, Any]:
    with gr.Tab("Stats", id="stats") as tab:
        summary = gr.Markdown(stats_summary(handle.service, []), elem_id="stats-summary")
        gr.Markdown(SPEEDUP_METHOD, elem_id="stats-method")
        with gr.Row():
            # Native plots: the browser draws them from the frames (drag over one to zoom, double-click back).
            # No points until the tab is opened (the browser draws a native plot for the series it first sees).
            turn_plot = gr.LinePlot(
                None,
                **REPLY_PLOT,
                color_map=REPLY_COLORS,
                elem_id="turn-plot",
                title="Per reply: acceptance rate and speedup",
                x_title="reply in this conversation",
                y_title="rate (fraction) · speedup (×)",
                tooltip="all",
                buttons=["fullscreen", "export"],
            )
            theory_plot = gr.ScatterPlot(
                None,
                **THEORY_PLOT,
                elem_id="theory-plot",
                title="Measured speedup vs the theory's",
                x_title="acceptance rate a",
                y_title="speedup vs standard decoding (×)",
                x_lim=[0, 1],
                tooltip="all",
                buttons=["fullscreen", "export"],
            )
        turns_table = gr.Dataframe(
            turns_frame([]), label="Replies in this conversation", interactive=False, elem_id="turns-table"
        )
    return dict(stats_tab=tab, summary=summary, turn_plot=turn_plot, theory_plot=theory_plot, turns_table=turns_table)


def _compare_pane(title: str, placeholder: str, elem_id: str) -> gr.Markdown:
    with gr.Column():
        gr.Markdown(title)
        return gr.Markdown(placeholder, elem_classes=["cmp-pane"], container=True, elem_id=elem_id)


def _compare_tab() -> dict[str, Any]:
    with gr.Tab("Compare", id="compare"):
        gr.Markdown(COMPARE_INTRO)
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(
                value="Explain speculative decoding in three sentences.",
                label="Prompt",
                lines=2,
                scale=8,
                elem_id="compare-prompt",
                max_length=MESSAGE_CHARS_MAX,
            )
            with gr.Column(scale=1, min_width=160):
                run = gr.Button("▶ Compare", variant="primary", elem_id="compare-btn")
                stop = gr.Button("■ Stop", variant="stop", size="sm", elem_id="compare-stop-btn")
        with gr.Row():
            standard = _compare_pane(
                "#### ◎ Standard (target only)", "*The standard reply streams here.*", "compare-standard"
            )
            speculative = _compare_pane(
                "#### ⚡ Speculative (draft + target)", "*The speculative reply streams here.*", "compare-speculative"
            )
        table = gr.Dataframe(
            pd.DataFrame(columns=COMPARE_COLUMNS),
            label="Measured in this comparison",
            interactive=False,
            elem_id="compare-table",
        )
        verdict = gr.Markdown("", elem_id="compare-verdict")
    return dict(
        prompt=prompt,
        compare=run,
        compare_stop=stop,
        standard=standard,
        speculative=speculative,
        table=table,
        verdict=verdict,
    )


def _model_tab(handle: ServiceHandle, settings: Settings) -> dict[str, Any]:
    """The pair: a picker for another one (when this server allows it), then what serves now."""
    fields = picker_fields(settings.model, settings.presets)
    on = can_switch(settings.server)
    with gr.Tab("Model", id="model"):
        with gr.Accordion("Load another pair", open=True, elem_id="model-picker"):
            gr.Markdown(PICKER_INTRO)
            preset = gr.Dropdown(
                preset_choices(settings.presets),
                value=fields.preset,
                label="Preset",
                info="a pair from the settings file's [presets]",
                elem_id="model-preset",
                interactive=on,
            )
            target = gr.Textbox(
                fields.target,
                label="Target (verifies)",
                elem_id="model-target",
                interactive=on,
                info="a hub id (org/name), a local folder, a .gguf file, or embedded:NAME",
            )
            with gr.Row(equal_height=True):
                draft_kind = gr.Radio(
                    list(DRAFT_KINDS),
                    value=fields.draft_kind,
                    label="Draft (proposes)",
                    elem_id="model-draft-kind",
                    interactive=on,
                    scale=2,
                )
                quantization = gr.Dropdown(
                    list(QUANTIZATIONS),
                    value=fields.quantization,
                    label="Draft quantization",
                    elem_id="model-quantization",
                    info="auto = int8 weight-only; bnb-int8 needs CUDA; none = unquantized",
                    interactive=on,
                    scale=1,
                )
            draft = gr.Textbox(
                fields.draft,
                label="Draft model",
                elem_id="model-draft",
                info="a hub id, a folder or a .gguf file of the target's family (same tokenizer)",
                interactive=on and fields.draft_kind == DRAFT_OTHER,
            )
            load = gr.Button("⟳ Load this pair", variant="primary", elem_id="model-load-btn", interactive=on)
            load_status = gr.Markdown("" if on else PICKER_OFF, elem_id="model-load-status")
        model = gr.Markdown(model_markdown(handle), elem_id="model-info")
    return dict(
        preset=preset,
        target=target,
        draft_kind=draft_kind,
        draft=draft,
        quantization=quantization,
        load=load,
        load_status=load_status,
        model=model,
    )


def _pick(page: dict[str, Any], names: tuple[str, ...]) -> list:
    return [page[name] for name in names]


def _generating_starts(page: dict[str, Any]) -> list:
    """The triggers that ask for a reply."""
    return [
        page["send"].click,
        page["message"].submit,
        page["resend"].change,
        page["regenerate"].click,
        page["chatbot"].retry,
    ]


def _stop_while_generating(page: dict[str, Any], h: Handlers) -> Callable[[list], None]:
    """Stop stands in Send's place while a reply is generated: swapped in the browser as soon as one is
    asked for, and back by the server when it has ended, however it ended. Call it before the generating
    events are wired (the browser runs a trigger's listeners in order), and what it returns after, with them."""
    buttons = [page["send"], page["stop"]]
    gr.on(_generating_starts(page), None, None, buttons, js=BUSY_JS, api_visibility="private", queue=False)

    def when_done(generating: list) -> None:
        for event in generating:
            event.then(h.idle, None, buttons, api_visibility="private", queue=False)

    return when_done


def _wire(
    demo: gr.Blocks,
    page: dict[str, Any],
    sidebar: dict[str, Any],
    h: Handlers,
    settings: Settings,
    panel: ConversationPanel | None,
):
    """Connect the events to the handlers; returns the chat event (for tests)."""
    # One slot for every model call; the queue shows waiting users their position on the chat / the panes.
    slot = dict(concurrency_limit=1, concurrency_id=GENERATION)
    gen = dict(slot, show_progress="full", preprocess=False)
    quick = dict(queue=False)  # no model call: answered at once, even while a reply streams
    hidden = dict(api_visibility="private", queue=False)
    chat_out, stats_out = _pick(page, CHAT_OUTPUTS), _pick(page, STATS_OUTPUTS)
    compare_fields = without(SIDEBAR_FIELDS, "mode")  # Compare runs both modes

    h.admission.queued = lambda: len(demo._queue)  # Gradio's own count of the requests waiting
    add_chat_api(h, slot)  # /chat for other programs
    # An edited user message, or an example clicked on the empty chat, goes to the input box; then the
    # `resend` counter's change sends it as the Send button would.
    # (Queued: a gr.State's change is only signalled through the queue.)
    edit_event = page["chatbot"].edit(
        h.edit, [page["state"], page["chatbot"], page["resend"]], [*chat_out, page["resend"]], api_visibility="private"
    )
    page["chatbot"].example_select(
        h.example, [page["resend"]], [page["message"], page["resend"]], api_visibility="private"
    )
    stop_shown_until = _stop_while_generating(page, h)
    if panel is not None:  # locked from the click that asks for a reply (see conversations_panel)
        gr.on(_generating_starts(page), None, None, _pick(page, LOCKED), js=LOCK_JS, **hidden)
    chat = decoding_endpoint(zerogpu.gpu_reply()(h.chat), h.refuse_chat, settings, ("message", "chat_state"))
    chat_event = gr.on(
        [page["send"].click, page["message"].submit, page["resend"].change],
        chat,
        [page["message"], page["state"], *sidebar.values()],
        chat_out,
        api_name="send",
        show_progress_on=[page["chatbot"]],
        validator=decoding_validator(h.prepare_chat, settings, ("message", "chat_state"), admission=h.admission),
        **gen,
    )
    regenerate = decoding_endpoint(zerogpu.gpu_reply()(h.regenerate), h.refuse_regenerate, settings, ("chat_state",))
    regenerate_event = gr.on(
        [page["regenerate"].click, page["chatbot"].retry],
        regenerate,
        [page["state"], *sidebar.values()],
        chat_out,
        api_name="regenerate",
        show_progress_on=[page["chatbot"]],
        validator=decoding_validator(h.prepare_regenerate, settings, ("chat_state",), admission=h.admission),
        **gen,
    )
    page["stop"].click(h.stop, None, page["notice"], api_name="stop", **quick)
    undo_event = page["chatbot"].undo(
        h.undo, [page["state"]], chat_out, api_name="undo", api_visibility="undocumented", queue=False
    )
    stop_shown_until([chat_event, regenerate_event])
    page["compare_stop"].click(h.stop, None, page["verdict"], **hidden)
    clear_event = page["clear"].click(h.clear, None, chat_out, api_name="clear", **quick)
    trash_event = page["chatbot"].clear(h.clear, None, chat_out, **hidden)  # the Chatbot's own trash button
    compare = decoding_endpoint(
        zerogpu.gpu_reply(runs=2)(h.compare), h.refuse_compare, settings, ("prompt",), compare_fields
    )
    gr.on(
        [page["compare"].click, page["prompt"].submit],
        compare,
        [page["prompt"], *(sidebar[name] for name in compare_fields)],
        _pick(page, COMPARE_OUTPUTS),
        api_name="compare",
        show_progress_on=[page["standard"], page["speculative"]],
        validator=decoding_validator(h.prepare_compare, settings, ("prompt",), compare_fields, h.admission),
        **gen,
    )
    restore_event = demo.load(h.restore, [page["state"]], chat_out, api_name="restore", preprocess=False, **quick)
    if panel is not None:
        changed = dict(
            replies=[chat_event, regenerate_event], edits=[undo_event, edit_event], clears=[clear_event, trash_event]
        )
        _wire_panel(page, panel, restore_event, **changed)
    plots = [page["turn_plot"], page["theory_plot"]]
    page["stats_tab"].select(
        h.stats, [page["state"], sidebar["k"]], stats_out, api_name="stats", preprocess=False, **quick
    ).then(h.plot_captions, [page["state"], sidebar["k"]], plots, **hidden)
    for plot in plots:  # zoom to the dragged range; double-click: all of it
        plot.select(h.zoom, None, plot, **hidden)
        plot.double_click(h.unzoom, None, plot, **hidden)
    demo.load(h.tick, None, _pick(page, MODEL_OUTPUTS), **hidden)
    gr.api(h.model_info, api_name="model_info", queue=False)
    picker = _pick(page, PICKER_INPUTS)
    page["preset"].change(h.choose_preset, page["preset"], picker[1:], **hidden)
    page["draft_kind"].change(h.draft_kind_changed, page["draft_kind"], page["draft"], **hidden)
    gr.on([page["target"].input, page["draft"].input], h.typed_pair, None, page["preset"], **hidden)
    page["load"].click(
        h.load_model,
        picker,
        _pick(page, LOAD_OUTPUTS),
        api_name="load_model",
        api_visibility="undocumented",
        show_progress="minimal",
        concurrency_limit=None,
    )  # one load at a time (the handle's rule): the next is told at once
    page["timer"].tick(h.tick, None, _pick(page, MODEL_OUTPUTS), **hidden)
    return chat_event


def _wire_panel(
    page: dict[str, Any], panel: ConversationPanel, restore: Any, replies: list, edits: list, clears: list
) -> None:
    """The saved conversations: opened after the browser's copy is shown on load, saved after every event
    that changes the chat (a reply's save also unlocks the panel), a new chat after Clear, and the panel's
    own buttons."""
    hidden = dict(api_visibility="private", queue=False, preprocess=False)
    chat, shown = [page["state"], page["conversation"]], page["conversation"]
    opened = _pick(page, OPEN_OUTPUTS)
    restore.then(panel.load, chat, opened, **hidden)
    for event in replies:
        event.then(panel.reply_done, chat, _pick(page, REPLY_DONE_OUTPUTS), **hidden)
    for event in edits:
        event.then(panel.save, chat, _pick(page, SAVE_OUTPUTS), **hidden)
    for event in clears:
        event.then(panel.cleared, [shown], _pick(page, SAVE_OUTPUTS), **hidden)
    page["conversations"].input(panel.open, [page["conversations"], shown], opened, **hidden)
    page["new_chat"].click(panel.new_chat, [shown], opened, **hidden)
    page["title"].submit(panel.rename, [page["title"], shown], _pick(page, SAVE_OUTPUTS), **hidden)
    page["delete"].click(panel.ask_delete, [shown], _pick(page, ASK_DELETE_OUTPUTS), **hidden)
    page["delete_no"].click(panel.cancel_delete, None, _pick(page, CANCEL_DELETE_OUTPUTS), **hidden)
    page["delete_yes"].click(panel.delete, [page["pending_delete"], shown], _pick(page, DELETE_OUTPUTS), **hidden)
