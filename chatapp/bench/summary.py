"""From run records to figures: per-configuration summaries, speedups, the theory.

Contract: pure functions over the run records of runs.run_config (plain
dicts) and the micro measurements: `summarize` groups runs by configuration
label into medians, min–max and pooled acceptance; `speedups` and
`paired_vs_standard` compare with standard decoding and hf-generate at the
same temperature; `theory` sets the measured speedups beside the
speculative-decoding theory (stats.py) at the measured a and step costs;
`correctness` counts greedy outputs identical to standard's. No I/O, no
models, no verdicts (goals.py judges).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

from ..stats import expected_speedup, expected_tokens_per_round
from .runs import Config


def spread(values: Iterable[float | None]) -> dict | None:
    """{median, min, max, n} of the values that are not None; None when there are none."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# Per-run figures summarized as spreads, by record key.
SPREAD_KEYS = (
    "tokens_per_s",
    "decode_tokens_per_s",
    "wall_s",
    "new_tokens",
    "acceptance_rate",
    "mean_accepted_per_round",
    "draft_step_s",
    "verify_step_s",
    "peak_rss_bytes",
)


def summarize(runs: Sequence[dict]) -> dict[str, dict]:
    """Per configuration label: medians and min-max of every per-run figure, pooled acceptance."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["config"], []).append(run)
    summary = {}
    for label, items in groups.items():
        first = items[0]
        drafted = sum(r.get("drafted") or 0 for r in items)
        accepted = sum(r.get("accepted") or 0 for r in items)
        rounds = sum(r.get("rounds") or 0 for r in items)
        entry = {
            "mode": first["mode"],
            "k": first["k"] if first["mode"] == "speculative" else 0,
            "temperature": first["temperature"],
            "runs": len(items),
            **{key: spread(r.get(key) for r in items) for key in SPREAD_KEYS},
            "pooled_acceptance_rate": accepted / drafted if drafted else None,
            "alpha": _alpha(items),
            "pooled_accepted_per_round": accepted / rounds if rounds else None,
            "time_split": _time_split(items),
        }
        if first["mode"] == "auto-k":
            entry["chosen_k"] = sorted(r["k"] for r in items)  # 0: auto K chose standard decoding
        summary[label] = entry
    return summary


def _alpha(items: Sequence[dict]) -> float | None:
    """The per-token acceptance rate a (the theory's), pooled over runs: accepted / (accepted +
    rejected), rejected = rounds that ended at a rejected draft. accepted/drafted understates it:
    drafts after a rejection are never checked. None when the runs do not count rejections."""
    if not items or not all(r.get("rejected") is not None for r in items):
        return None
    accepted = sum(r.get("accepted") or 0 for r in items)
    checked = accepted + sum(r["rejected"] for r in items)
    return accepted / checked if checked else None


def theory_a(entry: dict) -> float | None:
    """The a the theory uses: the per-token estimate when the runs allow it, else accepted/drafted."""
    return entry.get("alpha") if entry.get("alpha") is not None else entry.get("pooled_acceptance_rate")


def _time_split(items: Sequence[dict]) -> dict | None:
    """Where our engine's wall time went: the median over runs of each share (prefill, draft,
    target, and the rest: sampling, bookkeeping, Python). Medians, so one run slowed by
    other processes does not dominate."""
    if not all("prefill_s" in r and r["wall_s"] > 0 for r in items):
        return None
    shares: dict[str, list[float]] = {"prefill": [], "draft": [], "target": [], "other": []}
    for r in items:
        wall = r["wall_s"]
        shares["prefill"].append(r["prefill_s"] / wall)
        shares["draft"].append(r["draft_s"] / wall)
        shares["target"].append(r["target_s"] / wall)
        shares["other"].append(max(0.0, wall - r["prefill_s"] - r["draft_s"] - r["target_s"]) / wall)
    return {name: statistics.median(values) for name, values in shares.items()}


def mode_label(mode: str, temperature: float) -> str:
    """The label of a mode without K (standard, auto-k, hf-generate, hf-assisted) at `temperature`."""
    return Config(mode, 0, temperature).label


def standard_label(temperature: float) -> str:
    return mode_label("standard", temperature)


def median_of(summary: dict, label: str | None, key: str) -> float | None:
    """The median of figure `key` for configuration `label`; None when not measured."""
    entry = summary.get(label) if label else None
    value = entry.get(key) if entry else None
    return value["median"] if value else None


def median_tps(summary: dict, label: str | None) -> float | None:
    return median_of(summary, label, "tokens_per_s")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def speedups(summary: dict) -> dict[str, dict]:
    """Per configuration: median tokens/s over the median of standard and of hf-generate at its temperature."""
    out = {}
    for label, entry in summary.items():
        t = entry["temperature"]
        tps = median_tps(summary, label)
        out[label] = {
            "vs_standard": _ratio(tps, median_tps(summary, standard_label(t))),
            "vs_hf_generate": _ratio(tps, median_tps(summary, mode_label("hf-generate", t))),
            "decode_vs_standard": _ratio(
                median_of(summary, label, "decode_tokens_per_s"),
                median_of(summary, standard_label(t), "decode_tokens_per_s"),
            ),
        }
    return out


def paired_vs_standard(runs: Sequence[dict]) -> dict[str, float]:
    """Per configuration: the median over prompts (and repeats) of its tokens/s over standard's on the
    same prompt, repeat and temperature. Runs of one prompt are close in time, so load from other
    processes that comes and goes cancels out better than in the ratio of medians."""
    standard = {
        (r["prompt_id"], r.get("repeat", 0), r["temperature"]): r["tokens_per_s"]
        for r in runs
        if r["mode"] == "standard"
    }
    ratios: dict[str, list[float]] = {}
    for r in runs:
        base = standard.get((r["prompt_id"], r.get("repeat", 0), r["temperature"]))
        if base:
            ratios.setdefault(r["config"], []).append(r["tokens_per_s"] / base)
    return {label: statistics.median(values) for label, values in ratios.items()}


def best_fixed_k(summary: dict, temperature: float) -> str | None:
    """The label of the fastest speculative configuration (median tokens/s) at `temperature`."""
    labels = [
        label
        for label, e in summary.items()
        if e["mode"] == "speculative" and e["temperature"] == temperature and e["tokens_per_s"]
    ]
    return max(labels, key=lambda label: summary[label]["tokens_per_s"]["median"]) if labels else None


def theory(summary: dict, micro: dict) -> dict[str, dict]:
    """Per speculative configuration: theoretical speedups from the measured a and step costs.

    simple:      E / (1 + K c),                 c = draft step / target step
    with_verify: E * step / (K draft + verify(K+1 tokens))
    E = (1 - a^(K+1)) / (1 - a), a = the configuration's pooled acceptance rate.
    """
    step, draft = micro.get("target_step_s"), micro.get("draft_step_s")
    ratios = speedups(summary)
    out = {}
    for label, entry in summary.items():
        a = theory_a(entry)
        if entry["mode"] != "speculative" or a is None or not step or draft is None:
            continue
        k = entry["k"]
        verify = micro.get("verify_s", {}).get(str(k))
        e = expected_tokens_per_round(a, k)
        simple = expected_speedup(a, k, draft / step)
        with_verify = e * step / (k * draft + verify) if verify else None
        measured = ratios[label]["vs_standard"]
        out[label] = {
            "measured_decode": ratios[label]["decode_vs_standard"],
            "with_verify_in_run_costs": _in_run_theory(summary, label, e),
            "k": k,
            "temperature": entry["temperature"],
            "a": a,
            "accepted_over_drafted": entry["pooled_acceptance_rate"],
            "expected_tokens": e,
            "c": draft / step,
            "verify_s": verify,
            "simple": simple,
            "with_verify": with_verify,
            "measured": measured,
            "measured_over_simple": _ratio(measured, simple),
            "measured_over_with_verify": _ratio(measured, with_verify),
        }
    return out


def _in_run_theory(summary: dict, label: str, expected_tokens: float) -> float | None:
    """The verify-cost formula from the costs the runs themselves measured (a diagnostic):
    standard's per-step target time, this configuration's draft step and verify forward."""
    entry = summary[label]
    run_step = median_of(summary, standard_label(entry["temperature"]), "verify_step_s")
    run_draft, run_verify = median_of(summary, label, "draft_step_s"), median_of(summary, label, "verify_step_s")
    if not run_step or run_draft is None or not run_verify:
        return None
    return expected_tokens * run_step / (entry["k"] * run_draft + run_verify)


def correctness(runs: Sequence[dict]) -> dict:
    """At T=0: how many runs of each mode produced exactly the standard run's tokens for the same prompt."""
    reference = {
        (r["prompt_id"], r.get("repeat", 0)): r["token_ids"]
        for r in runs
        if r["mode"] == "standard" and r["temperature"] == 0
    }
    out: dict[str, list[int]] = {}
    for r in runs:
        if r["temperature"] != 0 or r["mode"] == "standard" or "token_ids" not in r:
            continue
        ref = reference.get((r["prompt_id"], r.get("repeat", 0)))
        if ref is None:
            continue
        same, total = out.setdefault(r["mode"], [0, 0])
        out[r["mode"]] = [same + (r["token_ids"] == ref), total + 1]
    return out
