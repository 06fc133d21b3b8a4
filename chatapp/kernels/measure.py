"""The kernel variants side by side on one model: `python -m chatapp.kernels.measure`.

Contract: `measure(hf_model, variants, ...)` builds the fast decoder
(chatapp.llama) once per kernel variant this CPU runs, plus plain torch ops,
for the fp32 target and its int8 draft, and times in ONE process, every
repetition interleaved over all candidates (a burst of load from other
processes then hits them alike): the target's 1-token step, the draft's step,
the target's verify of K+1 tokens and its prefill of a prompt (logits=False,
as the engine prefills), all at the end of a prefilled context. Medians.
`format_table(result)` renders the table; `main()` does both for the
configured model (the embedded SmolLM2-135M by default).

The weight-reading bound of a step is the bytes of weights it reads over the
memory bandwidth, measured between the same repetitions (the larger of a sum
and a copy over a 512 MiB tensor, as the benchmark measures it).

`candidates(hf_model, variants)` and `measure_candidates(built, ...)` are the
two halves of `measure`: the benchmark's variant section
(chatapp.bench.variants) builds the pairs once, runs whole replies on them
and times them here, in the same process.

It sits beside the kernels it measures but is a tool on top of the stack: it
imports chatapp.llama, chatapp.models and chatapp.settings lazily, and only
the benchmark imports it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import TORCH, cpu_kernels, supported_variants

BANDWIDTH_MB = 512


def candidates(hf_model, variants: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """name -> (fp32 target, int8 draft) for each variant that builds, and torch ops (last, once)."""
    from ..llama import INT8, LlamaDecoderLM  # lazy: a tool above the layer it lives in

    built = {}
    for name in [v for v in variants if v != TORCH and cpu_kernels(v) is not None] + [TORCH]:
        target = LlamaDecoderLM(hf_model, variant=name)
        draft = LlamaDecoderLM(hf_model, quantize=INT8, variant=name)
        built[name] = (target, draft)
    return built


def _jobs(target, draft, context: int, verify: int, prefill: int) -> dict[str, Callable[[], Any]]:
    """The timed calls of one candidate; the caches are filled so every step starts at `context`."""
    ids = [(7 + 7919 * i) % target.vocab_size for i in range(max(context, prefill) + verify)]
    t_cache = target.new_cache(max(context, prefill) + verify)
    d_cache = draft.new_cache(context + 1)
    target.forward(ids[:context], 0, t_cache, logits=False)
    draft.forward(ids[:context], 0, d_cache, logits=False)
    probe = ids[context : context + verify]
    return {
        "target_step": lambda: target.forward(probe[:1], context, t_cache),
        "draft_step": lambda: draft.forward(probe[:1], context, d_cache),
        "verify": lambda: target.forward(probe, context, t_cache),
        # Rewrites the context's keys/values with the same ids: the steps see the same cache.
        "prefill": lambda: target.forward(ids[:prefill], 0, t_cache, logits=False),
    }


def _bandwidth_jobs(megabytes: int) -> tuple[dict[str, Callable[[], Any]], int]:
    # Distinct values on every page: pages of one constant can be merged (KSM) and then hit the cache.
    src = torch.arange(megabytes * (1 << 20) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return {"read": lambda: src.sum(), "copy": lambda: dst.copy_(src)}, src.numel() * 4


def measure(
    hf_model,
    variants: Sequence[str] | None = None,
    *,
    reps: int = 9,
    context: int = 100,
    verify: int = 9,
    prefill: int = 100,
    bandwidth_mb: int = BANDWIDTH_MB,
) -> dict:
    """Medians (seconds) of every candidate's jobs, the bandwidth and the weight bounds."""
    variants = supported_variants() if variants is None else list(variants)
    return measure_candidates(
        candidates(hf_model, variants),
        reps=reps,
        context=context,
        verify=verify,
        prefill=prefill,
        bandwidth_mb=bandwidth_mb,
    )


def measure_candidates(
    built: dict[str, tuple[Any, Any]],
    *,
    reps: int = 9,
    context: int = 100,
    verify: int = 9,
    prefill: int = 100,
    bandwidth_mb: int = BANDWIDTH_MB,
) -> dict:
    """`measure` on pairs already built (`candidates`): name -> (target, draft)."""
    jobs = {
        (name, job): fn for name, (t, d) in built.items() for job, fn in _jobs(t, d, context, verify, prefill).items()
    }
    bandwidth, nbytes = _bandwidth_jobs(bandwidth_mb)
    jobs.update({("bandwidth", job): fn for job, fn in bandwidth.items()})
    for fn in jobs.values():  # warm-up
        fn()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in jobs}
    groups = list(dict.fromkeys(name for name, _ in jobs))
    for rep in range(reps):
        # The candidates take turns going first: torch's OpenMP threads keep spinning for a while
        # after its jobs, and would otherwise always slow down the same next candidate.
        order = groups[rep % len(groups) :] + groups[: rep % len(groups)]
        for key in sorted(jobs, key=lambda key: order.index(key[0])):
            start = time.perf_counter()
            jobs[key]()
            times[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(values) for key, values in times.items()}
    gb_s = max(nbytes / medians[("bandwidth", "read")], 2 * nbytes / medians[("bandwidth", "copy")]) / 1e9
    target, draft = next(iter(built.values()))
    return {
        "reps": reps,
        "context": context,
        "verify_tokens": verify,
        "prefill_tokens": prefill,
        "threads": torch.get_num_threads(),
        "bandwidth_gb_s": gb_s,
        "target_bound_s": target.step_weight_bytes() / (gb_s * 1e9),
        "draft_bound_s": draft.step_weight_bytes() / (gb_s * 1e9),
        "rows": {
            name: {
                "isa": cpu_kernels(name).isa() if name != TORCH else "torch ops",
                "implementation": t.info.implementation,
                **{f"{job}_s": medians[(name, job)] for job in ("target_step", "draft_step", "verify", "prefill")},
            }
            for name, (t, _) in built.items()
        },
    }


def format_table(result: dict) -> str:
    """The variant table in Markdown, with the bounds it is read against."""
    tb, db = result["target_bound_s"], result["draft_bound_s"]
    lines = [
        f"| variant (ISA) | target step ms (x bound) | draft step ms (x bound) | c = draft/target "
        f"| verify {result['verify_tokens']} / step | prefill {result['prefill_tokens']} ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        t, d = row["target_step_s"], row["draft_step_s"]
        lines.append(
            f"| {name} ({row['isa']}) | {t * 1e3:.2f} ({t / tb:.2f}x) | {d * 1e3:.2f} ({d / db:.2f}x) "
            f"| {d / t:.2f} | {row['verify_s'] / t:.2f} | {row['prefill_s'] * 1e3:.0f} |"
        )
    lines.append("")
    lines.append(
        f"Bandwidth {result['bandwidth_gb_s']:.1f} GB/s; weight-reading bound: target {tb * 1e3:.2f} ms, "
        f"draft {db * 1e3:.2f} ms. {result['threads']} threads, context {result['context']} tokens, "
        f"medians of {result['reps']} interleaved reps."
    )
    return "\n".join(lines)


def load_target_hf():
    """The configured target (model.target in the settings) as a float32 transformers model."""
    from transformers import AutoModelForCausalLM  # lazy: heavy, and only this tool needs it here

    from ..models import resolve_model
    from ..settings import load_settings

    folder = resolve_model(load_settings().model.target)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--variants", help="comma-separated (default: every variant this CPU runs)")
    parser.add_argument("--verify", type=int, default=9, help="tokens of the timed verify")
    parser.add_argument("--prefill", type=int, default=100, help="tokens of the timed prefill")
    args = parser.parse_args(argv)
    variants = args.variants.split(",") if args.variants else None
    result = measure(load_target_hf(), variants, reps=args.reps, verify=args.verify, prefill=args.prefill)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
