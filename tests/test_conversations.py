"""chatapp.conversations: conversations kept on disk, one JSON file each."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from chatapp import conversations
from chatapp.conversations import ConversationError, ConversationNotFound, ConversationStore

ROOT = Path(__file__).resolve().parents[1]
STATS = {"mode": "speculative", "k": 4, "new_tokens": 12, "acceptance_rate": 0.75, "k_choice": None, "notice": None}
CHAT = [
    {"role": "user", "content": "Why is the sky blue?\nAnswer briefly."},
    {"role": "assistant", "content": "Rayleigh scattering.", "stats": STATS},
]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_conversation_is_there_after_a_restart(tmp_path):
    # Two processes, as two starts of the app: the second reads what the first saved.
    env = {**os.environ, "SPECCHAT_DATA_DIR": str(tmp_path / "data")}
    save = (
        "import json, sys; from chatapp.conversations import ConversationStore as S; "
        "c = S().new(); S().set_messages(c.id, json.loads(sys.argv[1])); print(c.id)"
    )
    saved_id = subprocess.run(
        [sys.executable, "-c", save, json.dumps(CHAT)], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    read = (
        "import json; from chatapp.conversations import ConversationStore as S; s = S(); "
        "print(json.dumps([[x.id, x.title] for x in s.list()] + [list(s.load(s.list()[0].id).messages)]))"
    )
    listed = json.loads(
        subprocess.run(
            [sys.executable, "-c", read], cwd=ROOT, env=env, check=True, capture_output=True, text=True
        ).stdout
    )
    assert listed[:-1] == [[saved_id, "Why is the sky blue?"]]
    assert listed[-1] == CHAT
    assert sorted(_tree(tmp_path)) == [f"data/conversations/{saved_id}.json"]  # nothing written anywhere else


def test_default_folder_is_the_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECCHAT_DATA_DIR", str(tmp_path))
    assert ConversationStore().folder == tmp_path / "conversations"
    assert not (tmp_path / "conversations").exists()  # nothing is created before the first write


def test_round_trip_keeps_messages_and_stats(tmp_path):
    store = ConversationStore(tmp_path)
    made = store.new(CHAT)
    loaded = store.load(made.id)
    assert loaded == made
    assert list(loaded.messages) == CHAT and loaded.messages[1]["stats"] == STATS
    on_disk = json.loads((tmp_path / f"{made.id}.json").read_text())
    assert on_disk["format"] == "specchat-conversation" and on_disk["version"] == 1 and on_disk["id"] == made.id
    assert on_disk["created"] == on_disk["updated"] == made.created


def test_list_is_most_recently_updated_first(tmp_path):
    store = ConversationStore(tmp_path)
    first, second, third = (store.new([{"role": "user", "content": f"chat {i}"}]) for i in range(3))
    assert [s.id for s in store.list()] == [third.id, second.id, first.id]
    store.set_messages(first.id, [*store.load(first.id).messages, {"role": "assistant", "content": "hi"}])
    summaries = store.list()
    assert [s.id for s in summaries] == [first.id, third.id, second.id]
    assert summaries[0].message_count == 2 and summaries[0].updated > summaries[0].created


def test_titles_derive_from_the_first_user_message_until_renamed(tmp_path):
    store = ConversationStore(tmp_path)
    empty = store.new()
    assert empty.display_title == conversations.UNTITLED
    long_line = "word " * 40
    assert len(store.new([{"role": "user", "content": long_line}]).display_title) == conversations.TITLE_CHARS
    chat = store.new(CHAT)
    renamed = store.rename(chat.id, "  Sky\ncolour  ")
    assert renamed.title == "Sky colour" and store.load(chat.id).display_title == "Sky colour"
    assert store.rename(chat.id, "").display_title == "Why is the sky blue?"
    assert renamed.updated > chat.updated


def test_delete_removes_only_that_file(tmp_path):
    store = ConversationStore(tmp_path)
    kept, gone = store.new(CHAT), store.new(CHAT)
    assert store.delete(gone.id) is True
    assert store.delete(gone.id) is False
    assert [s.id for s in store.list()] == [kept.id]
    with pytest.raises(ConversationNotFound):
        store.load(gone.id)
    with pytest.raises(ConversationNotFound):
        store.rename(gone.id, "x")


def test_corrupt_and_foreign_files_are_skipped_never_deleted(tmp_path):
    store = ConversationStore(tmp_path)
    good = store.new(CHAT)
    corrupt = {
        "0" * 32 + ".json": b'{"format": "specchat-conv',  # truncated
        "1" * 32 + ".json": b"\xff\xfe not utf-8",
        "2" * 32 + ".json": json.dumps({"messages": []}).encode(),  # foreign JSON
        "3" * 32 + ".json": json.dumps({**good.to_json(), "version": 99, "id": "3" * 32}).encode(),  # newer version
        "4" * 32 + ".json": json.dumps({**good.to_json()}).encode(),  # holds another id
        "notes.txt": b"not ours",
        "settings.json": b"{}",
    }
    for name, data in corrupt.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / ("5" * 32 + ".json")).mkdir()
    before = _tree(tmp_path)
    assert [s.id for s in store.list()] == [good.id]
    for bad_id in ("0" * 32, "1" * 32, "2" * 32, "3" * 32, "4" * 32):
        with pytest.raises(ConversationError):
            store.load(bad_id)
    store.rename(good.id, "still works")
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(good.id)} == {
        k: v for k, v in before.items() if not k.startswith(good.id)
    }


def test_malformed_messages_are_dropped_on_reading(tmp_path):
    store = ConversationStore(tmp_path)
    made = store.new()
    data = made.to_json()
    data["messages"] = [
        CHAT[0],
        {"role": "system", "content": "x"},
        {"role": "user"},
        "text",
        None,
        {"role": "assistant", "content": "ok", "stats": "not a record", "extra": 1},
    ]
    (tmp_path / f"{made.id}.json").write_text(json.dumps(data))
    assert list(store.load(made.id).messages) == [CHAT[0], {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "", "A" * 32, "0" * 31, None, 7])
def test_ids_that_could_name_another_file_are_refused(tmp_path, bad_id):
    store = ConversationStore(tmp_path / "conversations")
    with pytest.raises(ConversationNotFound):
        store.load(bad_id)
    with pytest.raises(ConversationNotFound):
        store.delete(bad_id)
    assert not (tmp_path / "conversations").exists()


def test_files_are_private_and_no_temporary_file_is_left(tmp_path):
    store = ConversationStore(tmp_path / "conversations")
    made = store.new(CHAT)
    store.rename(made.id, "private")
    assert stat.S_IMODE((tmp_path / "conversations").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "conversations" / f"{made.id}.json").stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "conversations").iterdir()) == [f"{made.id}.json"]


def test_a_failed_write_leaves_the_old_version(tmp_path, monkeypatch):
    store = ConversationStore(tmp_path)
    made = store.new(CHAT)
    before = _tree(tmp_path)

    def power_cut(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(conversations.os, "replace", power_cut)
    with pytest.raises(OSError, match="disk gone"):
        store.set_messages(made.id, [])
    assert _tree(tmp_path) == before
    monkeypatch.undo()
    assert list(store.load(made.id).messages) == CHAT


def test_storage_imports_no_gradio():
    code = (
        "import sys, chatapp.conversations; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('gradio', 'torch', 'transformers') or m.startswith('chatapp')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['chatapp', 'chatapp.conversations', 'chatapp.paths']"
