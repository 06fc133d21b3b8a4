"""report.md and the headline table, from a finished result.

Contract: `write_report(result, path, plots)` writes the markdown report of a
result that summary/goals have completed (command.finish): how the bench
ran, the machine, the models, the headline table, every goal with its checks
and reasons, every configuration, the micro costs, measured vs theoretical
speedup, greedy correctness, auto K's final choice, and the plots.
`headline_table` is also what the command prints and what the README
carries (`headline_from_results`). `variants_table` is the variant
section's table (variants.py), printed and in report.md with the section's
micro table and goals (`variants_section`); `write_variants_report` writes a
report of that section alone (`bench --variants`). Reads dicts only;
computes no figure beyond ratios for display.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import megabytes
from ..kernels.measure import format_table
from .goals import GOALS, Check, ms
from .options import DEFAULT_OUT, MODES
from .runs import describe_k_choice
from .summary import speedups, theory_a


def _fmt_spread(s: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not s:
        return "–"
    f = f"{{:.{digits}f}}"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f.format(s["median"] * scale)
    return f"{f.format(s['median'] * scale)} ({f.format(s['min'] * scale)}–{f.format(s['max'] * scale)})"


def _fmt_x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def ordered_labels(summary: dict) -> list[str]:
    """Configuration labels by temperature, then mode (as MODES lists them), then K."""
    order = {m: i for i, m in enumerate(MODES)}

    def key(label: str) -> tuple:
        entry = summary[label]
        return entry["temperature"], order.get(entry["mode"], 99), entry["k"]

    return sorted(summary, key=key)


def _k_range(ks: Sequence[int]) -> str:
    """The Ks auto K chose, as "3" or "3–8"; K 0 is its choice of standard decoding."""
    lo, hi = min(ks), max(ks)
    text = f"{lo}" if lo == hi else f"{lo}–{hi}"
    return text + ("; 0: standard" if lo == 0 else "")


def headline_table(summary: dict, paired: dict[str, float] | None = None) -> str:
    """The headline markdown table: tokens/s (median, min–max) and ratios per configuration.

    vs standard / vs hf-generate: ratios of median tokens/s at the same temperature;
    paired (when given): the median of per-prompt ratios to standard (see paired_vs_standard).
    """
    ratios = speedups(summary)
    lines = [
        "| configuration | tokens/s median (min–max) | vs standard | vs standard, paired | vs hf-generate "
        "| acceptance a | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    paired = paired or {}
    for label in ordered_labels(summary):
        entry = summary[label]
        a = theory_a(entry)
        name = label
        if entry.get("chosen_k"):
            name += f" (chose K {_k_range(entry['chosen_k'])})"
        lines.append(
            f"| {name} | {_fmt_spread(entry['tokens_per_s'])} | {_fmt_x(ratios[label]['vs_standard'])} | "
            f"{_fmt_x(paired.get(label))} | {_fmt_x(ratios[label]['vs_hf_generate'])} | "
            f"{'–' if a is None else f'{a:.2f}'} | {entry['runs']} |"
        )
    return "\n".join(lines) + "\n"


def headline_from_results(path: str | os.PathLike = DEFAULT_OUT / "results.json") -> str:
    """The headline markdown table of a finished run's results.json (for the README)."""
    result = json.loads(Path(path).read_text(encoding="utf-8"))
    return headline_table(result["summary"], result.get("paired_vs_standard"))


def write_report(result: dict, path: Path, plots: Sequence[Path] = ()) -> Path:
    """report.md: machine, models, headline, per-configuration table, micro costs, theory, goals."""
    out: list[str] = ["# Speculative decoding benchmark", ""]
    out += _how_it_ran(result)
    out += _machine_section(result["machine"], result["micro"]["bandwidth"])
    out += _models_section(result["models"], result.get("hf_assisted", {}))
    out += ["", "## Headline", "", headline_table(result["summary"], result.get("paired_vs_standard"))]
    out += _goals_section(result["goals"])
    out += _per_config_table(result["summary"])
    out += _micro_section(result["micro"])
    out += _theory_section(result["theory"])
    out += _correctness_section(result.get("correctness", {}))
    out += _auto_k_section(result.get("auto_k_final"))
    if result.get("variants"):
        out += variants_section(result["variants"])
    if plots:
        out += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def _how_it_ran(result: dict) -> list[str]:
    options, timing = result["options"], result["timing"]
    prompts = len({r["prompt_id"] for r in result["runs"]})
    out = [
        f"{'Quick run' if options['quick'] else 'Full run'}: {prompts} prompts × {options['repeats']} repeat(s), "
        f"{options['max_new_tokens']} new tokens max, K ∈ {{{', '.join(map(str, options['ks']))}}}, "
        f"T ∈ {{{', '.join(f'{t:g}' for t in options['temperatures'])}}}, top-k {options['top_k']}, "
        f"top-p {options['top_p']:g}. Every configuration runs on every prompt, interleaved (order rotated per "
        "prompt), after one warm-up run each; fresh caches every run. Ratios are of median tokens/s (wall time "
        "incl. prefill).",
        "",
    ]
    total = timing.get("total_s")
    out.append(
        "Runtime: "
        + (f"**{total:.0f} s** in all ({total / 60:.1f} min); " if total else "")
        + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in timing.items() if k != "total_s")
        + "."
    )
    budget = GOALS["quick_run_s"]
    if options["quick"] and total:
        out.append(f"Quick-run budget (< {budget:g} s): {'PASS' if total < budget else 'FAIL'} ({total:.0f} s).")
    if options["quick"]:
        out.append(
            "A quick run is a smoke test: with a few prompts and short replies, figures move by several percent "
            "between runs, so verdicts within that of a threshold can flip; judge the goals on a full run."
        )
    if result.get("skipped_prompts"):
        out.append(
            f"To keep the {options['time_budget_s']:.0f} s time budget, {len(result['skipped_prompts'])} prompt(s) "
            "were not run: " + ", ".join(result["skipped_prompts"]) + "."
        )
    return out


def _machine_section(machine: dict, bw: dict) -> list[str]:
    out = ["", "## Machine", ""]
    out.append(
        f"- CPU: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']} with "
        f"{machine['torch_threads']} threads; transformers {machine.get('transformers', '?')}; "
        f"Python {machine['python']}; {machine['platform']}"
    )
    out.append(f"- Device: {machine['device']}" + (f" ({machine['gpu']})" if machine.get("gpu") else ""))
    out.append(
        f"- Peak RSS with the pair loaded: {megabytes(machine.get('peak_rss_pair_bytes'))}; whole process at the "
        f"end (with the transformers models): {megabytes(machine.get('peak_rss_process_bytes'))}"
    )
    if machine.get("peak_cuda_pair_bytes") is not None:
        out.append(f"- Peak CUDA memory with the pair loaded: {megabytes(machine['peak_cuda_pair_bytes'])}")
    if machine.get("load_average_start"):
        start, end = machine["load_average_start"], machine.get("load_average_end", [])
        out.append(
            f"- Load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in start)}, "
            f"at end {'/'.join(f'{x:.1f}' for x in end)}"
        )
    share = machine.get("cpu_share")
    if share:
        noisy = share["others"] + share["steal"] > 0.10
        out.append(
            f"- CPU capacity used during the bench: {share['ours']:.0%} by the bench, {share['others']:.0%} by "
            f"other processes, {share['steal']:.0%} stolen by the hypervisor"
            + (" — **the bench did not have the machine to itself; timings are noisy**" if noisy else "")
        )
    out.append(
        f"- Memory bandwidth: {bw['read_gb_s']:.1f} GB/s read (sum), {bw['copy_gb_s']:.1f} GB/s copy (read+write) "
        f"over a {megabytes(bw['tensor_bytes'])} tensor, median of {bw['reps']}"
        f"{', ' + bw['measured'] if bw.get('measured') else ''}; the bound uses {bw['bandwidth_gb_s']:.1f} GB/s"
    )
    return out


def _models_section(models: dict, hf_assisted: dict) -> list[str]:
    out = ["", "## Models", ""]
    for role in ("target", "draft"):
        info = models.get(role)
        if info:
            out.append(
                f"- {role}: {info.get('name', '?')} — {info.get('dtype', '')}, {info.get('quantization', '')}, "
                f"{info.get('implementation', '')}, {megabytes(info.get('weight_bytes'))} of weights"
            )
    if hf_assisted.get("assistant"):
        out.append(f"- hf-assisted assistant: {hf_assisted['assistant']}")
    if hf_assisted.get("transformers_defaults"):
        defaults = hf_assisted["transformers_defaults"]
        listed = ", ".join(f"{k}={v}" for k, v in defaults.items())
        out.append(f"- hf-assisted runs with transformers' defaults: {listed}")
    return out


def _goals_section(goals: list[dict]) -> list[str]:
    out = ["## Goals", ""]
    for goal in goals:
        out += [f"### {goal['goal']}. {goal['title']}: **{goal['status']}**", ""]
        out += ["- " + Check.from_dict(check).text() for check in goal["checks"]]
        out += [f"- Why: {line}" for line in goal["explanation"]]
        out.append("")
    return out


def _per_config_table(summary: dict) -> list[str]:
    lines = [
        "## Every configuration (median, min–max over runs)",
        "",
        "| configuration | tokens/s | decode-only tokens/s | wall s | new tokens | acceptance | accepted/round "
        "| draft step ms | verify step ms | peak RSS MB | time split (prefill/draft/target/other) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in ordered_labels(summary):
        e = summary[label]
        split = e.get("time_split")
        split_text = "/".join(f"{split[k]:.0%}" for k in ("prefill", "draft", "target", "other")) if split else "–"
        lines.append(
            f"| {label} | {_fmt_spread(e['tokens_per_s'])} | {_fmt_spread(e.get('decode_tokens_per_s'))} | "
            f"{_fmt_spread(e['wall_s'], digits=2)} | {_fmt_spread(e['new_tokens'], digits=0)} | "
            f"{_fmt_spread(e['acceptance_rate'], digits=2)} | {_fmt_spread(e['mean_accepted_per_round'], digits=2)} | "
            f"{_fmt_spread(e['draft_step_s'], 1e3, 2)} | {_fmt_spread(e['verify_step_s'], 1e3, 2)} | "
            f"{_fmt_spread(e['peak_rss_bytes'], 1e-6, 0)} | {split_text} |"
        )
    return lines + [""]


def _micro_section(micro: dict) -> list[str]:
    step, bound = micro["target_step_s"], micro["weight_bound_s"]
    lines = ["## Micro step costs", ""]
    lines += [f"Median of {micro['reps']} reps at {micro['context_tokens']} tokens of context.", ""]
    lines.append(f"- target decode step (1 token): {ms(step)}")
    lines.append(
        f"- weight-reading bound: {micro['target_step_weight_bytes'] / 1e6:.0f} MB / "
        f"{micro['bandwidth']['bandwidth_gb_s']:.1f} GB/s = {ms(bound)} (step = {step / bound:.2f}× bound)"
    )
    if micro.get("draft_step_s") is not None:
        draft_step = micro["draft_step_s"]
        lines.append(f"- draft step (1 token): {ms(draft_step)} = {draft_step / step:.3f}× the target step (c)")
    if micro.get("target_prefill_s") is not None:
        draft = ""
        if micro.get("draft_prefill_s") is not None:
            draft = f", draft {ms(micro['draft_prefill_s'])} ({micro.get('draft_prefill', 'computed')})"
        prefill = ms(micro["target_prefill_s"])
        lines.append(f"- prefill of {micro['context_tokens'] - 1} tokens: target {prefill}{draft}")
    if micro.get("min_s"):
        fastest = ", ".join(f"{k.removesuffix('_s')} {ms(v)}" for k, v in micro["min_s"].items())
        lines.append(f"- fastest rep of each: {fastest}")
    for k, v in micro["verify_s"].items():
        lines.append(f"- target verify of K+1 = {int(k) + 1} tokens: {ms(v)} = {v / step:.2f}× the 1-token step")
    agreement = micro.get("agreement") or {}
    if agreement.get("agreement") is not None:
        lines.append(
            f"- draft greedy agreement (teacher-forced on the target's greedy continuations): "
            f"{agreement['agreement']:.3f} over {agreement['positions']} positions (per prompt "
            f"{min(agreement['per_prompt']):.2f}–{max(agreement['per_prompt']):.2f}); the target reproduces its own "
            f"continuation at {agreement['target_reproduces_continuation']:.3f}"
        )
    return lines + [""]


THEORY_LEGEND = (
    "a: per-token acceptance probability, pooled over the runs as accepted / (accepted + rounds with a rejection) "
    "(accepted/drafted, the engine's acceptance rate, is shown beside it and understates a); "
    "E = (1 − a^(K+1))/(1 − a); c = draft step / target step; simple = E/(1 + Kc); "
    "with verify = E · step / (K · draft + verify(K+1)), from the micro costs (the goal's figure); "
    "in-run costs: the same formula with the runs' own median draft step, verify forward and standard step; "
    "measured: median tokens/s over standard's (wall incl. prefill); decode only: after the prefill."
)


def _theory_section(rows: dict) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Measured vs theoretical speedup",
        "",
        THEORY_LEGEND,
        "",
        "| configuration | a | accepted/drafted | E | c | simple | with verify | with verify, in-run costs "
        "| measured | measured, decode only | measured / with verify |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in sorted(rows.items(), key=lambda item: (item[1]["temperature"], item[1]["k"])):
        fraction = r["measured_over_with_verify"]
        lines.append(
            f"| {label} | {r['a']:.3f} | {r['accepted_over_drafted']:.3f} | {r['expected_tokens']:.2f} | "
            f"{r['c']:.3f} | {_fmt_x(r['simple'])} | {_fmt_x(r['with_verify'])} | "
            f"{_fmt_x(r.get('with_verify_in_run_costs'))} | {_fmt_x(r['measured'])} | "
            f"{_fmt_x(r.get('measured_decode'))} | {'–' if fraction is None else f'{fraction:.0%}'} |"
        )
    return lines + [""]


def _correctness_section(data: dict) -> list[str]:
    if not data:
        return []
    lines = ["## Greedy outputs vs standard (T=0)", ""]
    for mode, (same, total) in data.items():
        lines.append(f"- {mode}: {same}/{total} runs token-for-token identical to our standard decode")
    return lines + [""]


def _auto_k_section(final: dict | None) -> list[str]:
    """What auto K would choose next at each temperature, from its tracker at the end."""
    if not final:
        return []
    lines = ["## Auto-K trackers at the end", ""]
    lines += [f"- T={t}: {describe_k_choice(choice)}" for t, choice in final.items()]
    return lines + [""]


def _x(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}×"


def _tps(value: float | None, ratio: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ({_x(ratio)})"


def variants_table(section: dict) -> str:
    """The variant section's markdown table: one row per variant, with the shared baseline under it."""
    if section.get("skipped"):
        return f"Variant section not run: {section['skipped']}.\n"
    micro, k = section["micro"], section["k"]
    lines = [
        f"| variant (ISA) | standard tok/s (× generate) | speculative K={k} tok/s (× standard) | acceptance a "
        f"| greedy equal | target step × bound | draft step × bound | verify {micro['verify_tokens']} / step "
        f"| prefill {micro['prefill_tokens']} ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in section["rows"].items():
        equal = row["greedy_equal"]
        a = row["acceptance"]
        lines.append(
            f"| {name} ({row['isa']}) | {_tps(row['standard_tokens_per_s'], row['standard_vs_hf'])} "
            f"| {_tps(row['speculative_tokens_per_s'], row['speculative_vs_standard'])} "
            f"| {'–' if a is None else f'{a:.2f}'} "
            f"| {'yes' if equal['equal'] else 'NO'} ({equal['same']}/{equal['runs']}) "
            f"| {_x(row['target_step_vs_bound'])} | {_x(row['draft_step_vs_bound'])} "
            f"| {_x(row['verify_vs_step'])} | {row['prefill_s'] * 1e3:.1f} |"
        )
    hf = next(iter(section["rows"].values()), {}).get("hf_generate_tokens_per_s")
    lines += [
        "",
        f"hf-generate (transformers generate(), the shared baseline): {'–' if hf is None else f'{hf:.1f}'} tok/s. "
        f"{len(section['prompts'])} prompts × {section['max_new_tokens']} new tokens max, T=0; tokens/s are medians "
        "over the prompts of whole replies with their prefill. Step costs are micro medians of "
        f"{micro['reps']} reps; bounds: target {micro['target_bound_s'] * 1e3:.2f} ms, draft "
        f"{micro['draft_bound_s'] * 1e3:.2f} ms at {micro['bandwidth_gb_s']:.1f} GB/s.",
    ]
    return "\n".join(lines) + "\n"


def _load_line(machine: dict) -> str:
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    text = ""
    if start and end:
        text = f"Load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in start)} at the start, "
        text += f"{'/'.join(f'{x:.1f}' for x in end)} at the end. "
    share = machine.get("cpu_share")
    if share:
        text += (
            f"CPU capacity: {share['ours']:.0%} this bench, {share['others']:.0%} other processes, "
            f"{share['steal']:.0%} stolen."
        )
    return text


def variants_section(section: dict) -> list[str]:
    """report.md's section on the CPU kernel variants: how it ran, the table, the micro table, the goals."""
    out = ["## CPU kernel variants", ""]
    if section.get("skipped"):
        return out + [variants_table(section)]
    timing = section["timing"]
    out += [
        f"Measured {section['measured_at']} in {timing['total_s']:.0f} s, in one process: each variant's fp32 "
        f"target and {section['draft']}, built from the same transformers model; per prompt standard and "
        f"speculative K={section['k']} decoding on every variant and hf-generate once, interleaved (order rotated "
        "per prompt) after one warm-up run each, fresh caches every run. " + _load_line(section["machine"]),
        "",
    ]
    if section["not_built"]:
        out += [f"Not built here (no compiler support): {', '.join(section['not_built'])}.", ""]
    out += [variants_table(section), "### Micro step costs per variant", "", format_table(section["micro"]), ""]
    out += ["### Variant goals", ""]
    for goal in section["goals"]:
        out.append(f"- {goal['goal']}. {goal['title']}: {goal['status']}")
        out += ["  - " + Check.from_dict(check).text() for check in goal["checks"]]
        out += [f"  - Why: {line}" for line in goal["explanation"]]
    return out + [""]


def write_variants_report(section: dict, path: Path) -> Path:
    """report.md of a `bench --variants` run: the variant section alone."""
    machine = section.get("machine", {})
    head = ["# CPU kernel variants benchmark", ""]
    if machine.get("cpu"):
        head += [f"CPU: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}.", ""]
    path.write_text("\n".join(head + variants_section(section)), encoding="utf-8")
    return path
