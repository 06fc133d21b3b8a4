"""The saved conversations beside the chat: the list, New chat, Rename, Delete, and keeping the one shown.

Contract: `saves_conversations(server, env)` says whether this server keeps
conversations on disk (settings.server.save_conversations: "on", "off", or
"auto" = on only for a server that this machine alone reaches: a loopback
host, no share link, not a Hugging Face Space; on a shared server every
visitor would see everyone's list). `build_panel()`, inside a gr.Blocks,
makes the panel's components and returns them by name;
`ConversationPanel(store, handlers)` holds its events' handlers, each
returning its outputs in the order of one of the *_OUTPUTS tuples below
(the chat's own outputs are handlers.CHAT_OUTPUTS, made by `handlers.show`).

The conversation shown is named by its id, in a browser state of its own
("conversation"; NEW = a new chat, not saved yet); the chat state keeps its
messages as before (what /send, Regenerate and the Stats tab read), and the
store's file is the truth. On page load (`load`) the conversation the browser
named is opened from disk, else the most recent one, else a new chat; a chat
the browser holds that has no file (or whose file is gone or unreadable) is
saved as a new conversation, so that nothing shown is lost. After a reply,
regenerate, undo or edit, `save` writes the messages when they differ from
the file's: a new chat's first reply creates its file, and an empty new chat
is never written. Clear (`cleared`) starts a new chat and leaves the saved
conversation as it was: only Delete, which asks first, removes one. Titles are the store's (the first user message's,
unless renamed).

While a reply is generated the page locks the list, New chat and Delete
(LOCK_JS, from the click that asks for it) until `reply_done` has saved it;
a switch that gets through anyway (another client, a race) is refused in one
line while this session's reply runs, so a reply never lands in another
conversation.

Nothing here raises to Gradio: an unreadable file, a full disk or an id
that is not one of ours is one line in the chat's notice (these events are
not queued, so no toast: Gradio would print it on the server's terminal), and
the messages on screen and in the browser stay as they are.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from typing import Any

import gradio as gr

from ..conversations import (
    MAX_TITLE_CHARS,
    Conversation,
    ConversationError,
    ConversationNotFound,
    ConversationStore,
    ConversationSummary,
)
from ..errors import one_line
from ..paths import state_secret
from ..settings import ServerSettings
from .auth import is_loopback
from .handlers import CHAT_OUTPUTS, Handlers, Outputs
from .state import clean_state

CLEARED = "ℹ A new chat: the cleared conversation stays saved in the list (Delete removes it)."

SPACE_ENV = "SPACE_ID"  # set in every Hugging Face Space's container
NEW = ""  # the conversation id of a new chat that is not saved yet
CONVERSATION_KEY = "specchat-conversation-v1"  # the browser's localStorage key of the id shown

LIST_OUTPUTS = ("conversation", "conversations", "title")  # the id shown, the list, the rename box
OPEN_OUTPUTS = (*CHAT_OUTPUTS, *LIST_OUTPUTS, "delete_row")  # a conversation opened (or refused)
DELETE_OUTPUTS = (*OPEN_OUTPUTS, "pending_delete")
SAVE_OUTPUTS = (*LIST_OUTPUTS, "notice")  # after the chat changed: what saving it changes
LOCKED = ("conversations", "new_chat", "delete")  # what the page locks while a reply is generated
REPLY_DONE_OUTPUTS = (*SAVE_OUTPUTS, *(name for name in LOCKED if name not in SAVE_OUTPUTS))
ASK_DELETE_OUTPUTS = ("pending_delete", "delete_row", "delete_question", "notice")
CANCEL_DELETE_OUTPUTS = ("pending_delete", "delete_row")
LOCK_JS = "() => [" + ", ".join(["{__type__: 'update', interactive: false}"] * len(LOCKED)) + "]"

BUSY = "⚠ A reply is being written: stop it (■ Stop) or let it end before leaving this conversation."
LIST_INFO = "newest first"
EMPTY_LIST_INFO = "none yet: a chat is saved with its first reply"
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def saves_conversations(server: ServerSettings, env: Mapping[str, str] | None = None) -> bool:
    """Whether this server keeps conversations on disk (see the module docstring)."""
    if server.save_conversations != "auto":
        return server.save_conversations == "on"
    env = os.environ if env is None else env
    return is_loopback(server.host) and not server.share and not env.get(SPACE_ENV)


def build_panel() -> dict[str, Any]:
    """The panel's components, by the names the handlers' outputs use."""
    with gr.Accordion("Conversations", open=True, elem_id="conversations-panel"):
        conversation = gr.BrowserState(NEW, storage_key=CONVERSATION_KEY, secret=state_secret())
        new_chat = gr.Button("＋ New chat", variant="primary", size="sm", elem_id="new-chat-btn")
        conversations = gr.Radio([], value=None, label="Saved chats", info=EMPTY_LIST_INFO, elem_id="conversation-list")
        title = gr.Textbox(  # Enter or its ✎ button renames the conversation shown
            placeholder="a title for this chat",
            label="Title",
            show_label=False,
            max_length=MAX_TITLE_CHARS,
            submit_btn="✎ Rename",
            elem_id="conversation-title",
        )
        delete = gr.Button("Delete this chat…", size="sm", elem_id="delete-btn")
        with gr.Column(visible=False, elem_id="delete-confirm") as delete_row:
            delete_question = gr.Markdown("")
            with gr.Row():
                delete_yes = gr.Button("Delete", variant="stop", size="sm", min_width=80, elem_id="delete-yes-btn")
                delete_no = gr.Button("Cancel", size="sm", min_width=80, elem_id="delete-no-btn")
        pending_delete = gr.State(NEW)  # what the question named: a Delete confirmed deletes that one
    return dict(
        conversation=conversation,
        new_chat=new_chat,
        conversations=conversations,
        title=title,
        delete=delete,
        delete_row=delete_row,
        delete_question=delete_question,
        delete_yes=delete_yes,
        delete_no=delete_no,
        pending_delete=pending_delete,
    )


def _id(value: Any) -> str:
    """A conversation id as the browser state holds it ("" for anything that is not a string)."""
    return value if isinstance(value, str) else NEW


def _named(value: Any) -> str:
    """A client's value, named in one short line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _escaped(text: str) -> str:
    """A title as literal Markdown text (no emphasis, links or images of its own)."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text)


def _choices(summaries: list[ConversationSummary]) -> list[tuple[str, str]]:
    """(label, id) pairs, newest first. A title that several share gets its last change's time, and a number
    (1 = the oldest) where that is shared too: a label names one conversation."""
    titles = [s.title for s in summaries]
    dated = _told_apart(titles, lambda i: f"{titles[i]} · {_when(summaries[i])}")
    labels = _told_apart(dated, lambda i: f"{dated[i]} ({dated[i:].count(dated[i])})")
    return [(label, s.id) for label, s in zip(labels, summaries)]


def _told_apart(labels: list[str], distinct: Any) -> list[str]:
    """`labels` with each one that is not unique replaced by `distinct(index)`."""
    return [distinct(i) if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _when(summary: ConversationSummary) -> str:
    return time.strftime("%b %d %H:%M", time.localtime(summary.updated))


class ConversationPanel:
    """The panel's event handlers over one store (see the module docstring)."""

    def __init__(self, store: ConversationStore, handlers: Handlers):
        self.store, self.handlers = store, handlers
        self.open_out, self.delete_out = Outputs(OPEN_OUTPUTS), Outputs(DELETE_OUTPUTS)
        self.save_out, self.done_out = Outputs(SAVE_OUTPUTS), Outputs(REPLY_DONE_OUTPUTS)
        self.ask_out, self.cancel_out = Outputs(ASK_DELETE_OUTPUTS), Outputs(CANCEL_DELETE_OUTPUTS)

    # --- opening ------------------------------------------------------------------------

    def load(self, chat_state: Any, conversation: Any) -> tuple:
        """On page load: the conversation this browser showed, from disk; else the most recent, else a new chat.
        The browser's own copy is saved as a new conversation when it has no file to come from."""
        browser = clean_state(chat_state)["messages"]
        wanted = _id(conversation)
        if wanted:
            try:
                return self._show(self.store.load(wanted))
            except ConversationNotFound:
                lost = "ℹ The conversation this page showed is no longer saved"
            except (ConversationError, OSError) as error:
                lost = f"⚠ The conversation this page showed cannot be read ({one_line(error)})"
            if browser:
                return self._adopt(browser, f"{lost}: this page's copy is saved as a new conversation.")
            return self._opened(NEW, [], f"{lost}: a new chat is started.")
        if browser:  # kept by this browser while nothing was saved (an older version, a failed save)
            return self._adopt(browser)
        return self._latest()

    def open(self, selected: Any, conversation: Any, request: gr.Request = None) -> tuple:
        """A conversation chosen in the list (its id as the client sent it)."""
        current = _id(conversation)
        if selected == current:
            return self.open_out()
        if self.handlers.replying(request):
            return self._refused(current, BUSY)
        try:
            return self._show(self.store.load(selected))
        except ConversationNotFound:
            line = f"⚠ There is no saved conversation {_named(selected)}: the list is shown afresh."
        except (ConversationError, OSError) as error:
            line = f"⚠ Cannot open that conversation: {one_line(error)}"
        return self._refused(current, line)

    def new_chat(self, conversation: Any, request: gr.Request = None) -> tuple:
        """An empty chat, not written until its first reply."""
        if self.handlers.replying(request):
            return self._refused(_id(conversation), BUSY)
        return self._opened(NEW, [])

    def _show(self, conversation: Conversation, notice: str = "") -> tuple:
        messages = clean_state({"messages": list(conversation.messages)})["messages"]
        return self._opened(conversation.id, messages, notice)

    def _adopt(self, messages: list[dict], notice: str = "") -> tuple:
        """Show `messages` as a conversation of their own, saved now (shown unsaved if that fails)."""
        try:
            saved = self.store.new(messages)
        except OSError as error:
            return self._opened(NEW, messages, f"⚠ Not saved: {one_line(error)} (the chat stays in this browser)")
        return self._opened(saved.id, messages, notice)

    def _opened(self, conversation_id: str, messages: list[dict], notice: str = "") -> tuple:
        listing, problem = self._listing(conversation_id)
        chat = dict(zip(CHAT_OUTPUTS, self.handlers.show(messages, problem or notice)))
        return self.open_out(**chat, **listing, delete_row=gr.update(visible=False))

    def _refused(self, current: str, line: str) -> tuple:
        """The chat stays as it is; the list is shown afresh, with the conversation shown selected again."""
        listing, _ = self._listing(current, title=False)
        return self.open_out(notice=line, **listing)

    def _listing(self, current: str, *, title: bool = True, **radio: Any) -> tuple[dict, str]:
        """LIST_OUTPUTS with `current` shown (`radio`: more of the list's properties), and a line if the
        list cannot be read."""
        problem = ""
        try:
            summaries = self.store.list()
        except OSError as error:
            summaries, problem = [], f"⚠ Cannot list the saved conversations: {one_line(error)}"
        ids = [s.id for s in summaries]
        listing = {
            "conversation": current,
            "conversations": gr.update(
                choices=_choices(summaries),
                value=current if current in ids else None,
                info=LIST_INFO if summaries else EMPTY_LIST_INFO,
                **radio,
            ),
        }
        if title:
            listing["title"] = next((s.title for s in summaries if s.id == current), "")
        return listing, problem

    # --- saving ------------------------------------------------------------------------

    def save(self, chat_state: Any, conversation: Any) -> tuple:
        """The chat changed (undo, edit, clear): write it (see the module docstring)."""
        return self.save_out(**self._save(chat_state, conversation))

    def cleared(self, conversation: Any) -> tuple:
        """Clear: a new chat. The saved conversation stays as it was (only Delete, which asks, removes one)."""
        listing, problem = self._listing(NEW)
        return self.save_out(**listing, notice=problem or (CLEARED if _id(conversation) else gr.skip()))

    def reply_done(self, chat_state: Any, conversation: Any) -> tuple:
        """A reply (or regenerate) ended, however it ended: write it, and unlock what the page locked."""
        values = self._save(chat_state, conversation, interactive=True)
        unlocked = {name: gr.update(interactive=True) for name in LOCKED if name not in values}
        return self.done_out(**values, **unlocked)

    def _save(self, chat_state: Any, conversation: Any, **radio: Any) -> dict:
        messages = clean_state(chat_state)["messages"]
        before = _id(conversation)
        try:
            current, notice = self._write(before, messages)
        except (ConversationError, OSError) as error:
            current, notice = before, f"⚠ Not saved: {one_line(error)} (the chat stays on screen and in this browser)"
        listing, problem = self._listing(current, title=current != before, **radio)
        return {**listing, "notice": notice or problem or gr.skip()}

    def _write(self, current: str, messages: list[dict]) -> tuple[str, str]:
        """Write `messages` as conversation `current` (NEW: a new one, unless empty); the id they are kept
        under, and a line when that is not `current`'s file."""
        if not current:
            return (self.store.new(messages).id if messages else NEW), ""
        try:
            kept = self.store.load(current)
        except ConversationNotFound:
            notice = "ℹ This conversation was deleted elsewhere: it is saved again as a new one."
        except ConversationError as error:
            notice = f"⚠ This conversation's file cannot be read ({one_line(error)}): it is saved as a new one."
        else:
            if kept.messages != tuple(messages):  # unchanged (a refused request, a Stop before the start)
                self.store.set_messages(current, messages)
            return current, ""
        return (self.store.new(messages).id if messages else NEW), notice

    # --- rename and delete -------------------------------------------------------------------

    def rename(self, title: Any, conversation: Any) -> tuple:
        """The conversation shown gets `title` ("" = the one derived from its first message again)."""
        current = _id(conversation)
        if not current:
            return self.save_out(notice="ℹ Nothing to rename yet: a new chat is saved with its first reply.")
        notice = ""
        try:
            self.store.rename(current, title if isinstance(title, str) else "")
        except ConversationNotFound:
            notice = "⚠ Not renamed: this conversation is no longer saved."
        except (ConversationError, OSError) as error:
            notice = f"⚠ Not renamed: {one_line(error)}"
        listing, problem = self._listing(current)
        return self.save_out(**listing, notice=notice or problem)

    def ask_delete(self, conversation: Any) -> tuple:
        """Delete's first step: the question, naming the conversation shown."""
        current = _id(conversation)
        if not current:
            return self.ask_out(notice="ℹ Nothing to delete: this chat is not saved.")
        try:
            title = self.store.load(current).display_title
        except (ConversationError, OSError):
            title = "this conversation"  # unreadable: it can still be deleted
        question = f"Delete **{_escaped(title)}**? This cannot be undone."
        return self.ask_out(pending_delete=current, delete_row=gr.update(visible=True), delete_question=question)

    def cancel_delete(self) -> tuple:
        return self.cancel_out(pending_delete=NEW, delete_row=gr.update(visible=False))

    def delete(self, pending: Any, conversation: Any, request: gr.Request = None) -> tuple:
        """Delete's second step: the conversation the question named goes; if it was the one shown, the most
        recent one left is shown (or a new chat)."""
        doomed, current = _id(pending), _id(conversation)
        if not doomed:
            return self.delete_out(delete_row=gr.update(visible=False))
        if doomed == current and self.handlers.replying(request):
            return self._deleted(self._refused(current, BUSY))
        try:
            self.store.delete(doomed)
        except (ConversationError, OSError) as error:
            return self._deleted(self._refused(current, f"⚠ Not deleted: {one_line(error)}"))
        if doomed == current:
            return self._deleted(self._latest())
        listing, problem = self._listing(current, title=False)
        return self.delete_out(**listing, notice=problem, delete_row=gr.update(visible=False), pending_delete=NEW)

    def _deleted(self, opened: tuple) -> tuple:
        """DELETE_OUTPUTS from OPEN_OUTPUTS: the question is gone, whatever the answer did."""
        values = {**dict(zip(OPEN_OUTPUTS, opened)), "delete_row": gr.update(visible=False)}
        return self.delete_out(**values, pending_delete=NEW)

    def _latest(self) -> tuple:
        """The most recent conversation, or a new chat when there is none."""
        try:
            latest = self.store.list()[:1]
            return self._show(self.store.load(latest[0].id)) if latest else self._opened(NEW, [])
        except (ConversationError, OSError) as error:
            return self._opened(NEW, [], f"⚠ Cannot open the latest conversation: {one_line(error)}")
