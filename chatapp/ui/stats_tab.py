"""What the Stats tab shows for one conversation: a table of its replies,
two plots (per reply; measured vs theoretical speedup) and a summary of
what auto K currently knows.

Contract: functions of the replies' records (`service.Turn.record()`, as
stored in the browser) and of the service's `tracker` (autok's
AcceptanceTracker); they return pandas DataFrames (the table, and the long
frames that Gradio's native plots draw in the browser: zoomable, no image
sent) or Markdown. No Gradio here: the layout says which columns a plot
draws (the *_PLOT constants).

The captions name every series a plot draws, so that they change whenever
the series do: Gradio 6.31's native plot keeps the color legend it was
first drawn with until one of its settings (such as the caption) changes,
so the Stats tab sends the points first and then the caption.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..stats import expected_speedup
from .format import choice_text, pct

TURN_COLUMNS = ["turn", "mode", "K", "K chosen", "tokens", "acceptance", "accepted/round", "tok/s", "speedup", "stop"]
# The plots' long frames: one row per point, the series in a column (the plot's color).
REPLY_PLOT = dict(x="reply", y="value", color="series")
THEORY_PLOT = dict(x="acceptance rate", y="speedup", color="series")
ACCEPTANCE, SPEEDUP, STANDARD = "acceptance rate", "speedup vs standard decoding (×)", "standard decoding (1×)"
REPLY_COLORS = {ACCEPTANCE: "#16a34a", SPEEDUP: "#4f46e5", STANDARD: "#94a3b8"}
# One hue per K drawn (the last four used): the theory light, the measured replies dark.
THEORY_COLORS = [("#a5b4fc", "#3730a3"), ("#6ee7b7", "#065f46"), ("#fdba74", "#9a3412"), ("#f9a8d4", "#9d174d")]
THEORY_STEP = 0.02  # the theory curve's spacing in acceptance rate


def _turn_row(number: int, r: dict) -> list:
    spec = r["mode"] == "speculative"
    per_round = r.get("mean_accepted_per_round")
    return [
        number,
        r["mode"],
        str(r.get("k")) if spec else "—",
        (choice_text(r) or "fixed") if spec else (choice_text(r) or "—"),
        r.get("new_tokens") or 0,
        pct(r.get("acceptance_rate")) if spec else "—",
        "—" if per_round is None else f"{per_round:.2f}",
        f"{r.get('tokens_per_s') or 0:.1f}",
        "n/a" if r.get("speedup") is None else f"{r['speedup']:.2f}×",
        r.get("stop_reason") or "",
    ]


def turns_frame(records: list[dict]) -> pd.DataFrame:
    """One row per reply of the conversation."""
    return pd.DataFrame([_turn_row(i, r) for i, r in enumerate(records, 1)], columns=TURN_COLUMNS)


def reply_frame(records: list[dict]) -> pd.DataFrame:
    """Per reply: its acceptance rate (speculative replies) and its speedup, and the 1× line of standard
    decoding, as (reply, value, series, mode) rows for a line plot."""
    rows = []
    for i, r in enumerate(records, 1):
        if r.get("acceptance_rate") is not None:
            rows.append((i, float(r["acceptance_rate"]), ACCEPTANCE, r["mode"]))
        if r.get("speedup") is not None:
            rows.append((i, float(r["speedup"]), SPEEDUP, r["mode"]))
    if records:
        rows += [(1, 1.0, STANDARD, "standard"), (max(2, len(records)), 1.0, STANDARD, "standard")]
    frame = pd.DataFrame(rows, columns=[REPLY_PLOT["x"], REPLY_PLOT["y"], REPLY_PLOT["color"], "mode"])
    return frame.astype({REPLY_PLOT["x"]: "int64", REPLY_PLOT["y"]: "float64"})  # numbers even when empty


def theory_frame(records: list[dict], cost_ratio: float, default_k: int) -> tuple[pd.DataFrame, dict[str, str]]:
    """The theory's speedup S(a) = (1 − a^(K+1)) / ((1 − a)(1 + K·c)) over the acceptance rate, for the
    measured c and each K used (the last four; `default_k` when none), with the measured speculative
    replies as points beside it; and the color of each series."""
    spec = [r for r in records if r["mode"] == "speculative" and r.get("k")]
    ks = sorted({int(r["k"]) for r in spec})[-len(THEORY_COLORS) :] or [int(default_k)]
    steps = round(1 / THEORY_STEP)
    rows, colors = [], {}
    for (light, dark), k in zip(THEORY_COLORS, ks):
        curve, measured = f"theory, K={k}", f"measured replies, K={k}"
        colors[curve], colors[measured] = light, dark
        rows += [(i / steps, expected_speedup(i / steps, k, cost_ratio), curve) for i in range(steps + 1)]
        rows += [
            (float(r["acceptance_rate"]), float(r["speedup"]), measured)
            for r in spec
            if int(r["k"]) == k and r.get("acceptance_rate") is not None and r.get("speedup") is not None
        ]
    columns = [THEORY_PLOT["x"], THEORY_PLOT["y"], THEORY_PLOT["color"]]
    frame = pd.DataFrame(rows, columns=columns).astype({THEORY_PLOT["x"]: "float64", THEORY_PLOT["y"]: "float64"})
    return frame, colors


ZOOM_HINT = "Drag over the plot to zoom; double-click to see all."


def _count(frame: pd.DataFrame, series: str) -> int:
    return int((frame[REPLY_PLOT["color"]] == series).sum())


def reply_caption(frame: pd.DataFrame) -> str:
    """What the per-reply plot shows, in words that name each series it draws (see plot_captions)."""
    acceptance, speedup = _count(frame, ACCEPTANCE), _count(frame, SPEEDUP)
    if not acceptance and not speedup:
        return "No replies yet."
    return (
        f"Acceptance rate of {_plural(acceptance, 'reply')}, speedup of {speedup} (1× = standard decoding). {ZOOM_HINT}"
    )


def theory_caption(frame: pd.DataFrame, cost_ratio: float) -> str:
    """What the theory plot shows, in words that name each series it draws (see plot_captions)."""
    series = list(dict.fromkeys(frame[THEORY_PLOT["color"]]))
    ks = [name.removeprefix("theory, K=") for name in series if name.startswith("theory")]
    measured = [
        f"{_count(frame, name)} at K = {name.removeprefix('measured replies, K=')}"
        for name in series
        if name.startswith("measured")
    ]
    return (
        f"The theory S(a) = (1 − a^(K+1)) / ((1 − a)(1 + K·c)) for K = {', '.join(ks)} at the measured "
        f"c = {cost_ratio:.3f}; measured replies: "
        f"{', '.join(measured) or 'none yet'}. {ZOOM_HINT}"
    )


def _plural(count: int, word: str) -> str:
    plural = word[:-1] + "ies" if word.endswith("y") and word[-2] not in "aeiou" else word + "s"
    return f"{count} {word if count == 1 else plural}"


def _acceptance_text(tracker: Any, samples: dict) -> str:
    a = tracker.acceptance_rate
    if not tracker.drafted:
        return f"**a = {a:.3f}**: the greedy probe at load (no speculative reply yet)"
    window = samples["turn_rates"]
    weighed = (
        f"auto K weighs the rates of the last {_plural(window, 'reply')}"
        if window >= tracker.MIN_TURNS
        else f"auto K uses this pooled rate until {tracker.MIN_TURNS} replies have rates ({window} so far)"
    )
    return f"**a = {a:.3f}**: {tracker.accepted} of {tracker.accepted + tracker.rejected} checked drafts; {weighed}"


def _cost_text(tracker: Any, samples: dict) -> str:
    c, draft, step = tracker.cost_ratio, tracker.draft_step_s, tracker.target_step_s
    if draft is None or not step:
        return f"**c = {c:.3f}** (prior: draft and target steps not measured yet)"
    steps = samples["forwards"].get(1, 0)
    return (
        f"**c = {c:.3f}**: draft step {1000 * draft:.2f} ms ÷ target step {1000 * step:.2f} ms, medians of the "
        f"last {_plural(samples['draft_steps'], 'draft step')} and {_plural(steps, 'one-token target step')}"
    )


def _verify_text(tracker: Any, samples: dict, k: int) -> str:
    measured = samples["forwards"].get(k + 1, 0)
    how = (
        f"median of the last {_plural(measured, 'measured forward')} of {k + 1} tokens"
        if measured and tracker.target_step_s
        else f"interpolated from the sizes measured, +{tracker.verify_slope:.3f} step per extra token"
    )
    return f"**v({k}) = {tracker.verify_ratio(k):.2f}** target steps to verify {k + 1} tokens: {how}"


def _baseline_text(service: Any) -> str:
    rate = service.baseline.tokens_per_s
    if rate is None:
        return "**baseline**: none yet (it serves only to show drift)"
    return f"**baseline {rate:.1f} tok/s** (drift only, never a speedup): {service.baseline.source}"


def _auto_k_text(tracker: Any) -> str:
    choice = tracker.choose(1, auto=True)  # what auto K would answer for the next reply
    if not choice.speculative:
        return (
            "For these, auto K would decode the next reply the standard way: its best K is expected to reach "
            f"only {choice.expected_speedup:.2f}×."
        )
    return f"For these, auto K would pick **K = {choice.k}** (expected speedup {choice.expected_speedup:.2f}×)."


def stats_summary(service: Any, records: list[dict], k: int | None = None) -> str:
    """Where the running figures come from (all users of this server: a, c, v(K), the baseline, with how
    many replies and measurements each rests on), auto K's pick, and this conversation's counts. `k` is the
    K whose verify cost is shown (default: the last speculative reply's, else 4)."""
    if service is None:
        return "The models are not loaded."
    tracker = service.tracker
    samples = tracker.samples()
    if k is None:
        ks = [int(r["k"]) for r in records if r["mode"] == "speculative" and r.get("k")]
        k = ks[-1] if ks else 4
    n_spec = sum(r["mode"] == "speculative" for r in records)
    figures = [
        _acceptance_text(tracker, samples),
        _cost_text(tracker, samples),
        _verify_text(tracker, samples, k),
        _baseline_text(service),
    ]
    return (
        f"**The running figures** come from {_plural(samples['replies'], 'reply')} since the models were loaded "
        "(all users), on top of the calibration at load; step and forward times are windows of recent "
        "measurements, so the calibration's age out.\n\n"
        + "\n".join(f"- {line}" for line in figures)
        + f"\n\n{_auto_k_text(tracker)} This conversation: {_plural(len(records), 'reply')}, {n_spec} speculative."
    )
