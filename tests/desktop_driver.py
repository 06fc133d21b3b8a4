"""`specchat` (chatapp.desktop.run) with the scripted fake service, for tests/test_desktop.py.

Usage: python tests/desktop_driver.py RESULT.json [--browser | --read] [--delay S]

Settings come from the environment as for `specchat` (SPECCHAT_SERVER_PORT,
SPECCHAT_DATA_DIR, DISPLAY, ...). In a window, once it shows the app, the
driver types a message into the page by JavaScript (through pywebview),
presses Send and records the chat's text every few milliseconds while the
reply streams, then writes RESULT.json and leaves the window open: the test
closes it the way a user would. With --read it sends nothing: it waits for
the conversation the app opens at start and writes the chat's text and the
conversation list as they show. With --browser it is `specchat --browser`
with the fake service (RESULT.json is not written).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fake_engine
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # chatapp

from fake_engine import FakeService  # noqa: E402

from chatapp import desktop  # noqa: E402
from chatapp.settings import load_settings  # noqa: E402

MESSAGE = "Hello from the desktop window"
TYPE_AND_SEND = """
(() => {
  const box = document.querySelector('#chat-input textarea');
  box.value = %s;
  box.dispatchEvent(new Event('input', {bubbles: true}));
  setTimeout(() => document.querySelector('#send-btn').click(), 300);
  return true;
})()
"""
CHAT_TEXT = "(() => { const c = document.querySelector('#chatbot'); return c ? c.innerText : ''; })()"
APP_READY = "!!document.querySelector('#chat-input textarea') && location.pathname === '/'"


def evaluate(window, script: str):
    try:
        return window.evaluate_js(script)
    except Exception:  # the page is navigating (loading page -> app): ask again
        return None


def wait_for(window, script: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = evaluate(window, script)
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(script)


def drive(result: Path, window) -> None:
    wait_for(window, APP_READY)
    time.sleep(1.0)  # Gradio binds its events after the textarea appears
    evaluate(window, TYPE_AND_SEND % json.dumps(MESSAGE))
    snapshots: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = evaluate(window, CHAT_TEXT) or ""
        if not snapshots or text != snapshots[-1]:
            snapshots.append(text)
        if "That is all." in text and "speculative" in text.split("That is all.")[-1]:
            break  # the reply and its stats line are in
        time.sleep(0.02)
    result.write_text(json.dumps({"snapshots": snapshots, "url": evaluate(window, "location.href")}))


def read(result: Path, window) -> None:
    """What a new start shows by itself: the chat (the latest saved conversation) and the list."""
    wait_for(window, APP_READY)
    try:
        wait_for(window, f"({CHAT_TEXT}).includes({json.dumps(MESSAGE)})", timeout=60)
    except TimeoutError:
        pass  # the test reads what shows instead
    listed = "(() => { const l = document.querySelector('#conversation-list'); return l ? l.innerText : ''; })()"
    result.write_text(json.dumps({"chat": evaluate(window, CHAT_TEXT), "list": evaluate(window, listed)}))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("result", type=Path)
    parser.add_argument("--browser", action="store_true")
    parser.add_argument("--read", action="store_true")
    parser.add_argument("--delay", type=float, default=0.08)
    args = parser.parse_args()
    factory = lambda progress: FakeService(delay=args.delay)  # noqa: E731
    if args.browser:  # nothing to drive: the test reads the port from the data folder's instance.json
        return desktop.run(load_settings(), browser=True, factory=factory)
    job = read if args.read else drive
    return desktop.run(load_settings(), factory=factory, on_window=lambda window: job(args.result, window))


if __name__ == "__main__":
    sys.exit(main())
