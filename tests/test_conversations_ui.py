"""The saved conversations in the UI (chatapp/ui/conversations_panel.py): the handlers the page's events call,
in the order the page calls them, over the scripted fake service (tests/fake_engine.py) and a store in
tmp_path; the wiring, read from the built app; the setting that decides whether anything is saved.
tests/test_browser.py checks the panel in the real page."""

from __future__ import annotations

import dataclasses
import errno
import json
import threading
import time
from typing import Any

import gradio as gr
import pytest
from fake_engine import FakeService
from served import EMPTY, SETTINGS, settings_with

from chatapp import ui
from chatapp.conversations import ConversationStore
from chatapp.ui.conversations_panel import (
    ASK_DELETE_OUTPUTS,
    BUSY,
    CANCEL_DELETE_OUTPUTS,
    DELETE_OUTPUTS,
    NEW,
    OPEN_OUTPUTS,
    REPLY_DONE_OUTPUTS,
    SAVE_OUTPUTS,
    saves_conversations,
)

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # Gradio's queue statistics
SKIP = {"__type__": "update"}  # gr.skip(): the output is left as it is


def build(folder, settings=SETTINGS, service=None) -> gr.Blocks:
    return ui.build_app(service or FakeService(), settings, conversations=ConversationStore(folder))


class Page:
    """One browser tab: its stored values (the chat state, the conversation id) and what it shows, updated
    by each handler's outputs as the page would apply them."""

    def __init__(self, demo: gr.Blocks, state: Any = EMPTY, conversation: Any = None):
        self.h, self.panel = demo.specchat_handlers, demo.specchat_conversations
        self.shown: dict[str, Any] = {"state": state, "conversation": conversation}

    @property
    def state(self) -> Any:
        return self.shown["state"]

    @property
    def conversation(self) -> Any:
        return self.shown["conversation"]

    @property
    def messages(self) -> list[dict]:
        return self.state["messages"]

    @property
    def listed(self) -> list[tuple[str, str]]:
        return [tuple(choice) for choice in self.shown["conversations"]["choices"]]

    @property
    def selected(self) -> Any:
        return self.shown["conversations"].get("value")

    @property
    def notice(self) -> str:
        return self.shown.get("notice", "")

    def apply(self, names: tuple[str, ...], values: tuple) -> tuple:
        assert len(names) == len(values)
        for name, value in zip(names, values):
            if isinstance(value, dict) and value == SKIP:
                continue
            if isinstance(value, dict) and value.get("__type__") == "update":
                value = {**(self.shown.get(name) or {}), **value}
            self.shown[name] = value
        return values

    def load(self) -> Page:
        """A page load: the browser's copy of the chat, then the saved conversation."""
        self.apply(ui.CHAT_OUTPUTS, self.h.restore(self.state))
        self.apply(OPEN_OUTPUTS, self.panel.load(self.state, self.conversation))
        return self

    def send(self, text: str) -> None:
        *_, last = self.h.chat(text, self.state, SETTINGS.decoding)
        self.apply(ui.CHAT_OUTPUTS, last)
        self.reply_done()

    def regenerate(self) -> None:
        *_, last = self.h.regenerate(self.state, SETTINGS.decoding)
        self.apply(ui.CHAT_OUTPUTS, last)
        self.reply_done()

    def reply_done(self) -> None:
        self.apply(REPLY_DONE_OUTPUTS, self.panel.reply_done(self.state, self.conversation))

    def undo(self) -> None:
        self.apply(ui.CHAT_OUTPUTS, self.h.undo(self.state))
        self.apply(SAVE_OUTPUTS, self.panel.save(self.state, self.conversation))

    def clear(self) -> None:
        self.apply(ui.CHAT_OUTPUTS, self.h.clear())
        self.apply(SAVE_OUTPUTS, self.panel.cleared(self.conversation))

    def open(self, conversation_id: Any) -> tuple:
        return self.apply(OPEN_OUTPUTS, self.panel.open(conversation_id, self.conversation))

    def new_chat(self) -> tuple:
        return self.apply(OPEN_OUTPUTS, self.panel.new_chat(self.conversation))

    def rename(self, title: Any) -> None:
        self.apply(SAVE_OUTPUTS, self.panel.rename(title, self.conversation))

    def delete(self, confirm: bool = True) -> None:
        self.apply(ASK_DELETE_OUTPUTS, self.panel.ask_delete(self.conversation))
        if confirm:
            pending = self.shown.get("pending_delete", NEW)  # the page's gr.State starts as NEW
            self.apply(DELETE_OUTPUTS, self.panel.delete(pending, self.conversation))
        else:
            self.apply(CANCEL_DELETE_OUTPUTS, self.panel.cancel_delete())


def skipped(value: Any) -> bool:
    return isinstance(value, dict) and value == SKIP


def files(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def on_disk(folder, conversation_id: str) -> dict:
    return json.loads((folder / f"{conversation_id}.json").read_text())


def user_texts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


def one_line(text: str) -> bool:
    return bool(text) and "\n" not in text and "Traceback" not in text


# --- saving and opening ------------------------------------------------------------------


def test_a_reply_is_saved_and_listed(tmp_path):
    folder = tmp_path / "conversations"
    page = Page(build(folder)).load()
    assert page.conversation == NEW and page.listed == [] and files(folder) == []
    page.send("Hello there")
    (name,) = files(folder)
    assert name == f"{page.conversation}.json"
    saved = on_disk(folder, page.conversation)
    assert saved["messages"] == page.messages and user_texts(saved["messages"]) == ["Hello there"]
    assert saved["messages"][1]["stats"]["mode"] == "speculative"  # the reply's record is kept with it
    assert page.listed == [("Hello there", page.conversation)] and page.selected == page.conversation
    assert page.shown["title"] == "Hello there"  # the rename box shows the derived title
    page.send("And again")
    assert files(folder) == [name] and user_texts(on_disk(folder, page.conversation)["messages"]) == [
        "Hello there",
        "And again",
    ]


def test_a_restarted_app_lists_and_opens_the_latest_conversation(tmp_path):
    first = Page(build(tmp_path)).load()
    first.send("older one")
    first.new_chat()
    first.send("newest one")
    first.send("with a follow-up")
    newest, messages = first.conversation, first.messages

    again = Page(build(tmp_path)).load()  # a new app on the same folder, a browser that kept nothing
    assert again.conversation == newest and again.messages == messages
    assert [title for title, _ in again.listed] == ["newest one", "older one"] and again.selected == newest
    shown = [m["content"] for m in again.shown["chatbot"] if not m.get("metadata")]  # the stats asides aside
    assert shown == [m["content"] for m in messages]

    kept = Page(build(tmp_path), state=EMPTY, conversation=again.listed[1][1]).load()  # a browser that named one
    assert user_texts(kept.messages) == ["older one"] and kept.selected == again.listed[1][1]


def test_switching_between_two_conversations(tmp_path):
    page = Page(build(tmp_path)).load()
    page.send("about drafts")
    drafts = page.conversation
    page.new_chat()
    assert page.messages == [] and page.conversation == NEW and page.selected is None and page.shown["chatbot"] == []
    page.send("about targets")
    targets = page.conversation
    assert drafts != targets and [i for _, i in page.listed] == [targets, drafts]

    page.open(drafts)
    assert page.conversation == drafts and user_texts(page.messages) == ["about drafts"] and page.selected == drafts
    page.send("more on drafts")  # saved to the conversation shown, not the other one
    assert user_texts(on_disk(tmp_path, drafts)["messages"]) == ["about drafts", "more on drafts"]
    assert user_texts(on_disk(tmp_path, targets)["messages"]) == ["about targets"]
    assert [i for _, i in page.listed] == [drafts, targets]  # the newest change first
    page.open(targets)
    assert user_texts(page.messages) == ["about targets"] and page.shown["stats"] != ""


def test_regenerate_undo_and_clear_are_saved(tmp_path):
    page = Page(build(tmp_path)).load()
    page.send("one")
    page.send("two")
    conversation = page.conversation
    before = on_disk(tmp_path, conversation)["messages"][-1]["content"]
    page.regenerate()
    assert on_disk(tmp_path, conversation)["messages"] == page.messages and page.messages[-1]["content"]
    page.undo()
    assert user_texts(on_disk(tmp_path, conversation)["messages"]) == ["one"] and page.shown["message"] == "two"
    kept = on_disk(tmp_path, conversation)["messages"]
    page.clear()  # a new chat; the saved conversation is not emptied
    assert on_disk(tmp_path, conversation)["messages"] == kept and page.conversation == NEW
    assert "stays saved" in page.notice and page.messages == [] and before
    page.send("three")  # the next reply starts a conversation of its own
    assert page.conversation not in (NEW, conversation) and len(files(tmp_path)) == 2


def test_an_unchanged_chat_is_not_written_again(tmp_path):
    page = Page(build(tmp_path)).load()
    page.send("one")
    path = tmp_path / f"{page.conversation}.json"
    written = path.stat().st_mtime_ns, path.read_bytes()
    page.reply_done()  # a request refused or stopped before it started: the chat is as it was
    assert (path.stat().st_mtime_ns, path.read_bytes()) == written


def test_an_empty_new_chat_is_not_written(tmp_path):
    page = Page(build(tmp_path)).load()
    page.new_chat()
    page.reply_done()  # e.g. an empty message, refused
    page.clear()
    page.undo()
    assert files(tmp_path) == [] and page.conversation == NEW
    page.rename("a title")
    assert "Nothing to rename" in page.notice and files(tmp_path) == []
    page.delete()
    assert "Nothing to delete" in page.notice and files(tmp_path) == []


def test_rename(tmp_path):
    page = Page(build(tmp_path)).load()
    page.send("the first message makes the title")
    conversation = page.conversation
    page.rename("  My  *own*\ntitle ")
    assert page.listed == [("My *own* title", conversation)] and page.shown["title"] == "My *own* title"
    assert on_disk(tmp_path, conversation)["title"] == "My *own* title"
    page.send("a reply later keeps the title")
    assert page.listed == [("My *own* title", conversation)]
    page.rename("")  # back to the derived title
    assert page.listed == [("the first message makes the title", conversation)]
    page.rename(["not", "text"])  # a client's junk: as empty
    assert page.listed == [("the first message makes the title", conversation)] and "⚠" not in page.notice


def test_two_conversations_with_one_title_are_told_apart(tmp_path):
    page = Page(build(tmp_path)).load()
    page.send("same words")
    page.new_chat()
    page.send("same words")
    page.new_chat()
    page.send("other words")
    labels = [label for label, _ in page.listed]
    assert len(set(labels)) == 3 and labels[0] == "other words"
    assert all(label.startswith("same words · ") for label in labels[1:])  # with the time (and a number)


def test_delete_asks_first_and_the_shown_one_falls_back(tmp_path):
    page = Page(build(tmp_path)).load()
    page.send("keep me")
    kept = page.conversation
    page.new_chat()
    page.send("delete *me*")
    doomed = page.conversation

    page.delete(confirm=False)
    assert page.shown["delete_row"]["visible"] is False and len(files(tmp_path)) == 2  # asked, then cancelled
    page.apply(ASK_DELETE_OUTPUTS, page.panel.ask_delete(page.conversation))
    assert page.shown["delete_row"]["visible"] is True and page.shown["pending_delete"] == doomed
    assert page.shown["delete_question"] == r"Delete **delete \*me\***? This cannot be undone."
    assert len(files(tmp_path)) == 2  # nothing is deleted by the question
    page.apply(DELETE_OUTPUTS, page.panel.delete(page.shown["pending_delete"], page.conversation))
    assert files(tmp_path) == [f"{kept}.json"] and page.shown["delete_row"]["visible"] is False
    assert page.conversation == kept and user_texts(page.messages) == ["keep me"] and page.listed == [("keep me", kept)]

    page.delete()  # the last one: a new chat
    assert files(tmp_path) == [] and page.conversation == NEW and page.messages == [] and page.listed == []


def test_deleting_another_conversation_keeps_the_one_shown(tmp_path):
    page = Page(build(tmp_path)).load()
    page.send("first")
    first = page.conversation
    page.apply(ASK_DELETE_OUTPUTS, page.panel.ask_delete(first))  # asked about `first` ...
    page.new_chat()  # ... then another chat was opened before the answer
    page.send("second")
    second = page.conversation
    page.apply(DELETE_OUTPUTS, page.panel.delete(page.shown["pending_delete"], second))
    assert files(tmp_path) == [f"{second}.json"]  # the one the question named
    assert (
        page.conversation == second and user_texts(page.messages) == ["second"] and page.listed == [("second", second)]
    )


# --- the browser's copy and the files on disk ----------------------------------------------------


def test_a_chat_the_browser_kept_before_saving_is_saved_on_load(tmp_path):
    older = {"messages": [{"role": "user", "content": "from before"}, {"role": "assistant", "content": "kept"}]}
    page = Page(build(tmp_path), state=older, conversation=None).load()
    (name,) = files(tmp_path)
    assert name == f"{page.conversation}.json" and on_disk(tmp_path, page.conversation)["messages"] == older["messages"]
    assert page.messages == older["messages"] and page.listed == [("from before", page.conversation)]


def test_a_conversation_deleted_elsewhere_starts_anew_with_a_notice(tmp_path):
    page = Page(build(tmp_path)).load()
    page.send("here")
    gone = page.conversation
    (tmp_path / f"{gone}.json").unlink()  # deleted from another tab, or by hand
    page.send("still here")
    assert page.conversation not in (gone, NEW) and "deleted elsewhere" in page.notice and one_line(page.notice)
    assert user_texts(on_disk(tmp_path, page.conversation)["messages"]) == ["here", "still here"]

    empty = Page(build(tmp_path), state=EMPTY, conversation=gone).load()  # a browser naming it, with no copy
    assert empty.conversation == NEW and empty.messages == [] and "no longer saved" in empty.notice
    assert one_line(empty.notice) and len(files(tmp_path)) == 1
    copy = {"messages": [{"role": "user", "content": "my copy"}]}
    kept = Page(build(tmp_path), state=copy, conversation=gone).load()  # with a copy: saved as a new one
    assert kept.messages == copy["messages"] and kept.conversation not in (gone, NEW)
    assert "saved as a new conversation" in kept.notice and len(files(tmp_path)) == 2


# --- errors: one line, and nothing on screen lost ---------------------------------------------------


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "0" * 32, 12, None, ["x"], "a\nb" * 40])
def test_a_bad_id_from_the_client_is_one_line(tmp_path, bad):
    page = Page(build(tmp_path)).load()
    page.send("mine")
    shown, messages = page.conversation, page.messages
    out = dict(zip(OPEN_OUTPUTS, page.open(bad)))
    assert one_line(page.notice) and "no saved conversation" in page.notice
    assert len(page.notice) < 120
    assert all(skipped(out[name]) for name in ui.CHAT_OUTPUTS if name != "notice")  # the chat stays as it was
    assert page.conversation == shown and page.messages == messages and page.selected == shown  # reselected
    assert files(tmp_path) == [f"{shown}.json"]

    junk = Page(build(tmp_path), state=EMPTY, conversation=bad).load()  # the browser state's id, on load
    if isinstance(bad, str) and bad:
        assert junk.conversation == NEW and "no longer saved" in junk.notice and one_line(junk.notice)
    else:  # not an id at all: as if none was stored
        assert junk.conversation == shown and junk.notice == ""


def test_an_unreadable_file_is_one_line_and_the_chat_stays(tmp_path):
    page = Page(build(tmp_path)).load()
    page.send("readable")
    good = page.conversation
    page.new_chat()
    page.send("soon broken")
    broken = page.conversation
    (tmp_path / f"{broken}.json").write_text("{ not json")
    page.open(good)
    assert user_texts(page.messages) == ["readable"]
    page.open(broken)
    assert "Cannot open that conversation" in page.notice and one_line(page.notice)
    assert page.conversation == good and user_texts(page.messages) == ["readable"]
    assert page.listed == [("readable", good)]  # an unreadable file is not listed

    # A browser that showed it when it broke: its copy is saved as a new conversation; the file is left alone.
    copy = {"messages": [{"role": "user", "content": "soon broken"}]}
    other = Page(build(tmp_path), state=copy, conversation=broken).load()
    assert "cannot be read" in other.notice and one_line(other.notice) and other.messages == copy["messages"]
    assert other.conversation not in (broken, NEW) and (tmp_path / f"{broken}.json").read_text() == "{ not json"


def test_a_full_disk_keeps_the_chat_and_says_so_in_one_line(tmp_path, monkeypatch):
    page = Page(build(tmp_path)).load()
    page.send("saved while there was room")
    conversation = page.conversation

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("chatapp.conversations._write_atomically", full)
    page.send("not saved: the disk is full")
    assert "Not saved" in page.notice and "No space left on device" in page.notice and one_line(page.notice)
    assert user_texts(page.messages) == ["saved while there was room", "not saved: the disk is full"]  # on screen
    assert page.conversation == conversation and page.shown["new_chat"]["interactive"] is True  # unlocked anyway
    page.new_chat()
    page.send("a new one cannot be saved either")
    assert page.conversation == NEW and "Not saved" in page.notice and user_texts(page.messages)
    page.rename("new title")
    assert "Nothing to rename" in page.notice  # still a new chat: nothing could be written

    monkeypatch.undo()  # room again: the next change saves what is shown
    page.send("and now")
    assert user_texts(on_disk(tmp_path, page.conversation)["messages"]) == [
        "a new one cannot be saved either",
        "and now",
    ]


def test_a_folder_that_cannot_be_listed_is_one_line(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    page = Page(build(blocker)).load()
    assert page.listed == [] and page.messages == []
    page.send("hello")
    assert "Not saved" in page.notice and one_line(page.notice) and user_texts(page.messages) == ["hello"]


# --- a reply running ---------------------------------------------------------------------------------


def test_switching_while_a_reply_runs_is_refused_in_one_line(tmp_path):
    service = FakeService()
    page = Page(build(tmp_path, service=service)).load()
    page.send("first chat")
    first = page.conversation
    page.new_chat()
    page.send("second chat")
    second = page.conversation

    service.delay = 0.2  # a reply of some seconds, stopped below
    updates = []
    reply = threading.Thread(
        target=lambda: updates.extend(page.h.chat("a long one", page.state, SETTINGS.decoding)), daemon=True
    )
    reply.start()
    deadline = time.monotonic() + 30
    while not page.h.replying() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert page.h.replying(), "the reply did not start"
    try:
        for refused in (page.open(first), page.new_chat()):
            out = dict(zip(OPEN_OUTPUTS, refused))
            assert out["notice"] == BUSY and all(skipped(out[name]) for name in ui.CHAT_OUTPUTS if name != "notice")
            assert out["conversations"]["value"] == second  # the list shows the one being answered again
        page.apply(ASK_DELETE_OUTPUTS, page.panel.ask_delete(second))
        page.apply(DELETE_OUTPUTS, page.panel.delete(second, second))
        assert page.notice == BUSY and f"{second}.json" in files(tmp_path)
        page.rename("renamed meanwhile")  # harmless: allowed
    finally:
        page.h.stop()
        reply.join(30)
    page.apply(ui.CHAT_OUTPUTS, updates[-1])
    page.reply_done()
    assert page.conversation == second and user_texts(on_disk(tmp_path, second)["messages"]) == [
        "second chat",
        "a long one",
    ]
    assert on_disk(tmp_path, second)["title"] == "renamed meanwhile"
    assert user_texts(on_disk(tmp_path, first)["messages"]) == ["first chat"]
    page.open(first)  # once it has ended, switching works
    assert page.conversation == first


# --- the page's wiring and the setting ----------------------------------------------------------------


def test_the_page_saves_after_every_change_and_loads_from_disk(tmp_path):
    demo = build(tmp_path)
    panel, fns = demo.specchat_conversations, list(demo.fns.values())
    by_id = {fn._id: fn for fn in fns}

    def then_of(name: str) -> set[str]:
        """What the events running `name` trigger when they end."""
        return {fn.fn.__name__ for fn in fns if fn.trigger_after is not None and by_id[fn.trigger_after].name == name}

    assert {fn.name for fn in fns if getattr(fn.fn, "__self__", None) is panel} >= {
        "load",
        "reply_done",
        "save",
        "open",
        "new_chat",
        "rename",
        "ask_delete",
        "delete",
        "cancel_delete",
    }
    assert "reply_done" in then_of("chat")
    assert "reply_done" in then_of("regenerate")
    for changed in ("undo", "edit"):
        assert "save" in then_of(changed), changed
    assert "cleared" in then_of("clear")
    assert "load" in then_of("restore")
    # The panel's events are private: no API names, and /send, /restore ... keep theirs (tests/test_ui.py).
    assert all(fn.api_visibility == "private" for fn in fns if getattr(fn.fn, "__self__", None) is panel)
    config = demo.config["components"]
    assert any(c["props"].get("elem_id") == "conversation-list" for c in config)
    assert any(c["props"].get("storage_key") == "specchat-conversation-v1" for c in config)


@pytest.mark.parametrize(
    "server",
    [
        dict(host="0.0.0.0"),  # serve --host 0.0.0.0, auto
        dict(host="127.0.0.1", save_conversations="off"),
        dict(host="127.0.0.1", share=True),
    ],
)
def test_off_writes_nothing_and_has_no_panel(tmp_path, server):
    demo = build(tmp_path, settings_with(**server))
    assert demo.specchat_conversations is None
    components = demo.config["components"]
    assert not any(str(c["props"].get("elem_id", "")).startswith(("conversation", "new-chat")) for c in components)
    assert not any(c.get("props", {}).get("storage_key") == "specchat-conversation-v1" for c in components)
    h = demo.specchat_handlers
    *_, last = h.chat("not to be kept", EMPTY, SETTINGS.decoding)
    assert dict(zip(ui.CHAT_OUTPUTS, last))["state"]["messages"][0]["content"] == "not to be kept"
    assert files(tmp_path) == []


def test_auto_is_on_only_for_this_machine_alone():
    server = SETTINGS.server
    assert server.save_conversations == "auto"

    def saves(env=None, **changes):
        return saves_conversations(dataclasses.replace(server, **changes), env or {})

    assert saves(host="127.0.0.1") and saves(host="localhost") and saves(host="::1") and saves(host="127.0.0.2")
    assert not saves(host="0.0.0.0") and not saves(host="192.168.1.5") and not saves(host="my-box.example")
    assert not saves(host="127.0.0.1", share=True)  # a public gradio.live link
    assert not saves({"SPACE_ID": "user/specchat"}, host="127.0.0.1")  # a Hugging Face Space
    assert saves({"SPACE_ID": ""}, host="127.0.0.1")
    assert saves({"SPACE_ID": "user/specchat"}, host="0.0.0.0", save_conversations="on")  # forced
    assert not saves(host="127.0.0.1", save_conversations="off")


def test_the_space_id_turns_it_off_for_the_built_app(tmp_path, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "user/specchat")
    assert build(tmp_path).specchat_conversations is None
    monkeypatch.delenv("SPACE_ID")
    assert build(tmp_path).specchat_conversations is not None


def test_the_default_store_is_the_data_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECCHAT_DATA_DIR", str(tmp_path))
    demo = ui.build_app(FakeService(), SETTINGS)
    page = Page(demo).load()
    page.send("where am I kept?")
    assert files(tmp_path / "conversations") == [f"{page.conversation}.json"]
