"""Micro measurements: step costs, memory bandwidth, and draft/target agreement.

Contract: `measure_step_costs` times, at one context length, the target's
1-token step, its verify of K+1 tokens for each K, the draft's step and both
models' prefill (as the engine prefills), interleaved rep by rep with a
memory-bandwidth read and copy, and returns medians and minima in seconds.
`step_bound` adds the weight-reading bound of a decode step (weights /
bandwidth). `measure_agreement` is the fraction of positions where the
draft's argmax equals the target's, teacher-forced on the target's greedy
continuations (`greedy_sequences`). Every function takes loaded
`DecoderLM`s; none knows about configurations, runs or reports.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..engine import Generation, clock, prefill_draft
from .baselines import Models
from .options import Options
from .prompts import BenchPrompt


def context_ids(prompts: Sequence[BenchPrompt], length: int) -> list[int]:
    """`length` realistic token ids: the bench prompts, concatenated and cycled."""
    pool = [t for p in prompts for t in p.ids] or [0]
    return [pool[i % len(pool)] for i in range(length)]


def micro_context(models: Models, prompts: Sequence[BenchPrompt], options: Options) -> int:
    """The context length of the micro measurements: a median prompt plus half a reply, within the models' context."""
    median_prompt = int(statistics.median(len(p.ids) for p in prompts))
    return min(median_prompt + options.max_new_tokens // 2, models.target.max_positions - max(options.ks) - 2)


def measure_step_costs(
    target, draft, ks: Iterable[int], ids: Sequence[int], reps: int, bandwidth_mb: int | None = None
) -> dict:
    """Median (and min) times of the target's 1-token step, its verify of K+1 tokens, the
    draft's step, and both models' prefill of the context (as the engine prefills).
    With `bandwidth_mb`, the memory bandwidth too (`costs["bandwidth"]`), its reps
    interleaved with the steps': on a shared machine the bandwidth moves by 1.5x
    between minutes, and a bound measured at another moment than the step says little.

    Every step starts at position len(ids) after a prefill of `ids` (the context
    length), so repeated calls overwrite the same cache slots. The reps of all
    measurements are interleaved, so a burst of load from other processes
    hits them alike instead of one of them.
    """
    ks = sorted(set(ks))
    n = len(ids)
    device = target.device
    probe = list(ids[-(max(ks, default=1) + 1) :])
    t_cache = target.new_cache(n + max(ks, default=1) + 1)
    prefill_ids = list(ids[:-1])
    jobs: dict[str, Callable[[], Any]] = {
        "target_step_s": lambda: target.forward(probe[:1], n, t_cache),
        **{f"verify_{k}": (lambda k=k: target.forward(probe[: k + 1], n, t_cache)) for k in ks},
        "target_prefill_s": lambda: target.forward(prefill_ids, 0, t_cache, logits=False),
    }
    target.forward(list(ids), 0, t_cache, logits=False)
    costs: dict[str, Any] = {"context_tokens": n, "reps": reps}
    if draft is not None:
        d_cache = draft.new_cache(n + 2)
        jobs["draft_step_s"] = lambda: draft.forward(probe[:1], n, d_cache)
        draft.forward(list(ids), 0, d_cache, logits=False)
        # As the engine does it: a copy of the target's keys/values where the draft can take them.
        jobs["draft_prefill_s"] = lambda: prefill_draft(draft, d_cache, target, t_cache, ids)
        costs["draft_prefill"] = prefill_draft(draft, d_cache, target, t_cache, ids)
    if bandwidth_mb:
        src, dst = bandwidth_tensors(device, bandwidth_mb)
        jobs["bandwidth_read_s"] = lambda: src.sum()
        jobs["bandwidth_copy_s"] = lambda: dst.copy_(src)
    times = _interleaved_times(jobs, reps, device)
    medians = {name: statistics.median(values) for name, values in times.items()}
    if bandwidth_mb:
        read_s, copy_s = medians.pop("bandwidth_read_s"), medians.pop("bandwidth_copy_s")
        costs["bandwidth"] = bandwidth_result(src.numel() * 4, read_s, copy_s, reps, "interleaved with the step reps")
        for name in ("bandwidth_read_s", "bandwidth_copy_s"):
            times.pop(name)
        del src, dst
    for name in ("target_step_s", "draft_step_s", "target_prefill_s", "draft_prefill_s"):
        if name in medians:
            costs[name] = medians[name]
    costs["verify_s"] = {str(k): medians[f"verify_{k}"] for k in ks}
    costs["min_s"] = {name: min(values) for name, values in times.items()}
    return costs


def _interleaved_times(jobs: dict[str, Callable[[], Any]], reps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of every job, `reps` rounds of all jobs in turn (after one warm-up call each).

    The prefill jobs rewrite the cache prefix with the same ids, so the steps
    after them see the same cache contents.
    """
    for fn in jobs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(reps):
        for name, fn in jobs.items():
            start = clock(device)
            fn()
            times[name].append(clock(device) - start)
    return times


def bandwidth_tensors(device: torch.device, size_mib: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A source with distinct values on every page (pages of one constant can be
    merged by the kernel or the hypervisor, KSM, and then hit the cache) and a
    destination, for timing a sum (read) and a copy (read + write)."""
    src = torch.arange(size_mib * (1 << 20) // 4, dtype=torch.float32, device=device)
    return src, torch.empty_like(src)


def bandwidth_result(nbytes: int, read_s: float, copy_s: float, reps: int, when: str) -> dict:
    """GB/s of a read (sum) and a copy (read + write); the bound uses the larger."""
    return {
        "tensor_bytes": nbytes,
        "reps": reps,
        "read_gb_s": nbytes / read_s / 1e9,
        "copy_gb_s": 2 * nbytes / copy_s / 1e9,
        "bandwidth_gb_s": max(nbytes / read_s, 2 * nbytes / copy_s) / 1e9,
        "measured": when,
    }


def step_weight_bytes(lm) -> int:
    """The bytes of weights one decode step reads (the model's own count where it has one)."""
    if hasattr(lm, "step_weight_bytes"):
        return int(lm.step_weight_bytes())
    return int(lm.info.weight_bytes)


def add_step_bound(costs: dict, target, draft) -> dict:
    """In place: the weights a decode step reads and the bound of reading them at the measured bandwidth."""
    weight_bytes = step_weight_bytes(target)
    costs["target_step_weight_bytes"] = weight_bytes
    costs["weight_bound_s"] = weight_bytes / (costs["bandwidth"]["bandwidth_gb_s"] * 1e9)
    if draft is not None:
        costs["draft_step_weight_bytes"] = step_weight_bytes(draft)
    return costs


def teacher_forced_argmax(lm, ids: Sequence[int], first: int, vocab: int, chunk: int = 16) -> list[int]:
    """argmax of lm's logits predicting ids[first:], fed the true ids (few rows per forward, as decoding does)."""
    cache = lm.new_cache(len(ids) + 1)
    for start in range(0, first - 1, chunk):
        lm.forward(list(ids[start : min(start + chunk, first - 1)]), start, cache, logits=False)
    out: list[int] = []
    for start in range(first - 1, len(ids) - 1, chunk):
        piece = list(ids[start : min(start + chunk, len(ids) - 1)])
        logits = lm.forward(piece, start, cache)
        out.extend(torch.argmax(logits[:, :vocab], dim=-1).tolist())
    return out


def measure_agreement(target, draft, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict:
    """Fraction of positions where the draft's argmax equals the target's, teacher-forced on
    (prompt ids, the target's greedy continuation) pairs."""
    vocab = min(target.vocab_size, draft.vocab_size)
    agree = total = self_match = 0
    per_prompt = []
    for prompt_ids, continuation in sequences:
        if not continuation:
            continue
        ids = list(prompt_ids) + list(continuation)
        first = len(prompt_ids)
        t = teacher_forced_argmax(target, ids, first, vocab)
        d = teacher_forced_argmax(draft, ids, first, vocab)
        same = sum(a == b for a, b in zip(t, d))
        agree += same
        total += len(t)
        self_match += sum(a == b for a, b in zip(t, continuation))
        per_prompt.append(same / len(t))
    return {
        "positions": total,
        "agreement": agree / total if total else None,
        "per_prompt": per_prompt,
        "target_reproduces_continuation": self_match / total if total else None,
    }


def greedy_sequences(models: Models, prompts: Sequence[BenchPrompt], runs: list[dict], options: Options) -> list:
    """(prompt ids, the target's greedy continuation) per prompt: from the standard T=0 runs, else generated."""
    found = {
        r["prompt_id"]: r["token_ids"]
        for r in runs
        if r["mode"] == "standard" and r["temperature"] == 0 and r.get("token_ids")
    }
    sequences = []
    for prompt in prompts:
        ids = found.get(prompt.id)
        if ids is None:
            generation = Generation(
                models.target,
                None,
                prompt.ids,
                mode="standard",
                max_new_tokens=options.max_new_tokens,
                stop_ids=models.stop_ids,
                record_baseline=False,
            )
            generation.run()
            ids = generation.token_ids
        sequences.append((prompt.ids, ids))
    return sequences
