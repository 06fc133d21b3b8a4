"""Serving the app: the theme and CSS, `launch_app`, and `serve` (`main.py
serve`), which puts the page up at once and loads the models behind it.

Contract: `launch_app(demo, ...)` launches a built app (Gradio 6 takes the
theme and CSS in `launch()`), binding 127.0.0.1 unless asked otherwise. It
also puts on it what a server reachable by others needs: authentication
(chatapp.ui.auth: from the environment or the config folder, never the
repository; a warning on stderr when the app is reachable beyond this machine
without it), the limits on what a client may send (an upload, a request
body), and, with settings.server.openai_api, the OpenAI-compatible API
(chatapp.ui.openai_api) on the same server and generation slot.
`serve(settings)` returns the process exit status: 0, 1 when the web server
cannot start (or its authentication cannot be read), 2 when the models failed
to load.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import gradio as gr
from starlette.middleware import Middleware

from .. import zerogpu
from ..errors import one_line
from ..models import load_pair
from ..service import ChatService
from ..settings import Settings
from .auth import AuthError, credentials, exposure_warning
from .handle import ServiceHandle
from .intake import BodyLimit
from .layout import build_app
from .openai_api import openai_routes

CSS = """
#app-header h1 {margin-bottom: 0.1rem;}
#app-header p {margin-top: 0; opacity: 0.8;}
#model-status {font-size: 0.85rem; opacity: 0.9;}
#turn-stats {font-size: 0.9rem; padding: 0.4rem 0.75rem; border-radius: 8px;
             background: var(--block-background-fill); border: 1px solid var(--border-color-primary);}
#turn-stats p {margin: 0.15rem 0;}
#chat-notice p {margin: 0.2rem 0; font-size: 0.9rem;}
#token-legend {font-size: 0.82rem;}
#token-legend .swatch {display: inline-block; width: 0.8em; height: 0.8em; border-radius: 3px;
                       margin: 0 0.3em 0 0.9em; vertical-align: -0.05em;}
.cmp-pane {min-height: 160px;}
#sidebar-note {font-size: 0.8rem; opacity: 0.8;}
"""
INTERRUPTED_WHILE_LOADING = 130  # the shell's status for Ctrl-C
# The app takes no files, but Gradio's upload route is open to anyone who reaches the server.
UPLOAD_BYTES_MAX = 1024 * 1024


def theme() -> gr.themes.Base:
    # System fonts only: the app must look right offline (no Google Fonts).
    return gr.themes.Soft(
        primary_hue="indigo",
        secondary_hue="emerald",
        neutral_hue="slate",
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    ).set(
        button_primary_background_fill="*primary_600",
        button_primary_background_fill_hover="*primary_700",
        button_primary_text_color="white",
    )


def launch_app(
    demo: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    open_browser: bool = False,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
    auth: list[tuple[str, str]] | None = None,
    openai_api: bool | None = None,
):
    """Launch with the app's theme and CSS; binds `host` only (127.0.0.1 unless asked). `auth`
    None reads the accounts from the environment or the config folder (chatapp.ui.auth); `openai_api`
    None follows the settings the app was built with."""
    auth = auth if auth is not None else credentials()
    warning = exposure_warning(host, share, bool(auth))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    settings = getattr(demo, "specchat_settings", None)
    if openai_api is None:
        openai_api = settings is not None and settings.server.openai_api
    routes = openai_routes(demo.specchat_handle, settings, auth) if openai_api else []
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        inbrowser=open_browser,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        show_error=False,
        theme=theme(),
        css=CSS,
        auth=auth or None,
        max_file_size=UPLOAD_BYTES_MAX,
        app_kwargs={"routes": routes, "middleware": [Middleware(BodyLimit)]},
    )


def load_service(settings: Settings, progress: Callable[[str], None]) -> ChatService:
    """Load the pair and measure the standard-decoding baseline (runs on the handle's loader thread)."""
    pair = load_pair(settings.model, progress=progress)
    service = ChatService(pair, max_reply_seconds=settings.limits.max_reply_seconds)
    if not zerogpu.calibrate_at_load():  # ZeroGPU: no GPU outside a reply; replies time their own steps
        progress(f"ready: loaded in {pair.load_s:.1f} s; auto K learns its costs from the first replies")
        return service
    progress("measuring standard decoding on this machine (the speedup baseline)")
    rate = service.calibrate()
    rate_text = "an unmeasured rate" if rate is None else f"{rate:.1f} tok/s"
    progress(f"ready: loaded in {pair.load_s:.1f} s; standard decoding runs at {rate_text}")
    return service


def serve(settings: Settings) -> int:
    """`main.py serve`: bring the UI up at once and load the models behind it."""
    server = settings.server
    try:
        accounts = credentials()
    except AuthError as error:
        print(f"error: cannot read the authentication: {error}", file=sys.stderr)
        return 1
    handle = ServiceHandle(factory=lambda progress: load_service(settings, progress), echo=True).start()
    demo = build_app(handle, settings)
    try:
        launch_app(
            demo,
            host=server.host,
            port=server.port,
            share=server.share,
            open_browser=server.open_browser,
            auth=accounts,
        )
    except KeyboardInterrupt:
        pass
    except OSError as error:  # port taken, host not bindable
        print(f"error: cannot start the web server on {server.host}:{server.port}: {one_line(error)}", file=sys.stderr)
        return 1
    finally:
        try:
            demo.close()
        except Exception:  # closing a server that never started: nothing to do
            pass
    if handle.status == "loading":
        # Interrupted mid-load: the loader thread may be inside torch, which aborts
        # noisily at interpreter exit; leave at once instead.
        print("interrupted while loading the models", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(INTERRUPTED_WHILE_LOADING)
    return 0 if handle.status != "error" else 2
