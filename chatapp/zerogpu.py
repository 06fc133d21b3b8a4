"""ZeroGPU: Hugging Face's shared GPUs for Spaces, lent to a function only while it runs.

Contract: on ZeroGPU hardware (the `spaces` package's SPACES_ZERO_GPU variable
is true) the process that serves the page never holds a GPU. `spaces` emulates
CUDA there: tensors moved to "cuda" at load stay in host memory, recorded, and
each call of a `@spaces.GPU` function runs in a forked worker process that
holds a real GPU for at most the requested duration and gets the recorded
tensors moved onto it. Off ZeroGPU every name here is a no-op: the decorator is
the identity (or `spaces.GPU`, itself a no-op there), calibration and compiling
stay on, and no stop flag is ever written.

    on_zerogpu()        whether this process runs on ZeroGPU hardware
    activate()          import `spaces` first on ZeroGPU: it must patch torch before anything touches CUDA
    gpu(duration)       decorator factory: `spaces.GPU(duration=...)` when `spaces` is importable, else the
                        identity; every use is recorded in DECORATED
    gpu_reply(runs)     gpu() with reply_seconds() as the duration, read from the DecodingSettings argument
    reply_seconds(...)  how long a reply may hold the GPU: start-up + max_new_tokens at a conservative rate
    calibrate_at_load() False on ZeroGPU: no GPU at load to measure with
    compile_allowed()   False on ZeroGPU: it has no torch.compile
    STOPS               Stop and Clear requests that reach a reply running in the forked worker

What follows from the fork: a reply's Python objects (its Turn, the session
it runs in, what auto K learns) live in the worker, not in the process whose
Stop handler runs; STOPS carries a Stop across with one flag file per
session. It knows nothing about Gradio, the models or the service.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import DecodingSettings

ZEROGPU_ENV = "SPACES_ZERO_GPU"  # what the `spaces` package reads (spaces/config.py)
_TRUE = ("1", "t", "true")  # the values `spaces` counts as true

# The duration rule. No figure here is measured on ZeroGPU (no ZeroGPU in this project's reach):
# each is a conservative assumption, so that a reply is not cut by its own request.
STARTUP_S = 20.0  # fork the worker, move the weights onto the GPU, first (eager) steps
CONSERVATIVE_TOKENS_PER_S = 20.0  # eager decoding of a 7B target, slowest of standard and speculative
MIN_DURATION_S = 30  # short requests keep a good place in ZeroGPU's queue; nothing needs less
MAX_DURATION_S = 300  # ZeroGPU refuses requests over a visitor's quota; replies past this are cut

STOP_POLL_S = 0.05  # how often a running reply looks for its stop flag (rounds take longer)


def on_zerogpu(env: dict[str, str] | None = None) -> bool:
    """Whether this process runs on ZeroGPU hardware (Spaces set SPACES_ZERO_GPU there)."""
    value = (os.environ if env is None else env).get(ZEROGPU_ENV)
    return value is not None and value.strip().lower() in _TRUE


def activate() -> bool:
    """On ZeroGPU, import `spaces` now: it patches torch for the CUDA emulation, which must happen before
    anything initializes CUDA, and in the thread that will load the models. Returns whether it did."""
    if not on_zerogpu():
        return False
    importlib.import_module("spaces")  # on ZeroGPU a missing or broken `spaces` must stop the start, loudly
    return True


def calibrate_at_load() -> bool:
    """Whether the service may measure standard decoding at load. Not on ZeroGPU: the load runs without a GPU,
    and each reply prices standard decoding from its own one-token steps (TurnStats.speedup) anyway."""
    return not on_zerogpu()


def compile_allowed() -> bool:
    """Whether the graph decoder may torch.compile (CUDA graphs): ZeroGPU supports no torch.compile."""
    return not on_zerogpu()


# --- the decorator ------------------------------------------------------------------------


@dataclass(frozen=True)
class Decorated:
    """One use of gpu(): the function's name, its duration (seconds or a rule), whether spaces.GPU wrapped it."""

    name: str
    duration: float | Callable[..., float]
    by_spaces: bool


DECORATED: dict[str, Decorated] = {}  # qualified name -> the latest gpu() applied to it


def _spaces_gpu() -> Callable[..., Any] | None:
    """spaces.GPU, or None where the package is not installed (desktop installs need not have it)."""
    try:
        spaces = importlib.import_module("spaces")
    except ModuleNotFoundError as error:
        if error.name != "spaces":  # `spaces` is there but broken: say so
            raise
        if on_zerogpu():
            raise RuntimeError("SPACES_ZERO_GPU is set but the `spaces` package is not installed (pip install spaces)")
        return None
    return spaces.GPU


def gpu(duration: float | Callable[..., float]) -> Callable[[Callable], Callable]:
    """Decorator factory: `spaces.GPU(duration=duration)` where `spaces` is importable (a no-op off ZeroGPU),
    the identity elsewhere. `duration` is seconds, or a function of the decorated function's arguments
    returning seconds (ZeroGPU's dynamic duration). Each use is recorded in DECORATED."""

    def decorate(fn: Callable) -> Callable:
        spaces_gpu = _spaces_gpu()
        wrapped = fn if spaces_gpu is None else spaces_gpu(duration=duration)(fn)
        name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
        DECORATED[name] = Decorated(name, duration, spaces_gpu is not None)
        return wrapped

    return decorate


def reply_seconds(max_new_tokens: int, runs: int = 1, tokens_per_s: float = CONSERVATIVE_TOKENS_PER_S) -> int:
    """Seconds of GPU that `runs` replies of up to `max_new_tokens` each may take, within ZeroGPU's bounds."""
    needed = STARTUP_S + runs * max_new_tokens / tokens_per_s
    return int(min(MAX_DURATION_S, max(MIN_DURATION_S, math.ceil(needed))))


def max_new_tokens_of(args: tuple, kwargs: dict) -> int:
    """The reply length a handler's arguments ask for: a DecodingSettings among them, else a settings mapping
    with "max_new_tokens" (an API client's), else the default settings'."""
    values = (*args, *kwargs.values())
    decoding = next((a for a in values if isinstance(a, DecodingSettings)), None)
    if decoding is not None:
        return decoding.max_new_tokens
    for value in values:
        if isinstance(value, Mapping) and "max_new_tokens" in value:
            with contextlib.suppress(TypeError, ValueError):
                return max(1, int(value["max_new_tokens"]))
    return DecodingSettings().max_new_tokens


def gpu_reply(runs: int = 1) -> Callable[[Callable], Callable]:
    """gpu() for a handler that generates `runs` replies, its duration from the reply length its arguments ask
    for (max_new_tokens_of)."""

    def duration(*args: Any, **kwargs: Any) -> int:
        return reply_seconds(max_new_tokens_of(args, kwargs), runs)

    return gpu(duration)


# --- Stop across the fork ---------------------------------------------------------------------


STOP, CLEAR = "stop", "clear"  # why a reply is asked to end: Clear also means "do not write the chat back"


@dataclass
class StopWatch:
    """What a watched reply was asked: None, STOP or CLEAR (set when the request arrived)."""

    reason: str | None = None


class StopFlags:
    """Stop requests that cross the process boundary: one flag file per session key, holding the reason, in a
    folder named once at import in the process that serves the page (a forked worker inherits the name).
    `request(key, reason)` raises the flag; `watch(key, turn)` runs while a reply streams and calls
    `turn.stop()` within STOP_POLL_S of the flag going up. Off ZeroGPU both do nothing: Stop and Clear
    reach the Turn and the session directly there."""

    def __init__(self, folder: Path | None = None, enabled: Callable[[], bool] = on_zerogpu):
        self.folder = folder or Path(tempfile.gettempdir()) / f"specchat-stops-{os.getpid()}"
        self._enabled = enabled

    def _flag(self, key: str) -> Path:
        return self.folder / hashlib.sha256(key.encode()).hexdigest()[:32]

    def request(self, key: str, reason: str = STOP) -> bool:
        """Ask the reply of session `key` to end; False when there is nothing to do (off ZeroGPU)."""
        if not self._enabled():
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        flag = self._flag(key)
        partial = flag.parent / f"{flag.name}.{os.getpid()}.tmp"
        partial.write_text(reason)
        os.replace(partial, flag)  # the watcher never reads half a reason
        return True

    def requested(self, key: str) -> str | None:
        """The reason of the pending request for `key`, or None."""
        try:
            return self._flag(key).read_text() or STOP
        except FileNotFoundError:
            return None

    def clear(self, key: str) -> None:
        self._flag(key).unlink(missing_ok=True)

    @contextlib.contextmanager
    def watch(self, key: str, turn: Any, on_clear: Callable[[], None] | None = None) -> Iterator[StopWatch]:
        """While inside, a request for `key` stops `turn` (after its current round, as Stop does), calling
        `on_clear()` first when the request is a Clear; the StopWatch yielded says which request came."""
        seen = StopWatch()
        if not self._enabled():
            yield seen
            return
        self.clear(key)  # a request from before this reply began is not about it
        done = threading.Event()

        def poll() -> None:
            while not done.wait(STOP_POLL_S):
                reason = self.requested(key)
                if reason:
                    self.clear(key)
                    seen.reason = CLEAR if CLEAR in (seen.reason, reason) else reason
                    if reason == CLEAR and on_clear is not None:
                        on_clear()
                    turn.stop()

        watcher = threading.Thread(target=poll, name="specchat-stop-watch", daemon=True)
        watcher.start()
        try:
            yield seen
        finally:
            done.set()
            watcher.join()
            self.clear(key)


STOPS = StopFlags()
