"""chatapp.desktop: the native window under Xvfb, one instance per user, a free port, the /specchat routes.

The window tests run `specchat` under Xvfb (Debian's xvfb; `make test`
installs it with GTK/WebKit, xdotool, x11-utils and ImageMagick), look at the
real X window with X tools (xdotool, xprop, ImageMagick's import) and close
it the way a window manager does when the user clicks its close button. The
fast ones serve the scripted fake service (tests/desktop_driver.py); one slow
test starts `main.py` itself with the embedded model.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fake_engine import FakeService

from chatapp import desktop
from chatapp.settings import DEFAULT_SETTINGS_PATH, load_settings

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
DRIVER = ROOT / "tests" / "desktop_driver.py"
MESSAGE = "Hello from the desktop window"  # what the driver sends (desktop_driver.MESSAGE)
DESKTOP_ENTRY = ROOT / "packaging" / "desktop" / "specchat.desktop.in"
SETTINGS = load_settings(DEFAULT_SETTINGS_PATH, env={})
X_TOOLS = ("Xvfb", "xdotool", "xprop", "import")


# --- helpers ------------------------------------------------------------------------


def busy_socket() -> socket.socket:
    """A port some other program listens on."""
    sock = socket.socket()
    sock.bind((desktop.HOST, 0))
    sock.listen(1)
    return sock


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((desktop.HOST, port)) == 0


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the app exited ({proc.returncode}) while waiting for {what}: {output(proc)}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def output(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        return "(still running)"
    return (proc.stderr.read() if proc.stderr else "")[-3000:]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def app_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """`specchat`'s environment: temporary data and config folders, the model cache as it is."""
    env = {key: value for key, value in os.environ.items() if key != "SPECCHAT_SERVER_PORT"}
    env.update(SPECCHAT_DATA_DIR=str(tmp_path / "data"), SPECCHAT_CONFIG_DIR=str(tmp_path / "config"), **extra)
    return env


def instance(tmp_path: Path) -> dict | None:
    return desktop.running_instance(tmp_path / "data")


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def second_start(env: dict[str, str]) -> subprocess.CompletedProcess:
    """`specchat` again, as the user starting it from the menu a second time."""
    return subprocess.run([sys.executable, "main.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


# --- X11 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def display():
    missing = [tool for tool in X_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (`make setup` installs xvfb, xdotool, x11-utils, imagemagick)")
    if desktop.window_unavailable() == "pywebview is not installed" or importlib.util.find_spec("gi") is None:
        pytest.skip("pywebview or GTK's Python bindings are missing (`make setup` installs them)")
    read_end, write_end = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1400x1000x24", "-nolisten", "tcp"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        number = pipe.readline().strip()
    yield f":{number}"
    xvfb.terminate()
    xvfb.wait()


def x_tool(display: str, *args: str) -> str:
    env = {**os.environ, "DISPLAY": display}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=30).stdout.strip()


def app_window(display: str) -> int | None:
    """The id of SpecChat's visible top-level window (found by its WM_CLASS), or None."""
    ids = x_tool(display, "xdotool", "search", "--onlyvisible", "--class", desktop.WINDOW_CLASS).split()
    return int(ids[0]) if ids else None


def screenshot(display: str, window: int, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["import", "-window", str(window), str(path)], env={**os.environ, "DISPLAY": display}, check=True, timeout=60
    )
    return path


def image_colors(display: str, path: Path) -> int:
    return int(x_tool(display, "identify", "-format", "%k", str(path)))


class _ClientMessage(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("serial", ctypes.c_ulong),
        ("send_event", ctypes.c_int),
        ("display", ctypes.c_void_p),
        ("window", ctypes.c_ulong),
        ("message_type", ctypes.c_ulong),
        ("format", ctypes.c_int),
        ("data", ctypes.c_long * 5),
    ]


class _XEvent(ctypes.Union):
    _fields_ = [("xclient", _ClientMessage), ("pad", ctypes.c_long * 24)]


def close_like_a_user(display: str, window: int) -> None:
    """Send WM_DELETE_WINDOW: what the window manager sends when the user clicks the close button."""
    x11 = ctypes.CDLL("libX11.so.6")
    x11.XOpenDisplay.restype, x11.XOpenDisplay.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    x11.XInternAtom.restype, x11.XInternAtom.argtypes = ctypes.c_ulong, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    x11.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long, ctypes.POINTER(_XEvent)]
    x11.XFlush.argtypes = x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    connection = x11.XOpenDisplay(display.encode())
    assert connection, f"cannot open X display {display}"
    event = _XEvent()
    event.xclient.type, event.xclient.display, event.xclient.window, event.xclient.format = 33, connection, window, 32
    event.xclient.message_type = x11.XInternAtom(connection, b"WM_PROTOCOLS", 0)
    event.xclient.data[0] = x11.XInternAtom(connection, b"WM_DELETE_WINDOW", 0)
    assert x11.XSendEvent(connection, window, 0, 0, ctypes.byref(event))
    x11.XFlush(connection)
    x11.XCloseDisplay(connection)


def startup_wm_class() -> str:
    return next(
        line.split("=", 1)[1] for line in DESKTOP_ENTRY.read_text().splitlines() if line.startswith("StartupWMClass=")
    )


# --- the window, with the fake service ------------------------------------------------------


def test_window_streams_a_reply_and_a_second_start_reaches_it(display, tmp_path):
    busy = busy_socket()
    busy_port = busy.getsockname()[1]
    env = app_env(tmp_path, DISPLAY=display, SPECCHAT_SERVER_PORT=str(busy_port))
    result = tmp_path / "result.json"
    app = start([str(DRIVER), str(result)], env)
    try:
        wait_until(result.exists, 240, "a reply in the window", app)
        snapshots = json.loads(result.read_text())["snapshots"]
        # The reply streamed: the chat's text grew through several partial replies before the final one.
        replies = [s for s in snapshots if "You said" in s]
        assert len(replies) >= 3, snapshots
        assert MESSAGE in replies[-1] and "That is all." in replies[-1]
        assert len({len(r) for r in replies}) >= 3

        # The busy port made the app move to another one, which it published with its token.
        published = instance(tmp_path)
        assert published["port"] != busy_port and published["pid"] == app.pid
        assert get_json(f"http://{desktop.HOST}:{published['port']}/specchat/status")["status"] == "ready"

        # The real X window: named for the desktop entry, and what it shows.
        window = app_window(display)
        assert window is not None
        wm_class = x_tool(display, "xprop", "-id", str(window), "WM_CLASS")
        assert wm_class.endswith(f'"{desktop.PROGRAM_NAME}", "{startup_wm_class()}"'), wm_class
        assert x_tool(display, "xdotool", "getwindowname", str(window)) == desktop.TITLE
        shot = screenshot(display, window, ARTIFACTS / "desktop-window-fake.png")
        assert image_colors(display, shot) > 50  # a rendered page, not a blank window

        # A second start reaches this one and exits at once, without a second server.
        again = second_start(env)
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stderr
        assert instance(tmp_path) == published

        # Closing the window stops the server and ends the process.
        close_like_a_user(display, window)
        assert app.wait(timeout=30) == 0
        assert "another start asked for the window" in output(app)
        assert not port_open(published["port"])
        assert instance(tmp_path) is None
    finally:
        stop(app)
        busy.close()

    # The conversation is on disk, in the data folder, and the next start opens it by itself.
    saved = [json.loads(path.read_text()) for path in (tmp_path / "data" / "conversations").glob("*.json")]
    assert len(saved) == 1 and [m["role"] for m in saved[0]["messages"]] == ["user", "assistant"]
    assert saved[0]["messages"][0]["content"] == MESSAGE and "That is all." in saved[0]["messages"][1]["content"]
    reread = tmp_path / "reread.json"
    again = start([str(DRIVER), str(reread), "--read"], env)
    try:
        wait_until(reread.exists, 240, "the saved conversation in a new window", again)
        shown = json.loads(reread.read_text())
        assert MESSAGE in shown["chat"] and "That is all." in shown["chat"]
        assert MESSAGE in shown["list"]  # listed under its derived title
        close_like_a_user(display, app_window(display))
        assert again.wait(timeout=30) == 0
    finally:
        stop(again)


# --- the browser, the lock and the routes, no display needed ------------------------------------------


def test_browser_mode_and_a_second_start_open_tabs(tmp_path):
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" >> "{opened}"\n')
    browser.chmod(0o755)
    env = app_env(tmp_path, BROWSER=str(browser))
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    app = start([str(DRIVER), str(tmp_path / "unused.json"), "--browser"], env)
    try:
        published = wait_until(lambda: instance(tmp_path), 240, "the server", app)
        url = f"http://{desktop.HOST}:{published['port']}"
        wait_until(opened.exists, 30, "the browser")
        assert opened.read_text().split() == [f"{url}/specchat/loading"]
        again = second_start(env)
        assert again.returncode == 0, again.stderr
        # A browser tab cannot be brought to the front: the second start opens the app in a new one.
        wait_until(lambda: len(opened.read_text().split()) == 2, 30, "a second tab")
        assert opened.read_text().split()[1] == f"{url}/"
        os.killpg(app.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert app.wait(timeout=30) == 0
        assert not port_open(published["port"]) and instance(tmp_path) is None
    finally:
        stop(app)


def test_a_busy_port_means_another_free_port():
    busy = busy_socket()
    try:
        moved = desktop.listening_socket(desktop.HOST, busy.getsockname()[1])
        assert moved.getsockname()[1] not in (0, busy.getsockname()[1])
    finally:
        busy.close()
    free_port = moved.getsockname()[1]
    moved.close()
    kept = desktop.listening_socket(desktop.HOST, free_port)
    assert kept.getsockname()[1] == free_port
    kept.close()


def test_one_instance_per_data_folder(tmp_path):
    first, second = desktop.InstanceLock(tmp_path), desktop.InstanceLock(tmp_path)
    assert first.acquire()
    assert not second.acquire()
    assert desktop.InstanceLock(tmp_path / "elsewhere").acquire()  # another data folder, another instance
    first.publish(1234, "token")
    assert desktop.running_instance(tmp_path) == {"pid": os.getpid(), "port": 1234, "token": "token"}
    assert oct((tmp_path / desktop.INSTANCE_FILE).stat().st_mode & 0o777) == "0o600"
    first.release()
    assert desktop.running_instance(tmp_path) is None
    assert second.acquire()
    second.release()


def test_the_lock_dies_with_its_process(tmp_path):
    code = (
        "import pathlib, sys, time; from chatapp.desktop import InstanceLock; "
        "lock = InstanceLock(pathlib.Path(sys.argv[1])); assert lock.acquire(); print('held', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not desktop.InstanceLock(tmp_path).acquire()
        holder.kill()  # a crash: no release() ran
        holder.wait()
        lock = desktop.InstanceLock(tmp_path)
        assert lock.acquire()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_nobody_answering_is_not_reaching_an_instance(tmp_path):
    assert not desktop.reach_running_instance(tmp_path, wait_s=0.3)
    with socket.socket() as unused:
        unused.bind((desktop.HOST, 0))
        port = unused.getsockname()[1]
    (tmp_path / desktop.INSTANCE_FILE).write_text(json.dumps({"pid": 1, "port": port, "token": "t"}))
    assert not desktop.reach_running_instance(tmp_path, wait_s=0.3)  # a stale file from a crashed instance


@pytest.fixture(scope="module")
def served():
    focused = []
    server = desktop.AppServer(SETTINGS, factory=lambda progress: FakeService(), on_focus=lambda: focused.append(1))
    server.start()
    yield server, focused
    server.stop()


def test_routes_status_loading_page_and_app(served):
    server, _ = served
    server.handle.wait(30)
    assert get_json(f"{server.url}specchat/status") == {"status": "ready", "progress": [], "error": None}
    with urllib.request.urlopen(server.loading_url, timeout=5) as response:
        page = response.read().decode()
    assert "<svg" in page and "/specchat/status" in page and "{{ICON}}" not in page
    with urllib.request.urlopen(server.url, timeout=10) as response:
        assert response.status == 200 and "gradio" in response.read().decode().lower()


def test_focus_needs_the_token(served):
    server, focused = served
    for token in ("", "wrong"):
        request = urllib.request.Request(
            f"{server.url}specchat/focus", method="POST", data=b"", headers={desktop.TOKEN_HEADER: token}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 403
    assert focused == []
    assert desktop.ask_to_focus({"port": server.port, "token": server.token})
    assert focused == [1]


def test_loading_progress_is_reported_while_the_models_load():
    release = threading.Event()

    def slow_factory(progress):
        progress("converting the model (once)")
        release.wait(30)
        return FakeService()

    server = desktop.AppServer(SETTINGS, slow_factory)
    server.start()
    try:
        status = wait_until(
            lambda: get_json(f"{server.url}specchat/status")["progress"] and get_json(f"{server.url}specchat/status"),
            30,
            "progress",
        )
        assert status["status"] == "loading" and status["progress"] == ["converting the model (once)"]
        release.set()
        wait_until(lambda: get_json(f"{server.url}specchat/status")["status"] == "ready", 30, "ready")
    finally:
        release.set()
        server.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a display is a Linux notion here")
def test_no_display_means_the_browser(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert desktop.window_unavailable() == "no display"
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    assert desktop.window_unavailable() is None


# --- `specchat` itself, with the embedded model -----------------------------------------------------


@pytest.mark.slow
def test_specchat_opens_its_window_and_answers_with_the_embedded_model(display, tmp_path):
    from gradio_client import Client

    env = app_env(tmp_path, DISPLAY=display)
    app = start(["main.py"], env)
    try:
        window = wait_until(lambda: app_window(display), 120, "the window", app)
        published = wait_until(lambda: instance(tmp_path), 180, "the server", app)
        url = f"http://{desktop.HOST}:{published['port']}/"
        time.sleep(2)  # the window moves from its first page to the served loading page
        if get_json(f"{url}specchat/status")["status"] == "loading":  # the first-start steps, shown in the window
            screenshot(display, window, ARTIFACTS / "desktop-loading.png")
        wait_until(lambda: get_json(f"{url}specchat/status")["status"] == "ready", 600, "the models", app)
        progress = get_json(f"{url}specchat/status")["progress"]
        assert any("kernels" in line for line in progress) and any(line.startswith("ready") for line in progress)

        # A question typed into the real window with the keyboard (XTEST); then the same question over the
        # HTTP API. Generation is one at a time, first come first served: when the API's reply is complete,
        # the window's is too, and meanwhile the window was filmed.
        client = Client(url, verbose=False)
        time.sleep(3)  # the loading page hands over to the app
        x_tool(display, "xdotool", "windowfocus", "--sync", str(window))
        frames = [screenshot(display, window, tmp_path / "frame.png").read_bytes()]
        x_tool(display, "xdotool", "type", "--delay", "40", "Name a primary color.")
        x_tool(display, "xdotool", "key", "Return")
        time.sleep(1)
        job = client.submit(message="Name a primary color.", chat_state={"messages": []}, api_name="/send")
        deadline = time.monotonic() + 300
        while not job.done() and time.monotonic() < deadline:
            frame = screenshot(display, window, tmp_path / "frame.png").read_bytes()
            if frame != frames[-1]:
                frames.append(frame)
        job.result(timeout=60)
        assert len(job.outputs()) >= 3  # the API's reply streamed
        assert len(frames) >= 4  # the window changed with the typing, the start of the reply and as it streamed
        screenshot(display, window, ARTIFACTS / "desktop-window.png")
        client.close()

        close_like_a_user(display, window)
        assert app.wait(timeout=30) == 0
        assert not port_open(published["port"])
    finally:
        stop(app)


@pytest.mark.parametrize(
    ("argv", "command", "browser"),
    [
        ([], "desktop", False),
        (["--browser"], "desktop", True),
        (["--port", "8000"], "desktop", False),
        (["desktop", "--browser"], "desktop", True),
        (
            ["--host", "0.0.0.0", "--port", "8080", "--no-browser"],
            "serve",
            None,
        ),  # serving on the network stays `serve`
        (["--share"], "serve", None),
    ],
)
def test_specchat_without_a_command_opens_the_desktop_app(monkeypatch, argv, command, browser):
    from chatapp import cli

    ran = []
    monkeypatch.setitem(cli.COMMANDS, command, lambda args: ran.append(args) or 0)
    assert cli.main(argv) == 0
    assert ran[0].command == command and getattr(ran[0], "browser", None) == browser
