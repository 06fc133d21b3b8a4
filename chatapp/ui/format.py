"""Words for numbers: one reply's stats line, the Model tab, the comparison.

Contract: plain functions from plain data to text. A reply is described by
its record (`service.Turn.record()`: `TurnStats.to_dict()` plus "k_choice",
a `KChoice.to_dict()` or None, and "notice"), which is also what the browser
stores; records saved by the previous version (k_choice a string such as
"fixed" or "auto (a=...)", k None for standard replies) still read. The
service handle, turns and model infos are read by attribute only.

This module imports neither Gradio nor pandas: the CLI prints the same stats
line (`stats_line(record, markdown=False)`) without paying for either.
"""

from __future__ import annotations

import time
from typing import Any

from ..autok import KChoice
from ..errors import megabytes, one_line

CURSOR = " ▌"  # ends a reply that is still streaming
NO_STATS = "*Stats of the last reply appear here.*"
SPEEDUP_METHOD = (
    "**How the speedup is measured:** against standard decoding *timed within the same reply*, on the same "
    "machine under the same load. During each speculative reply the app times a few one-token target steps "
    "(standard decoding's whole work per token: one early in the reply, the rest after its last token, all "
    "left out of the reply's own time). Standard decoding of this reply would have taken the same prefill plus "
    "*new tokens × the median of those steps*; the speedup is that estimate ÷ the reply's wall time. "
    "A standard reply is 1.00× by definition: its rate against earlier standard runs is shown as drift, never "
    "as a speedup. *First token* is the time from the request to the first shown token (the prefill of what "
    "the conversation's cache does not already hold, plus the first round)."
)


# --- one reply ---------------------------------------------------------------------


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _k_choice(record: dict) -> KChoice | None:
    return KChoice.from_dict(record.get("k_choice"))


def _auto_figures(choice: KChoice) -> str:
    """What auto K assumed, e.g. "a=0.93, c=0.31, verify +0.05 step/token, expected 1.85×"."""
    figures = [
        f"{name}={value:.2f}"
        for name, value in (("a", choice.acceptance_rate), ("c", choice.cost_ratio))
        if value is not None
    ]
    if choice.verify_slope is not None:
        figures.append(f"verify +{choice.verify_slope:.2f} step/token")
    if choice.expected_speedup is not None:
        figures.append(f"expected {choice.expected_speedup:.2f}×")
    return ", ".join(figures)


def choice_text(record: dict) -> str:
    """How K was chosen for this reply, in words; "" when nothing chose it
    (a standard reply the user asked for)."""
    raw = record.get("k_choice")
    if isinstance(raw, str):  # saved by the previous version: its own words
        return raw
    choice = KChoice.from_dict(raw)
    if choice is None:
        return ""
    if not choice.auto:
        return "fixed"
    if not choice.speculative:
        expected = "" if choice.expected_speedup is None else f", {choice.expected_speedup:.2f}×"
        return f"auto K: speculation expected to lose{expected}"
    return f"auto: {_auto_figures(choice)}"


def k_text(record: dict) -> str:
    """K and how it was chosen: "K = 4 (fixed)", "K = 6 (auto: a=..., ...)";
    for a standard reply "K n/a", or why auto K chose standard decoding."""
    how = choice_text(record)
    if record["mode"] != "speculative":
        return how or "K n/a"
    return f"K = {record.get('k')} ({how or 'fixed'})"


def _drift_text(record: dict) -> str:
    """A standard reply's rate against earlier standard runs: how much the machine's speed drifts."""
    ratio, baseline = record.get("baseline_ratio"), record.get("baseline_tokens_per_s")
    if ratio is None or not baseline:
        return "no earlier standard run to compare with"
    return f"{ratio:.2f}× the earlier standard runs ({baseline:.1f} tok/s)"


def _speedup_text(record: dict, bold) -> str:
    """The reply against standard decoding. A speculative reply times a few standard steps of its own
    (stats.TurnStats.speedup); a record saved by the previous version was priced by the baseline."""
    if record["mode"] != "speculative" and "baseline_ratio" in record:
        return _drift_text(record)  # its speedup is 1 by definition
    speedup, estimate = record.get("speedup"), record.get("standard_estimate_s")
    if speedup is None:
        return "speedup n/a (standard decoding not timed in this reply)"
    if not estimate:  # a record of the previous version: priced by the load-time baseline
        return f"{bold(f'{speedup:.2f}×')} vs standard decoding ({record.get('baseline_tokens_per_s') or 0:.1f} tok/s)"
    steps = record.get("reference_steps") or 0
    rate = (record.get("new_tokens") or 0) / estimate
    return (
        f"{bold(f'{speedup:.2f}×')} vs standard decoding timed within this reply "
        f"({rate:.1f} tok/s, from {steps} one-token target step{'s' if steps != 1 else ''})"
    )


def first_token_text(record: dict) -> str | None:
    """Time to first token: the prefill plus the first round; None in records that lack it."""
    seconds = record.get("first_token_s")
    return None if seconds is None else f"first token {seconds:.2f} s"


def prefix_text(record: dict) -> str | None:
    """How much of the prompt the conversation's prefix cache held, e.g. "reused 412 of 430 prompt
    tokens"; None in records that lack it."""
    if "prefix_reused" not in record or not record.get("prompt_tokens"):
        return None
    return f"reused {record.get('prefix_reused') or 0} of {record['prompt_tokens']} prompt tokens"


def _head(record: dict, bold, markdown: bool) -> list[str]:
    tps = bold(f"{record.get('tokens_per_s') or 0.0:.1f} tok/s")
    if record["mode"] == "speculative":
        per_round = record.get("mean_accepted_per_round")
        return [
            ("⚡ " if markdown else "") + bold("speculative") + _fallback_text(record),
            k_text(record),
            f"acceptance {bold(pct(record.get('acceptance_rate')))}",
            "n/a accepted/round" if per_round is None else f"{per_round:.2f} accepted/round",
            tps,
            *_present(first_token_text(record)),
            _speedup_text(record, bold),
        ]
    how = choice_text(record)  # auto K may have chosen standard decoding for this reply
    title = ("◎ " if markdown else "") + bold("standard") + f" ({how or 'target only'})"
    return [
        title,
        *([] if how else ["K n/a"]),
        "acceptance n/a",
        tps,
        *_present(first_token_text(record)),
        _speedup_text(record, bold),
    ]


def _fallback_text(record: dict) -> str:
    """Said after "speculative" when the draft failed and the target finished the reply alone."""
    return ", finished in standard mode (the draft failed)" if record.get("fallback") else ""


def _present(*parts: str | None) -> list[str]:
    return [part for part in parts if part]


def _details(record: dict) -> list[str]:
    if record["mode"] == "speculative":
        draft = f"draft INT8 path: {record.get('int8_path') or 'n/a'}"
        if record.get("draft_prefill"):
            draft += f" · draft's prompt keys/values {record['draft_prefill']}"
    else:
        draft = "draft: not used"
    return [
        f"{record.get('new_tokens') or 0} tokens in {record.get('wall_s') or 0.0:.2f} s",
        *_present(prefix_text(record)),
        f"stop: {record.get('stop_reason') or 'n/a'}",
        f"baseline: {record.get('baseline_source') or 'none'}",
        draft,
    ]


def stats_line(record: dict, markdown: bool = True) -> str:
    """One reply's stats: a headline (mode, K, acceptance, speed, speedup) and
    a details line (tokens, time, stop reason, baseline, draft path). Markdown
    for the UI; plain text on two lines for the terminal."""

    def bold(text: str) -> str:
        return f"**{text}**" if markdown else text

    head, details = " · ".join(_head(record, bold, markdown)), " · ".join(_details(record))
    return f"{head}\n\n*{details}*" if markdown else f"{head}\n{details}"


def stats_title(record: dict) -> str:
    """The short title of a reply's collapsed stats aside in the chat."""
    tps = record.get("tokens_per_s") or 0.0
    speedup = record.get("speedup") if record["mode"] == "speculative" else None  # a standard reply is 1×
    speed = "" if speedup is None else f" · {speedup:.2f}× vs standard"
    choice = _k_choice(record)
    if record["mode"] == "speculative":
        how = "" if choice is None else " auto" if choice.auto else " fixed"
        acceptance = pct(record.get("acceptance_rate"))
        then = " → standard" if record.get("fallback") else ""
        return f"⚡ speculative{then} · K={record.get('k')}{how} · {acceptance} accepted · {tps:.1f} tok/s{speed}"
    how = " (auto K)" if choice is not None and choice.auto else ""
    return f"◎ standard{how} · {tps:.1f} tok/s{speed}"


def live_line(stats: Any) -> str:
    """The stats line while a reply streams (from its live TurnStats)."""
    first = "" if stats.first_token_s is None else f" · first token {stats.first_token_s:.2f} s"
    if stats.mode == "speculative":
        return (
            f"generating… speculative · K = {stats.k}{first} · {stats.new_tokens} tokens · "
            f"acceptance so far {pct(stats.acceptance_rate)} · {stats.tokens_per_s:.1f} tok/s"
        )
    return f"generating… standard{first} · {stats.new_tokens} tokens · {stats.tokens_per_s:.1f} tok/s"


# --- the models --------------------------------------------------------------------


def params(count: Any) -> str:
    count = int(count or 0)
    if count >= 1e9:
        return f"{count / 1e9:.2f} B"
    if count >= 1e6:
        return f"{count / 1e6:.1f} M"
    return f"{count:,}"


def cell(value: Any) -> str:
    """A value as one Markdown table cell (no pipes, no line breaks)."""
    return str(value if value not in (None, "") else "—").replace("|", "\\|").replace("\n", " ")


def decode_paths(info: Any) -> str:
    """The load-time timing of a model's candidate decode paths (chatapp.llama.LlamaDecoderLM.from_hf),
    fastest first, e.g. "CPU kernels (avxvnni) 21.9 ms · CPU kernels (avx512) 25.7 ms · torch ops 34.7 ms";
    its reason where it was not timed, "–" where there was nothing to choose."""
    paths = (getattr(info, "extra", None) or {}).get("decode_paths_ms")
    if isinstance(paths, dict) and paths:
        return " · ".join(f"{name} {ms:.1f} ms" for name, ms in sorted(paths.items(), key=lambda item: item[1]))
    return str(paths) if paths else "–"


def _model_table(target: Any, draft: Any) -> str:
    rows = [
        ("Name", target.name, draft.name),
        ("Source", target.source, draft.source),
        ("Weights dtype", target.dtype, draft.dtype),
        ("Quantization", target.quantization, draft.quantization),
        ("Device", target.device, draft.device),
        ("Parameters", params(target.parameters), params(draft.parameters)),
        ("Weight memory", megabytes(target.weight_bytes), megabytes(draft.weight_bytes)),
        ("Implementation", target.implementation, draft.implementation),
        ("Timed at load (target: step + verify of 9)", decode_paths(target), decode_paths(draft)),
    ]
    return "| | Target (verifies) | Draft (proposes) |\n|---|---|---|\n" + "\n".join(
        f"| **{name}** | {cell(t)} | {cell(d)} |" for name, t, d in rows
    )


def _loaded_markdown(service: Any) -> str:
    pair = service.pair
    target, draft = pair.target.info, pair.draft.info
    baseline = service.baseline.tokens_per_s
    lines = [_model_table(target, draft), "", f"**Compatibility:** {cell(pair.compatibility)}"]
    if target.weight_bytes and draft.weight_bytes and draft is not target:
        lines.append(f"**Draft size:** {draft.weight_bytes / target.weight_bytes:.0%} of the target's weight memory")
    lines += [
        f"**Load time:** {pair.load_s:.1f} s",
        f"**Context:** {service.context} tokens",
        "**Standard-decoding baseline:** "
        + ("not measured yet" if baseline is None else f"{baseline:.1f} tok/s — {service.baseline.source}"),
    ]
    for who, info in (("target", target), ("draft", draft)):
        warning = (getattr(info, "extra", None) or {}).get("warning")
        if warning:
            lines.append(f"⚠ **{who}:** {cell(warning)}")
    return "\n\n".join(lines)


def model_markdown(handle: Any) -> str:
    """The Model tab: both models and the baseline, or the load progress or error."""
    if handle.status == "loading":
        lines = "\n".join(f"- {cell(m)}" for m in handle.progress[-8:]) or "- starting…"
        waited = time.perf_counter() - handle.started
        return f"### Loading the models… ({waited:.0f} s)\n\n{lines}"
    if handle.status == "error":
        return (
            "### ✘ The models could not be loaded\n\n"
            f"**{cell(handle.error)}**\n\n"
            "Fix `settings.toml` (or the command-line flags) and restart the app. "
            "The rest of the UI stays up, but chat and compare need the models."
        )
    return _loaded_markdown(handle.service)


def model_status_line(handle: Any) -> str:
    """The one line under the header: the pair, or where loading stands."""
    if handle.status == "loading":
        last = handle.progress[-1] if handle.progress else "starting"
        return f"Loading the models… ({cell(last)})"
    if handle.status == "error":
        return f"✘ Models not loaded: {cell(handle.error)} — see the Model tab"
    pair = handle.service.pair
    t, d = pair.target.info, pair.draft.info
    quant = d.quantization.split(" (")[0]
    target = f"Target **{t.name}** ({t.dtype}, {t.device})"
    return f"{target} · Draft **{d.name}** ({quant}) · {params(t.parameters)} parameters"


PICKER_OFF = (
    "Switching models from the page is off: this server can be reached from other machines, and a switch "
    "would change the pair for every user. Restart it with `--target` / `--draft` or `--preset`."
)


def reload_markdown(job: Any, handle: Any) -> str:
    """Where a swap of the pair (handle.Reload) stands: its progress while it runs; then the pair now
    serving, or the one-line reason it failed and the pair still serving."""
    lines = "\n".join(f"- {cell(m)}" for m in job.progress[-8:]) or "- starting…"
    if not job.done:
        waited = time.perf_counter() - job.started
        return f"**Loading the new pair…** ({waited:.0f} s; the current pair serves meanwhile)\n\n{lines}"
    if job.swapped:
        return f"✔ **Now serving:** {model_status_line(handle)}\n\n{lines}"
    still = model_status_line(handle) if handle.status == "ready" else "nothing (no pair is loaded)"
    return f"✘ **Not loaded:** {cell(job.error)}. Still serving: {still}\n\n{lines}"


# --- the comparison ------------------------------------------------------------------

COMPARE_COLUMNS = ["decoding", "ran", "tokens", "wall time (s)", "tokens/s", "acceptance rate", "speedup"]


def compare_rows(turns: dict[str, Any], order: tuple[str, ...]) -> list[list]:
    """One row per decoding (COMPARE_COLUMNS), "—" for a run that did not happen."""
    std = turns.get("standard")
    std_tps = std.stats.tokens_per_s if std is not None else 0.0
    rows = []
    for mode in ("standard", "speculative"):
        turn = turns.get(mode)
        if turn is None:
            rows.append([mode] + ["—"] * (len(COMPARE_COLUMNS) - 1))
            continue
        s = turn.stats
        speed = f"{s.tokens_per_s / std_tps:.2f}×" if s.tokens_per_s and std_tps else "—"
        acceptance = pct(s.acceptance_rate) if mode == "speculative" else "—"
        ran = "1st" if order[0] == mode else "2nd"
        rows.append([mode, ran, s.new_tokens, f"{s.wall_s:.2f}", f"{s.tokens_per_s:.1f}", acceptance, speed])
    return rows


def _sameness(std: Any, spec: Any, temperature: float, seed: int) -> str:
    """Whether the two replies had to be identical, and whether they are."""
    if temperature != 0:
        return (
            f"At temperature {temperature:g} both runs sample the target's distribution with seed "
            f"{seed}, but they draw their random numbers differently, so the texts may differ."
        )
    std_ids, spec_ids = [t.id for t in std.tokens], [t.id for t in spec.tokens]
    if std_ids == spec_ids and std.text == spec.text:
        return (
            f"✔ **Identical:** at temperature 0 both replies are the same {len(std_ids)} tokens, "
            "as speculative decoding guarantees."
        )
    first = next((i for i, (a, b) in enumerate(zip(std_ids, spec_ids)) if a != b), min(len(std_ids), len(spec_ids)))
    return (
        f"✘ **Different:** at temperature 0 the replies should be identical but differ from token {first} on "
        "(a bug: please report it)."
    )


def compare_verdict(
    turns: dict[str, Any], order: tuple[str, ...], temperature: float, seed: int, error: BaseException | None
) -> str:
    """The comparison in words: the order, the speedup, and whether the texts match as they must."""
    lines = [f"**Order this time:** {order[0]} first, then {order[1]} (it alternates each click)."]
    if error is not None:
        lines.append(f"⚠ The comparison failed: {one_line(error)}")
    std, spec = turns.get("standard"), turns.get("speculative")
    if std is None or spec is None or "stopped" in (std.stats.stop_reason, spec.stats.stop_reason):
        lines.append("The comparison is incomplete (stopped or failed); the table shows what ran.")
        return "\n\n".join(lines)
    if std.stats.tokens_per_s:
        ratio = spec.stats.tokens_per_s / std.stats.tokens_per_s
        record = spec.record()
        lines.append(
            f"**Speedup:** {ratio:.2f}× ({spec.stats.tokens_per_s:.1f} vs {std.stats.tokens_per_s:.1f} tok/s, "
            f"{k_text(record)}, acceptance {pct(spec.stats.acceptance_rate)})."
        )
    lines.append(_sameness(std, spec, temperature, seed))
    return "\n\n".join(lines)
