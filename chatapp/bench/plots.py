"""The bench's PNG plots: acceptance and speedup vs K, measured vs theory, tokens/s.

Contract: `plot(result, out, progress)` draws from a finished result's
summary and theory rows into `out` and returns the files written; none
(and a progress line) when matplotlib is missing. matplotlib is imported
here, lazily: it is slow to import and only the plots need it, so the rest
of the bench (and its tests of figures) never pays for it.
"""

from __future__ import annotations

from pathlib import Path

from ..models import Progress
from .goals import GOALS
from .options import MODES
from .report import ordered_labels


def plot(result: dict, out: Path, progress: Progress) -> list[Path]:
    """The PNG plots (matplotlib, Agg); none if matplotlib is missing."""
    try:
        import matplotlib  # lazy: slow to import, and only the plots need it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed: no plots")
        return []
    summary, rows = result["summary"], result["theory"]
    temps = sorted({e["temperature"] for e in summary.values()})
    spec = {t: _speculative_by_k(summary, t) for t in temps}
    files = []
    if any(spec.values()):
        files.append(_acceptance_vs_k(plt, summary, temps, spec, out / "acceptance_vs_k.png"))
        files.append(_speedup_vs_k(plt, rows, temps, spec, out / "speedup_vs_k.png"))
    if rows:
        files.append(_measured_vs_theory(plt, rows, out / "measured_vs_theory.png"))
    if summary:
        files.append(_tokens_per_s(plt, summary, out / "tokens_per_s.png"))
    return files


def _speculative_by_k(summary: dict, temperature: float) -> list[tuple[int, str]]:
    """(K, label) of the speculative configurations at `temperature`, by K."""
    return sorted(
        (e["k"], label)
        for label, e in summary.items()
        if e["mode"] == "speculative" and e["temperature"] == temperature
    )


def _acceptance_vs_k(plt, summary: dict, temps: list[float], spec: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, t in enumerate(temps):
        if not spec[t]:
            continue
        ks = [k for k, _ in spec[t]]
        accepted = [summary[label]["pooled_acceptance_rate"] for _, label in spec[t]]
        ax.plot(ks, accepted, "o-", color=f"C{i}", label=f"accepted/drafted T={t:g}")
        alphas = [summary[label].get("alpha") for _, label in spec[t]]
        if all(x is not None for x in alphas):
            ax.plot(ks, alphas, "s--", color=f"C{i}", alpha=0.7, label=f"per-token a T={t:g}")
    ax.set(xlabel="K (draft tokens per round)", ylabel="acceptance", title="Acceptance vs K", ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def _speedup_vs_k(plt, rows: dict, temps: list[float], spec: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, t in enumerate(temps):
        labels = [label for _, label in spec[t] if label in rows]
        if not labels:
            continue
        ks = [rows[label]["k"] for label in labels]
        color = f"C{i}"
        ax.plot(ks, [rows[label]["measured"] for label in labels], "o-", color=color, label=f"measured T={t:g}")
        decode = [rows[label].get("measured_decode") for label in labels]
        if all(x is not None for x in decode):
            ax.plot(ks, decode, "^-.", color=color, alpha=0.7, label=f"measured, decode only T={t:g}")
        with_verify = [rows[label]["with_verify"] for label in labels]
        ax.plot(ks, with_verify, "s--", color=color, alpha=0.7, label=f"theory (verify cost) T={t:g}")
        simple = [rows[label]["simple"] for label in labels]
        ax.plot(ks, simple, ":", color=color, alpha=0.7, label=f"theory E/(1+Kc) T={t:g}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="K", ylabel="speedup over our standard", title="Speedup vs K")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _measured_vs_theory(plt, rows: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    both = [r for r in rows.values() if r["with_verify"] and r["measured"]]
    xs, ys = [r["with_verify"] for r in both], [r["measured"] for r in both]
    ax.scatter(xs, ys)
    for r in both:
        ax.annotate(f"K={r['k']} T={r['temperature']:g}", (r["with_verify"], r["measured"]), fontsize=7)
    hi = max(xs + ys + [1.0]) * 1.1
    goal = GOALS["measured_vs_theory"]
    ax.plot([0, hi], [0, hi], color="grey", lw=0.8, label="measured = theory")
    ax.plot([0, hi], [0, goal * hi], "--", color="grey", lw=0.8, label=f"{goal:.0%} of theory")
    ax.set(
        xlabel="theoretical speedup (measured a, draft and verify costs)",
        ylabel="measured speedup",
        title="Measured vs theoretical",
        xlim=(0, hi),
        ylim=(0, hi),
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _tokens_per_s(plt, summary: dict, path: Path) -> Path:
    labels = ordered_labels(summary)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels)), 4.5))
    med = [summary[label]["tokens_per_s"]["median"] for label in labels]
    lo = [m - summary[label]["tokens_per_s"]["min"] for m, label in zip(med, labels)]
    hi = [summary[label]["tokens_per_s"]["max"] - m for m, label in zip(med, labels)]
    modes = [summary[label]["mode"] for label in labels]
    colors = [f"C{MODES.index(mode) if mode in MODES else 9}" for mode in modes]
    ax.bar(range(len(labels)), med, yerr=[lo, hi], color=colors, capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="tokens/s (median, min–max)", title="Tokens/s per configuration")
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
