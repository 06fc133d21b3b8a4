"""The Gradio chat UI: chat with streaming speculative decoding, per-reply
stats, a token view, a Stats tab (measured vs theoretical speedup), a Compare
tab (standard vs speculative on one prompt) and a Model tab.

Contract: the UI reaches the models only through a `ChatService`-like object
(`start_turn`, `tokenizer`, `pair`, `baseline`, `tracker`, `context`), so the
tests can inject a scripted fake. `build_app(service_or_factory, settings)`
returns the Blocks; `launch_app` launches it with the app's theme and CSS
(Gradio 6 takes those in `launch()`); `serve(settings)` is `main.py serve`.

Every handler catches its own errors and shows one line (a gr.Warning toast
plus a notice line); no traceback ever reaches the page. All generation shares
one queue slot (concurrency id "generation"), so waiting users see their
position in the queue.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from .settings import DecodingSettings, Settings, load_settings, with_overrides
from .stats import best_k, expected_speedup

__all__ = [
    "CHAT_OUTPUTS",
    "COMPARE_OUTPUTS",
    "STATS_OUTPUTS",
    "GENERATION",
    "SOURCE_COLORS",
    "ServiceHandle",
    "build_app",
    "format_stats_line",
    "launch_app",
    "serve",
    "stats_record",
]

GENERATION = "generation"  # the one concurrency slot that every model call shares
STORAGE_KEY = "specchat-chat-v1"
SOURCE_COLORS = {  # token view categories -> colors (Gradio HighlightedText color_map)
    "draft": "#22c55e",  # accepted draft tokens
    "target": "#f97316",  # the target's correction after a rejected draft token
    "bonus": "#3b82f6",  # the target's extra token after all K drafts were accepted
    "standard": "#94a3b8",  # standard (target-only) decoding
}
SOURCE_HELP = {
    "draft": "draft token the target accepted",
    "target": "target's correction of a rejected draft",
    "bonus": "target's bonus token after all K drafts were accepted",
    "standard": "standard decoding (target only)",
}
EMPTY_STATE: dict = {"messages": []}
# What /chat, /regenerate, /clear and /restore return, in order (for API clients and tests).
CHAT_OUTPUTS = ("chatbot", "message", "state", "stats", "tokens", "notice", "turns_table", "summary")
STATS_OUTPUTS = ("turn_plot", "theory_plot", "turns_table", "summary")  # what /stats returns
COMPARE_OUTPUTS = ("standard", "speculative", "table", "verdict")  # what /compare returns
COMPARE_COLUMNS = ["decoding", "ran", "tokens", "wall time (s)", "tokens/s", "acceptance rate", "speedup"]
CURSOR = " ▌"
MAX_LINE = 300  # longest error line shown

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


def _one_line(error: BaseException | str) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"


class UnavailableError(RuntimeError):
    """The models are still loading or failed to load."""


# --- the service, possibly still loading -------------------------------------------


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
        self._echo = echo
        self._thread: threading.Thread | None = None
        self.started = time.perf_counter()
        self.ready_s: float | None = 0.0 if service is not None else None

    @property
    def status(self) -> str:
        if self.service is not None:
            return "ready"
        return "error" if self.error else "loading"

    def report(self, message: str) -> None:
        self.progress.append(message)
        self.progress = self.progress[-12:]
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
            name = type(error).__name__
            message = _one_line(error)
            if "OutOfMemory" in name:
                message = f"out of memory loading the models ({message}); try a smaller model or another device"
            elif name not in ("ModelLoadError", "IncompatibleModelsError", "SettingsError"):
                message = f"{name}: {message}"
            self._fail(message)
        else:
            self.service = service
            self.ready_s = time.perf_counter() - self.started

    def _fail(self, message: str) -> None:
        self.error = message
        if self._echo:
            print(f"error: {message} (the UI stays up and shows it in the Model tab)", file=sys.stderr, flush=True)

    def require(self) -> Any:
        if self.service is not None:
            return self.service
        if self.error:
            raise UnavailableError(f"the models failed to load: {self.error}")
        raise UnavailableError("the models are still loading; see the Model tab")


def _as_handle(service_or_factory: Any) -> ServiceHandle:
    if isinstance(service_or_factory, ServiceHandle):
        return service_or_factory.start()
    if hasattr(service_or_factory, "start_turn"):
        return ServiceHandle(service_or_factory)
    if callable(service_or_factory):
        return ServiceHandle(factory=service_or_factory).start()
    raise TypeError("build_app needs a ChatService-like object, a ServiceHandle or a factory(progress)")


# --- per-browser-session bookkeeping (Stop, Clear) -----------------------------------


@dataclass
class _Session:
    turn: Any = None  # the running turn, for Stop
    epoch: int = 0  # bumped by Clear: a reply started before it does not write back
    last_seen: float = 0.0


class _Sessions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    def get(self, request: gr.Request | None) -> _Session:
        key = getattr(request, "session_hash", None) or "default"
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                if len(self._sessions) > 2000:  # forget idle sessions
                    idle = sorted((s.last_seen, k) for k, s in self._sessions.items() if s.turn is None)
                    for _, old in idle[:1000]:
                        del self._sessions[old]
                session = self._sessions[key] = _Session()
            session.last_seen = now
            return session


# --- formatting ------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def stats_record(turn: Any) -> dict:
    """What the UI keeps of one reply's stats: plain JSON (it is stored in the browser)."""
    s = turn.stats
    speculative = s.mode == "speculative"
    return {
        "mode": s.mode,
        "k": int(s.k) if speculative else None,
        "k_choice": (turn.k_choice or "fixed") if speculative else "",
        "new_tokens": int(s.new_tokens),
        "rounds": int(s.rounds),
        "drafted": int(s.drafted),
        "accepted": int(s.accepted),
        "acceptance_rate": _num(s.acceptance_rate),
        "mean_accepted_per_round": _num(s.mean_accepted_per_round),
        "tokens_per_s": _num(s.tokens_per_s),
        "speedup": _num(s.speedup),
        "baseline_tokens_per_s": _num(s.baseline_tokens_per_s),
        "baseline_source": s.baseline_source or "none",
        "int8_path": s.int8_path or "",
        "draft_prefill": s.draft_prefill or "",
        "stop_reason": s.stop_reason or "",
        "wall_s": _num(s.wall_s),
        "prefill_s": _num(s.prefill_s),
        "source_counts": {str(k): int(v) for k, v in (s.source_counts or {}).items()},
        "notice": turn.notice,
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _k_text(record: dict) -> str:
    choice = record.get("k_choice") or "fixed"
    if choice.startswith("auto (") and choice.endswith(")"):
        return f"K = {record['k']} (auto: {choice[6:-1]})"
    return f"K = {record['k']} ({choice})"


def _speedup_text(record: dict) -> str:
    if record.get("speedup") is None:
        return "speedup n/a (no standard-decoding baseline measured yet)"
    return f"**{record['speedup']:.2f}×** vs standard decoding ({record['baseline_tokens_per_s']:.1f} tok/s)"


def format_stats_line(record: dict) -> str:
    """The stats of one reply as Markdown: a headline and a details line."""
    tps = record.get("tokens_per_s") or 0.0
    if record["mode"] == "speculative":
        head = [
            "⚡ **speculative**",
            _k_text(record),
            f"acceptance **{_pct(record.get('acceptance_rate'))}**",
            "n/a accepted/round"
            if record.get("mean_accepted_per_round") is None
            else f"{record['mean_accepted_per_round']:.2f} accepted/round",
            f"**{tps:.1f} tok/s**",
            _speedup_text(record),
        ]
        draft = f"draft INT8 path: {record.get('int8_path') or 'n/a'}"
        if record.get("draft_prefill"):
            draft += f" · draft's prompt keys/values {record['draft_prefill']}"
    else:
        head = [
            "◎ **standard** (target only)",
            "K n/a",
            "acceptance n/a",
            f"**{tps:.1f} tok/s**",
            _speedup_text(record),
        ]
        draft = "draft: not used"
    wall = record.get("wall_s") or 0.0
    details = [
        f"{record['new_tokens']} tokens in {wall:.2f} s",
        f"stop: {record.get('stop_reason') or 'n/a'}",
        f"baseline: {record.get('baseline_source') or 'none'}",
        draft,
    ]
    return " · ".join(head) + "\n\n" + "*" + " · ".join(details) + "*"


def _stats_title(record: dict) -> str:
    tps = record.get("tokens_per_s") or 0.0
    speed = "" if record.get("speedup") is None else f" · {record['speedup']:.2f}× vs standard"
    if record["mode"] == "speculative":
        return (
            f"⚡ speculative · K={record['k']} {(record.get('k_choice') or 'fixed').split(' ')[0]}"
            f" · {_pct(record.get('acceptance_rate'))} accepted · {tps:.1f} tok/s{speed}"
        )
    return f"◎ standard · {tps:.1f} tok/s{speed}"


def _live_line(turn: Any) -> str:
    s = turn.stats
    if s.mode == "speculative":
        return (
            f"generating… speculative · K = {s.k} · {s.new_tokens} tokens · "
            f"acceptance so far {_pct(s.acceptance_rate)} · {s.tokens_per_s:.1f} tok/s"
        )
    return f"generating… standard · {s.new_tokens} tokens · {s.tokens_per_s:.1f} tok/s"


def _mb(nbytes: Any) -> str:
    return f"{(nbytes or 0) / 1e6:,.1f} MB"


def _params(count: Any) -> str:
    count = int(count or 0)
    if count >= 1e9:
        return f"{count / 1e9:.2f} B"
    if count >= 1e6:
        return f"{count / 1e6:.1f} M"
    return f"{count:,}"


def _cell(value: Any) -> str:
    return str(value if value not in (None, "") else "—").replace("|", "\\|").replace("\n", " ")


def model_markdown(handle: ServiceHandle) -> str:
    if handle.status == "loading":
        lines = "\n".join(f"- {_cell(m)}" for m in handle.progress[-8:]) or "- starting…"
        waited = time.perf_counter() - handle.started
        return f"### Loading the models… ({waited:.0f} s)\n\n{lines}"
    if handle.status == "error":
        return (
            "### ✘ The models could not be loaded\n\n"
            f"**{_cell(handle.error)}**\n\n"
            "Fix `settings.toml` (or the command-line flags) and restart the app. "
            "The rest of the UI stays up, but chat and compare need the models."
        )
    service = handle.service
    pair = service.pair
    target, draft = pair.target.info, pair.draft.info
    rows = [
        ("Name", target.name, draft.name),
        ("Source", target.source, draft.source),
        ("Weights dtype", target.dtype, draft.dtype),
        ("Quantization", target.quantization, draft.quantization),
        ("Device", target.device, draft.device),
        ("Parameters", _params(target.parameters), _params(draft.parameters)),
        ("Weight memory", _mb(target.weight_bytes), _mb(draft.weight_bytes)),
        ("Implementation", target.implementation, draft.implementation),
    ]
    table = "| | Target (verifies) | Draft (proposes) |\n|---|---|---|\n" + "\n".join(
        f"| **{name}** | {_cell(t)} | {_cell(d)} |" for name, t, d in rows
    )
    baseline = service.baseline.tokens_per_s
    lines = [
        table,
        "",
        f"**Compatibility:** {_cell(pair.compatibility)}",
        *(
            [f"**Draft size:** {draft.weight_bytes / target.weight_bytes:.0%} of the target's weight memory"]
            if target.weight_bytes and draft.weight_bytes and draft is not target
            else []
        ),
        f"**Load time:** {pair.load_s:.1f} s",
        f"**Context:** {service.context} tokens",
        "**Standard-decoding baseline:** "
        + ("not measured yet" if baseline is None else f"{baseline:.1f} tok/s — {service.baseline.source}"),
    ]
    for who, info in (("target", target), ("draft", draft)):
        warning = (getattr(info, "extra", None) or {}).get("warning")
        if warning:
            lines.append(f"⚠ **{who}:** {_cell(warning)}")
    return "\n\n".join(lines)


def model_status_line(handle: ServiceHandle) -> str:
    if handle.status == "loading":
        last = handle.progress[-1] if handle.progress else "starting"
        return f"Loading the models… ({_cell(last)})"
    if handle.status == "error":
        return f"✘ Models not loaded: {_cell(handle.error)} — see the Model tab"
    pair = handle.service.pair
    t, d = pair.target.info, pair.draft.info
    quant = d.quantization.split(" (")[0]
    return f"Target **{t.name}** ({t.dtype}, {t.device}) · Draft **{d.name}** ({quant}) · {_params(t.parameters)} parameters"


# --- chat state (stored in the browser) ---------------------------------------------


def _clean_state(value: Any) -> dict:
    """The stored chat, tolerating missing or foreign localStorage data."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    messages = value.get("messages") if isinstance(value, dict) else None
    clean = []
    for m in messages if isinstance(messages, list) else []:
        if isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str):
            entry = {"role": m["role"], "content": m["content"]}
            if m["role"] == "assistant" and isinstance(m.get("stats"), dict):
                entry["stats"] = m["stats"]
            clean.append(entry)
    return {"messages": clean}


def _history(messages: list[dict]) -> list[dict]:
    """The model-facing history: plain {"role", "content"} messages."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render_chat(messages: list[dict], streaming: str | None = None, notice: str | None = None) -> list[dict]:
    """Chatbot messages: every reply followed by its stats as a collapsed aside."""
    out: list[dict] = []
    for m in messages:
        stats = m.get("stats") if m["role"] == "assistant" else None
        if stats and stats.get("notice"):
            out.append(_notice_aside(stats["notice"]))
        out.append({"role": m["role"], "content": m["content"]})
        if stats:
            out.append(
                {
                    "role": "assistant",
                    "content": format_stats_line(stats),
                    "metadata": {"title": _stats_title(stats), "status": "done"},
                }
            )
    if streaming is not None:
        if notice:
            out.append(_notice_aside(notice))
        out.append({"role": "assistant", "content": streaming + CURSOR})
    return out


def _notice_aside(notice: str) -> dict:
    return {
        "role": "assistant",
        "content": "The conversation no longer fits the model's context: the oldest turns were left out "
        "of the prompt for this reply (they stay visible here).",
        "metadata": {"title": f"ℹ {notice}", "status": "done"},
    }


# --- the Stats tab ---------------------------------------------------------------------


def _records(messages: list[dict]) -> list[dict]:
    return [m["stats"] for m in messages if m["role"] == "assistant" and m.get("stats")]


def turns_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for i, r in enumerate(records, 1):
        spec = r["mode"] == "speculative"
        rows.append(
            {
                "turn": i,
                "mode": r["mode"],
                "K": str(r["k"]) if spec else "—",
                "K chosen": (r.get("k_choice") or "fixed") if spec else "—",
                "tokens": r["new_tokens"],
                "acceptance": _pct(r.get("acceptance_rate")) if spec else "—",
                "accepted/round": "—"
                if r.get("mean_accepted_per_round") is None
                else f"{r['mean_accepted_per_round']:.2f}",
                "tok/s": f"{r.get('tokens_per_s') or 0:.1f}",
                "speedup": "n/a" if r.get("speedup") is None else f"{r['speedup']:.2f}×",
                "stop": r.get("stop_reason") or "",
            }
        )
    columns = ["turn", "mode", "K", "K chosen", "tokens", "acceptance", "accepted/round", "tok/s", "speedup", "stop"]
    return pd.DataFrame(rows, columns=columns)


def per_turn_figure(records: list[dict]):
    """Acceptance rate (left axis) and speedup (right axis) of every reply in the conversation."""
    from matplotlib.figure import Figure  # no pyplot: thread-safe, no GUI backend
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = Figure(figsize=(6.4, 4.2), dpi=100)  # a fixed layout: constrained layout doubles the drawing time
    fig.subplots_adjust(left=0.12, right=0.88, top=0.92, bottom=0.12)
    ax = fig.subplots()
    right = ax.twinx()
    acc = [(i, r["acceptance_rate"]) for i, r in enumerate(records, 1) if r.get("acceptance_rate") is not None]
    spd = [(i, r["speedup"], r["mode"]) for i, r in enumerate(records, 1) if r.get("speedup") is not None]
    if acc:
        ax.plot(*zip(*acc), color="#16a34a", marker="o", lw=2, label="acceptance rate (left)")
    if spd:
        right.plot([x for x, _, _ in spd], [y for _, y, _ in spd], color="#4f46e5", lw=2, label="speedup (right)")
        for mode, marker in (("speculative", "s"), ("standard", "D")):
            pts = [(x, y) for x, y, m in spd if m == mode]
            if pts:
                right.scatter(*zip(*pts), color="#4f46e5" if mode == "speculative" else "white", edgecolor="#4f46e5",
                              marker=marker, s=45, zorder=3, label=f"{mode} reply")  # fmt: skip
    right.axhline(1.0, color="#64748b", ls="--", lw=1)
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    right.set_ylim(0, max([2.0] + [y * 1.15 for _, y, _ in spd]))
    ax.set_xlim(0.5, max(1, len(records)) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("reply in this conversation")
    ax.set_ylabel("acceptance rate", color="#16a34a")
    right.set_ylabel("speedup vs standard decoding (×)", color="#4f46e5")
    ax.set_title("Per reply: acceptance rate and speedup", fontsize=10)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no replies yet", ha="center", va="center", transform=ax.transAxes, color="#64748b")
    return fig


def theory_figure(records: list[dict], cost_ratio: float, default_k: int):
    """Expected speedup vs acceptance rate for the measured c and the Ks used, with the measured turns."""
    from matplotlib.figure import Figure  # no pyplot: thread-safe, no GUI backend

    spec = [r for r in records if r["mode"] == "speculative" and r.get("k")]
    ks = sorted({int(r["k"]) for r in spec})[-4:] or [int(default_k)]
    fig = Figure(figsize=(7.2, 4.2), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.12)
    ax = fig.subplots()
    grid = [i / 100 for i in range(101)]
    colors = ["#4f46e5", "#059669", "#ea580c", "#db2777"]
    for color, k in zip(colors, ks):
        ax.plot(grid, [expected_speedup(a, k, cost_ratio) for a in grid], color=color, lw=2, label=f"theory, K={k}")
        points = [
            r
            for r in spec
            if int(r["k"]) == k and r.get("acceptance_rate") is not None and r.get("speedup") is not None
        ]
        if points:
            ax.scatter(
                [r["acceptance_rate"] for r in points], [r["speedup"] for r in points],
                color=color, edgecolor="black", s=55, zorder=3, label=f"measured turns, K={k}",
            )  # fmt: skip
    ax.axhline(1.0, color="#64748b", ls="--", lw=1, label="standard decoding (1×)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("acceptance rate a")
    ax.set_ylabel("speedup vs standard decoding")
    ax.set_title(f"Measured vs theoretical speedup: S(a) = (1 − a^(K+1)) / ((1 − a)(1 + K·c)), c = {cost_ratio:.3f}",
                 fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def stats_summary(service: Any, records: list[dict]) -> str:
    if service is None:
        return "The models are not loaded."
    tracker = service.tracker
    a, c = tracker.acceptance_rate, tracker.cost_ratio
    measured = bool(tracker.draft_forwards and tracker.verify_forwards)
    c_text = (
        f"**c = {c:.3f}** (draft step {1000 * tracker.draft_s / tracker.draft_forwards:.2f} ms ÷ verify step "
        f"{1000 * tracker.verify_s / tracker.verify_forwards:.2f} ms, measured on this machine)"
        if measured
        else f"**c = {c:.3f}** (prior: no speculative reply measured yet)"
    )
    a_text = (
        f"**a = {a:.3f}** over {tracker.drafted} drafted tokens (all users, this session of the server)"
        if tracker.drafted
        else f"**a = {a:.3f}** (prior)"
    )
    k = best_k(min(a, 0.99), c)
    n_spec = sum(r["mode"] == "speculative" for r in records)
    return (
        f"Running acceptance rate {a_text} · draft/verify cost ratio {c_text}.\n\n"
        f"For these, the best K is **{k}** (expected speedup {expected_speedup(min(a, 0.99), k, c):.2f}×); "
        f"auto K picks it. This conversation: {len(records)} replies, {n_spec} speculative."
    )


# --- settings -------------------------------------------------------------------------


def decoding_settings(
    settings: Settings, mode, k, auto_k, temperature, top_p, top_k, max_new_tokens, seed, system
) -> DecodingSettings:
    """The sidebar's values as validated DecodingSettings (never written to settings.toml)."""
    d = settings.decoding

    def as_int(value: Any, default: int) -> int:
        return default if value is None or value == "" else int(round(float(value)))

    def as_float(value: Any, default: float) -> float:
        return default if value is None or value == "" else float(value)

    overrides = {
        "decoding.mode": str(mode or d.mode),
        "decoding.k": as_int(k, d.k),
        "decoding.auto_k": bool(auto_k),
        "decoding.temperature": as_float(temperature, d.temperature),
        "decoding.top_p": as_float(top_p, d.top_p),
        "decoding.top_k": as_int(top_k, d.top_k),
        "decoding.max_new_tokens": as_int(max_new_tokens, d.max_new_tokens),
        "decoding.seed": as_int(seed, d.seed),
        "decoding.system_prompt": "" if system is None else str(system),
    }
    return with_overrides(settings, overrides, source="settings sidebar").decoding


# --- the app ---------------------------------------------------------------------------


class _Out:
    """Handler results by output name; unnamed outputs are left as they are."""

    def __init__(self, components: list[tuple[str, Any]]):
        self.names = [name for name, _ in components]
        self.components = [component for _, component in components]

    def __call__(self, **values: Any) -> tuple:
        unknown = set(values) - set(self.names)
        assert not unknown, unknown
        return tuple(values.get(name, gr.skip()) for name in self.names)


def build_app(service_or_factory: Any, settings: Settings | None = None) -> gr.Blocks:
    """The Blocks app. `service_or_factory`: a ChatService-like object, a ServiceHandle,
    or `factory(progress) -> service` (loaded in a background thread)."""
    settings = settings if settings is not None else load_settings()
    handle = _as_handle(service_or_factory)
    sessions = _Sessions()
    compare_count = itertools.count()
    decode_cache: dict[int, str] = {}
    d = settings.decoding

    def piece(service: Any, token_id: int) -> str:
        text = decode_cache.get(token_id)
        if text is None:
            try:
                text = service.tokenizer.decode([token_id])
            except Exception:
                text = f"<{token_id}>"
            if len(decode_cache) < 200_000:
                decode_cache[token_id] = text
        return text

    def token_view(service: Any, tokens: list) -> list[tuple[str, str]]:
        return [(piece(service, t.id), t.source) for t in tokens]

    with gr.Blocks(title="SpecChat · speculative decoding", analytics_enabled=False, fill_width=True) as demo:
        state = gr.BrowserState(EMPTY_STATE, storage_key=STORAGE_KEY)

        with gr.Sidebar(label="Settings", open=True, width=330, elem_id="settings-sidebar"):
            gr.Markdown("## ⚙ Decoding")
            mode = gr.Radio(["speculative", "standard"], value=d.mode, label="Mode", elem_id="mode",
                            info="standard = the target alone, for comparison")  # fmt: skip
            k = gr.Slider(1, 16, value=d.k, step=1, label="K: draft tokens per round", elem_id="k",
                          interactive=not d.auto_k)  # fmt: skip
            auto_k = gr.Checkbox(value=d.auto_k, label="Auto K (from measured acceptance and cost)", elem_id="auto-k")
            temperature = gr.Slider(0, max(2.0, d.temperature), value=d.temperature, step=0.05,
                                    label="Temperature (0 = greedy)", elem_id="temperature")  # fmt: skip
            top_p = gr.Slider(0.01, 1.0, value=d.top_p, step=0.01, label="Top-p (1 = off)", elem_id="top-p")
            top_k = gr.Slider(0, max(200, d.top_k), value=d.top_k, step=1, label="Top-k (0 = off)", elem_id="top-k")
            max_new_tokens = gr.Slider(1, max(2048, d.max_new_tokens), value=d.max_new_tokens, step=1,
                                       label="Max new tokens", elem_id="max-new-tokens")  # fmt: skip
            seed = gr.Number(value=d.seed, precision=0, minimum=0, label="Seed", elem_id="seed")
            system = gr.Textbox(
                value=d.system_prompt, lines=3, max_lines=8, label="System prompt", elem_id="system-prompt"
            )
            gr.Markdown("Applied to the next reply only; `settings.toml` is never changed.", elem_id="sidebar-note")
        settings_inputs = [system, mode, k, auto_k, temperature, top_p, top_k, max_new_tokens, seed]

        with gr.Column(elem_id="app-header"):
            gr.Markdown(
                "# ⚡ SpecChat\n"
                "An INT8 draft proposes K tokens, the full-precision target verifies them in one pass: "
                "the reply is exactly the target's own, only faster."
            )
            status_md = gr.Markdown(model_status_line(handle), elem_id="model-status")

        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chatbot = gr.Chatbot(
                    label="Chat", show_label=False, height=460, elem_id="chatbot", render_markdown=True,
                    buttons=["copy", "copy_all"], feedback_options=None,
                    placeholder="**Ask anything.** Replies stream round by round; the stats and the "
                    "colored token view below show what the draft contributed.",
                )  # fmt: skip
                notice = gr.Markdown("", elem_id="chat-notice")
                with gr.Row(equal_height=True):
                    message = gr.Textbox(
                        placeholder="Type a message and press Enter (Shift+Enter for a new line)",
                        show_label=False, lines=1, max_lines=10, scale=8, elem_id="chat-input", autofocus=True,
                    )  # fmt: skip
                    send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="send-btn")
                with gr.Row():
                    stop = gr.Button("■ Stop", variant="stop", size="sm", elem_id="stop-btn")
                    regenerate = gr.Button("↻ Regenerate", variant="secondary", size="sm", elem_id="regenerate-btn")
                    clear = gr.Button("✕ Clear", variant="secondary", size="sm", elem_id="clear-btn")
                stats_md = gr.Markdown("*Stats of the last reply appear here.*", elem_id="turn-stats")
                tokens_view = gr.HighlightedText(
                    value=[], label="Tokens of the last reply, by origin", color_map=SOURCE_COLORS,
                    show_legend=True, show_inline_category=False, combine_adjacent=False,
                    elem_id="token-view",
                )  # fmt: skip
                gr.HTML(
                    "<div id='token-legend'>"
                    + "".join(
                        f"<span class='swatch' style='background:{SOURCE_COLORS[s]}'></span><b>{s}</b>: {SOURCE_HELP[s]}"
                        for s in SOURCE_COLORS
                    )
                    + "</div>"
                )

            with gr.Tab("Stats", id="stats") as stats_tab:
                stats_summary_md = gr.Markdown(stats_summary(handle.service, []), elem_id="stats-summary")
                with gr.Row():
                    # Drawn when the tab is opened (matplotlib takes ~0.3 s a figure on a small CPU).
                    turn_plot = gr.Plot(None, show_label=False, elem_id="turn-plot")
                    theory_plot = gr.Plot(None, show_label=False, elem_id="theory-plot")
                turns_table = gr.Dataframe(
                    turns_frame([]), label="Replies in this conversation", interactive=False, elem_id="turns-table"
                )

            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "One prompt, answered by standard decoding and by speculative decoding with the sidebar's "
                    "settings (same seed, same device, fresh caches for each run). The order alternates each click."
                )
                with gr.Row(equal_height=True):
                    cmp_prompt = gr.Textbox(
                        value="Explain speculative decoding in three sentences.", label="Prompt",
                        lines=2, scale=8, elem_id="compare-prompt",
                    )  # fmt: skip
                    with gr.Column(scale=1, min_width=160):
                        cmp_btn = gr.Button("▶ Compare", variant="primary", elem_id="compare-btn")
                        cmp_stop = gr.Button("■ Stop", variant="stop", size="sm", elem_id="compare-stop-btn")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("#### ◎ Standard (target only)")
                        cmp_std = gr.Markdown(
                            "*The standard reply streams here.*",
                            elem_classes=["cmp-pane"],
                            container=True,
                            elem_id="compare-standard",
                        )
                    with gr.Column():
                        gr.Markdown("#### ⚡ Speculative (draft + target)")
                        cmp_spec = gr.Markdown(
                            "*The speculative reply streams here.*",
                            elem_classes=["cmp-pane"],
                            container=True,
                            elem_id="compare-speculative",
                        )
                cmp_table = gr.Dataframe(pd.DataFrame(columns=COMPARE_COLUMNS), label="Measured in this comparison",
                                         interactive=False, elem_id="compare-table")  # fmt: skip
                cmp_verdict = gr.Markdown("", elem_id="compare-verdict")

            with gr.Tab("Model", id="model"):
                model_md = gr.Markdown(model_markdown(handle), elem_id="model-info")

        timer = gr.Timer(1.0, active=handle.status == "loading")

        chat_out = _Out(
            list(zip(CHAT_OUTPUTS, [chatbot, message, state, stats_md, tokens_view, notice, turns_table, stats_summary_md]))
        )  # fmt: skip

        def fail(out: _Out, error: BaseException | str, prefix: str = "", **extra) -> tuple:
            text = _one_line(error)
            line = f"{prefix}{text}"
            gr.Warning(line)
            return out(notice=f"⚠ {line}", **extra)

        def final_outputs(messages: list[dict], **extra) -> tuple:
            records = _records(messages)
            last = records[-1] if records else None
            values = dict(
                chatbot=_render_chat(messages), state={"messages": messages},
                stats=format_stats_line(last) if last else "*Stats of the last reply appear here.*",
                turns_table=turns_frame(records), summary=stats_summary(handle.service, records),
            )  # fmt: skip
            values.update(extra)
            return chat_out(**values)

        def stream_reply(service, session, epoch, messages, turn, notice_text, clear_box):
            """Stream one reply into the chat, then store it (with its stats) in the browser state."""
            session.turn = turn
            pairs: list[tuple[str, str]] = []
            iterator = iter(turn)
            error = None
            try:
                if notice_text:
                    gr.Info(notice_text)
                yield chat_out(
                    chatbot=_render_chat(messages, "", turn.notice), message="" if clear_box else gr.skip(),
                    stats=_live_line(turn),
                    tokens=[], notice=f"ℹ {notice_text}" if notice_text else "",
                )  # fmt: skip
                for event in iterator:
                    pairs.extend(token_view(service, event.tokens))
                    if session.epoch != epoch:  # cleared meanwhile
                        turn.stop()
                        continue
                    yield chat_out(
                        chatbot=_render_chat(messages, turn.text, turn.notice), stats=_live_line(turn), tokens=pairs
                    )
            except Exception as exc:  # the engine failed mid-reply: keep what came, say why
                error = exc
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
                if session.turn is turn:
                    session.turn = None
            if session.epoch != epoch:
                return
            record = stats_record(turn)
            reply = {"role": "assistant", "content": turn.text, "stats": record}
            messages = messages + [reply]
            extra = {"tokens": token_view(service, turn.tokens), "notice": ""}
            if record["stop_reason"] == "stopped":
                extra["notice"] = "■ Stopped: the reply is cut where it was."
            if notice_text:
                extra["notice"] = f"ℹ {notice_text}"
            if error is not None:
                line = f"generation failed: {_one_line(error)}"
                gr.Warning(line)
                extra["notice"] = f"⚠ {line}"
            yield final_outputs(messages, **extra)

        def chat(message, chat_state, system_prompt, mode, k, auto_k, temperature, top_p, top_k, max_new_tokens, seed,
                 request: gr.Request = None):  # fmt: skip
            """Send `message`; streams the reply. `chat_state` is the stored chat ({"messages": [...]})."""
            session = sessions.get(request)
            messages = _clean_state(chat_state)["messages"]
            text = message or ""
            if not text.strip():
                yield fail(chat_out, "the message is empty: type something first")
                return
            try:
                service = handle.require()
                decoding = decoding_settings(
                    settings, mode, k, auto_k, temperature, top_p, top_k, max_new_tokens, seed, system_prompt
                )
                messages = messages + [{"role": "user", "content": text}]
                turn = service.start_turn(_history(messages), decoding)
            except (ValueError, UnavailableError) as exc:  # too long, bad settings, not loaded
                yield fail(chat_out, exc, "Not sent: ", message=text)
                return
            except Exception as exc:
                yield fail(chat_out, f"{type(exc).__name__}: {_one_line(exc)}", "Not sent: ", message=text)
                return
            yield from stream_reply(service, session, session.epoch, messages, turn, turn.notice, True)

        def regen(chat_state, system_prompt, mode, k, auto_k, temperature, top_p, top_k, max_new_tokens, seed,
                  request: gr.Request = None):  # fmt: skip
            """Answer the last user message again (the last reply is replaced)."""
            session = sessions.get(request)
            messages = _clean_state(chat_state)["messages"]
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if not messages:
                yield fail(chat_out, "nothing to regenerate yet")
                return
            try:
                service = handle.require()
                decoding = decoding_settings(
                    settings, mode, k, auto_k, temperature, top_p, top_k, max_new_tokens, seed, system_prompt
                )
                turn = service.start_turn(_history(messages), decoding)
            except (ValueError, UnavailableError) as exc:
                yield fail(chat_out, exc, "Cannot regenerate: ")
                return
            except Exception as exc:
                yield fail(chat_out, f"{type(exc).__name__}: {_one_line(exc)}", "Cannot regenerate: ")
                return
            yield from stream_reply(service, session, session.epoch, messages, turn, turn.notice, False)

        def stop_fn(request: gr.Request = None) -> str:
            """Stop this session's running reply after its current round."""
            session = sessions.get(request)
            turn = session.turn
            if turn is None:
                return "Nothing is being generated."
            try:
                turn.stop()
            except Exception as exc:
                return f"⚠ Stop failed: {_one_line(exc)}"
            return "■ Stopping after the current round…"

        def clear_fn(request: gr.Request = None) -> tuple:
            """Forget the conversation (stops a running reply)."""
            session = sessions.get(request)
            session.epoch += 1
            if session.turn is not None:
                session.turn.stop()
            return final_outputs([], tokens=[], notice="")

        def restore(chat_state) -> tuple:
            """Show the chat stored in the browser (on page load)."""
            try:
                messages = _clean_state(chat_state)["messages"]
                return final_outputs(messages, tokens=[], notice="")
            except Exception as exc:
                return chat_out(notice=f"⚠ Could not restore the saved chat: {_one_line(exc)}", state=EMPTY_STATE)

        cmp_out = _Out(list(zip(COMPARE_OUTPUTS, [cmp_std, cmp_spec, cmp_table, cmp_verdict])))

        def compare(prompt, system_prompt, k, auto_k, temperature, top_p, top_k, max_new_tokens, seed,
                    request: gr.Request = None):  # fmt: skip
            """Answer `prompt` with standard and with speculative decoding, one after the other; compare."""
            session = sessions.get(request)
            if not (prompt or "").strip():
                gr.Warning("the prompt is empty")
                yield cmp_out(verdict="⚠ The prompt is empty.")
                return
            try:
                service = handle.require()
                runs = {
                    m: decoding_settings(
                        settings, m, k, auto_k, temperature, top_p, top_k, max_new_tokens, seed, system_prompt
                    )
                    for m in ("standard", "speculative")
                }
            except (ValueError, UnavailableError) as exc:
                gr.Warning(_one_line(exc))
                yield cmp_out(verdict=f"⚠ {_one_line(exc)}")
                return
            order = ("standard", "speculative") if next(compare_count) % 2 == 0 else ("speculative", "standard")
            texts = {"standard": "", "speculative": ""}
            turns: dict[str, Any] = {}
            history = [{"role": "user", "content": prompt}]
            yield cmp_out(
                standard="", speculative="", table=None, verdict=f"Running {order[0]} first, then {order[1]}…"
            )
            error = None
            for m in order:
                try:
                    turn = service.start_turn(history, runs[m])  # a fresh Generation: fresh caches
                except Exception as exc:
                    error = exc
                    break
                turns[m] = turn
                session.turn = turn
                iterator = iter(turn)
                try:
                    for _ in iterator:
                        texts[m] = turn.text
                        yield cmp_out(**{m: turn.text + CURSOR})
                except Exception as exc:
                    error = exc
                finally:
                    close = getattr(iterator, "close", None)
                    if close is not None:
                        close()
                    if session.turn is turn:
                        session.turn = None
                texts[m] = turn.text
                if error is not None or turn.stats.stop_reason == "stopped":
                    break
            yield cmp_out(
                standard=texts["standard"], speculative=texts["speculative"],
                table=compare_frame(turns, order), verdict=compare_verdict(turns, order, runs["speculative"], error),
            )  # fmt: skip

        stats_out = _Out(list(zip(STATS_OUTPUTS, [turn_plot, theory_plot, turns_table, stats_summary_md])))

        def stats_fn(chat_state, k) -> tuple:
            """The Stats tab for the stored chat: per-reply plot, theory plot, table, summary."""
            try:
                records = _records(_clean_state(chat_state)["messages"])
                service = handle.service
                c = service.tracker.cost_ratio if service is not None else 0.3
                return stats_out(
                    turn_plot=per_turn_figure(records), theory_plot=theory_figure(records, c, int(k or d.k)),
                    turns_table=turns_frame(records), summary=stats_summary(service, records),
                )  # fmt: skip
            except Exception as exc:
                gr.Warning(f"cannot draw the stats: {_one_line(exc)}")
                return stats_out(summary=f"⚠ Cannot draw the stats: {_one_line(exc)}")

        def tick():
            status = handle.status
            return model_markdown(handle), model_status_line(handle), gr.Timer(active=status == "loading")

        # --- wiring ---
        # One slot for every model call; the queue shows waiting users their position on the chat / the panes.
        gen = dict(concurrency_limit=1, concurrency_id=GENERATION, show_progress="full")
        chat_event = gr.on(
            [send.click, message.submit], chat, [message, state, *settings_inputs], chat_out.components,
            api_name="chat", show_progress_on=[chatbot], **gen,
        )  # fmt: skip
        regenerate.click(regen, [state, *settings_inputs], chat_out.components, api_name="regenerate",
                         show_progress_on=[chatbot], **gen)  # fmt: skip
        stop.click(stop_fn, None, notice, api_name="stop", queue=False)
        cmp_stop.click(stop_fn, None, cmp_verdict, api_visibility="private", queue=False)
        clear.click(clear_fn, None, chat_out.components, api_name="clear", queue=False)
        cmp_args = [cmp_prompt, system, k, auto_k, temperature, top_p, top_k, max_new_tokens, seed]
        gr.on([cmp_btn.click, cmp_prompt.submit], compare, cmp_args, cmp_out.components, api_name="compare",
              show_progress_on=[cmp_std, cmp_spec], **gen)  # fmt: skip
        demo.load(restore, [state], chat_out.components, api_name="restore", queue=False)
        stats_tab.select(stats_fn, [state, k], stats_out.components, api_name="stats", queue=False)
        demo.load(tick, None, [model_md, status_md, timer], api_visibility="private", queue=False)

        def model_info() -> str:
            """The Model tab's text: both models, compatibility, load time (or the load progress/error)."""
            return model_markdown(handle)

        gr.api(model_info, api_name="model_info", queue=False)
        timer.tick(tick, None, [model_md, status_md, timer], api_visibility="private", queue=False)

        def sync_k(mode_v, auto_v):
            speculative = mode_v == "speculative"
            return gr.update(interactive=speculative and not auto_v), gr.update(interactive=speculative)

        gr.on([mode.change, auto_k.change], sync_k, [mode, auto_k], [k, auto_k], api_visibility="private", queue=False)
        demo.queue(default_concurrency_limit=1)
        demo.specchat_handle = handle  # for tests and serve()
        demo.specchat_chat_event = chat_event
    return demo


# --- the comparison -------------------------------------------------------------------


def compare_frame(turns: dict[str, Any], order: tuple[str, ...]) -> pd.DataFrame:
    std = turns.get("standard")
    std_tps = std.stats.tokens_per_s if std is not None else 0.0
    rows = []
    for m in ("standard", "speculative"):
        turn = turns.get(m)
        if turn is None:
            rows.append([m, "—", "—", "—", "—", "—", "—"])
            continue
        s = turn.stats
        speed = "—"
        if s.tokens_per_s and std_tps:
            speed = f"{s.tokens_per_s / std_tps:.2f}×"
        rows.append(
            [
                m, "1st" if order[0] == m else "2nd", s.new_tokens, f"{s.wall_s:.2f}", f"{s.tokens_per_s:.1f}",
                _pct(s.acceptance_rate) if m == "speculative" else "—", speed,
            ]
        )  # fmt: skip
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)


def compare_verdict(
    turns: dict[str, Any], order: tuple[str, ...], decoding: DecodingSettings, error: Exception | None
) -> str:
    lines = [f"**Order this time:** {order[0]} first, then {order[1]} (it alternates each click)."]
    if error is not None:
        lines.append(f"⚠ The comparison failed: {_one_line(error)}")
    std, spec = turns.get("standard"), turns.get("speculative")
    if std is None or spec is None or "stopped" in (std.stats.stop_reason, spec.stats.stop_reason):
        lines.append("The comparison is incomplete (stopped or failed); the table shows what ran.")
        return "\n\n".join(lines)
    ratio = spec.stats.tokens_per_s / std.stats.tokens_per_s if std.stats.tokens_per_s else None
    if ratio is not None:
        lines.append(
            f"**Speedup:** {ratio:.2f}× ({spec.stats.tokens_per_s:.1f} vs {std.stats.tokens_per_s:.1f} tok/s, "
            f"K = {spec.stats.k} ({spec.k_choice}), acceptance {_pct(spec.stats.acceptance_rate)})."
        )
    if decoding.temperature == 0:
        std_ids, spec_ids = [t.id for t in std.tokens], [t.id for t in spec.tokens]
        if std_ids == spec_ids and std.text == spec.text:
            lines.append(
                f"✔ **Identical:** at temperature 0 both replies are the same {len(std_ids)} tokens, "
                "as speculative decoding guarantees."
            )
        else:
            first = next(
                (i for i, (a, b) in enumerate(zip(std_ids, spec_ids)) if a != b), min(len(std_ids), len(spec_ids))
            )
            lines.append(
                f"✘ **Different:** at temperature 0 the replies should be identical but differ from token {first} on "
                "(a bug: please report it)."
            )
    else:
        lines.append(
            f"At temperature {decoding.temperature:g} both runs sample the target's distribution with seed "
            f"{decoding.seed}, but they draw their random numbers differently, so the texts may differ."
        )
    return "\n\n".join(lines)


# --- launching ---------------------------------------------------------------------------


def launch_app(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
               open_browser: bool = False, prevent_thread_lock: bool = False, quiet: bool = False):  # fmt: skip
    """Launch with the app's theme and CSS; binds `host` only (127.0.0.1 unless asked)."""
    return demo.launch(
        server_name=host, server_port=port, share=share, inbrowser=open_browser,
        prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=False,
        theme=theme(), css=CSS,
    )  # fmt: skip


def _load_service(settings: Settings, progress: Callable[[str], None]):
    from .models import load_pair
    from .service import ChatService

    pair = load_pair(settings.model, progress=progress)
    service = ChatService(pair)
    progress("measuring standard decoding on this machine (the speedup baseline)")
    rate = service.calibrate()
    progress(
        f"ready: loaded in {pair.load_s:.1f} s; standard decoding runs at "
        + ("an unmeasured rate" if rate is None else f"{rate:.1f} tok/s")
    )
    return service


def serve(settings: Settings) -> int:
    """`main.py serve`: bring the UI up at once and load the models behind it."""
    server = settings.server
    handle = ServiceHandle(factory=lambda progress: _load_service(settings, progress), echo=True).start()
    demo = build_app(handle, settings)
    try:
        launch_app(demo, host=server.host, port=server.port, share=server.share, open_browser=server.open_browser)
    except KeyboardInterrupt:
        pass
    except OSError as error:  # port taken, host not bindable
        print(f"error: cannot start the web server on {server.host}:{server.port}: {_one_line(error)}", file=sys.stderr)
        return 1
    finally:
        try:
            demo.close()
        except Exception:
            pass
    if handle.status == "loading":
        # Interrupted mid-load: the loader thread may be inside torch, which aborts
        # noisily at interpreter exit; leave at once instead.
        print("interrupted while loading the models", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    return 0 if handle.status != "error" else 2
