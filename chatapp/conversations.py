"""Conversations kept on disk: one JSON file each, under the user's data folder.

Contract: `ConversationStore(folder)` keeps conversations in `folder` (default
data_dir()/conversations, chatapp.paths), one file `<id>.json` each:

    {"format": "specchat-conversation", "version": 1, "id": "<32 hex>",
     "title": "", "created": <unix seconds>, "updated": <unix seconds>,
     "messages": [{"role": "user" | "assistant", "content": str, "stats": {...}}, ...]}

A reply's "stats" is its record (chatapp.service.Turn.record()), the same
message shape the UI keeps in the browser. An empty title means "untitled":
`display_title` then comes from the first user message.

    list()                      summaries, most recently updated first
    new(messages=(), title="")  a new conversation, written at once
    load(id)                    the conversation (ConversationNotFound, ConversationError)
    save(conversation)          writes it with `updated` = now
    set_messages(id, messages)  load, replace the messages, save
    rename(id, title)           the new title ("" = back to the derived one)
    delete(id)                  True if there was one to delete

Every write goes to a temporary file in the same folder, is flushed to disk
and renamed over the old file (then the folder is flushed too), so a crash or
a power cut leaves the old version or the new one, never half of either.
Files and folder are the user's only (0600, 0700). A file that is not one of
ours (another name, not JSON, another format, a newer version) is skipped by
list() and never rewritten or deleted; a malformed message inside one of ours
is dropped on reading. Nothing is written outside the folder.

It knows nothing about Gradio, models or the service; it imports only chatapp.paths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import data_dir

FORMAT = "specchat-conversation"
VERSION = 1
ROLES = ("user", "assistant")
UNTITLED = "New conversation"
TITLE_CHARS = 60  # a derived title: the first user message's first line, cut to this
MAX_TITLE_CHARS = 200  # a title given by rename()
MAX_FILE_BYTES = 64 << 20  # larger files are not ours (a chat of that size would not fit any context)
_ID = re.compile(r"^[0-9a-f]{32}$")
_FILE = re.compile(r"^([0-9a-f]{32})\.json$")


class ConversationError(ValueError):
    """A conversation file that cannot be read as one of ours; the message is one line."""


class ConversationNotFound(ConversationError, KeyError):
    """No conversation with that id (or not a valid id at all)."""

    def __str__(self) -> str:  # KeyError's str() adds quotes around the message
        return str(self.args[0]) if self.args else "conversation not found"


@dataclass(frozen=True)
class ConversationSummary:
    """What a conversation list shows: no messages."""

    id: str
    title: str
    created: float
    updated: float
    message_count: int


@dataclass(frozen=True)
class Conversation:
    id: str
    created: float
    updated: float
    messages: tuple[dict, ...] = ()
    title: str = ""  # "" = untitled: display_title derives one

    @property
    def display_title(self) -> str:
        return self.title or derived_title(self.messages)

    def summary(self) -> ConversationSummary:
        return ConversationSummary(self.id, self.display_title, self.created, self.updated, len(self.messages))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "id": self.id,
            "title": self.title,
            "created": self.created,
            "updated": self.updated,
            "messages": list(self.messages),
        }


def derived_title(messages: Iterable[dict]) -> str:
    """The first line of the first user message, cut to TITLE_CHARS; UNTITLED without one."""
    for message in messages:
        if message["role"] == "user" and message["content"].strip():
            line = message["content"].strip().splitlines()[0].strip()
            return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"
    return UNTITLED


def clean_messages(messages: Any) -> tuple[dict, ...]:
    """The well-formed messages of `messages`, as plain dicts; anything else is dropped."""
    if not isinstance(messages, (list, tuple)):
        return ()
    return tuple(_clean_message(m) for m in messages if _is_message(m))


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)


def _clean_message(m: dict) -> dict:
    entry = {"role": m["role"], "content": m["content"]}
    if m["role"] == "assistant" and isinstance(m.get("stats"), dict):
        entry["stats"] = m["stats"]
    return entry


def _clean_title(title: Any) -> str:
    return " ".join(str(title).split())[:MAX_TITLE_CHARS] if title else ""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse(data: Any, expected_id: str) -> Conversation:
    """A conversation from a file's JSON value, or ConversationError saying why it is not one of ours."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConversationError(f"{expected_id}: not a SpecChat conversation")
    if data.get("version") != VERSION:
        raise ConversationError(f"{expected_id}: conversation format version {data.get('version')!r} is not {VERSION}")
    if data.get("id") != expected_id:
        raise ConversationError(f"{expected_id}: the file holds conversation {data.get('id')!r}")
    created, updated = _number(data.get("created")), _number(data.get("updated"))
    if created is None or updated is None:
        raise ConversationError(f"{expected_id}: created/updated times are missing")
    title = data.get("title")
    return Conversation(
        id=expected_id,
        created=created,
        updated=updated,
        messages=clean_messages(data.get("messages")),
        title=_clean_title(title) if isinstance(title, str) else "",
    )


class ConversationStore:
    """The conversations of one folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else data_dir() / "conversations"
        self._lock = threading.Lock()  # read-modify-write (rename, set_messages) from several UI threads

    # --- reading ---

    def list(self) -> list[ConversationSummary]:
        """Every readable conversation, most recently updated first; unreadable and foreign files skipped."""
        found = []
        for path in self._files():
            try:
                found.append(self._read(path, _FILE.match(path.name).group(1)).summary())
            except ConversationError:
                continue
        return sorted(found, key=lambda s: (-s.updated, -s.created, s.id))

    def load(self, conversation_id: str) -> Conversation:
        return self._read(self._path(conversation_id), conversation_id)

    def _files(self) -> list[Path]:
        try:
            return [p for p in self.folder.iterdir() if _FILE.match(p.name) and p.is_file()]
        except FileNotFoundError:
            return []

    def _path(self, conversation_id: str) -> Path:
        if not isinstance(conversation_id, str) or not _ID.match(conversation_id):
            raise ConversationNotFound(f"no conversation {conversation_id!r}")
        return self.folder / f"{conversation_id}.json"

    def _read(self, path: Path, conversation_id: str) -> Conversation:
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ConversationError(f"{conversation_id}: larger than {MAX_FILE_BYTES >> 20} MB")
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ConversationNotFound(f"no conversation {conversation_id!r}") from None
        except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
            raise ConversationError(f"{conversation_id}: cannot read {path.name}: {error}") from None
        return parse(data, conversation_id)

    # --- writing ---

    def new(self, messages: Iterable[dict] = (), title: str = "") -> Conversation:
        now = time.time()
        conversation = Conversation(
            id=uuid.uuid4().hex,
            created=now,
            updated=now,
            messages=clean_messages(list(messages)),
            title=_clean_title(title),
        )
        with self._lock:
            self._write(conversation)
        return conversation

    def save(self, conversation: Conversation) -> Conversation:
        """Write `conversation` (its messages cleaned), `updated` set to now; the written version is returned."""
        self._path(conversation.id)  # a valid id, or ConversationNotFound
        with self._lock:
            return self._save(conversation)

    def set_messages(self, conversation_id: str, messages: Iterable[dict]) -> Conversation:
        with self._lock:
            return self._save(dataclasses.replace(self.load(conversation_id), messages=tuple(messages)))

    def rename(self, conversation_id: str, title: str) -> Conversation:
        with self._lock:
            return self._save(dataclasses.replace(self.load(conversation_id), title=_clean_title(title)))

    def delete(self, conversation_id: str) -> bool:
        path = self._path(conversation_id)
        with self._lock:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        _sync_folder(self.folder)
        return True

    def _save(self, conversation: Conversation) -> Conversation:
        # Never earlier than `created`, and strictly later than the last save, so that
        # list() orders two saves within one clock tick the way they happened.
        updated = max(time.time(), conversation.created, conversation.updated + 1e-6)
        saved = dataclasses.replace(
            conversation,
            updated=updated,
            messages=clean_messages(list(conversation.messages)),
            title=_clean_title(conversation.title),
        )
        self._write(saved)
        return saved

    def _write(self, conversation: Conversation) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps(conversation.to_json(), ensure_ascii=False, indent=1).encode("utf-8")
        _write_atomically(self.folder / f"{conversation.id}.json", data)


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data` all at once; mkstemp's file is the user's only (0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename, an unlink) to disk, so they survive a power cut (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
