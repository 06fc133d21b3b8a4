"""The variant section of the bench: every CPU kernel variant, end to end, side by side, in one process.

Contract: `run_variants(models, prompts, options, progress, k=K)` builds, from
the target's transformers model (models.hf_target), the fp32 target and its
int8 draft on every kernel variant this CPU runs that builds, plus plain
torch ops (chatapp.kernels.measure.candidates), and runs them on the same
prompts through the main runs' loop (loop.warm_up, loop.interleaved_runs):
per prompt, in an order rotated per prompt, standard and speculative
decoding at K on every variant, both at T=0, and transformers `generate()`
once, the baseline they all share. One warm-up run per configuration, fresh
caches every run, tokens/s over the whole reply with its prefill, as the
main runs measure. Then, in the same process and on the same pairs, the
micro table of kernels.measure (target step, draft step, verify of 9 tokens,
prefill of 100, the weight-reading bounds). It returns the raw section,
plain JSON, or {"skipped": why} where the variants cannot run (not on the
CPU, a model the fast decoder does not take, weights not float32).

`finish_variants(section)` adds one row per variant (`variant_rows`: tokens/s
and ratios from summary.py's functions over the variant's runs and the
shared hf-generate runs, acceptance, greedy equality of speculative and
standard tokens, the micro ratios) and the goals (`VARIANT_GOALS`, judged by
`evaluate_variant_goals`: PASS / FAIL with the numbers, "not measured" for a
variant this CPU lacks). report.py renders the section.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import torch

from ..kernels import TORCH, measure, supported_variants
from ..llama import supports
from ..models import Progress
from .baselines import Models
from .goals import EVERY_VARIANT, VARIANT_GOALS, Check, Goal, ms
from .loop import interleaved_runs, warm_up
from .machine import cpu_contention, cpu_sample, machine_description
from .options import Options
from .prompts import BenchPrompt
from .runs import Config, Slot
from .summary import (
    correctness,
    median_tps,
    mode_label,
    paired_vs_standard,
    speedups,
    standard_label,
    summarize,
    theory_a,
)

VARIANT_K = 6  # the section's K when neither --variant-k nor a main run's best K gives one
TEMPERATURE = 0.0
MICRO_CONTEXT = 100  # tokens already in the cache when the micro steps run
VERIFY_TOKENS = 9  # the goals' verify: K + 1 for K up to 8
PREFILL_TOKENS = 100  # the goals' prefill

# What each goal measures on a variant's row, and whether higher is better.
METRICS: dict[str, tuple[str, bool]] = {
    "standard_vs_hf": ("standard tokens/s / hf-generate's", True),
    "speculative_vs_hf": ("speculative tokens/s / hf-generate's", True),
    "speculative_vs_standard": ("speculative tokens/s / standard's", True),
    "target_step_vs_bound": ("target step / its weight-reading bound", False),
    "draft_step_vs_bound": ("draft step / its weight-reading bound", False),
    "verify_vs_step": (f"verify of {VERIFY_TOKENS} tokens / 1-token step", False),
    "prefill_vs_avx512": (f"prefill of {PREFILL_TOKENS} tokens / avx512's", False),
}


def unsupported_reason(models: Models) -> str | None:
    """Why the variants cannot be built from this bench's models; None when they can."""
    hf = models.hf_target
    if hf is None:
        return "no transformers model of the target to build the variants' pairs from"
    weight = next(hf.parameters())
    if weight.device.type != "cpu":
        return f"the kernel variants run on the CPU, and this bench runs on {weight.device}"
    if weight.dtype != torch.float32:
        return f"the target's weights are {str(weight.dtype).replace('torch.', '')}; the kernels take float32"
    if not supports(hf.config):
        return f"the fast decoder does not take model type {hf.config.model_type!r}"
    return None


def variant_slots(models: Models, pairs: dict[str, tuple], k: int) -> list[Slot]:
    """hf-generate on the shared transformers model, then standard and speculative K on each variant's pair."""
    slots = [Slot(Config("hf-generate", 0, TEMPERATURE), models)]
    for name, (target, draft) in pairs.items():
        pair = dataclasses.replace(models, target=target, draft=draft)
        slots.append(Slot(Config("standard", 0, TEMPERATURE), pair, name))
        slots.append(Slot(Config("speculative", k, TEMPERATURE), pair, name))
    return slots


def micro_sizes(pairs: dict[str, tuple]) -> dict[str, int]:
    """The micro table's context, verify and prefill lengths, within the models' context."""
    room = min(target.max_positions for target, _ in pairs.values()) - VERIFY_TOKENS
    return {"context": min(MICRO_CONTEXT, room), "verify": VERIFY_TOKENS, "prefill": min(PREFILL_TOKENS, room)}


def run_variants(
    models: Models,
    prompts: Sequence[BenchPrompt],
    options: Options,
    progress: Progress,
    *,
    k: int = VARIANT_K,
    variants: Sequence[str] | None = None,
) -> dict:
    """The raw section: every variant's runs and the micro table (variants: default every one this CPU runs)."""
    reason = unsupported_reason(models)
    if reason is not None:
        progress(f"variants: not run: {reason}")
        return {"skipped": reason}
    if not prompts:
        raise ValueError("the variant section needs at least one prompt")
    started = time.perf_counter()
    machine = machine_description(models.hf_target.device)
    cpu_before = cpu_sample()
    asked = [v for v in (supported_variants() if variants is None else variants) if v != TORCH]
    progress(f"variants: the target and its int8 draft on {', '.join(asked + [TORCH])}")
    pairs = measure.candidates(models.hf_target, asked)  # built once: the runs and the micro table share them
    timing = {"build_s": time.perf_counter() - started}

    run_options = dataclasses.replace(
        options, max_new_tokens=options.variant_max_new_tokens, repeats=1, temperatures=(TEMPERATURE,)
    )
    slots = variant_slots(models, pairs, k)
    mark = time.perf_counter()
    warm_up(slots, prompts[0], run_options, progress)
    timing["warmup_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    runs, _ = interleaved_runs(slots, prompts, run_options, {}, progress, deadline=None)
    timing["runs_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    sizes = micro_sizes(pairs)
    progress(f"variants: micro step costs at {sizes['context']} tokens of context, {options.micro_reps} reps")
    micro = measure.measure_candidates(pairs, reps=options.micro_reps, bandwidth_mb=options.bandwidth_mb, **sizes)
    timing["micro_s"] = time.perf_counter() - mark
    timing["total_s"] = time.perf_counter() - started

    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = list(os.getloadavg())
    machine["cpu_share"] = cpu_contention(cpu_before, cpu_sample(), os.cpu_count() or 1)
    return {
        "k": k,
        "temperature": TEMPERATURE,
        "max_new_tokens": run_options.max_new_tokens,
        "warmup_tokens": run_options.warmup_tokens,
        "draft": "the target's int8 weight-only copy (chatapp.llama INT8), on the same variant",
        "asked": asked,
        "variants": list(pairs),
        "not_built": [v for v in asked if v not in pairs],
        "prompts": [{"id": p.id, "category": p.category, "prompt_tokens": len(p.ids)} for p in prompts],
        "runs": runs,
        "micro": micro,
        "machine": machine,
        "timing": timing,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def variant_rows(section: dict) -> dict[str, dict]:
    """Per variant: tokens/s and ratios (medians over prompts), acceptance, greedy equality, micro ratios."""
    runs, micro, k = section["runs"], section["micro"], section["k"]
    baseline = [r for r in runs if r["mode"] == "hf-generate"]
    std_label, hf_label = standard_label(TEMPERATURE), mode_label("hf-generate", TEMPERATURE)
    spec_label = Config("speculative", k, TEMPERATURE).label
    reference = micro["rows"].get("avx512", {}).get("prefill_s")
    rows = {}
    for name in section["variants"]:
        own = [r for r in runs if r.get("variant") == name]
        summary = summarize(baseline + own)
        ratios = speedups(summary)
        same, total = correctness(own).get("speculative", [0, 0])
        m = micro["rows"].get(name, {})
        rows[name] = {
            "isa": m.get("isa"),
            "implementation": m.get("implementation"),
            "hf_generate_tokens_per_s": median_tps(summary, hf_label),
            "standard_tokens_per_s": median_tps(summary, std_label),
            "speculative_tokens_per_s": median_tps(summary, spec_label),
            "standard_vs_hf": ratios.get(std_label, {}).get("vs_hf_generate"),
            "speculative_vs_hf": ratios.get(spec_label, {}).get("vs_hf_generate"),
            "speculative_vs_standard": ratios.get(spec_label, {}).get("vs_standard"),
            "speculative_vs_standard_paired": paired_vs_standard(own).get(spec_label),
            "acceptance": theory_a(summary[spec_label]) if spec_label in summary else None,
            "greedy_equal": {"same": same, "runs": total, "equal": total > 0 and same == total},
            **{key: m.get(key) for key in ("target_step_s", "draft_step_s", "verify_s", "prefill_s")},
            "target_step_vs_bound": _ratio(m.get("target_step_s"), micro["target_bound_s"]),
            "draft_step_vs_bound": _ratio(m.get("draft_step_s"), micro["draft_bound_s"]),
            "verify_vs_step": _ratio(m.get("verify_s"), m.get("target_step_s")),
            "prefill_vs_avx512": _ratio(m.get("prefill_s"), reference),
            "summary": {label: summary[label] for label in (std_label, spec_label) if label in summary},
        }
    return rows


def evaluate_variant_goals(rows: dict[str, dict], micro: dict, thresholds: dict = VARIANT_GOALS) -> list[Goal]:
    """One Goal per entry of the table: its checks on the variant's row ("every variant": on each row)."""
    goals = []
    for number, (who, table) in enumerate(thresholds.items(), 1):
        names = list(rows) if who == EVERY_VARIANT else [who]
        checks, why = [], []
        for name in names:
            row = rows.get(name, {})
            for metric, threshold in table.items():
                what, higher = METRICS[metric]
                check = Check(f"{name}: {what}", row.get(metric), threshold, higher)
                checks.append(check)
                if check.ok is False:
                    line = f"{name}: {_numbers(metric, row, micro)}"
                    if line not in why:  # the tokens/s checks share one sentence
                        why.append(line)
        terms = [f"{METRICS[m][0]} {'>=' if METRICS[m][1] else '<='} {t:g}" for m, t in table.items()]
        goals.append(Goal(number, f"{who}: " + "; ".join(terms), checks, why))
    return goals


def _numbers(metric: str, row: dict, micro: dict) -> str:
    """The measurements behind a failed check, in a sentence."""
    tps = {key: row.get(f"{key}_tokens_per_s") or 0.0 for key in ("hf_generate", "standard", "speculative")}
    if metric in ("standard_vs_hf", "speculative_vs_hf", "speculative_vs_standard"):
        a = row.get("acceptance")
        return (
            f"standard {tps['standard']:.1f} tok/s, speculative {tps['speculative']:.1f} tok/s"
            + (f" (acceptance a={a:.2f})" if a is not None else "")
            + f", hf-generate {tps['hf_generate']:.1f} tok/s."
        )
    if metric == "target_step_vs_bound":
        return f"target step {ms(row['target_step_s'])} vs its bound {ms(micro['target_bound_s'])}."
    if metric == "draft_step_vs_bound":
        return f"draft step {ms(row['draft_step_s'])} vs its bound {ms(micro['draft_bound_s'])}."
    if metric == "verify_vs_step":
        return f"verify of {micro['verify_tokens']} tokens {ms(row['verify_s'])} vs a step {ms(row['target_step_s'])}."
    avx512 = micro["rows"]["avx512"]["prefill_s"]
    return f"prefill of {micro['prefill_tokens']} tokens {ms(row['prefill_s'])} vs avx512's {ms(avx512)}."


def finish_variants(section: dict, thresholds: dict = VARIANT_GOALS) -> dict:
    """In place: the rows and the goals of a raw section (a skipped one stays as it is)."""
    if section.get("skipped"):
        return section
    section["rows"] = variant_rows(section)
    section["goals"] = [g.to_dict() for g in evaluate_variant_goals(section["rows"], section["micro"], thresholds)]
    return section
