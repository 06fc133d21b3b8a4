"""The service behind the UI, possibly still loading, and what each browser
session keeps between calls (its running reply, for Stop; Clear's epoch).

Contract: `ServiceHandle` wraps a ready ChatService-like object, or builds
one with `factory(progress)` in a background thread so that the page is up
at once; handlers call `require()` (the service, or `UnavailableError` with a
one-line reason). Its `slot` is the one generation slot: every reply, from the
page, the Gradio API or the OpenAI-compatible API, runs while holding it.
`Sessions.get(request)` returns the `Session` of a Gradio request (keyed by
its session hash). None of them knows anything about Gradio's components or
about what a service does.

`reload(factory)` swaps the pair (the Model tab): another service is built in
a thread while the current one keeps serving, and replaces it only once it is
fully built; a reply already running finishes on the pair it started with.
A failed reload keeps the current service and says why, in one line.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .. import zerogpu
from ..errors import one_line

PROGRESS_KEPT = 12  # load-progress messages kept for the Model tab
MAX_SESSIONS = 2000  # past this, the least recently seen idle half is forgotten
# Load failures whose message already says what went wrong (no class name needed).
SELF_EXPLAINING = ("ModelLoadError", "IncompatibleModelsError", "SettingsError")


class UnavailableError(RuntimeError):
    """The models are still loading or failed to load."""


class BusyError(RuntimeError):
    """Too many requests already wait for the generation slot."""


class Cancelled(RuntimeError):
    """The request was stopped (or its client left) before it got the generation slot."""


class GenerationSlot:
    """One reply at a time: the models, their caches and the kept prefix are shared.

    Gradio's queue already runs the page's and the Gradio API's replies one at
    a time (concurrency id GENERATION, where waiting users see their place);
    this lock is what they share with requests from outside that queue (the
    OpenAI-compatible API). `hold(cancelled)` waits for it in a thread,
    `acquire_async(cancelled)` / `release()` in an event loop; both give up
    with Cancelled as soon as `cancelled()` says so, and refuse with BusyError
    when `max_waiting` others already wait."""

    POLL_S = 0.05  # how often a waiter looks at `cancelled`

    def __init__(self, max_waiting: int | None = None):
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self.waiting = 0

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def full(self) -> bool:
        """As many requests wait as may: the next one is refused."""
        return self.max_waiting is not None and self.busy and self.waiting >= self.max_waiting

    def _enter(self) -> None:
        with self._count:
            if self.full:
                raise BusyError(
                    f"the server is busy: {self.waiting} requests already wait for a reply; try again later"
                )
            self.waiting += 1

    def _leave(self) -> None:
        with self._count:
            self.waiting -= 1

    @contextmanager
    def hold(self, cancelled: Callable[[], bool] = lambda: False) -> Iterator[None]:
        self._enter()
        try:
            while not self._lock.acquire(timeout=self.POLL_S):
                if cancelled():
                    raise Cancelled("stopped before the reply started")
        finally:
            self._leave()
        try:
            yield
        finally:
            self._lock.release()

    async def acquire_async(self, cancelled: Callable[[], Awaitable[bool]]) -> None:
        """Wait for the slot without a thread (an event loop's request); `release()` when done."""
        self._enter()
        try:
            while not self._lock.acquire(blocking=False):
                if await cancelled():
                    raise Cancelled("the client left before the reply started")
                await asyncio.sleep(self.POLL_S)
        finally:
            self._leave()

    def release(self) -> None:
        self._lock.release()


class Reload:
    """One swap of the service: its progress, and how it ended (`error`, or `swapped`)."""

    def __init__(self, label: Any, echo: bool = False):
        self.label = label  # what is being loaded, as the caller describes it (e.g. ModelSettings)
        self.progress: list[str] = []
        self.error: str | None = None
        self.swapped = False
        self.started = time.perf_counter()
        self._echo = echo
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def finish(self, error: str | None = None) -> None:
        self.error, self.swapped = error, error is None
        self._done.set()

    def report(self, message: str) -> None:
        self.progress = (self.progress + [message])[-PROGRESS_KEPT:]
        if self._echo:
            print(f"specchat: {message}", file=sys.stderr, flush=True)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


class ServiceHandle:
    """A service that is ready, or being built by `factory(progress)` in a thread."""

    def __init__(
        self, service: Any = None, factory: Callable[[Callable[[str], None]], Any] | None = None, *, echo: bool = False
    ):
        if service is None and factory is None:
            raise ValueError("ServiceHandle needs a service or a factory")
        self.service = service
        self.error: str | None = None
        self.progress: list[str] = []
        self._factory = factory
        self._echo = echo  # also print progress and errors to stderr (`main.py serve`)
        self._thread: threading.Thread | None = None
        self.slot = GenerationSlot()
        self.started = time.perf_counter()
        self.ready_s: float | None = 0.0 if service is not None else None
        self.reloading: Reload | None = None  # the latest swap of the service, running or ended
        self.loaded_from: Any = None  # the label of the reload that built the serving service, if one did
        self._reload_lock = threading.Lock()

    @classmethod
    def of(cls, service_or_factory: Any) -> ServiceHandle:
        """A started handle from a handle, a ChatService-like object or a factory(progress)."""
        if isinstance(service_or_factory, ServiceHandle):
            return service_or_factory.start()
        if hasattr(service_or_factory, "start_turn"):
            return cls(service_or_factory)
        if callable(service_or_factory):
            return cls(factory=service_or_factory).start()
        raise TypeError("build_app needs a ChatService-like object, a ServiceHandle or a factory(progress)")

    @property
    def status(self) -> str:
        if self.service is not None:
            return "ready"
        return "error" if self.error else "loading"

    def report(self, message: str) -> None:
        self.progress = (self.progress + [message])[-PROGRESS_KEPT:]
        if self._echo:
            print(f"specchat: {message}", file=sys.stderr, flush=True)

    def start(self) -> ServiceHandle:
        if self._factory is not None and self._thread is None and self.service is None:
            self._thread = threading.Thread(target=self._load, name="specchat-load", daemon=True)
            self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> str:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status

    def _load(self) -> None:
        try:
            service = self._factory(self.report)
        except MemoryError:
            self._fail("out of memory loading the models; try a smaller model or another device")
        except Exception as error:  # ModelLoadError, IncompatibleModelsError, CUDA OOM, anything
            self._fail(_load_failure(error))
        else:
            self.service = service
            self.ready_s = time.perf_counter() - self.started

    def _fail(self, message: str) -> None:
        self.error = message
        if self._echo:
            print(f"error: {message} (the UI stays up and shows it in the Model tab)", file=sys.stderr, flush=True)

    def reload(
        self,
        factory: Callable[[Callable[[str], None]], Any],
        label: Any = None,
        swapped: Callable[[], None] = lambda: None,
    ) -> Reload | None:
        """Build another service with `factory(progress)` in a thread, the current one serving meanwhile,
        and swap it in once built, then call `swapped()` (to drop what was made for the old service); None
        (nothing started) while the first load or another reload runs."""
        with self._reload_lock:
            if self.status == "loading" or (self.reloading is not None and not self.reloading.done):
                return None
            job = self.reloading = Reload(label, self._echo)
        thread = threading.Thread(
            target=self._swap_in, args=(job, factory, swapped), name="specchat-reload", daemon=True
        )
        thread.start()
        return job

    def _swap_in(
        self, job: Reload, factory: Callable[[Callable[[str], None]], Any], swapped: Callable[[], None]
    ) -> None:
        try:
            service = factory(job.report)
        except MemoryError:
            job.finish("out of memory loading the models; try a smaller model or another device")
        except Exception as error:  # ModelLoadError, IncompatibleModelsError, CUDA OOM, anything
            job.finish(_load_failure(error))
        else:
            # One assignment: the next reply starts on the new service, a running one ends on the old.
            self.service, self.error, self.loaded_from = service, None, job.label
            swapped()
            job.finish()
        finally:
            if not job.done:  # interrupted (KeyboardInterrupt, SystemExit): waiters must not wait forever
                job.finish("the load was interrupted")

    def require(self) -> Any:
        if self.service is not None:
            return self.service
        if self.error:
            raise UnavailableError(f"the models failed to load: {self.error}")
        raise UnavailableError("the models are still loading; see the Model tab")


def _load_failure(error: Exception) -> str:
    name = type(error).__name__
    message = one_line(error)
    if "OutOfMemory" in name:
        return f"out of memory loading the models ({message}); try a smaller model or another device"
    return message if name in SELF_EXPLAINING else f"{name}: {message}"


@dataclass
class Session:
    key: str = "default"  # the browser session (ZeroGPU's worker learns of Stop/Clear by it)
    turn: Any = None  # the running turn, for Stop
    epoch: int = 0  # bumped by Clear: a reply started before it does not write back
    stops: int = 0  # bumped by Stop: a request sent before it and not yet started does not start
    last_seen: float = 0.0

    @contextmanager
    def running(self, turn: Any) -> Iterator[Iterator[Any]]:
        """Iterate `turn` as this session's running turn (what Stop stops); the
        turn's iterator is closed however the iteration ends (a client gone,
        an engine error), so that its generation is released."""
        self.turn = turn
        events = iter(turn)
        try:
            with zerogpu.STOPS.watch(self.key, turn, on_clear=self.cleared):
                yield events
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            if self.turn is turn:
                self.turn = None

    def cleared(self) -> None:
        self.epoch += 1


def session_key(request: Any) -> str:
    """A Gradio request's session (its session hash); "default" without one."""
    return getattr(request, "session_hash", None) or "default"


class Sessions:
    """Per-browser-session bookkeeping, keyed by Gradio's session hash."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def get(self, request: Any) -> Session:
        key = session_key(request)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                if len(self._sessions) > MAX_SESSIONS:
                    self._forget_idle()
                session = self._sessions[key] = Session(key)
            session.last_seen = time.monotonic()
            return session

    def _forget_idle(self) -> None:
        idle = sorted((s.last_seen, key) for key, s in self._sessions.items() if s.turn is None)
        for _, key in idle[: MAX_SESSIONS // 2]:
            del self._sessions[key]
