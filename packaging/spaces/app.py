"""Hugging Face Spaces entry point: the Space's app_file, run as `python app.py` in the Space folder.

Contract: reads settings.toml and the Space's variables, serves the chat UI on
0.0.0.0:$GRADIO_SERVER_PORT (7860 when unset), the interface and port a Space
routes its traffic to, and loads the models. Exit status as `main.py serve`:
0, 1 when the web server cannot start, 2 for bad settings.

Which models, the first that is set:
    SPECCHAT_PRESET              a [presets.NAME] pair of settings.toml (for GPU hardware)
    SPECCHAT_MODEL_TARGET/DRAFT  any model spec: a hub id, or embedded:smollm2-135m-instruct
    settings.toml [model]        in the built bundle HuggingFaceTB/SmolLM2-135M-Instruct, in its
                                 own weights, preloaded by the front matter's preload_from_hub
A target that cannot be loaded (the hub unreachable, a gated model and no
HF_TOKEN secret) falls back to the embedded model; the log and the Model tab
say why. HF_TOKEN itself is read by huggingface_hub.

ZeroGPU (chatapp.zerogpu): `spaces` is imported before torch; the models load
in the main thread before the server starts (ZeroGPU intercepts CUDA in that
thread only, and packs the weights when the server starts); no calibration
at load, since no GPU is held then.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chatapp import zerogpu  # noqa: E402

zerogpu.activate()  # first: on ZeroGPU its CUDA emulation must be in place before torch is imported

from collections.abc import Callable, Mapping  # noqa: E402
from dataclasses import replace  # noqa: E402

from chatapp.cli import keep_freed_memory  # noqa: E402
from chatapp.errors import one_line  # noqa: E402
from chatapp.models import EMBEDDED, ModelLoadError, load_pair  # noqa: E402
from chatapp.service import ChatService  # noqa: E402
from chatapp.settings import Settings, SettingsError, apply_preset, load_settings, with_overrides  # noqa: E402
from chatapp.ui import ServiceHandle, build_app, launch_app  # noqa: E402

PRESET_ENV = "SPECCHAT_PRESET"
PORT_ENV = "GRADIO_SERVER_PORT"  # Gradio's own variable, which Spaces set
HOST = "0.0.0.0"  # a Space reaches the app on the container's interface, not on its loopback
DEFAULT_PORT = 7860
EXIT_SERVER, EXIT_SETTINGS = 1, 2

Progress = Callable[[str], None]


def say(message: str) -> None:
    print(f"specchat: {message}", file=sys.stderr, flush=True)


def space_port(env: Mapping[str, str]) -> int:
    raw = env.get(PORT_ENV, "").strip()
    if not raw:
        return DEFAULT_PORT
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"environment variable {PORT_ENV} = {raw!r} is not a port number") from None


def space_settings(env: Mapping[str, str] | None = None) -> Settings:
    """settings.toml and the SPECCHAT_* variables, then SPECCHAT_PRESET, then the Space's address."""
    env = os.environ if env is None else env
    settings = load_settings(env=env)
    preset = env.get(PRESET_ENV, "").strip()
    if preset:
        settings = apply_preset(settings, preset)
    address = {"server.host": HOST, "server.port": space_port(env), "server.open_browser": False, "server.share": False}
    return with_overrides(settings, address, source=f"the Space ({PORT_ENV})")


def load_models(settings: Settings, progress: Progress):
    """The configured pair, or the embedded model when the configured target cannot be loaded."""
    try:
        return load_pair(settings.model, progress=progress)
    except ModelLoadError as error:
        if settings.model.target.strip() == EMBEDDED:
            raise
        reason = f"cannot load {settings.model.target}: {one_line(error)}; serving the embedded model instead"
    progress(f"warning: {reason}")
    pair = load_pair(replace(settings.model, target=EMBEDDED, draft=""), progress=progress)
    pair.target.info.extra["warning"] = reason  # the Model tab shows it under the target
    return pair


def load_service(settings: Settings, progress: Progress) -> ChatService:
    """Load the pair; measure the standard-decoding baseline unless on ZeroGPU (no GPU at load there)."""
    pair = load_models(settings, progress)
    service = ChatService(pair)
    if zerogpu.calibrate_at_load():
        progress("measuring standard decoding on this machine (the speedup baseline)")
        service.calibrate()
    else:
        progress("ZeroGPU: no calibration at load; each reply measures standard decoding within itself")
    progress(f"ready: loaded in {pair.load_s:.1f} s")
    return service


def service_handle(settings: Settings) -> ServiceHandle:
    """Off ZeroGPU the models load behind the page (it is up at once). On ZeroGPU they load here, in the
    main thread, before the server starts; a failure is kept for the Model tab as a background load's is."""
    if not zerogpu.on_zerogpu():
        return ServiceHandle(factory=lambda progress: load_service(settings, progress), echo=True).start()
    try:
        return ServiceHandle(load_service(settings, say))
    except Exception as error:  # shown in the UI, as the background loader would show it
        failure = error

    def fail(progress: Progress):
        raise failure

    handle = ServiceHandle(factory=fail, echo=True).start()
    handle.wait()
    return handle


def main() -> int:
    keep_freed_memory()
    try:
        settings = space_settings()
    except SettingsError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_SETTINGS
    model = settings.model
    say(
        f"target {model.target}, draft {model.draft or 'INT8 copy of the target'}; "
        f"HF_TOKEN {'set' if os.environ.get('HF_TOKEN') else 'not set'}; ZeroGPU {zerogpu.on_zerogpu()}"
    )
    demo = build_app(service_handle(settings), settings)
    server = settings.server
    try:
        launch_app(demo, host=server.host, port=server.port)
    except OSError as error:  # the port is taken
        print(f"error: cannot start the web server on {server.host}:{server.port}: {one_line(error)}", file=sys.stderr)
        return EXIT_SERVER
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
