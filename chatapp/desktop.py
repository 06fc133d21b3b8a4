"""SpecChat as a desktop app: its own window, one instance per user, a free port, start-up shown in the window.

Contract: `run(settings, browser=False)` is `specchat` (`specchat desktop`) and
returns the process exit status. It

  - takes this user's one-instance lock (data_dir()/instance.lock, chatapp.paths);
    when another instance holds it, asks that one over 127.0.0.1 to show its
    window (or, in the browser, a new tab) and returns 0 -- a second start opens
    the running app instead of failing;
  - serves the Gradio app on 127.0.0.1 from a thread of this process, on
    settings.server.port or, when that port is busy, on a free one;
  - opens a native window (pywebview: GTK/WebKit or Qt on Linux, WebView2 on
    Windows, WebKit on macOS) that first shows a loading page listing the
    start-up steps (model fetch and conversion, kernel build, calibration) and
    then the app; closing the window stops the server and ends the process.
    `browser=True`, or a machine without a display or a window toolkit, opens
    the browser instead and runs until Ctrl-C.

Next to the app the server answers three routes of its own, under /specchat:
`GET status` (the models' status and progress, JSON), `GET loading` (the
loading page) and `POST focus` (another start asking for the window; it
must carry the token written with the port in data_dir()/instance.json,
which only this user can read). The web view keeps its storage (the page's
chat and the id of the conversation it shows, gr.BrowserState) in
data_dir()/window; nothing is written outside the data folder.

It knows the UI only as `build_app`, the theme and CSS of chatapp.ui.launch and
`load_service`, and the service only through chatapp.ui's ServiceHandle.

Past ~400 lines: the window, the single-instance lock and the loading page
share one life cycle (start, focus, close) that is easier to follow whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import secrets
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import one_line
from .paths import data_dir
from .settings import Settings

# gradio, uvicorn, torch (through chatapp.ui) and pywebview are imported inside the functions that use them:
# a second start only has to reach the first one, and must not spend seconds importing them to do so.

TITLE = "SpecChat"
PROGRAM_NAME = "specchat"  # GTK's program name: the Wayland app id, matched to specchat.desktop
WINDOW_CLASS = "SpecChat"  # the X11 WM_CLASS class, the desktop entry's StartupWMClass
HOST = "127.0.0.1"
ROUTES = "/specchat"
TOKEN_HEADER = "X-SpecChat-Token"
LOCK_FILE = "instance.lock"
INSTANCE_FILE = "instance.json"
ASSETS = Path(__file__).with_name("assets")
ICON_SVG = ASSETS / "specchat.svg"
ICON_PNG = ASSETS / "specchat-256.png"
LOADING_PAGE = ASSETS / "loading.html"
WINDOW_SIZE = (1280, 900)
WINDOW_MIN_SIZE = (720, 520)
FIRST_INSTANCE_WAIT_S = 90.0  # a first instance still importing gradio and torch publishes its port late
SERVER_START_S = 60.0
SERVER_STOP_S = 5.0
EXIT_OK, EXIT_FAILED = 0, 1


def say(message: str) -> None:
    print(f"specchat: {message}", file=sys.stderr, flush=True)


# --- one instance per user ---------------------------------------------------------


class InstanceLock:
    """This user's one running instance: an OS lock on data_dir()/instance.lock,
    held while the app runs and dropped by the OS when the process ends however
    it ends (no stale lock after a crash), and data_dir()/instance.json, which
    says where the running instance listens."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder if folder is not None else data_dir()
        self._handle = None

    @property
    def instance_file(self) -> Path:
        return self.folder / INSTANCE_FILE

    def acquire(self) -> bool:
        """True if this process is now the instance; False if another one holds the lock."""
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / LOCK_FILE, "a+b")
        if not _try_lock(handle):
            handle.close()
            return False
        self._handle = handle
        return True

    def publish(self, port: int, token: str) -> None:
        """Say where this instance listens (user-only file: the token lets a start of ours ask for the window)."""
        info = json.dumps({"pid": os.getpid(), "port": port, "token": token}).encode()
        draft = self.instance_file.with_name(f".{INSTANCE_FILE}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(info)
        os.replace(draft, self.instance_file)

    def release(self) -> None:
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            self.instance_file.unlink(missing_ok=True)
        self._handle.close()  # closing the file drops the lock
        self._handle = None


def _try_lock(handle) -> bool:
    try:
        import fcntl  # POSIX; Windows has msvcrt instead (imported here: only one of the two exists)
    except ImportError:
        import msvcrt

        try:
            handle.seek(0)  # msvcrt locks bytes from the file position: always the first one
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def running_instance(folder: Path) -> dict | None:
    """The published {"pid", "port", "token"} of the running instance, or None if it has published none."""
    try:
        info = json.loads((folder / INSTANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(info, dict) and isinstance(info.get("port"), int) and isinstance(info.get("token"), str)
    return info if ok else None


def ask_to_focus(info: dict, timeout: float = 3.0) -> bool:
    """Ask the instance described by `info` to show itself; True if it answered yes."""
    request = urllib.request.Request(
        f"http://{HOST}:{info['port']}{ROUTES}/focus", method="POST", headers={TOKEN_HEADER: info["token"]}, data=b""
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 204
    except (OSError, urllib.error.URLError):
        return False


def reach_running_instance(folder: Path, wait_s: float = FIRST_INSTANCE_WAIT_S) -> bool:
    """Ask the instance holding the lock to show itself, waiting while it is still starting."""
    deadline = time.monotonic() + wait_s
    while True:
        info = running_instance(folder)
        if info is not None and ask_to_focus(info):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


# --- the server ----------------------------------------------------------------------


def listening_socket(host: str, preferred: int | None) -> socket.socket:
    """A socket bound to `preferred`, or to a free port the OS picks when that one is busy.

    Bound here and handed to the server, so that no other program can take the
    port between the check and the start."""
    for port in ([preferred] if preferred else []) + [0]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if os.name == "posix":  # lets a restart reuse a port still in TIME_WAIT; never a port in use
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            continue
        sock.listen(128)
        return sock
    raise OSError(f"no free port on {host}")


def load_models(settings: Settings, progress: Callable[[str], None]):
    """The service, with the CPU kernels checked first so that their one-time build shows as a step of its own."""
    from .ui.launch import load_service  # lazy: imports torch

    if _runs_on_cpu(settings):
        from .kernels import cpu_kernels

        progress("checking the CPU kernels (the first start compiles them for this CPU, about 30 s)")
        cpu_kernels()
    return load_service(settings, progress)


def _runs_on_cpu(settings: Settings) -> bool:
    if settings.model.device != "auto":
        return settings.model.device == "cpu"
    import torch  # lazy: imported by the UI anyway, only after the window is up

    return not torch.cuda.is_available()


@dataclass
class Status:
    status: str
    progress: list[str]
    error: str | None


class AppServer:
    """The Gradio app and the /specchat routes on 127.0.0.1, served by uvicorn from a thread of this process.

    `factory(progress)` builds the service (default: the models of `settings`);
    `on_focus()` runs when another start asks for the window."""

    def __init__(
        self,
        settings: Settings,
        factory: Callable[[Callable[[str], None]], Any] | None = None,
        on_focus: Callable[[], None] | None = None,
    ):
        self.settings = settings
        self.factory = factory or (lambda progress: load_models(settings, progress))
        self.on_focus = on_focus or (lambda: None)
        self.token = secrets.token_urlsafe(24)
        self.handle = None
        self.port: int | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    @property
    def loading_url(self) -> str:
        return f"http://{HOST}:{self.port}{ROUTES}/loading"

    def status(self) -> Status:
        handle = self.handle
        if handle is None:
            return Status("loading", ["starting"], None)
        return Status(handle.status, list(handle.progress), handle.error)

    def start(self) -> None:
        """Build the app, start loading the models behind it and serve it; returns once the server listens."""
        import uvicorn  # lazy, with gradio: seconds of imports

        from .ui import ServiceHandle, build_app

        self.handle = ServiceHandle(factory=self.factory, echo=True).start()
        demo = build_app(self.handle, self.settings)
        sock = listening_socket(HOST, self.settings.server.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._asgi_app(demo), log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="specchat-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + SERVER_START_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the web server did not start on {HOST}:{self.port}")
            time.sleep(0.05)

    def wait(self) -> None:
        """Until the server stops (Ctrl-C raises KeyboardInterrupt here)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(SERVER_STOP_S)

    def _asgi_app(self, demo):
        import gradio as gr
        from fastapi import FastAPI
        from starlette.responses import HTMLResponse, JSONResponse, Response

        from .ui.launch import CSS, theme

        no_store = {"Cache-Control": "no-store"}

        def status(request) -> JSONResponse:
            return JSONResponse(dataclasses.asdict(self.status()), headers=no_store)

        def loading(request) -> HTMLResponse:
            return HTMLResponse(loading_page(), headers=no_store)

        def focus(request) -> Response:
            # A custom header: a web page cannot send it cross-origin without a preflight, which is never granted.
            if not secrets.compare_digest(request.headers.get(TOKEN_HEADER, ""), self.token):
                return Response(status_code=403)
            self.on_focus()
            return Response(status_code=204)

        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        # Plain Starlette routes: they take the request as it is, without FastAPI's parameter parsing.
        app.add_route(f"{ROUTES}/status", status, methods=["GET"])
        app.add_route(f"{ROUTES}/loading", loading, methods=["GET"])
        app.add_route(f"{ROUTES}/focus", focus, methods=["POST"])
        # The same look as `main.py serve` (chatapp.ui.launch.launch_app): Gradio 6 takes theme and CSS here.
        return gr.mount_gradio_app(app, demo, path="/", theme=theme(), css=CSS, show_error=False)


def loading_page() -> str:
    """The loading page, its icon inlined (the window's first page is shown before any server is up)."""
    svg = ICON_SVG.read_text(encoding="utf-8")
    return LOADING_PAGE.read_text(encoding="utf-8").replace("{{ICON}}", svg[svg.index("<svg") :])


def error_page(message: str) -> str:
    from html import escape

    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{TITLE}</title></head>"
        f"<body style='font:15px system-ui,sans-serif;margin:3rem'><h1>{TITLE} could not start</h1>"
        f"<p>{escape(message)}</p></body></html>"
    )


# --- the window ------------------------------------------------------------------------


def window_unavailable() -> str | None:
    """Why no native window can open here, or None if one can."""
    if importlib.util.find_spec("webview") is None:
        return "pywebview is not installed"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display"
    return None


def _name_the_program() -> None:
    """Name the program before pywebview opens its GTK window, so that the desktop matches the window to
    specchat.desktop: the X11 WM_CLASS ("specchat", "SpecChat") against StartupWMClass, the Wayland app id
    ("specchat") against the file name."""
    try:
        import gi

        gi.require_version("Gdk", "3.0")
        gi.require_version("Gtk", "3.0")
        from gi.repository import GLib

        GLib.set_prgname(PROGRAM_NAME)  # before GTK starts: it reads the name once
        GLib.set_application_name(TITLE)
        from gi.repository import Gdk, Gtk  # noqa: F401 -- importing Gtk starts GTK, which sets its own class
    except (ImportError, ValueError):  # no GTK (the Qt backend, Windows, macOS): nothing to name
        return
    Gdk.set_program_class(WINDOW_CLASS)  # after GTK started, before any window exists


class WindowUnavailable(RuntimeError):
    """pywebview found no toolkit to open a window with."""


def show_in_window(server: AppServer, lock: InstanceLock, on_window: Callable[[Any], None] | None = None) -> int:
    """Serve the app in a native window until it is closed (raises WindowUnavailable before serving anything)."""
    _name_the_program()
    import webview  # lazy: only the window needs it
    from webview.errors import WebViewException

    window = webview.create_window(
        TITLE, html=loading_page(), width=WINDOW_SIZE[0], height=WINDOW_SIZE[1], min_size=WINDOW_MIN_SIZE
    )
    failed: list[str] = []

    def bring_to_front() -> None:
        say("another start asked for the window; bringing it to the front")
        window.restore()
        window.show()

    def boot() -> None:
        try:
            server.on_focus = bring_to_front
            server.start()
            lock.publish(server.port, server.token)
            say(f"serving on {server.url} (in this window; closing it stops the app)")
            window.load_url(server.loading_url)
        except Exception as error:  # an import or a bind failing: shown in the window, not only in a terminal
            failed.append(one_line(error))
            say(f"error: {failed[-1]}")
            window.load_html(error_page(failed[-1]))
            return
        if on_window is not None:
            on_window(window)

    try:
        # Not private: the page keeps its chat and the conversation it shows in the browser's storage
        # (gr.BrowserState), which a private WebKit view does not have (localStorage is null there).
        # The view's storage lives in this instance's data folder, like the saved conversations.
        storage = lock.folder / "window"
        webview.start(boot, private_mode=False, storage_path=str(storage), icon=str(ICON_PNG))
    except WebViewException as error:
        raise WindowUnavailable(one_line(error)) from None
    finally:
        server.stop()
    return EXIT_FAILED if failed else EXIT_OK


def show_in_browser(server: AppServer, lock: InstanceLock) -> int:
    """Serve the app and open it in the browser; runs until Ctrl-C."""
    server.on_focus = lambda: webbrowser.open(server.url)  # a browser tab cannot be brought forward: open another
    try:
        server.start()
    except Exception as error:
        say(f"error: cannot start the web server: {one_line(error)}")
        return EXIT_FAILED
    lock.publish(server.port, server.token)
    say(f"serving on {server.url} (press Ctrl-C to stop)")
    webbrowser.open(server.loading_url)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return EXIT_OK


def run(
    settings: Settings,
    browser: bool = False,
    *,
    factory: Callable | None = None,
    on_window: Callable[[Any], None] | None = None,
) -> int:
    """`specchat`: the app in its own window (or the browser), one instance per user (see the module docstring).

    `factory(progress)` replaces the models (the tests use a scripted service);
    `on_window(window)` runs in a thread once the window has been sent to the app
    (the tests drive the page through it)."""
    lock = InstanceLock()
    if not lock.acquire():
        if reach_running_instance(lock.folder):
            say("SpecChat is already running; showed its window")
            return EXIT_OK
        say(f"error: another SpecChat holds {lock.folder / LOCK_FILE} but does not answer")
        return EXIT_FAILED
    server = AppServer(settings, factory)
    try:
        reason = None if browser else window_unavailable()
        if reason:
            say(f"no native window ({reason}); opening the browser instead")
        if browser or reason:
            return show_in_browser(server, lock)
        try:
            return show_in_window(server, lock, on_window)
        except WindowUnavailable as error:
            say(f"no native window ({error}); opening the browser instead")
            return show_in_browser(server, lock)
    finally:
        lock.release()
        _leave_if_still_loading(server)


def _leave_if_still_loading(server: AppServer) -> None:
    # Closed mid-load: the loader thread may be inside torch, which aborts noisily
    # at interpreter exit; leave at once instead (as `main.py serve` does).
    if server.handle is not None and server.handle.status == "loading":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)
