"""The UI in headless Chromium (Debian's package; `make test` installs it):
send a message, see the streamed reply, its stats and the token view, survive
a reload; once with a scripted fake service, once with the real embedded pair.
Also the chat's own controls (Stop, retry, edit, undo, examples), and the
Model tab switching the pair. Saves artifacts/browser-*.png; with
SPECCHAT_UPDATE_SCREENSHOT=1 the real model's chat, Stats tab and Model tab
become the README's docs/screenshot.png, docs/screenshot-stats.png and
docs/screenshot-model-tab.png."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from fake_engine import FakeService, fake_loader

from chatapp import ui
from chatapp.conversations import ConversationStore
from chatapp.settings import DEFAULT_SETTINGS_PATH, load_settings, with_overrides

pytestmark = [pytest.mark.browser, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 30_000
REAL_LOAD_TIMEOUT_MS = 600_000  # the real model on a busy CPU: a reply, or loading and calibrating the pair


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (`make test` installs Debian's package: apt-get install chromium)")
    return path


@contextlib.contextmanager
def _served_page(service, settings, loader=None):
    """A Chromium page on the app serving `service`, on 127.0.0.1, saving its conversations in a folder of its
    own; all stopped (and removed) after."""
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    conversations = tempfile.TemporaryDirectory(prefix="specchat-test-conversations-")
    demo = ui.build_app(service, settings, loader=loader, conversations=ConversationStore(conversations.name))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, url, _ = ui.launch_app(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 1000})
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(url)
                yield page
            finally:
                browser.close()
    finally:
        demo.close()
        conversations.cleanup()


@pytest.fixture
def page():
    with _served_page(FakeService(delay=0.03), load_settings(DEFAULT_SETTINGS_PATH, env={})) as page:
        yield page


def _wait_text(page, selector: str, text: str, absent: str | None = None) -> None:
    """Wait until `selector` exists and shows `text` (and not `absent`)."""
    page.wait_for_function(
        "([sel, text, absent]) => { const el = document.querySelector(sel); const t = el ? el.innerText : '';"
        " return t.includes(text) && !(absent && t.includes(absent)); }",
        arg=[selector, text, absent],
    )


def _reply_done(page) -> None:
    _wait_text(page, "#turn-stats", "acceptance", absent="generating")


def test_chat_in_the_browser(page):
    box = page.locator("#chat-input textarea")
    box.fill("How does speculative decoding work?")
    page.locator("#send-btn").click()
    _reply_done(page)
    box.fill("And why is the output identical to the target's?")
    box.press("Enter")
    _wait_text(page, "#chatbot", "identical to the target")
    _reply_done(page)

    chat = page.locator("#chatbot")
    assert "fewer target steps" in chat.inner_text()  # the code block of the (fake) reply rendered
    assert chat.locator("pre code").count() >= 1  # Markdown code blocks render as code
    stats = page.locator("#turn-stats")
    assert stats.is_visible()
    text = stats.inner_text()
    for part in (
        "speculative",
        "K = 4 (fixed)",
        "acceptance",
        "accepted/round",
        "tok/s",
        "vs standard decoding",
        "baseline:",
        "draft INT8 path:",
    ):
        assert part in text, (part, text)
    tokens = page.locator("#token-view")
    assert tokens.is_visible()
    assert "Speculative" in tokens.inner_text() and "draft" in tokens.inner_text()
    assert box.input_value() == ""
    # Saved and listed beside the chat, titled by its first message; the list, locked while a reply was
    # generated, is unlocked once the reply is saved.
    _wait_text(page, "#conversation-list", "How does speculative decoding work?")
    page.wait_for_function("() => !document.querySelector('#conversation-list input').disabled")

    _screenshot(page, "browser-chat.png")

    # The Stats tab draws its plots when opened: in the browser, from the points, with every series.
    page.get_by_role("tab", name="Stats").click()
    _wait_text(page, "#turn-plot", "Acceptance rate of 2 replies, speedup of 2")
    _wait_text(page, "#theory-plot", "measured replies: 2 at K = 4")
    for plot, series in (("#turn-plot", "speedup vs standard"), ("#theory-plot", "measured replies, K=4")):
        page.locator(f"{plot} svg").first.wait_for(state="visible")
        _wait_text(page, plot, series)  # the legend
    _screenshot(page, "browser-stats.png")
    _wait_text(page, "#turns-table", "speculative")

    # The chat is saved: a reload brings it back from disk, selected in the list.
    page.reload()
    _wait_text(page, "#chatbot", "identical to the target")
    _wait_text(page, "#turn-stats", "acceptance")
    page.locator("#conversation-list input:checked").wait_for(state="attached")


def _stop_shows_while_generating(page) -> None:
    """Stop stands where Send was while a reply is generated, and Send comes back after it."""
    page.locator("#stop-btn").wait_for(state="visible")
    assert not page.locator("#send-btn").is_visible()
    _wait_text(page, "#turn-stats", "generating")
    page.locator("#send-btn").wait_for(state="visible")
    assert not page.locator("#stop-btn").is_visible()
    _reply_done(page)


def test_chat_controls_in_the_browser():
    """Examples on the empty chat; Stop only while generating; the Chatbot's retry, edit and undo."""
    fake = FakeService(delay=0.15)  # a reply of some 2 s: time to see Stop
    with _served_page(fake, load_settings(DEFAULT_SETTINGS_PATH, env={})) as page:
        page.locator("#send-btn").wait_for(state="visible")
        assert not page.locator("#stop-btn").is_visible()
        examples = page.locator("#chatbot .example")
        examples.first.wait_for(state="visible")
        assert examples.count() >= 3
        examples.first.click()  # an example is sent at once
        _stop_shows_while_generating(page)
        first = fake.histories[-1][-1]["content"]
        assert first.startswith("Explain speculative decoding") and first in page.locator("#chatbot").inner_text()

        box = page.locator("#chat-input textarea")
        box.fill("A second question")
        box.press("Enter")
        page.locator("#stop-btn").wait_for(state="visible")
        _wait_text(page, "#turn-stats", "generating")
        page.locator("#stop-btn").click()  # Stop ends the reply early
        _wait_text(page, "#chat-notice", "Stopped")
        page.locator("#send-btn").wait_for(state="visible")
        assert fake.last.stats.stop_reason == "stopped"

        page.get_by_role("button", name="Retry").click()  # the last reply again, whole this time
        _stop_shows_while_generating(page)
        assert [m["content"] for m in fake.histories[-1]][-1] == "A second question"
        assert fake.last.stats.stop_reason == "eos" and len(fake.histories[-1]) == 3

        page.get_by_role("button", name="Edit").first.click()  # the first message, edited: the rest goes
        page.locator("#chatbot textarea").fill("An edited first question")
        page.get_by_role("button", name="Submit").click()
        _stop_shows_while_generating(page)
        assert fake.histories[-1] == [{"role": "user", "content": "An edited first question"}]
        chat_text = page.locator("#chatbot").inner_text()
        assert "You said: An edited first question" in chat_text and "A second question" not in chat_text

        page.get_by_role("button", name="Undo").click()  # the exchange is taken back into the box
        page.wait_for_function("() => document.querySelector('#chat-input textarea').value.includes('edited')")
        assert box.input_value() == "An edited first question"
        page.locator("#chatbot .example").first.wait_for(state="visible")  # the chat is empty again
        _wait_text(page, "#conversation-list", "New conversation")  # saved so (no title without a message)
        page.reload()  # and stays so
        page.locator("#chatbot .example").first.wait_for(state="visible")


def test_the_model_tab_switches_the_pair_in_the_browser():
    """The picker: a preset fills it; a pair typed in loads with its progress and replaces the serving one
    (the header and the chat follow); a draft with another vocabulary is refused and the pair keeps serving."""
    first = FakeService(delay=0.02)
    settings = load_settings(DEFAULT_SETTINGS_PATH, env={})
    with _served_page(first, settings, functools.partial(fake_loader, step_s=0.4)) as page:
        page.get_by_role("tab", name="Model").click()
        target, draft = page.locator("#model-target textarea"), page.locator("#model-draft textarea")
        assert target.input_value() == settings.model.target and draft.is_disabled()

        page.locator("#model-preset input").click()  # a preset fills the picker
        page.get_by_role("option", name="qwen2.5-1.5b", exact=False).first.click()
        page.wait_for_function(
            "() => document.querySelector('#model-target textarea').value === 'Qwen/Qwen2.5-1.5B-Instruct'"
        )
        assert draft.input_value() == "Qwen/Qwen2.5-0.5B-Instruct" and draft.is_enabled()

        target.fill("")
        target.press_sequentially("tiny/chat-target")  # typed in: no longer the preset's pair
        draft.fill("tiny/chat-draft")
        page.wait_for_function("() => document.querySelector('#model-preset input').value.startsWith('custom')")
        page.locator("#model-load-btn").click()
        _wait_text(page, "#model-load-status", "Loading the new pair")  # the progress, while the old pair serves
        _wait_text(page, "#model-load-status", "Now serving")
        status = page.locator("#model-load-status").inner_text()
        assert "vocabulary check: compatible" in status and status.index("loading tiny/chat-target") < status.index(
            "vocabulary check"
        )
        _wait_text(page, "#model-status", "tiny/chat-target")  # the header names the new pair
        _wait_text(page, "#model-info", "tiny/chat-draft")
        _screenshot(page, "browser-model-tab.png")

        draft.fill("tiny/incompatible-draft")  # refused by the vocabulary check: the pair keeps serving
        page.locator("#model-load-btn").click()
        _wait_text(page, "#model-load-status", "Not loaded")
        assert "does not speak" in page.locator("#model-load-status").inner_text()
        assert "tiny/chat-target" in page.locator("#model-status").inner_text()

        page.get_by_role("tab", name="Chat").click()
        box = page.locator("#chat-input textarea")
        box.fill("Who answers now?")
        box.press("Enter")
        _reply_done(page)
        assert len(first.turns) == 0  # the new pair answered, not the first one
        assert "Who answers now?" in page.locator("#chatbot").inner_text()


def _screenshot(page, name: str) -> Path:
    out = ROOT / "artifacts" / name
    out.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    return out


@pytest.mark.slow
def test_real_model_in_the_browser():
    from chatapp.models import load_pair
    from chatapp.service import ChatService

    _chromium()  # skip before loading anything when there is no browser
    settings = with_overrides(load_settings(DEFAULT_SETTINGS_PATH, env={}), {"decoding.max_new_tokens": 96})
    service = ChatService(load_pair(settings.model, progress=lambda message: None))
    service.calibrate()
    with _served_page(service, settings) as page:
        box = page.locator("#chat-input textarea")
        box.fill("Give me three tips for writing clear Python code.")
        box.press("Enter")
        _reply_done(page)
        text = page.locator("#turn-stats").inner_text()
        for part in ("speculative", "acceptance", "tok/s", "vs standard decoding", "calibration at load", "int16"):
            assert part in text, (part, text)
        assert "first token" in text and "reused 0 of" in text, text
        assert page.locator("#token-view").is_visible()
        shots = {"screenshot.png": _screenshot(page, "browser-real.png")}

        # Two more replies of the conversation for the Stats tab: in standard mode, then at K = 6.
        page.locator("#mode label", has_text="standard").click()
        _real_reply(page, "And one more tip, in one line.")
        assert "reused" in page.locator("#turn-stats").inner_text()
        page.locator("#mode label", has_text="speculative").click()
        k = page.locator("#k input[type=number]")
        k.fill("6")
        k.press("Enter")
        _real_reply(page, "Now sum the tips up in one sentence.")
        page.get_by_role("tab", name="Stats").click()
        _wait_text(page, "#turn-plot", "Acceptance rate of 2 replies, speedup of 3")
        _wait_text(page, "#theory-plot", "measured replies: 1 at K = 4, 1 at K = 6")
        shots["screenshot-stats.png"] = _screenshot(page, "browser-real-stats.png")

        # The Model tab: the same pair loaded again, checked, and swapped in while the first one serves.
        page.get_by_role("tab", name="Model").click()
        page.locator("#model-load-btn").click()
        page.wait_for_function(
            "() => document.querySelector('#model-load-status').innerText.includes('Now serving')",
            timeout=REAL_LOAD_TIMEOUT_MS,
        )
        status = page.locator("#model-load-status").inner_text()
        assert "vocabulary check: compatible" in status and "measuring standard decoding" in status, status
        shots["screenshot-model-tab.png"] = _screenshot(page, "browser-real-model-tab.png")
    if os.environ.get("SPECCHAT_UPDATE_SCREENSHOT") == "1":
        for name, shot in shots.items():
            shutil.copyfile(shot, ROOT / "docs" / name)


def _real_reply(page, message: str) -> None:
    """Send `message` and wait for its reply from the real model (Stop shows at once, Send comes back after)."""
    box = page.locator("#chat-input textarea")
    box.fill(message)
    box.press("Enter")
    page.locator("#stop-btn").wait_for(state="visible")
    page.locator("#send-btn").wait_for(state="visible", timeout=REAL_LOAD_TIMEOUT_MS)
    _reply_done(page)
