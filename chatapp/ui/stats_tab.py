"""What the Stats tab shows for one conversation: a table of its replies,
two figures (per reply; measured vs theoretical speedup) and a summary of
what auto K currently knows.

Contract: functions of the replies' records (`service.Turn.record()`, as
stored in the browser) and of the service's `tracker` (autok's
AcceptanceTracker); they return a pandas DataFrame, matplotlib Figures (no
pyplot: thread-safe, no GUI backend) or Markdown. No Gradio here.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..stats import expected_speedup
from .format import choice_text, pct

TURN_COLUMNS = ["turn", "mode", "K", "K chosen", "tokens", "acceptance", "accepted/round", "tok/s", "speedup", "stop"]
ACCEPTANCE_COLOR, SPEEDUP_COLOR, BASELINE_COLOR = "#16a34a", "#4f46e5", "#64748b"
THEORY_COLORS = ["#4f46e5", "#059669", "#ea580c", "#db2777"]  # one per K drawn (the last four used)


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


def _plot_speedups(right: Any, records: list[dict]) -> list[float]:
    """The speedup line, with a marker per reply showing its mode; returns the speedups drawn."""
    points = [(i, r["speedup"], r["mode"]) for i, r in enumerate(records, 1) if r.get("speedup") is not None]
    if points:
        right.plot([x for x, _, _ in points], [y for _, y, _ in points], color=SPEEDUP_COLOR, lw=2,
                   label="speedup (right)")
    for mode, marker in (("speculative", "s"), ("standard", "D")):
        pts = [(x, y) for x, y, m in points if m == mode]
        if pts:
            fill = SPEEDUP_COLOR if mode == "speculative" else "white"
            right.scatter(*zip(*pts), color=fill, edgecolor=SPEEDUP_COLOR, marker=marker, s=45, zorder=3,
                          label=f"{mode} reply")
    return [y for _, y, _ in points]


def per_turn_figure(records: list[dict]):
    """Acceptance rate (left axis) and speedup (right axis) of every reply in the conversation."""
    # matplotlib on first use only (the Stats tab opened): importing it adds ~0.6 s to the app's start-up.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = Figure(figsize=(6.4, 4.2), dpi=100)  # a fixed layout: constrained layout doubles the drawing time
    fig.subplots_adjust(left=0.12, right=0.88, top=0.92, bottom=0.12)
    ax = fig.subplots()
    right = ax.twinx()
    acceptance = [(i, r["acceptance_rate"]) for i, r in enumerate(records, 1) if r.get("acceptance_rate") is not None]
    if acceptance:
        ax.plot(*zip(*acceptance), color=ACCEPTANCE_COLOR, marker="o", lw=2, label="acceptance rate (left)")
    speedups = _plot_speedups(right, records)
    right.axhline(1.0, color=BASELINE_COLOR, ls="--", lw=1)
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    right.set_ylim(0, max([2.0] + [y * 1.15 for y in speedups]))
    ax.set_xlim(0.5, max(1, len(records)) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("reply in this conversation")
    ax.set_ylabel("acceptance rate", color=ACCEPTANCE_COLOR)
    right.set_ylabel("speedup vs standard decoding (×)", color=SPEEDUP_COLOR)
    ax.set_title("Per reply: acceptance rate and speedup", fontsize=10)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no replies yet", ha="center", va="center", transform=ax.transAxes, color=BASELINE_COLOR)
    return fig


def theory_figure(records: list[dict], cost_ratio: float, default_k: int):
    """Expected speedup vs acceptance rate for the measured c and the Ks used, with the measured turns."""
    from matplotlib.figure import Figure  # on first use only, as above

    spec = [r for r in records if r["mode"] == "speculative" and r.get("k")]
    ks = sorted({int(r["k"]) for r in spec})[-len(THEORY_COLORS):] or [int(default_k)]
    fig = Figure(figsize=(7.2, 4.2), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.12)
    ax = fig.subplots()
    grid = [i / 100 for i in range(101)]
    for color, k in zip(THEORY_COLORS, ks):
        ax.plot(grid, [expected_speedup(a, k, cost_ratio) for a in grid], color=color, lw=2, label=f"theory, K={k}")
        measured = [r for r in spec if int(r["k"]) == k and r.get("acceptance_rate") is not None
                    and r.get("speedup") is not None]
        if measured:
            ax.scatter([r["acceptance_rate"] for r in measured], [r["speedup"] for r in measured], color=color,
                       edgecolor="black", s=55, zorder=3, label=f"measured turns, K={k}")
    ax.axhline(1.0, color=BASELINE_COLOR, ls="--", lw=1, label="standard decoding (1×)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("acceptance rate a")
    ax.set_ylabel("speedup vs standard decoding")
    formula = "S(a) = (1 − a^(K+1)) / ((1 − a)(1 + K·c))"
    ax.set_title(f"Measured vs theoretical speedup: {formula}, c = {cost_ratio:.3f}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


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
    figures = [_acceptance_text(tracker, samples), _cost_text(tracker, samples), _verify_text(tracker, samples, k),
               _baseline_text(service)]
    return (
        f"**The running figures** come from {_plural(samples['replies'], 'reply')} since the models were loaded "
        "(all users), on top of the calibration at load; step and forward times are windows of recent "
        "measurements, so the calibration's age out.\n\n"
        + "\n".join(f"- {line}" for line in figures)
        + f"\n\n{_auto_k_text(tracker)} This conversation: {_plural(len(records), 'reply')}, {n_spec} speculative."
    )
