"""The Hugging Face Spaces bundle (packaging/spaces) and ZeroGPU (chatapp/zerogpu.py).

No network: the bundle runs the embedded model (HF_HUB_OFFLINE=1), servers
listen on this machine and are reached on 127.0.0.1 only, and every server a
test starts is stopped by it. ZeroGPU is simulated by its environment
variable; the real `spaces` cannot run its ZeroGPU mode on a CPU build of
torch (it patches the CUDA runtime), so those tests put a recording stand-in
in its place.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from chatapp import zerogpu
from chatapp.models import EMBEDDED, ModelLoadError
from chatapp.settings import DecodingSettings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "packaging/spaces/build.sh"
APP = ROOT / "packaging/spaces/app.py"
TEST_ONLY = {"pytest", "playwright", "ruff", "coverage", "openai"}

# A stand-in for `spaces` on simulated ZeroGPU: spaces.GPU(duration=...) returns a recorded wrapper.
FAKE_SPACES = """
import functools, inspect

def GPU(task=None, *, duration=None, size=None):
    def wrap(fn):
        if inspect.isgeneratorfunction(fn):
            def wrapper(*args, **kwargs):
                yield from fn(*args, **kwargs)
        else:
            def wrapper(*args, **kwargs):
                return fn(*args, **kwargs)
        wrapper = functools.wraps(fn)(wrapper)
        wrapper.zerogpu, wrapper.duration = None, duration
        return wrapper
    return wrap(task) if callable(task) else wrap

def gradio_auto_wrap(fn):
    return fn
"""


def build(out: Path, *flags: str) -> Path:
    subprocess.run(["bash", str(BUILD), *flags, str(out)], check=True, capture_output=True, text=True)
    return out


def front_matter(readme: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", readme, re.S)
    assert match, "README.md must open with a YAML front matter block"
    return yaml.safe_load(match.group(1))


def requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if match:
            names.add(re.sub(r"[-_.]+", "-", match.group(1)).lower())
    return names


def pinned(name: str) -> str:
    text = (ROOT / "requirements.txt").read_text()
    return re.search(rf"^{name}==(\S+)", text, re.M).group(1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("bundle") / "space")


# --- the bundle ------------------------------------------------------------------------------


def test_front_matter_is_valid_for_a_gradio_space(bundle):
    meta = front_matter((bundle / "README.md").read_text())
    assert meta["sdk"] == "gradio"
    assert meta["sdk_version"] == pinned("gradio"), "Spaces would install another Gradio"
    version = tuple(int(part) for part in str(meta["python_version"]).split("."))
    assert version >= (3, 11), "tomllib and transformers 5 need Python 3.11+"
    assert version[:2] == (3, 12), "the one version ZeroGPU (3.10.13 or 3.12.12) and the code share"
    assert (bundle / meta["app_file"]).is_file()
    assert meta["suggested_hardware"] in {"cpu-basic", "cpu-upgrade"}
    assert meta["license"] and 0 < len(meta["short_description"]) <= 60
    for key in ("title", "emoji", "colorFrom", "colorTo"):
        assert meta[key]


def test_preloaded_models_are_the_configured_default(bundle):
    meta = front_matter((bundle / "README.md").read_text())
    model = load_settings(bundle / "settings.toml", env={}).model
    configured = {model.target, *([model.draft] if model.draft else [])}
    assert model.target == "HuggingFaceTB/SmolLM2-135M-Instruct"
    preloaded = {entry.split()[0] for entry in meta["preload_from_hub"]}  # "repo [files] [revision]"
    assert preloaded == configured
    assert set(meta["models"]) == configured
    # Only the target line differs from the repository's settings.
    ours = tomllib.loads((ROOT / "settings.toml").read_text())
    ours["model"]["target"] = model.target
    assert tomllib.loads((bundle / "settings.toml").read_text()) == ours


def test_runtime_requirements_hold_no_test_only_packages(bundle):
    text = (bundle / "requirements.txt").read_text()
    names = requirement_names(text)
    assert not names & TEST_ONLY and not any(n.startswith("pytest-") for n in names)
    development = requirement_names((ROOT / "requirements.txt").read_text())
    assert names == development - TEST_ONLY  # everything else the app needs, spaces included
    assert f"gradio=={pinned('gradio')}" in text.splitlines() and f"torch=={pinned('torch')}" in text.splitlines()
    assert "--extra-index-url" not in text  # PyPI's torch runs on every hardware
    assert (bundle / "packages.txt").read_text().split() == ["build-essential"]


def test_cpu_only_bundle_takes_torch_from_the_cpu_wheel_index(tmp_path):
    text = (build(tmp_path / "space", "--cpu-only") / "requirements.txt").read_text().splitlines()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
    assert f"torch=={pinned('torch')}+cpu" in text and f"torch=={pinned('torch')}" not in text


def test_bundle_holds_the_app_and_its_readme(bundle):
    for name in (
        "app.py",
        "settings.toml",
        "packages.txt",
        "chatapp/engine.py",
        "chatapp/zerogpu.py",
        "chatapp/kernels/cpu_kernels.cpp",
        "chatapp/ui/layout.py",
    ):
        assert (bundle / name).is_file(), name
    assert not list(bundle.rglob("__pycache__")) and not list(bundle.rglob("*.pyc"))
    body = (bundle / "README.md").read_text()
    for needed in (
        "HF_TOKEN",
        "SPECCHAT_PRESET",
        "SPECCHAT_MODEL_TARGET",
        "SPECCHAT_MODEL_DRAFT",
        "hf upload",
        "torch.compile",
        "3.12.12",
        "@spaces.GPU",
        "build.sh --cpu-only",
    ):
        assert needed in body, needed


# --- app.py's choices, in this process --------------------------------------------------------


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # app.py puts its folder first; undone after
    monkeypatch.delenv(zerogpu.ZEROGPU_ENV, raising=False)
    # run_path returns a copy of the module's globals; the functions read the originals, which tests patch.
    return runpy.run_path(str(APP), run_name="space_app")["main"].__globals__


def test_the_space_binds_all_interfaces_on_7860_and_takes_the_preset(app):
    settings = app["space_settings"]({})
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 7860)
    assert not settings.server.open_browser and not settings.server.share
    settings = app["space_settings"](
        {"SPECCHAT_PRESET": "qwen2.5-1.5b", "GRADIO_SERVER_PORT": "7999", "SPECCHAT_MODEL_TARGET": "someone/else"}
    )
    assert (settings.model.target, settings.model.draft) == ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")
    assert settings.server.port == 7999
    assert app["space_settings"]({"SPECCHAT_MODEL_TARGET": EMBEDDED}).model.target == EMBEDDED
    with pytest.raises(SettingsError, match="unknown preset 'nope'"):
        app["space_settings"]({"SPECCHAT_PRESET": "nope"})
    with pytest.raises(SettingsError, match="GRADIO_SERVER_PORT"):
        app["space_settings"]({"GRADIO_SERVER_PORT": "http"})


def fake_pair(target: str):
    info = SimpleNamespace(extra={}, name=target)
    return SimpleNamespace(target=SimpleNamespace(info=info), draft=None, load_s=0.5, spec=target)


def test_a_target_that_cannot_load_falls_back_to_the_embedded_model(app):
    asked = []

    def load_pair(model, progress):
        asked.append(model.target)
        if model.target != EMBEDDED:
            raise ModelLoadError(f"cannot download '{model.target}' from the Hugging Face hub (no network?)")
        return fake_pair(model.target)

    app["load_pair"] = load_pair  # the functions below read app.py's globals
    settings = app["space_settings"]({"SPECCHAT_MODEL_TARGET": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    said = []
    pair = app["load_models"](settings, said.append)
    assert asked == ["HuggingFaceTB/SmolLM2-135M-Instruct", EMBEDDED] and pair.spec == EMBEDDED
    warning = pair.target.info.extra["warning"]  # what the Model tab shows under the target
    assert "cannot load HuggingFaceTB/SmolLM2-135M-Instruct" in warning and "no network" in warning
    assert any(line.startswith("warning: ") and "embedded" in line for line in said)
    # The embedded model itself failing is the error to show: there is nothing to fall back to.
    app["load_pair"] = lambda model, progress: (_ for _ in ()).throw(ModelLoadError("pip cannot reach PyPI"))
    with pytest.raises(ModelLoadError, match="PyPI"):
        app["load_models"](app["space_settings"]({"SPECCHAT_MODEL_TARGET": EMBEDDED}), said.append)


def test_zerogpu_skips_calibration_at_load(app, monkeypatch):
    calibrated = []

    class Service:
        def __init__(self, pair):
            self.pair = pair

        def calibrate(self):
            calibrated.append(True)

    app["load_pair"] = lambda model, progress: fake_pair(model.target)
    app["ChatService"] = Service
    settings = app["space_settings"]({"SPECCHAT_MODEL_TARGET": EMBEDDED})
    app["load_service"](settings, lambda message: None)
    assert calibrated == [True]
    monkeypatch.setenv(zerogpu.ZEROGPU_ENV, "true")
    said = []
    app["load_service"](settings, said.append)
    assert calibrated == [True] and any("no calibration" in line for line in said)


# --- chatapp/zerogpu.py ---------------------------------------------------------------------


def test_zerogpu_is_read_as_the_spaces_package_reads_it():
    assert zerogpu.on_zerogpu({"SPACES_ZERO_GPU": "true"}) and zerogpu.on_zerogpu({"SPACES_ZERO_GPU": "1"})
    assert not zerogpu.on_zerogpu({}) and not zerogpu.on_zerogpu({"SPACES_ZERO_GPU": "false"})


def test_the_reply_duration_grows_with_the_reply_within_bounds():
    default = zerogpu.reply_seconds(DecodingSettings().max_new_tokens)
    assert zerogpu.MIN_DURATION_S <= default < zerogpu.reply_seconds(1024) < zerogpu.MAX_DURATION_S
    assert zerogpu.reply_seconds(1024, runs=2) > zerogpu.reply_seconds(1024)  # a comparison is two replies
    assert zerogpu.reply_seconds(1) == zerogpu.MIN_DURATION_S
    assert zerogpu.reply_seconds(8192) == zerogpu.MAX_DURATION_S
    # At the assumed rate the reply itself fits: start-up plus its tokens.
    assert zerogpu.reply_seconds(1024) >= 1024 / zerogpu.CONSERVATIVE_TOKENS_PER_S + zerogpu.STARTUP_S


def test_off_zerogpu_the_real_spaces_decorator_changes_nothing(monkeypatch):
    monkeypatch.setattr(zerogpu, "DECORATED", {})
    monkeypatch.delenv(zerogpu.ZEROGPU_ENV, raising=False)
    import spaces  # installed from requirements.txt: its GPU() is the identity off ZeroGPU

    def reply():
        yield "token"

    assert zerogpu.gpu(45)(reply) is reply
    assert zerogpu.DECORATED[reply.__qualname__] == zerogpu.Decorated(reply.__qualname__, 45, True)
    assert spaces.GPU(duration=45)(reply) is reply
    assert zerogpu.calibrate_at_load() and zerogpu.compile_allowed()


def test_without_the_spaces_package_the_decorator_is_the_identity(monkeypatch):
    monkeypatch.setattr(zerogpu, "DECORATED", {})
    monkeypatch.setitem(sys.modules, "spaces", None)  # what `import spaces` finds when it is not installed

    def reply():
        return "text"

    monkeypatch.delenv(zerogpu.ZEROGPU_ENV, raising=False)
    assert zerogpu.gpu(30)(reply) is reply and not zerogpu.DECORATED[reply.__qualname__].by_spaces
    monkeypatch.setenv(zerogpu.ZEROGPU_ENV, "true")  # a ZeroGPU Space without `spaces` must not start quietly
    with pytest.raises(RuntimeError, match="pip install spaces"):
        zerogpu.gpu(30)(reply)


def test_on_zerogpu_replies_are_wrapped_with_a_duration_that_fits_them(monkeypatch):
    monkeypatch.setattr(zerogpu, "DECORATED", {})
    fake = SimpleNamespace()
    exec(FAKE_SPACES, fake.__dict__)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setenv(zerogpu.ZEROGPU_ENV, "true")

    class Handlers:
        def chat(self, message, chat_state, decoding, request=None):
            yield f"reply to {message}"

    handlers = Handlers()
    wrapped = zerogpu.gpu_reply()(handlers.chat)
    compare = zerogpu.gpu_reply(runs=2)(handlers.chat)
    assert wrapped is not handlers.chat and hasattr(wrapped, "zerogpu")
    assert list(wrapped("hi", {}, DecodingSettings())) == ["reply to hi"]
    assert zerogpu.DECORATED[handlers.chat.__qualname__].by_spaces  # "Handlers.chat" in the UI
    long = DecodingSettings(max_new_tokens=2048)
    assert wrapped.duration("hi", {}, long, None) == zerogpu.reply_seconds(2048)
    assert compare.duration("hi", {}, decoding=long) == zerogpu.reply_seconds(2048, runs=2)
    assert wrapped.duration("hi", {}) == zerogpu.reply_seconds(DecodingSettings().max_new_tokens)
    # An API client's settings object (a mapping) counts too; what cannot be read falls back to the default.
    assert wrapped.duration("hi", [], {"max_new_tokens": 2048}) == zerogpu.reply_seconds(2048)
    assert wrapped.duration("hi", [], {"max_new_tokens": "many"}) == wrapped.duration("hi", [])
    assert not zerogpu.calibrate_at_load() and not zerogpu.compile_allowed()


def test_on_zerogpu_the_graph_decoder_compiles_nothing(monkeypatch):
    import torch

    from chatapp import graph_llama

    cuda = torch.device("cuda")
    monkeypatch.delenv(zerogpu.ZEROGPU_ENV, raising=False)
    assert graph_llama._resolve_compile("auto", cuda) == "reduce-overhead"
    monkeypatch.setenv(zerogpu.ZEROGPU_ENV, "true")
    assert graph_llama._resolve_compile("auto", cuda) is None


class Turn:
    """What StopFlags.watch needs of a reply: stop()."""

    def __init__(self):
        self.stopped = threading.Event()

    def stop(self):
        self.stopped.set()


def _reply_in_a_worker(flags: zerogpu.StopFlags, key: str, started, result, reason) -> None:
    turn, cleared = Turn(), []
    with flags.watch(key, turn, on_clear=lambda: cleared.append(turn.stopped.is_set())) as seen:
        started.set()
        t0 = time.perf_counter()
        while not turn.stopped.is_set() and time.perf_counter() - t0 < 10:  # the rounds of a reply
            time.sleep(0.01)
    result.value = time.perf_counter() - t0 if turn.stopped.is_set() else -1.0
    reason.value = (seen.reason or "").encode() + (b"+cb" if cleared == [False] else b"")  # on_clear before stop()


def test_stop_reaches_a_reply_running_in_a_forked_worker(tmp_path):
    flags = zerogpu.StopFlags(tmp_path / "stops", enabled=lambda: True)
    flags.request("session-a")  # a request from before the reply began is not about it
    fork = multiprocessing.get_context("fork")  # how ZeroGPU starts its workers
    started, result, reason = fork.Event(), fork.Value("d", 0.0), fork.Array("c", 16)
    worker = fork.Process(target=_reply_in_a_worker, args=(flags, "session-a", started, result, reason))
    worker.start()
    try:
        assert started.wait(10)
        time.sleep(0.3)
        assert flags.requested("session-a") is None, "the stale request must have been cleared"
        asked = time.perf_counter()
        assert flags.request("session-a", zerogpu.CLEAR)
        worker.join(10)
        assert worker.exitcode == 0
        assert 0.3 <= result.value and time.perf_counter() - asked < 2.0  # stopped on request, promptly
        assert reason.value == b"clear+cb" and flags.requested("session-a") is None
    finally:
        worker.kill()


def test_a_stop_request_names_its_reason(tmp_path):
    flags = zerogpu.StopFlags(tmp_path / "stops", enabled=lambda: True)
    assert flags.requested("s") is None
    flags.request("s")
    assert flags.requested("s") == zerogpu.STOP and flags.requested("other") is None
    flags.request("s", zerogpu.CLEAR)
    assert flags.requested("s") == zerogpu.CLEAR
    assert sorted(path.name for path in (tmp_path / "stops").iterdir()) == [flags._flag("s").name]  # no leftovers
    flags.clear("s")
    assert flags.requested("s") is None


def test_off_zerogpu_stop_flags_do_nothing(tmp_path):
    flags = zerogpu.StopFlags(tmp_path / "stops", enabled=lambda: False)
    turn = Turn()
    assert flags.request("s") is False and not (tmp_path / "stops").exists()
    with flags.watch("s", turn) as seen:
        pass
    assert not turn.stopped.is_set() and seen.reason is None


# --- ZeroGPU simulated: import and load touch no CUDA ---------------------------------------------

PROBE = textwrap.dedent('''
    import json, runpy, sys, threading, traceback
    import torch

    calls = {"init": [], "lazy_init": [], "is_available": []}

    def recorder(name, original):
        def record(*args, **kwargs):
            calls[name].append(traceback.format_stack(limit=4)[0].strip())
            return original(*args, **kwargs)
        return record

    torch.cuda.init = recorder("init", torch.cuda.init)
    torch.cuda._lazy_init = recorder("lazy_init", torch.cuda._lazy_init)
    torch.cuda.is_available = recorder("is_available", torch.cuda.is_available)

    def calls_gpu(fn):
        """Whether an endpoint is, or calls, a function spaces.GPU wrapped (the stand-in marks them)."""
        cells = [getattr(cell, "cell_contents", None) for cell in (getattr(fn, "__closure__", None) or ())]
        return any(hasattr(f, "zerogpu") for f in (fn, *cells))

    app = runpy.run_path(sys.argv[1], run_name="space_app")["main"].__globals__
    at_import = {name: len(found) for name, found in calls.items()}

    from chatapp import graph_llama, llama, lm, zerogpu
    forwards = []
    for cls in (llama.LlamaDecoderLM, lm.HFDecoderLM, graph_llama.GraphLlamaLM, graph_llama.Transformer):
        original = cls.forward
        def counted(self, *args, _original=original, **kwargs):
            forwards.append(type(self).__name__)
            return _original(self, *args, **kwargs)
        cls.forward = counted
    threads = []
    load_pair = app["load_pair"]
    def recorded_load_pair(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return load_pair(*args, **kwargs)
    app["load_pair"] = recorded_load_pair

    settings = app["space_settings"]()
    handle = app["service_handle"](settings)
    status_on_return = handle.status
    at_load = {name: len(found) for name, found in calls.items()}
    forwards_at_load = len(forwards)
    baseline_at_load = handle.service.baseline.tokens_per_s
    demo = app["build_app"](handle, settings)
    handle.service.calibrate(new_tokens=4)  # the counter's control: a calibration does run the models
    print("PROBE " + json.dumps({
        "zerogpu": zerogpu.on_zerogpu(), "at_import": at_import, "at_load": at_load,
        "init_calls": calls["init"] + calls["lazy_init"], "status_on_return": status_on_return,
        "loaded_in_main_thread": threads, "forwards_at_load": forwards_at_load,
        "forwards_in_calibration": len(forwards) - forwards_at_load,
        "baseline_at_load": baseline_at_load, "decorated": sorted(zerogpu.DECORATED),
        "endpoints": sorted(str(fn.api_name) for fn in demo.fns.values()),
        "wrapped_endpoints": sorted(str(fn.api_name) for fn in demo.fns.values() if calls_gpu(fn.fn)),
    }))
''')


@pytest.fixture(scope="module")
def zerogpu_probe(bundle, tmp_path_factory) -> dict:
    fakes = tmp_path_factory.mktemp("fake-spaces")
    (fakes / "spaces.py").write_text(FAKE_SPACES)
    env = {
        **os.environ,
        zerogpu.ZEROGPU_ENV: "true",
        "PYTHONPATH": str(fakes),
        "HF_HUB_OFFLINE": "1",
        "SPECCHAT_MODEL_TARGET": EMBEDDED,
        "GRADIO_ANALYTICS_ENABLED": "False",
        # No CUDA emulation on a CPU build of torch (the real `spaces` provides it on ZeroGPU), so the CPU;
        # without the CPU kernels, whose load times a step: on ZeroGPU the graph decoder runs, as here.
        "SPECCHAT_MODEL_DEVICE": "cpu",
        "SPECCHAT_DISABLE_KERNELS": "1",
    }
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(bundle / "app.py")],
        cwd=bundle,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((x for x in run.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert run.returncode == 0 and line, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(line[len("PROBE ") :])


@pytest.mark.slow
def test_zerogpu_import_and_load_touch_no_cuda(zerogpu_probe):
    probe = zerogpu_probe
    assert probe["zerogpu"]
    assert probe["at_import"] == {"init": 0, "lazy_init": 0, "is_available": 0}, probe["at_import"]
    assert probe["init_calls"] == [], "CUDA was initialized at import or load"
    assert probe["status_on_return"] == "ready" and probe["loaded_in_main_thread"] == [True]
    assert probe["forwards_at_load"] == 0, "nothing may run the models at load (no calibration, no compiling)"
    assert probe["baseline_at_load"] is None
    assert probe["forwards_in_calibration"] > 0  # the counter counts


@pytest.mark.slow
def test_zerogpu_reply_handlers_are_decorated(zerogpu_probe):
    # Every endpoint that runs the models: the page's chat (/send, or /chat before the plain API took that
    # name), the plain /chat, /regenerate and /compare.
    generating = {"chat", "send", "regenerate", "compare"} & set(zerogpu_probe["endpoints"])
    assert {"chat", "regenerate", "compare"} <= generating
    assert generating <= set(zerogpu_probe["wrapped_endpoints"]), "each must call a function spaces.GPU wrapped"
    assert zerogpu_probe["decorated"]


# --- the bundle served as a Space would serve it ----------------------------------------------------


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


class Lines:
    """A child's stderr, read in a thread; wait() for a line that matches."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((x for x in self.lines if re.search(pattern, x)), None)
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found
                self._cond.wait(left)


def listening(pid: int, port: int) -> set[str]:
    import psutil

    return {
        c.laddr.ip
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def stream_replies(client, message: str, greedy: dict) -> list[tuple[str, dict, int]]:
    """(text, stats record, streamed updates) of one reply through each chat endpoint the UI has: the page's
    chat (/send, or /chat before the plain API took that name: message, chat_state and the sidebar's fields
    -> the chat outputs, the stored chat third) and the plain /chat for programs (message, history,
    settings -> reply, stats) where there is one."""
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    plain = "history" in {p["parameter_name"] for p in endpoints["/chat"]["parameters"]}
    results = []
    job = client.submit(message=message, chat_state={"messages": []}, api_name="/send" if plain else "/chat", **greedy)
    reply = job.result(timeout=180)[2]["messages"][-1]
    assert reply["role"] == "assistant"
    results.append((reply["content"], reply["stats"], len(job.outputs())))
    if plain:
        job = client.submit(message=message, history=[], settings=greedy, api_name="/chat")
        text, record = job.result(timeout=180)
        results.append((text, record, len(job.outputs())))
    return results


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_bundle_starts_as_a_space_and_streams_a_reply_and_a_comparison(bundle):
    from gradio_client import Client

    port = 7860 if port_free(7860) else free_port()  # 7860 is what Spaces use; another when it is taken here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECCHAT_", "GRADIO_", "SPACE"))}
    env.update(
        {
            "SYSTEM": "spaces",
            "SPACE_ID": "user/specchat",
            "SPACE_AUTHOR_NAME": "user",
            "SPACE_REPO_NAME": "specchat",
            "SPACE_TITLE": "SpecChat",
            "SPACE_HOST": "user-specchat.hf.space",
            "CPU_CORES": "2",
            "MEMORY": "16Gi",
            "GRADIO_SERVER_NAME": "0.0.0.0",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONUNBUFFERED": "1",
            "SPECCHAT_MODEL_TARGET": EMBEDDED,
            "SPECCHAT_MODEL_DEVICE": "cpu",
        }
    )
    env.pop("PYTHONPATH", None)
    if port != 7860:
        env["GRADIO_SERVER_PORT"] = str(port)
    assert subprocess.run([sys.executable, "-c", "import spaces"], env=env).returncode == 0, "pip install spaces"
    child = subprocess.Popen(
        [sys.executable, "app.py"],
        cwd=bundle,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log = Lines(child.stdout)
    client = None
    try:
        assert log.wait(r"ready: loaded", 300), "\n".join(log.lines[-40:])
        assert listening(child.pid, port) == {"0.0.0.0"}, "a Space reaches the app on all interfaces"
        assert log.wait(r"target embedded:smollm2-135m-instruct", 1)
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        greedy = dict(temperature=0.0, max_new_tokens=16, k=4, seed=0)
        for text, record, updates in stream_replies(client, "Name three primary colors.", greedy):
            assert text.strip() and updates >= 3, (text, updates)
            assert record["mode"] == "speculative" and record["new_tokens"] > 0
        standard, speculative, table, verdict = client.predict(
            prompt="Name three primary colors.", api_name="/compare", **greedy
        )
        assert standard.strip() and standard == speculative, (standard, speculative)
        assert "Identical" in verdict and {row[0] for row in table["data"]} == {"standard", "speculative"}
    finally:
        if client is not None:
            client.close()
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(10)
    assert child.returncode is not None
