"""The app served on 127.0.0.1 for a test, over a service (usually tests/fake_engine.py's), and
the settings it is built with; used by the API, hostile-input, load and security tests."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gradio_client import Client

from chatapp import ui
from chatapp.settings import DEFAULT_SETTINGS_PATH, load_settings

SETTINGS = load_settings(DEFAULT_SETTINGS_PATH, env={})  # the shipped defaults, whatever the environment says
EMPTY = {"messages": []}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_with(**server: Any):
    """The shipped settings with [server] keys changed."""
    return dataclasses.replace(SETTINGS, server=dataclasses.replace(SETTINGS.server, **server))


@contextmanager
def served(
    service: Any, settings=SETTINGS, *, auth=None, host: str = "127.0.0.1", **launch: Any
) -> Iterator[tuple[Any, str]]:
    """(demo, url) of the app over `service`, closed afterwards."""
    demo = ui.build_app(service, settings)
    _, url, _ = ui.launch_app(
        demo, host=host, port=free_port(), prevent_thread_lock=True, quiet=True, auth=auth, **launch
    )
    try:
        yield demo, url
    finally:
        demo.close()


def client(url: str, **kwargs: Any) -> Client:
    return Client(url.replace("0.0.0.0", "127.0.0.1"), verbose=False, **kwargs)
