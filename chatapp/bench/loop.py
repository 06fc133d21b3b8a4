"""The whole bench: warm-up, the interleaved runs under a time budget, the micro measurements.

Contract: `bench(models, prompts, options, progress, deadline, tracker_factory)`
runs every configuration (runs.build_configs) on every prompt, interleaved:
for each prompt every configuration once, in an order rotated per prompt,
after one warm-up run per configuration. Then it measures the micro step
costs and the draft's agreement (micro.py) and returns the raw result, plain
JSON: options, machine, models, prompts, configs, runs, micro, timing. A
deadline drops whole prompts, never single configurations, so the
comparison stays balanced. Auto-K's tracker starts as a fresh chat session's
(ChatService.calibrate) and learns per temperature. Summaries, goals and
files are later stages (summary.py, goals.py, report.py, plots.py).

`warm_up` and `interleaved_runs` take `Slot`s (a configuration on a pair),
so the variant section (variants.py) runs its pairs through the same loop.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

from ..autok import AcceptanceTracker, calibrate_tracker
from ..models import ModelPair, Progress
from ..service import ChatService
from .baselines import Models, hf_assisted_defaults
from .machine import cpu_contention, cpu_sample, machine_description, peak_rss_bytes
from .micro import add_step_bound, context_ids, greedy_sequences, measure_agreement, measure_step_costs, micro_context
from .options import Options, jsonable
from .prompts import BenchPrompt
from .runs import Slot, build_configs, describe_k_choice, rotated, run_slot

MIN_PROMPTS = 2  # a time budget never cuts the runs below this many prompts
TAIL_RESERVE_S = 30.0  # what a time budget keeps for the micro measurements, the agreement and the files


def deadline_for(started: float, options: Options) -> float | None:
    """The time.perf_counter() value after which no prompt starts, for a command started at `started`."""
    return started + options.time_budget_s - TAIL_RESERVE_S if options.time_budget_s else None


def bench(
    models: Models,
    prompts: Sequence[BenchPrompt],
    options: Options,
    progress: Progress,
    deadline: float | None = None,
    tracker_factory: Callable[[], AcceptanceTracker] | None = None,
) -> dict:
    """Warm-up, the interleaved runs, the micro measurements and the agreement; the raw result.

    deadline (a time.perf_counter() value): start no further prompt (after
    MIN_PROMPTS) whose runs, at the mean time per prompt so far, would end after
    it. Every prompt that starts runs in every configuration, so the comparison
    stays balanced; the skipped prompts are listed in the result.

    tracker_factory: the auto-K tracker as a fresh chat session has it (run_bench
    uses ChatService.calibrate); one copy per temperature then learns from that
    temperature's turns only. Default: calibrated_tracker on the first prompt.
    """
    device = models.target.device
    configs = build_configs(options)
    if not configs:
        raise ValueError("nothing to run: no modes selected")
    calibrated = (tracker_factory or (lambda: calibrated_tracker(models, prompts[0].ids)))()
    trackers = {t: copy.deepcopy(calibrated) for t in options.temperatures}
    machine = machine_description(device)
    timing: dict[str, float] = {}
    cpu_before = cpu_sample()

    slots = [Slot(config, models) for config in configs]
    started = time.perf_counter()
    warm_up(slots, prompts[0], options, progress)
    timing["warmup_s"] = time.perf_counter() - started

    started = time.perf_counter()
    runs, skipped = interleaved_runs(slots, prompts, options, trackers, progress, deadline)
    timing["runs_s"] = time.perf_counter() - started

    started = time.perf_counter()
    ctx = micro_context(models, prompts, options)
    progress(f"micro step costs at {ctx} tokens of context, {options.micro_reps} reps")
    micro = measure_step_costs(
        models.target,
        models.draft,
        options.ks,
        context_ids(prompts, ctx),
        options.micro_reps,
        bandwidth_mb=options.bandwidth_mb,
    )
    add_step_bound(micro, models.target, models.draft)
    timing["micro_s"] = time.perf_counter() - started

    started = time.perf_counter()
    progress("draft/target greedy agreement (teacher-forced)")
    ran = {r["prompt_id"] for r in runs}
    sequences = greedy_sequences(models, [p for p in prompts if p.id in ran], runs, options)
    micro["agreement"] = measure_agreement(models.target, models.draft, sequences)
    timing["agreement_s"] = time.perf_counter() - started

    _finish_machine(machine, models, cpu_before)
    return {
        "options": jsonable(asdict(options)),
        "machine": machine,
        "models": models.descriptions,
        "hf_assisted": {"assistant": models.hf_draft_note, "transformers_defaults": hf_assisted_defaults()},
        "prompts": [{"id": p.id, "category": p.category, "prompt_tokens": len(p.ids)} for p in prompts],
        "configs": [c.label for c in configs],
        "skipped_prompts": skipped,
        "runs": runs,
        "micro": micro,
        "timing": timing,
        # What auto K would choose next at each temperature (KChoice.to_dict()).
        "auto_k_final": {f"{t:g}": tracker.choose(0, auto=True).to_dict() for t, tracker in trackers.items()},
    }


def warm_up(slots: Sequence[Slot], prompt: BenchPrompt, options: Options, progress: Progress) -> None:
    """One short untimed run of every slot (options.warmup_tokens new tokens)."""
    progress(f"warm-up: {len(slots)} configurations, {options.warmup_tokens} tokens each")
    for slot in slots:  # the warm-up's auto-k turns feed a throwaway tracker, not the measured one
        run_slot(
            slot,
            prompt,
            max_new_tokens=options.warmup_tokens,
            seed=options.seed,
            options=options,
            tracker=AcceptanceTracker(),
        )


def interleaved_runs(
    slots: Sequence[Slot],
    prompts: Sequence[BenchPrompt],
    options: Options,
    trackers: dict[float, AcceptanceTracker],
    progress: Progress,
    deadline: float | None,
) -> tuple[list[dict], list[str]]:
    """Every prompt in every slot, rotated per prompt; the records and the prompts skipped.
    trackers: per temperature, for auto-k and for the speculative runs' K choice (none: fixed K)."""
    started = time.perf_counter()
    runs: list[dict] = []
    skipped: list[str] = []
    done = 0
    total = options.repeats * len(prompts) * len(slots)
    for repeat in range(options.repeats):
        for index, prompt in enumerate(prompts):
            now = time.perf_counter()
            if deadline is not None and done >= MIN_PROMPTS and now + (now - started) / done > deadline:
                skipped.append(f"{prompt.id} (repeat {repeat})")
                progress(f"time budget: skipping {prompt.id} (repeat {repeat})")
                continue
            done += 1
            seed = options.seed + 1000 * repeat + index
            for slot in rotated(slots, index + repeat):
                record = run_slot(
                    slot,
                    prompt,
                    max_new_tokens=options.max_new_tokens,
                    seed=seed,
                    options=options,
                    tracker=trackers.get(slot.config.temperature),
                )
                record["repeat"] = repeat
                runs.append(record)
                progress(_run_line(len(runs), total, record))
    return runs, skipped


def _finish_machine(machine: dict, models: Models, cpu_before: dict | None) -> None:
    """In place: the load, CPU shares and peak memory at the end of the bench."""
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = list(os.getloadavg())
    machine["cpu_share"] = cpu_contention(cpu_before, cpu_sample(), os.cpu_count() or 1)
    machine["peak_rss_pair_bytes"] = models.peak_rss_pair_bytes
    machine["peak_rss_process_bytes"] = peak_rss_bytes()
    if models.peak_cuda_pair_bytes is not None:
        machine["peak_cuda_pair_bytes"] = models.peak_cuda_pair_bytes


def calibrated_tracker(models: Models, ids: Sequence[int], new_tokens: int = 32) -> AcceptanceTracker:
    """An AcceptanceTracker seeded as ChatService.calibrate seeds the app's (autok.calibrate_tracker)."""
    tracker = AcceptanceTracker()
    calibrate_tracker(tracker, models.target, models.draft, list(ids), new_tokens)
    return tracker


def service_tracker(models: Models) -> Callable[[], AcceptanceTracker]:
    """A tracker factory that runs the app's own ChatService.calibrate() on these models."""

    def make() -> AcceptanceTracker:
        service = ChatService(ModelPair(models.target, models.draft, models.tokenizer, "", 0.0))
        service.calibrate()
        return service.tracker

    return make


def _run_line(n: int, total: int, r: dict) -> str:
    extra = ""
    if r.get("acceptance_rate") is not None:
        extra = f", a={r['acceptance_rate']:.2f}"
    if r["mode"] == "auto-k":
        extra += f", {describe_k_choice(r.get('k_choice'))}"
    variant = f" [{r['variant']}]" if r.get("variant") else ""
    return (
        f"[{n}/{total}] {r['config']}{variant} | {r['prompt_id']}: {r['new_tokens']} tokens in {r['wall_s']:.2f} s "
        f"({r['tokens_per_s']:.1f} tok/s{extra})"
    )
