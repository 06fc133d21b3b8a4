"""`python main.py bench`: standard vs speculative decoding, measured.

Every mode runs in one process on the same prompts, interleaved: for each
prompt, every configuration once, in an order rotated per prompt, after one
warm-up run per configuration. Every run starts from fresh caches (a new
`Generation`, or a new `generate()` call). Modes:

    hf-generate   transformers `generate()` on the target's HF model (dynamic cache)
    hf-assisted   transformers assisted generation, `generate(assistant_model=...)`,
                  with transformers' own defaults for the number of draft tokens.
                  The assistant is an HF copy of the draft: for our int8
                  weight-only draft, a copy of the source model whose weights
                  are fake-quantized to int8 per output row (dequantized fp32
                  values, the numerics of our draft)
    standard      our engine, target only
    speculative   our engine, for each K in --k
    auto-k        our engine, K chosen before every turn by
                  AcceptanceTracker.choose_k from the running measurements of
                  the previous auto-k turns (one tracker per temperature), as
                  the UI does

Besides the runs it measures micro step costs (target decode step, target
verify of K+1 tokens, draft step), the memory bandwidth and the weight-reading
bound of a decode step, and the draft's teacher-forced greedy agreement with
the target. It writes results.json, report.md and PNG plots to --out, and
prints the headline table (markdown) to stdout; progress goes to stderr.

Function boundaries: `resolve_options` (flags -> Options), `load_models`,
`bench` (warm-up, runs, micro measurements), `run_config` (one run),
`measure_step_costs` (with the bandwidth), `measure_agreement`, `summarize`,
`speedups`, `theory`, `evaluate_goals`, `headline_table`, `write_report`,
`plot`.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

try:
    import resource  # POSIX only
except ImportError:  # Windows: no getrusage; peak memory and CPU shares are left out
    resource = None  # type: ignore[assignment]

from .engine import Generation, clock, prefill_draft
from .sampling import SamplingParams
from .stats import AcceptanceTracker, best_k, expected_speedup, expected_tokens_per_round

MODES = ("hf-generate", "hf-assisted", "standard", "speculative", "auto-k")
HF_MODES = ("hf-generate", "hf-assisted")
DEFAULT_PROMPTS = Path(__file__).with_name("bench_prompts.jsonl")
DEFAULT_OUT = Path("bench-out")

# The goals the report judges (thresholds of the issue, not measurements).
GOALS = {
    "standard_vs_hf": 2.0,  # our standard tokens/s >= this x hf-generate
    "step_vs_bound": 1.5,  # decode step <= this x the weight-reading bound
    "agreement": 0.95,  # int8 draft greedy agreement >= this
    "draft_cost": 0.35,  # draft step <= this x target step
    "speculative_vs_standard": {0.0: 2.0, 0.7: 1.5},  # best fixed K vs standard, per temperature
    "measured_vs_theory": 0.85,  # measured speedup >= this x theoretical
    "auto_vs_best": 0.95,  # auto-K tokens/s >= this x best fixed K
}

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- options -------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    prompts_path: Path = DEFAULT_PROMPTS
    max_new_tokens: int = 96
    ks: tuple[int, ...] = (2, 3, 4, 6, 8, 10)
    temperatures: tuple[float, ...] = (0.0, 0.7)
    modes: tuple[str, ...] = MODES
    repeats: int = 1
    out: Path = DEFAULT_OUT
    quick: bool = False
    prompt_limit: int | None = None  # None: every prompt of the file
    warmup_tokens: int = 16
    micro_reps: int = 15
    bandwidth_mb: int = 1024  # the bandwidth tensor (>= 512 MiB for a real measurement)
    time_budget_s: float | None = None  # the whole command's budget (quick); prompts are dropped to keep it
    top_k: int = 0
    top_p: float = 1.0
    system_prompt: str | None = None
    seed: int = 0


QUICK = {
    "max_new_tokens": 48,
    "ks": (2, 4, 6, 8),
    "temperatures": (0.0, 0.7),
    "repeats": 1,
    "prompt_limit": 4,
    "warmup_tokens": 4,
    "micro_reps": 7,
    "bandwidth_mb": 512,
    "time_budget_s": 285.0,
}


def parse_list(text: str | None, convert: Callable[[str], Any], name: str) -> tuple | None:
    """'1,2,4' -> (1, 2, 4); None or blank -> None. Bad items raise ValueError naming the flag."""
    if text is None or not str(text).strip():
        return None
    items = []
    for raw in str(text).split(","):
        raw = raw.strip()
        if not raw:
            continue
        try:
            items.append(convert(raw))
        except ValueError:
            raise ValueError(f"--{name}: {raw!r} is not a valid value") from None
    if not items:
        raise ValueError(f"--{name} is empty")
    return tuple(dict.fromkeys(items))  # unique, in the given order


def resolve_options(settings, args) -> Options:
    """Options from the CLI flags (args) on top of the quick or full defaults and the settings."""
    base = Options(**QUICK) if getattr(args, "quick", False) else Options()
    ks = parse_list(getattr(args, "k", None), int, "k") or base.ks
    temps = parse_list(getattr(args, "temperature", None), float, "temperature") or base.temperatures
    modes = parse_list(getattr(args, "modes", None), str, "modes") or base.modes
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"--modes: unknown mode {bad[0]!r}; choose from {','.join(MODES)}")
    if any(not 1 <= k <= 16 for k in ks):
        raise ValueError(f"--k: every K must be in 1..16, got {','.join(map(str, ks))}")
    if any(not 0 <= t <= 10 for t in temps):
        raise ValueError("--temperature: every temperature must be in 0..10")
    max_new = getattr(args, "max_new_tokens", None) or base.max_new_tokens
    repeats = getattr(args, "repeats", None) or base.repeats
    if max_new < 1 or repeats < 1:
        raise ValueError("--max-new-tokens and --repeats must be >= 1")
    decoding = settings.decoding
    return Options(
        prompts_path=Path(getattr(args, "prompts", None) or DEFAULT_PROMPTS).expanduser(),
        max_new_tokens=int(max_new),
        ks=tuple(sorted(ks)),
        temperatures=tuple(sorted(temps)),
        modes=tuple(m for m in MODES if m in modes),
        repeats=int(repeats),
        out=Path(getattr(args, "out", None) or DEFAULT_OUT).expanduser(),
        quick=bool(getattr(args, "quick", False)),
        prompt_limit=base.prompt_limit,
        warmup_tokens=min(base.warmup_tokens, int(max_new)),
        micro_reps=base.micro_reps,
        bandwidth_mb=base.bandwidth_mb,
        time_budget_s=base.time_budget_s,
        top_k=decoding.top_k,
        top_p=decoding.top_p,
        system_prompt=decoding.system_prompt or None,
        seed=decoding.seed,
    )


# --- prompts -------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    ids: tuple[int, ...]


def load_prompts(path: Path) -> list[dict]:
    """The JSONL prompt file: one {"id", "category", "prompt"} object per line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"cannot read the prompt file {path}: {error.strerror or error}") from None
    prompts, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip() for k in ("id", "category", "prompt")):
            raise ValueError(f"{path}:{number}: each line needs non-empty string fields id, category and prompt")
        if item["id"] in seen:
            raise ValueError(f"{path}:{number}: duplicate prompt id {item['id']!r}")
        seen.add(item["id"])
        prompts.append(item)
    if not prompts:
        raise ValueError(f"the prompt file {path} has no prompts")
    return prompts


def select_prompts(prompts: list[dict], limit: int | None) -> list[dict]:
    """At most `limit` prompts, taken round-robin over the categories (all when limit is None)."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    by_category: dict[str, list[dict]] = {}
    for item in prompts:
        by_category.setdefault(item["category"], []).append(item)
    picked: list[dict] = []
    while len(picked) < limit:
        for items in by_category.values():
            if items and len(picked) < limit:
                picked.append(items.pop(0))
    return picked


def encode_prompts(tokenizer, prompts: list[dict], system: str | None, max_prompt_tokens: int) -> list[BenchPrompt]:
    """Chat-template each prompt as one user turn (the app's own build_prompt)."""
    from .chat import build_prompt

    encoded = []
    for item in prompts:
        result = build_prompt(tokenizer, [{"role": "user", "content": item["prompt"]}], system, max_prompt_tokens)
        encoded.append(BenchPrompt(item["id"], item["category"], tuple(result.ids)))
    return encoded


# --- models --------------------------------------------------------------------


@dataclass
class Models:
    """What the bench runs: our pair, and (for the hf modes) transformers models."""

    target: Any
    draft: Any
    stop_ids: tuple[int, ...] = ()
    hf_target: Any = None  # transformers model of the target (hf-generate, hf-assisted)
    hf_draft: Any = None  # transformers assistant (hf-assisted)
    hf_draft_note: str = ""
    pad_id: int | None = None
    descriptions: dict = field(default_factory=dict)
    tokenizer: Any = None
    peak_rss_pair_bytes: int | None = None
    peak_cuda_pair_bytes: int | None = None
    load_s: float = 0.0


def fake_quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """In place: every Linear and embedding weight -> int8 per output row, dequantized.

    The same rounding as chatapp.llama.quantize_int8, which our int8 draft uses
    for each matrix (fused QKV and gate/up rows are quantized row by row, so
    quantizing the separate projections gives the same values). Tied weights
    are quantized once.
    """
    from .llama import quantize_int8

    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                continue
            weight = module.weight
            if weight.data_ptr() in seen or weight.dim() != 2:
                continue
            seen.add(weight.data_ptr())
            q, scale = quantize_int8(weight.detach())
            weight.copy_((q.float() * scale[:, None]).to(weight.dtype))
    return model


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size so far (getrusage maxrss; KiB on Linux, bytes on macOS)."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak counters: CUDA's, and Linux's VmHWM (via /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def run_peak_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(peak RSS since reset_peak_memory, peak CUDA bytes since it) where measurable."""
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        rss = None
    cuda = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return rss, cuda


def load_models(settings, options: Options, progress: Progress = _stderr) -> Models:
    """Our pair (load_pair), plus the transformers models the hf modes need."""
    from .lm import HFDecoderLM
    from .models import load_pair, resolve_model, resolve_target_dtype, stop_token_ids

    start = time.perf_counter()
    pair = load_pair(settings.model, progress=progress)
    device = pair.target.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    models = Models(
        target=pair.target,
        draft=pair.draft,
        stop_ids=tuple(stop_token_ids(pair.tokenizer)),
        pad_id=pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else pair.tokenizer.eos_token_id,
        peak_rss_pair_bytes=peak_rss_bytes(),
        peak_cuda_pair_bytes=int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
    )
    models.descriptions = {"target": dict(vars(pair.target.info)), "draft": dict(vars(pair.draft.info)), "compatibility": pair.compatibility}
    models.tokenizer = pair.tokenizer
    if any(m in options.modes for m in HF_MODES):
        trust = bool(settings.model.trust_remote_code)
        if isinstance(pair.target, HFDecoderLM):
            models.hf_target = pair.target.model
        else:
            dtype = resolve_target_dtype(settings.model.target_dtype, device)
            folder = resolve_model(settings.model.target, progress, trust_remote_code=trust)
            progress("loading the target's transformers model for the hf modes")
            models.hf_target = _load_hf_model(folder, dtype, device, trust)
        if "hf-assisted" in options.modes:
            models.hf_draft, models.hf_draft_note = _hf_assistant(settings, pair, models.hf_target, progress)
    models.load_s = time.perf_counter() - start
    return models


def _load_hf_model(folder, dtype: torch.dtype, device: torch.device, trust: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust)
    return model.to(device).eval()


def _hf_assistant(settings, pair, hf_target, progress: Progress):
    """The transformers assistant for hf-assisted, and a sentence saying what it is."""
    from .lm import HFDecoderLM
    from .models import resolve_model

    if isinstance(pair.draft, HFDecoderLM):
        return pair.draft.model, f"the pair's own draft model ({pair.draft.info.quantization})"
    device = pair.target.device
    draft_spec = settings.model.draft.strip()
    needs_fp32 = pair.draft.info.quantization.startswith("int8") or next(hf_target.parameters()).dtype != torch.float32
    if draft_spec or needs_fp32:
        trust = bool(settings.model.trust_remote_code)
        folder = resolve_model(draft_spec or settings.model.target, progress, trust_remote_code=trust)
        source = _load_hf_model(folder, torch.float32, device, trust)
    else:
        source = copy.deepcopy(hf_target)
    if pair.draft.info.quantization.startswith("int8"):
        progress("fake-quantizing an HF copy of the draft to int8 per output row for hf-assisted")
        return fake_quantize_int8(source), (
            "a transformers float32 copy of the draft's source model with every Linear and embedding weight "
            "fake-quantized to int8 per output row (dequantized fp32 values: the numerics of our int8 draft, "
            "run by transformers at fp32 speed)"
        )
    return source, "a transformers copy of the draft's source model (unquantized, like our draft)"


# --- configurations and one run -------------------------------------------------


@dataclass(frozen=True)
class Config:
    mode: str
    k: int  # 0 except for speculative
    temperature: float

    @property
    def label(self) -> str:
        k = f" K={self.k}" if self.mode == "speculative" else ""
        return f"{self.mode}{k} T={self.temperature:g}"


def build_configs(options: Options) -> list[Config]:
    configs = []
    for t in options.temperatures:
        for mode in options.modes:
            if mode == "speculative":
                configs.extend(Config(mode, k, t) for k in options.ks)
            else:
                configs.append(Config(mode, 0, t))
    return configs


def rotated(items: Sequence, shift: int) -> list:
    if not items:
        return []
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def run_config(
    models: Models,
    config: Config,
    prompt: BenchPrompt,
    *,
    max_new_tokens: int,
    seed: int,
    options: Options,
    tracker: AcceptanceTracker | None = None,
) -> dict:
    """One generation of `prompt` in `config`, from fresh caches; returns its record."""
    device = models.target.device
    record: dict[str, Any] = {
        "config": config.label, "mode": config.mode, "k": config.k, "temperature": config.temperature,
        "prompt_id": prompt.id, "category": prompt.category, "prompt_tokens": len(prompt.ids), "seed": seed,
    }  # fmt: skip
    reset_peak_memory(device)
    if config.mode in HF_MODES:
        record.update(_run_hf(models, config, prompt, max_new_tokens, seed, options))
    else:
        record.update(_run_engine(models, config, prompt, max_new_tokens, seed, options, tracker))
    record["peak_rss_bytes"], record["peak_cuda_bytes"] = run_peak_memory(device)
    record["tokens_per_s"] = record["new_tokens"] / record["wall_s"] if record["wall_s"] > 0 else 0.0
    if record.get("prefill_s") is not None:  # our engine: the rate after the prompt's prefill
        decode = record["wall_s"] - record["prefill_s"]
        record["decode_tokens_per_s"] = record["new_tokens"] / decode if decode > 0 else None
    return record


def _run_engine(models, config, prompt, max_new_tokens, seed, options, tracker) -> dict:
    k, k_choice = config.k, "fixed"
    if config.mode == "auto-k":
        assert tracker is not None, "auto-k needs an AcceptanceTracker"
        k = tracker.choose_k()
        k_choice = f"auto (a={tracker.acceptance_rate:.3f}, c={tracker.cost_ratio:.3f}"
        k_choice += f", verify +{tracker.verify_slope:.3f} step/token"
        k_choice += ")"
    mode = "standard" if config.mode == "standard" else "speculative"
    device = models.target.device
    start = clock(device)
    generation = Generation(
        models.target, models.draft if mode == "speculative" else None, prompt.ids,
        mode=mode, k=max(k, 1), sampling=SamplingParams(config.temperature, options.top_k, options.top_p),
        max_new_tokens=max_new_tokens, stop_ids=models.stop_ids, seed=seed, baseline=None, record_baseline=False,
    )  # fmt: skip
    generation.run()
    wall = clock(device) - start
    if tracker is not None:
        tracker.record(generation.stats)
    s = generation.stats
    return {
        "k": k if mode == "speculative" else 0,
        "k_choice": k_choice if mode == "speculative" else None,
        "new_tokens": s.new_tokens, "wall_s": wall, "engine_wall_s": s.wall_s, "prefill_s": s.prefill_s,
        "draft_s": s.draft_s, "target_s": s.target_s, "rounds": s.rounds, "drafted": s.drafted, "accepted": s.accepted,
        "acceptance_rate": s.acceptance_rate, "mean_accepted_per_round": s.mean_accepted_per_round,
        "draft_step_s": s.draft_step_s, "verify_step_s": s.verify_step_s,
        "target_forwards": s.target_forwards, "draft_forwards": s.draft_forwards,
        "rejected": s.rejected, "drafted_kept": s.drafted_kept,
        "stop_reason": s.stop_reason, "token_ids": generation.token_ids,
    }  # fmt: skip


def hf_generate_kwargs(models: Models, temperature: float, options: Options, max_new_tokens: int) -> dict:
    """generate() arguments matching our engine's sampling: stop ids, top-k off when 0, no other processors."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": list(models.stop_ids) or None,
        "pad_token_id": models.pad_id,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=options.top_k, top_p=options.top_p)
    return kwargs


def _run_hf(models, config, prompt, max_new_tokens, seed, options) -> dict:
    model = models.hf_target
    if model is None:
        raise ValueError(f"{config.mode} needs the target's transformers model")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt.ids)], dtype=torch.long, device=device)
    kwargs = hf_generate_kwargs(models, config.temperature, options, max_new_tokens)
    if config.mode == "hf-assisted":
        if models.hf_draft is None:
            raise ValueError("hf-assisted needs a transformers assistant model")
        kwargs["assistant_model"] = models.hf_draft
    torch.manual_seed(seed)
    start = clock(device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    wall = clock(device) - start
    new = out[0, ids.shape[1] :].tolist()
    return {"new_tokens": len(new), "wall_s": wall, "token_ids": new, "k_choice": None}


# --- micro measurements ------------------------------------------------------------


def _median_time(fn: Callable[[], Any], reps: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = clock(device)
        fn()
        times.append(clock(device) - start)
    return statistics.median(times)


def context_ids(prompts: Sequence[BenchPrompt], length: int) -> list[int]:
    """`length` realistic token ids: the bench prompts, concatenated and cycled."""
    pool = [t for p in prompts for t in p.ids] or [0]
    return [pool[i % len(pool)] for i in range(length)]


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
        costs["bandwidth"] = bandwidth_result(
            src.numel() * 4, medians.pop("bandwidth_read_s"), medians.pop("bandwidth_copy_s"), reps,
            "interleaved with the step reps",
        )
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


def bandwidth_tensors(device: torch.device, megabytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A source with distinct values on every page (pages of one constant can be
    merged by the kernel or the hypervisor, KSM, and then hit the cache) and a
    destination, for timing a sum (read) and a copy (read + write)."""
    src = torch.arange(megabytes * (1 << 20) // 4, dtype=torch.float32, device=device)
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


# --- the whole bench -------------------------------------------------------------------


def machine_description(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = list(os.getloadavg())
    return info


def cpu_sample() -> dict | None:
    """The machine's busy and steal CPU seconds (/proc/stat) and this process's CPU seconds, now."""
    if resource is None:
        return None
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    values = [int(v) / ticks for v in fields]
    user, nice, system, idle, iowait, irq, softirq = values[:7]
    steal = values[7] if len(values) > 7 else 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall": time.perf_counter(),
        "busy": user + nice + system + irq + softirq,
        "steal": steal,
        "self": usage.ru_utime + usage.ru_stime,
    }


def cpu_contention(before: dict | None, after: dict | None, cores: int) -> dict | None:
    """Shares of the machine's CPU capacity used by other processes, by us, and stolen (VM), between samples."""
    if not before or not after:
        return None
    capacity = (after["wall"] - before["wall"]) * max(cores, 1)
    if capacity <= 0:
        return None
    ours = after["self"] - before["self"]
    busy = after["busy"] - before["busy"]
    return {
        "ours": ours / capacity,
        "others": max(0.0, busy - ours) / capacity,
        "steal": (after["steal"] - before["steal"]) / capacity,
    }


def hf_assisted_defaults() -> dict:
    """transformers' default assisted-generation parameters (what hf-assisted runs with)."""
    try:
        from transformers import GenerationConfig

        defaults = GenerationConfig()._get_default_generation_params()
    except Exception:  # older or newer transformers: not fatal for a report line
        return {}
    keys = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    return {k: defaults.get(k) for k in keys}


MIN_PROMPTS = 2  # a time budget never cuts the runs below this many prompts
TAIL_RESERVE_S = 30.0  # what a time budget keeps for the micro measurements, the agreement and the files


def bench(
    models: Models,
    prompts: Sequence[BenchPrompt],
    options: Options,
    progress: Progress = _stderr,
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
    temperature's auto-k turns only. Default: calibrated_tracker on the first prompt.
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
    started = time.perf_counter()
    progress(f"warm-up: {len(configs)} configurations, {options.warmup_tokens} tokens each")
    for config in configs:  # the warm-up's auto-k turns feed a throwaway tracker, not the measured one
        run_config(models, config, prompts[0], max_new_tokens=options.warmup_tokens, seed=options.seed,
                   options=options, tracker=AcceptanceTracker())  # fmt: skip
    timing["warmup_s"] = time.perf_counter() - started

    started = time.perf_counter()
    runs: list[dict] = []
    skipped: list[str] = []
    done = 0
    total = options.repeats * len(prompts) * len(configs)
    for repeat in range(options.repeats):
        for index, prompt in enumerate(prompts):
            now = time.perf_counter()
            if deadline is not None and done >= MIN_PROMPTS and now + (now - started) / done > deadline:
                skipped.append(f"{prompt.id} (repeat {repeat})")
                progress(f"time budget: skipping {prompt.id} (repeat {repeat})")
                continue
            done += 1
            seed = options.seed + 1000 * repeat + index
            for config in rotated(configs, index + repeat):
                record = run_config(models, config, prompt, max_new_tokens=options.max_new_tokens, seed=seed,
                                    options=options, tracker=trackers[config.temperature])  # fmt: skip
                record["repeat"] = repeat
                runs.append(record)
                progress(_run_line(len(runs), total, record))
    timing["runs_s"] = time.perf_counter() - started

    started = time.perf_counter()
    median_prompt = int(statistics.median(len(p.ids) for p in prompts))
    ctx = min(median_prompt + options.max_new_tokens // 2, models.target.max_positions - max(options.ks) - 2)
    progress(f"micro step costs at {ctx} tokens of context, {options.micro_reps} reps")
    micro = measure_step_costs(models.target, models.draft, options.ks, context_ids(prompts, ctx), options.micro_reps,
                               bandwidth_mb=options.bandwidth_mb)  # fmt: skip
    weight_bytes = _step_weight_bytes(models.target)
    micro["target_step_weight_bytes"] = weight_bytes
    micro["weight_bound_s"] = weight_bytes / (micro["bandwidth"]["bandwidth_gb_s"] * 1e9)
    if models.draft is not None:
        micro["draft_step_weight_bytes"] = _step_weight_bytes(models.draft)
    timing["micro_s"] = time.perf_counter() - started

    started = time.perf_counter()
    progress("draft/target greedy agreement (teacher-forced)")
    ran = {r["prompt_id"] for r in runs}
    sequences = greedy_sequences(models, [p for p in prompts if p.id in ran], runs, options)
    micro["agreement"] = measure_agreement(models.target, models.draft, sequences)
    timing["agreement_s"] = time.perf_counter() - started

    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = list(os.getloadavg())
    machine["cpu_share"] = cpu_contention(cpu_before, cpu_sample(), os.cpu_count() or 1)
    machine["peak_rss_pair_bytes"] = models.peak_rss_pair_bytes
    machine["peak_rss_process_bytes"] = peak_rss_bytes()
    if models.peak_cuda_pair_bytes is not None:
        machine["peak_cuda_pair_bytes"] = models.peak_cuda_pair_bytes
    return {
        "options": _jsonable(asdict(options)),
        "machine": machine,
        "models": models.descriptions,
        "hf_assisted": {"assistant": models.hf_draft_note, "transformers_defaults": hf_assisted_defaults()},
        "prompts": [{"id": p.id, "category": p.category, "prompt_tokens": len(p.ids)} for p in prompts],
        "configs": [c.label for c in configs],
        "skipped_prompts": skipped,
        "runs": runs,
        "micro": micro,
        "timing": timing,
        "auto_k_final": {f"{t:g}": {"a": tr.acceptance_rate, "c": tr.cost_ratio, "k": tr.choose_k()} for t, tr in trackers.items()},
    }


def calibrated_tracker(models: Models, ids: Sequence[int], new_tokens: int = 32) -> AcceptanceTracker:
    """An AcceptanceTracker seeded as ChatService.calibrate seeds the UI's (service.calibrate_tracker)."""
    from .service import calibrate_tracker

    tracker = AcceptanceTracker()
    calibrate_tracker(tracker, models.target, models.draft, list(ids), new_tokens)
    return tracker


def service_tracker(models: Models) -> Callable[[], AcceptanceTracker]:
    """A tracker factory that runs the app's own ChatService.calibrate() on these models."""

    def make() -> AcceptanceTracker:
        from .models import ModelPair
        from .service import ChatService

        service = ChatService(ModelPair(models.target, models.draft, models.tokenizer, "", 0.0))
        service.calibrate()
        return service.tracker

    return make


def greedy_sequences(models: Models, prompts: Sequence[BenchPrompt], runs: list[dict], options: Options) -> list:
    """(prompt ids, the target's greedy continuation) per prompt: from the standard T=0 runs, else generated."""
    found = {r["prompt_id"]: r["token_ids"] for r in runs if r["mode"] == "standard" and r["temperature"] == 0 and r.get("token_ids")}
    sequences = []
    for prompt in prompts:
        ids = found.get(prompt.id)
        if ids is None:
            generation = Generation(models.target, None, prompt.ids, mode="standard", max_new_tokens=options.max_new_tokens,
                                    stop_ids=models.stop_ids, record_baseline=False)  # fmt: skip
            ids = generation.run() and generation.token_ids
        sequences.append((prompt.ids, ids))
    return sequences


def _step_weight_bytes(lm) -> int:
    if hasattr(lm, "step_weight_bytes"):
        return int(lm.step_weight_bytes())
    return int(lm.info.weight_bytes)


def _run_line(n: int, total: int, r: dict) -> str:
    extra = ""
    if r.get("acceptance_rate") is not None:
        extra = f", a={r['acceptance_rate']:.2f}"
    if r["mode"] == "auto-k":
        extra += f", chose K={r['k']}"
    return (
        f"[{n}/{total}] {r['config']} | {r['prompt_id']}: {r['new_tokens']} tokens in {r['wall_s']:.2f} s "
        f"({r['tokens_per_s']:.1f} tok/s{extra})"
    )


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --- summaries ---------------------------------------------------------------------


def spread(values: Iterable[float | None]) -> dict | None:
    """{median, min, max, n} of the values that are not None; None when there are none."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


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
            "tokens_per_s": spread(r["tokens_per_s"] for r in items),
            "decode_tokens_per_s": spread(r.get("decode_tokens_per_s") for r in items),
            "wall_s": spread(r["wall_s"] for r in items),
            "new_tokens": spread(r["new_tokens"] for r in items),
            "acceptance_rate": spread(r.get("acceptance_rate") for r in items),
            "mean_accepted_per_round": spread(r.get("mean_accepted_per_round") for r in items),
            "draft_step_s": spread(r.get("draft_step_s") for r in items),
            "verify_step_s": spread(r.get("verify_step_s") for r in items),
            "peak_rss_bytes": spread(r.get("peak_rss_bytes") for r in items),
            "pooled_acceptance_rate": accepted / drafted if drafted else None,
            "alpha": _alpha(items),
            "pooled_accepted_per_round": accepted / rounds if rounds else None,
            "time_split": _time_split(items),
        }
        if first["mode"] == "auto-k":
            entry["chosen_k"] = sorted(r["k"] for r in items)
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


def _theory_a(entry: dict) -> float | None:
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


def median_tps(summary: dict, label: str) -> float | None:
    entry = summary.get(label)
    return entry["tokens_per_s"]["median"] if entry and entry["tokens_per_s"] else None


def speedups(summary: dict) -> dict[str, dict]:
    """Per configuration: median tokens/s over the median of standard and of hf-generate at its temperature."""
    out = {}
    for label, entry in summary.items():
        t = entry["temperature"]
        tps = median_tps(summary, label)
        std = median_tps(summary, Config("standard", 0, t).label)
        hf = median_tps(summary, Config("hf-generate", 0, t).label)
        decode = _median(summary, label, "decode_tokens_per_s")
        std_decode = _median(summary, Config("standard", 0, t).label, "decode_tokens_per_s")
        out[label] = {
            "vs_standard": tps / std if tps is not None and std else None,
            "vs_hf_generate": tps / hf if tps is not None and hf else None,
            "decode_vs_standard": decode / std_decode if decode is not None and std_decode else None,
        }
    return out


def _median(summary: dict, label: str | None, key: str) -> float | None:
    entry = summary.get(label) if label else None
    value = entry.get(key) if entry else None
    return value["median"] if value else None


def paired_vs_standard(runs: Sequence[dict]) -> dict[str, float]:
    """Per configuration: the median over prompts (and repeats) of its tokens/s over standard's on the
    same prompt, repeat and temperature. Runs of one prompt are close in time, so load from other
    processes that comes and goes cancels out better than in the ratio of medians."""
    standard = {(r["prompt_id"], r.get("repeat", 0), r["temperature"]): r["tokens_per_s"] for r in runs if r["mode"] == "standard"}
    ratios: dict[str, list[float]] = {}
    for r in runs:
        base = standard.get((r["prompt_id"], r.get("repeat", 0), r["temperature"]))
        if base:
            ratios.setdefault(r["config"], []).append(r["tokens_per_s"] / base)
    return {label: statistics.median(values) for label, values in ratios.items()}


def best_fixed_k(summary: dict, temperature: float) -> str | None:
    """The label of the fastest speculative configuration (median tokens/s) at `temperature`."""
    labels = [l for l, e in summary.items() if e["mode"] == "speculative" and e["temperature"] == temperature and e["tokens_per_s"]]
    return max(labels, key=lambda l: summary[l]["tokens_per_s"]["median"]) if labels else None


def theory(summary: dict, micro: dict) -> dict[str, dict]:
    """Per speculative configuration: theoretical speedups from the measured a and step costs.

    simple:      E / (1 + K c),                 c = draft step / target step
    with_verify: E * step / (K draft + verify(K+1 tokens))
    E = (1 - a^(K+1)) / (1 - a), a = the configuration's pooled acceptance rate.
    """
    step, draft = micro.get("target_step_s"), micro.get("draft_step_s")
    out = {}
    for label, entry in summary.items():
        if entry["mode"] != "speculative" or _theory_a(entry) is None or not step or draft is None:
            continue
        k, a = entry["k"], _theory_a(entry)
        verify = micro.get("verify_s", {}).get(str(k))
        e = expected_tokens_per_round(a, k)
        c = draft / step
        simple = expected_speedup(a, k, c)
        with_verify = e * step / (k * draft + verify) if verify else None
        ratios = speedups(summary)[label]
        measured = ratios["vs_standard"]
        # The same formula from the costs the runs themselves measured (diagnostic):
        # standard's per-step target time, this configuration's draft step and verify forward.
        run_step = _median(summary, Config("standard", 0, entry["temperature"]).label, "verify_step_s")
        run_draft, run_verify = _median(summary, label, "draft_step_s"), _median(summary, label, "verify_step_s")
        in_run = e * run_step / (k * run_draft + run_verify) if run_step and run_draft is not None and run_verify else None
        out[label] = {
            "measured_decode": ratios["decode_vs_standard"], "with_verify_in_run_costs": in_run,
            "k": k, "temperature": entry["temperature"], "a": a, "accepted_over_drafted": entry["pooled_acceptance_rate"], "expected_tokens": e, "c": c,
            "verify_s": verify, "simple": simple, "with_verify": with_verify, "measured": measured,
            "measured_over_simple": measured / simple if measured is not None and simple else None,
            "measured_over_with_verify": measured / with_verify if measured is not None and with_verify else None,
        }  # fmt: skip
    return out


# --- goals ---------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    value: float | None
    threshold: float
    higher_is_better: bool = True

    @property
    def ok(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def text(self) -> str:
        if self.value is None:
            return f"{self.name}: not measured"
        op = ">=" if self.higher_is_better else "<="
        mark = "ok" if self.ok else "FAILS"
        return f"{self.name} = {self.value:.3f} (needs {op} {self.threshold:g}): {mark}"


@dataclass
class Goal:
    number: int
    title: str
    checks: list[Check]
    explanation: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        results = [c.ok for c in self.checks]
        if not results or all(r is None for r in results):
            return "NOT MEASURED"
        if any(r is False for r in results):
            return "FAIL"
        return "PASS" if all(results) else "INCOMPLETE"

    def to_dict(self) -> dict:
        return {
            "goal": self.number, "title": self.title, "status": self.status, "explanation": self.explanation,
            "checks": [{"name": c.name, "value": c.value, "threshold": c.threshold, "ok": c.ok} for c in self.checks],
        }  # fmt: skip


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f} ms"


def evaluate_goals(summary: dict, micro: dict, thresholds: dict = GOALS) -> list[Goal]:
    """PASS / FAIL / NOT MEASURED for the five goals, with the numbers and, on failure, why."""
    temps = sorted({e["temperature"] for e in summary.values()})
    return [
        _goal_standard(summary, micro, temps, thresholds),
        _goal_draft(micro, thresholds),
        _goal_speculative(summary, micro, thresholds),
        _goal_theory(summary, micro, thresholds),
        _goal_auto(summary, temps, thresholds),
    ]


def _goal_standard(summary, micro, temps, th) -> Goal:
    checks, why = [], []
    for t in temps:
        std, hf = median_tps(summary, Config("standard", 0, t).label), median_tps(summary, Config("hf-generate", 0, t).label)
        check = Check(f"standard / hf-generate tokens/s at T={t:g}", _ratio(std, hf), th["standard_vs_hf"])
        checks.append(check)
        if check.ok is False:
            why.append(f"At T={t:g} our standard decodes {std:.1f} tok/s and hf-generate {hf:.1f} tok/s (ratio {check.value:.2f}).")
    step, bound = micro.get("target_step_s"), micro.get("weight_bound_s")
    check = Check("decode step / weight-reading bound", _ratio(step, bound), th["step_vs_bound"], higher_is_better=False)
    checks.append(check)
    if check.ok is False:
        bw = micro["bandwidth"]["bandwidth_gb_s"]
        why.append(
            f"The target's 1-token step takes {_ms(step)}; reading its {micro['target_step_weight_bytes'] / 1e6:.0f} MB of weights "
            f"at the measured {bw:.1f} GB/s takes {_ms(bound)}, so {step / bound:.2f}x the bound: the step is "
            f"{'compute- or overhead-bound' if step > bound else 'at the bound'}, effective {micro['target_step_weight_bytes'] / step / 1e9:.1f} GB/s."
        )
    return Goal(1, f"our standard >= {th['standard_vs_hf']:g}x hf-generate; decode step <= {th['step_vs_bound']:g}x weight-reading bound", checks, why)


def _goal_draft(micro, th) -> Goal:
    agreement = (micro.get("agreement") or {}).get("agreement")
    step, draft = micro.get("target_step_s"), micro.get("draft_step_s")
    checks = [
        Check("draft greedy agreement", agreement, th["agreement"]),
        Check("draft step / target step", _ratio(draft, step), th["draft_cost"], higher_is_better=False),
    ]
    why = []
    if checks[0].ok is False:
        why.append(f"The int8 draft's argmax matches the target's at {agreement:.3f} of {micro['agreement']['positions']} teacher-forced positions.")
    if checks[1].ok is False:
        wb = micro.get("draft_step_weight_bytes")
        bw = micro["bandwidth"]["bandwidth_gb_s"]
        bound = wb / (bw * 1e9) if wb else None
        why.append(
            f"The draft step takes {_ms(draft)} vs the target's {_ms(step)}. Its weights are {wb / 1e6:.0f} MB "
            f"({wb / micro['target_step_weight_bytes']:.2f}x the target's); at {bw:.1f} GB/s reading them takes {_ms(bound)}, "
            f"so the draft step runs at {draft / bound:.2f}x its own weight-reading bound."
            if wb else f"The draft step takes {_ms(draft)} vs the target's {_ms(step)}."
        )
    return Goal(2, f"INT8 draft agreement >= {th['agreement']:g} and draft step <= {th['draft_cost']:g}x target step", checks, why)


def _ceiling(a: float, c: float) -> tuple[int, float]:
    """The best K in 1..16 and its simple-theory speedup for acceptance a and cost ratio c."""
    k = best_k(min(a, 0.999), c)
    return k, expected_speedup(min(a, 0.999), k, c)


def _goal_speculative(summary, micro, th) -> Goal:
    checks, why = [], []
    step, draft = micro.get("target_step_s"), micro.get("draft_step_s")
    for t, need in sorted(th["speculative_vs_standard"].items()):
        best = best_fixed_k(summary, t)
        std = median_tps(summary, Config("standard", 0, t).label)
        value = _ratio(median_tps(summary, best), std) if best else None
        check = Check(f"best fixed K / standard at T={t:g}" + (f" ({best})" if best else ""), value, need)
        checks.append(check)
        if check.ok is False:
            a = _theory_a(summary[best])
            text = f"At T={t:g} the best fixed K is {summary[best]['k']} ({median_tps(summary, best):.1f} vs {std:.1f} tok/s standard, a={a:.3f})."
            if step and draft is not None:
                c = draft / step
                k, ceiling = _ceiling(a, c)
                text += f" With a={a:.3f} and c={c:.3f} the simple theory allows at most {ceiling:.2f}x (K={k})"
                need_c = _cost_needed(a, need)
                need_a = _acceptance_needed(c, need)
                text += "; reaching " + f"{need:g}x needs " + " or ".join(
                    x for x in (
                        f"c <= {need_c:.3f} at this a" if need_c is not None else "",
                        f"a >= {need_a:.3f} at this c" if need_a is not None else f"a lower c (no a <= 0.999 suffices at c={c:.3f})",
                    ) if x
                ) + "."  # fmt: skip
            text += _round_costs(summary, micro, best, t)
            why.append(text)
    return Goal(3, "speculative (best K) >= " + ", ".join(f"{v:g}x standard at T={t:g}" for t, v in sorted(th["speculative_vs_standard"].items())), checks, why)


def _round_costs(summary: dict, micro: dict, label: str, t: float) -> str:
    """Where a round's time goes for `label`: verify vs 1-token step, draft step, prefill, decode-only speedup."""
    k = summary[label]["k"]
    step, verify = micro.get("target_step_s"), micro.get("verify_s", {}).get(str(k))
    parts = []
    if step and verify:
        parts.append(f"verifying K+1={k + 1} tokens costs {verify / step:.2f}x a 1-token step (micro; 1.00x if verify were weight-bound)")
    run_step = _median(summary, Config("standard", 0, t).label, "verify_step_s")
    run_draft, run_verify = _median(summary, label, "draft_step_s"), _median(summary, label, "verify_step_s")
    if run_step and run_draft is not None and run_verify:
        parts.append(
            f"in the runs a standard step took {_ms(run_step)}, a draft step {_ms(run_draft)} (c={run_draft / run_step:.2f}) "
            f"and a verify {_ms(run_verify)} ({run_verify / run_step:.2f}x the step)"
        )
    if micro.get("target_prefill_s") and micro.get("draft_prefill_s") is not None:
        how = "copies the target's prompt keys/values into the draft" if micro.get("draft_prefill") == "copied from the target" else "also prefills the draft"
        parts.append(
            f"speculative decoding {how}: {_ms(micro['draft_prefill_s'])} on top of the target's prefill, "
            f"{_ms(micro['target_prefill_s'])} at {micro['context_tokens'] - 1} tokens"
        )
    decode = speedups(summary)[label]["decode_vs_standard"]
    if decode is not None:
        parts.append(f"excluding prefill the speedup is {decode:.2f}x")
    return (" Costs: " + "; ".join(parts) + ".") if parts else ""


def _cost_needed(a: float, target: float) -> float | None:
    """The largest c for which some K in 1..16 reaches `target` simple-theory speedup at acceptance a."""
    best = None
    for k in range(1, 17):
        e = expected_tokens_per_round(min(a, 0.999), k)
        if e >= target:
            c = (e / target - 1.0) / k
            best = c if best is None else max(best, c)
    return best


def _acceptance_needed(c: float, target: float) -> float | None:
    """The smallest a (to 0.001) for which some K in 1..16 reaches `target` at cost ratio c."""
    for step in range(0, 1000):
        a = step / 1000
        if _ceiling(a, c)[1] >= target:
            return a
    return None


def _goal_theory(summary, micro, th) -> Goal:
    rows = theory(summary, micro)
    checks, why = [], []
    for label, row in sorted(rows.items(), key=lambda item: (item[1]["temperature"], item[1]["k"])):
        check = Check(f"measured / theoretical (verify-cost formula) for {label}", row["measured_over_with_verify"], th["measured_vs_theory"])
        checks.append(check)
        if check.ok is False:
            split = summary[label].get("time_split") or {}
            run_draft = summary[label]["draft_step_s"]["median"] if summary[label]["draft_step_s"] else None
            run_verify = summary[label]["verify_step_s"]["median"] if summary[label]["verify_step_s"] else None
            decode = row.get("measured_decode")
            in_run = row.get("with_verify_in_run_costs")
            why.append(
                f"{label}: measured {row['measured']:.2f}x vs theoretical {row['with_verify']:.2f}x (simple {row['simple']:.2f}x)"
                + (f"; excluding prefill measured {decode:.2f}x" if decode is not None else "")
                + (f"; the formula with the runs' own step costs gives {in_run:.2f}x" if in_run is not None else "")
                + f". In the runs the draft step was {_ms(run_draft)} (micro {_ms(micro.get('draft_step_s'))}) and the verify "
                f"{_ms(run_verify)} (micro {_ms(row['verify_s'])}); wall time split: "
                + ", ".join(f"{k} {v:.0%}" for k, v in split.items())
                + "."
            )
    return Goal(4, f"measured speedup >= {th['measured_vs_theory']:.0%} of theoretical (measured a, K, draft and verify costs)", checks, why)


def _goal_auto(summary, temps, th) -> Goal:
    checks, why = [], []
    for t in temps:
        auto = median_tps(summary, Config("auto-k", 0, t).label)
        best = best_fixed_k(summary, t)
        hf = median_tps(summary, Config("hf-assisted", 0, t).label)
        best_tps = median_tps(summary, best) if best else None
        c1 = Check(f"auto-K / best fixed K at T={t:g}", _ratio(auto, best_tps), th["auto_vs_best"])
        c2 = Check(f"auto-K / hf-assisted at T={t:g}", _ratio(auto, hf), 1.0)
        checks += [c1, c2]
        chosen = summary.get(Config("auto-k", 0, t).label, {}).get("chosen_k")
        if c1.ok is False:
            auto_label = Config("auto-k", 0, t).label
            text = f"At T={t:g} auto-K ran {auto:.1f} tok/s choosing K in {chosen} vs the best fixed {best} at {best_tps:.1f} tok/s"
            auto_decode, best_decode = _median(summary, auto_label, "decode_tokens_per_s"), _median(summary, best, "decode_tokens_per_s")
            if auto_decode and best_decode:
                text += f"; excluding prefill {auto_decode:.1f} vs {best_decode:.1f} tok/s ({auto_decode / best_decode:.2f}x)"
            auto_new, best_new = _median(summary, auto_label, "new_tokens"), _median(summary, best, "new_tokens")
            if auto_new is not None and best_new is not None and auto_new != best_new:
                text += f"; median reply {auto_new:.0f} vs {best_new:.0f} tokens (a shorter reply spreads the prefill over fewer tokens)"
            auto_verify, step = _median(summary, auto_label, "verify_step_s"), _median(summary, Config("standard", 0, t).label, "verify_step_s")
            if auto_verify and step:
                text += f"; its verify forwards took {auto_verify / step:.2f}x a standard step"
            why.append(text + ".")
        if c2.ok is False:
            why.append(f"At T={t:g} auto-K ran {auto:.1f} tok/s vs hf-assisted {hf:.1f} tok/s.")
    return Goal(5, f"auto-K within {1 - th['auto_vs_best']:.0%} of the best fixed K, and faster than hf-assisted", checks, why)


# --- the report --------------------------------------------------------------------------


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
    order = {m: i for i, m in enumerate(MODES)}
    return sorted(summary, key=lambda l: (summary[l]["temperature"], order.get(summary[l]["mode"], 99), summary[l]["k"]))


def headline_table(summary: dict, paired: dict[str, float] | None = None) -> str:
    """The headline markdown table: tokens/s (median, min–max) and ratios per configuration.

    vs standard / vs hf-generate: ratios of median tokens/s at the same temperature;
    paired (when given): the median of per-prompt ratios to standard (see paired_vs_standard).
    """
    ratios = speedups(summary)
    lines = [
        "| configuration | tokens/s median (min–max) | vs standard | vs standard, paired | vs hf-generate | acceptance a | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    paired = paired or {}
    for label in ordered_labels(summary):
        entry = summary[label]
        a = _theory_a(entry)
        name = label
        if entry.get("chosen_k"):
            name += f" (chose K {_k_range(entry['chosen_k'])})"
        lines.append(
            f"| {name} | {_fmt_spread(entry['tokens_per_s'])} | {_fmt_x(ratios[label]['vs_standard'])} | "
            f"{_fmt_x(paired.get(label))} | {_fmt_x(ratios[label]['vs_hf_generate'])} | {'–' if a is None else f'{a:.2f}'} | {entry['runs']} |"
        )
    return "\n".join(lines) + "\n"


def headline_from_results(path: str | os.PathLike = DEFAULT_OUT / "results.json") -> str:
    """The headline markdown table of a finished run's results.json (for the README)."""
    result = json.loads(Path(path).read_text(encoding="utf-8"))
    return headline_table(result["summary"], result.get("paired_vs_standard"))


def _k_range(ks: Sequence[int]) -> str:
    lo, hi = min(ks), max(ks)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _mb(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f} MiB"


def write_report(result: dict, path: Path, plots: Sequence[Path] = ()) -> Path:
    """report.md: machine, models, headline, per-configuration table, micro costs, theory, goals."""
    summary, micro, machine, options = result["summary"], result["micro"], result["machine"], result["options"]
    goals = result["goals"]
    timing = result["timing"]
    out: list[str] = ["# Speculative decoding benchmark", ""]
    out.append(
        f"{'Quick run' if options['quick'] else 'Full run'}: {len({r['prompt_id'] for r in result['runs']})} prompts × {options['repeats']} repeat(s), "
        f"{options['max_new_tokens']} new tokens max, K ∈ {{{', '.join(map(str, options['ks']))}}}, "
        f"T ∈ {{{', '.join(f'{t:g}' for t in options['temperatures'])}}}, top-k {options['top_k']}, top-p {options['top_p']:g}. "
        f"Every configuration runs on every prompt, interleaved (order rotated per prompt), after one warm-up run each; "
        f"fresh caches every run. Ratios are of median tokens/s (wall time incl. prefill)."
    )
    out.append("")
    total = timing.get("total_s")
    out.append(
        "Runtime: " + (f"**{total:.0f} s** in all ({total / 60:.1f} min); " if total else "")
        + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in timing.items() if k != "total_s")
        + "."
    )
    if options["quick"] and total:
        out.append(f"Quick-run budget (< 300 s): {'PASS' if total < 300 else 'FAIL'} ({total:.0f} s).")
    if options["quick"]:
        out.append(
            "A quick run is a smoke test: with a few prompts and short replies, figures move by several percent "
            "between runs, so verdicts within that of a threshold can flip; judge the goals on a full run."
        )
    if result.get("skipped_prompts"):
        out.append(
            f"To keep the {options['time_budget_s']:.0f} s time budget, {len(result['skipped_prompts'])} prompt(s) were not run: "
            + ", ".join(result["skipped_prompts"]) + "."
        )
    out += ["", "## Machine", ""]
    out.append(f"- CPU: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']} with {machine['torch_threads']} threads; "
               f"transformers {machine.get('transformers', '?')}; Python {machine['python']}; {machine['platform']}")  # fmt: skip
    out.append(f"- Device: {machine['device']}" + (f" ({machine['gpu']})" if machine.get("gpu") else ""))
    out.append(f"- Peak RSS with the pair loaded: {_mb(machine.get('peak_rss_pair_bytes'))}; whole process at the end (with the transformers models): {_mb(machine.get('peak_rss_process_bytes'))}")
    if machine.get("peak_cuda_pair_bytes") is not None:
        out.append(f"- Peak CUDA memory with the pair loaded: {_mb(machine['peak_cuda_pair_bytes'])}")
    if machine.get("load_average_start"):
        start, end = machine["load_average_start"], machine.get("load_average_end", [])
        out.append(f"- Load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in start)}, at end {'/'.join(f'{x:.1f}' for x in end)}")
    share = machine.get("cpu_share")
    if share:
        noisy = share["others"] + share["steal"] > 0.10
        out.append(
            f"- CPU capacity used during the bench: {share['ours']:.0%} by the bench, {share['others']:.0%} by other processes, "
            f"{share['steal']:.0%} stolen by the hypervisor"
            + (" — **the bench did not have the machine to itself; timings are noisy**" if noisy else "")
        )
    bw = micro["bandwidth"]
    out.append(f"- Memory bandwidth: {bw['read_gb_s']:.1f} GB/s read (sum), {bw['copy_gb_s']:.1f} GB/s copy (read+write) over a {bw['tensor_bytes'] / 2**20:.0f} MiB tensor, median of {bw['reps']}"
               f"{', ' + bw['measured'] if bw.get('measured') else ''}; the bound uses {bw['bandwidth_gb_s']:.1f} GB/s")
    out += ["", "## Models", ""]
    for role in ("target", "draft"):
        info = result["models"].get(role)
        if not info:
            continue
        out.append(f"- {role}: {info.get('name', '?')} — {info.get('dtype', '')}, {info.get('quantization', '')}, {info.get('implementation', '')}, {_mb(info.get('weight_bytes'))} of weights")
    hfa = result.get("hf_assisted", {})
    if hfa.get("assistant"):
        out.append(f"- hf-assisted assistant: {hfa['assistant']}")
    if hfa.get("transformers_defaults"):
        out.append("- hf-assisted runs with transformers' defaults: " + ", ".join(f"{k}={v}" for k, v in hfa["transformers_defaults"].items()))
    out += ["", "## Headline", "", headline_table(summary, result.get("paired_vs_standard"))]
    out += ["## Goals", ""]
    for goal in goals:
        out.append(f"### {goal['goal']}. {goal['title']}: **{goal['status']}**")
        out.append("")
        for check in goal["checks"]:
            out.append("- " + Check(check["name"], check["value"], check["threshold"], _higher(check)).text())
        for line in goal["explanation"]:
            out.append(f"- Why: {line}")
        out.append("")
    out += _per_config_table(summary)
    out += _micro_section(micro)
    out += _theory_section(result["theory"])
    out += _correctness_section(result.get("correctness", {}))
    if result.get("auto_k_final"):
        out += ["## Auto-K trackers at the end", ""]
        for t, v in result["auto_k_final"].items():
            out.append(f"- T={t}: a={v['a']:.3f}, c={v['c']:.3f} → K={v['k']}")
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def _higher(check: dict) -> bool:
    name = check["name"]
    return not (name.startswith("decode step") or name.startswith("draft step"))


def _per_config_table(summary: dict) -> list[str]:
    lines = [
        "## Every configuration (median, min–max over runs)", "",
        "| configuration | tokens/s | decode-only tokens/s | wall s | new tokens | acceptance | accepted/round | draft step ms | verify step ms | peak RSS MiB | time split (prefill/draft/target/other) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for label in ordered_labels(summary):
        e = summary[label]
        split = e.get("time_split")
        split_text = "/".join(f"{split[k]:.0%}" for k in ("prefill", "draft", "target", "other")) if split else "–"
        lines.append(
            f"| {label} | {_fmt_spread(e['tokens_per_s'])} | {_fmt_spread(e.get('decode_tokens_per_s'))} | {_fmt_spread(e['wall_s'], digits=2)} | {_fmt_spread(e['new_tokens'], digits=0)} | "
            f"{_fmt_spread(e['acceptance_rate'], digits=2)} | {_fmt_spread(e['mean_accepted_per_round'], digits=2)} | "
            f"{_fmt_spread(e['draft_step_s'], 1e3, 2)} | {_fmt_spread(e['verify_step_s'], 1e3, 2)} | "
            f"{_fmt_spread(e['peak_rss_bytes'], 1 / 2**20, 0)} | {split_text} |"
        )
    return lines + [""]


def _micro_section(micro: dict) -> list[str]:
    lines = ["## Micro step costs", ""]
    lines.append(f"Median of {micro['reps']} reps at {micro['context_tokens']} tokens of context.")
    lines.append("")
    lines.append(f"- target decode step (1 token): {_ms(micro['target_step_s'])}")
    lines.append(f"- weight-reading bound: {micro['target_step_weight_bytes'] / 1e6:.0f} MB / {micro['bandwidth']['bandwidth_gb_s']:.1f} GB/s = {_ms(micro['weight_bound_s'])} (step = {micro['target_step_s'] / micro['weight_bound_s']:.2f}× bound)")
    if micro.get("draft_step_s") is not None:
        lines.append(f"- draft step (1 token): {_ms(micro['draft_step_s'])} = {micro['draft_step_s'] / micro['target_step_s']:.3f}× the target step (c)")
    if micro.get("target_prefill_s") is not None:
        lines.append(f"- prefill of {micro['context_tokens'] - 1} tokens: target {_ms(micro['target_prefill_s'])}"
                     + (f", draft {_ms(micro['draft_prefill_s'])} ({micro.get('draft_prefill', 'computed')})"
                        if micro.get("draft_prefill_s") is not None else ""))
    if micro.get("min_s"):
        lines.append("- fastest rep of each: " + ", ".join(f"{k.removesuffix('_s')} {_ms(v)}" for k, v in micro["min_s"].items()))
    for k, v in micro["verify_s"].items():
        lines.append(f"- target verify of K+1 = {int(k) + 1} tokens: {_ms(v)} = {v / micro['target_step_s']:.2f}× the 1-token step")
    agreement = micro.get("agreement") or {}
    if agreement.get("agreement") is not None:
        lines.append(
            f"- draft greedy agreement (teacher-forced on the target's greedy continuations): {agreement['agreement']:.3f} over "
            f"{agreement['positions']} positions (per prompt {min(agreement['per_prompt']):.2f}–{max(agreement['per_prompt']):.2f}); "
            f"the target reproduces its own continuation at {agreement['target_reproduces_continuation']:.3f}"
        )
    return lines + [""]


def _theory_section(rows: dict) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Measured vs theoretical speedup", "",
        "a: per-token acceptance probability, pooled over the runs as accepted / (accepted + rounds with a rejection) "
        "(accepted/drafted, the engine's acceptance rate, is shown beside it and understates a); E = (1 − a^(K+1))/(1 − a); c = draft step / target step; "
        "simple = E/(1 + Kc); with verify = E · step / (K · draft + verify(K+1)), from the micro costs "
        "(the goal's figure); in-run costs: the same formula with the runs' own median draft step, verify forward and "
        "standard step; measured: median tokens/s over standard's (wall incl. prefill); decode only: after the prefill.", "",
        "| configuration | a | accepted/drafted | E | c | simple | with verify | with verify, in-run costs | measured | measured, decode only | measured / with verify |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for label, r in sorted(rows.items(), key=lambda item: (item[1]["temperature"], item[1]["k"])):
        fraction = r["measured_over_with_verify"]
        lines.append(
            f"| {label} | {r['a']:.3f} | {r['accepted_over_drafted']:.3f} | {r['expected_tokens']:.2f} | {r['c']:.3f} | {_fmt_x(r['simple'])} | "
            f"{_fmt_x(r['with_verify'])} | {_fmt_x(r.get('with_verify_in_run_costs'))} | {_fmt_x(r['measured'])} | "
            f"{_fmt_x(r.get('measured_decode'))} | {'–' if fraction is None else f'{fraction:.0%}'} |"
        )
    return lines + [""]


def correctness(runs: Sequence[dict]) -> dict:
    """At T=0: how many runs of each mode produced exactly the standard run's tokens for the same prompt."""
    reference = {(r["prompt_id"], r.get("repeat", 0)): r["token_ids"] for r in runs if r["mode"] == "standard" and r["temperature"] == 0}
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


def _correctness_section(data: dict) -> list[str]:
    if not data:
        return []
    lines = ["## Greedy outputs vs standard (T=0)", ""]
    for mode, (same, total) in data.items():
        lines.append(f"- {mode}: {same}/{total} runs token-for-token identical to our standard decode")
    lines.append("")
    return lines


# --- plots ---------------------------------------------------------------------------------


def plot(result: dict, out: Path, progress: Progress = _stderr) -> list[Path]:
    """The PNG plots (matplotlib, Agg); none if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed: no plots")
        return []
    summary, rows = result["summary"], result["theory"]
    files = []
    temps = sorted({e["temperature"] for e in summary.values()})
    spec = {t: sorted((e["k"], l) for l, e in summary.items() if e["mode"] == "speculative" and e["temperature"] == t) for t in temps}

    if any(spec.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in temps:
            if spec[t]:
                ks = [k for k, _ in spec[t]]
                ax.plot(ks, [summary[l]["pooled_acceptance_rate"] for _, l in spec[t]], "o-", color=f"C{temps.index(t)}", label=f"accepted/drafted T={t:g}")
                alphas = [summary[l].get("alpha") for _, l in spec[t]]
                if all(x is not None for x in alphas):
                    ax.plot(ks, alphas, "s--", color=f"C{temps.index(t)}", alpha=0.7, label=f"per-token a T={t:g}")
        ax.set(xlabel="K (draft tokens per round)", ylabel="acceptance", title="Acceptance vs K", ylim=(0, 1.05))
        ax.grid(alpha=0.3)
        ax.legend()
        files.append(_save(fig, out / "acceptance_vs_k.png", plt))

        fig, ax = plt.subplots(figsize=(6, 4))
        for i, t in enumerate(temps):
            labels = [l for _, l in spec[t] if l in rows]
            if not labels:
                continue
            ks = [rows[l]["k"] for l in labels]
            color = f"C{i}"
            ax.plot(ks, [rows[l]["measured"] for l in labels], "o-", color=color, label=f"measured T={t:g}")
            decode = [rows[l].get("measured_decode") for l in labels]
            if all(x is not None for x in decode):
                ax.plot(ks, decode, "^-.", color=color, alpha=0.7, label=f"measured, decode only T={t:g}")
            ax.plot(ks, [rows[l]["with_verify"] for l in labels], "s--", color=color, alpha=0.7, label=f"theory (verify cost) T={t:g}")
            ax.plot(ks, [rows[l]["simple"] for l in labels], ":", color=color, alpha=0.7, label=f"theory E/(1+Kc) T={t:g}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xlabel="K", ylabel="speedup over our standard", title="Speedup vs K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        files.append(_save(fig, out / "speedup_vs_k.png", plt))

    if rows:
        fig, ax = plt.subplots(figsize=(5, 5))
        xs = [r["with_verify"] for r in rows.values() if r["with_verify"] and r["measured"]]
        ys = [r["measured"] for r in rows.values() if r["with_verify"] and r["measured"]]
        ax.scatter(xs, ys)
        for label, r in rows.items():
            if r["with_verify"] and r["measured"]:
                ax.annotate(f"K={r['k']} T={r['temperature']:g}", (r["with_verify"], r["measured"]), fontsize=7)
        hi = max(xs + ys + [1.0]) * 1.1
        ax.plot([0, hi], [0, hi], color="grey", lw=0.8, label="measured = theory")
        ax.plot([0, hi], [0, 0.85 * hi], "--", color="grey", lw=0.8, label="85% of theory")
        ax.set(xlabel="theoretical speedup (measured a, draft and verify costs)", ylabel="measured speedup", title="Measured vs theoretical", xlim=(0, hi), ylim=(0, hi))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        files.append(_save(fig, out / "measured_vs_theory.png", plt))

    labels = ordered_labels(summary)
    if labels:
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels)), 4.5))
        med = [summary[l]["tokens_per_s"]["median"] for l in labels]
        lo = [m - summary[l]["tokens_per_s"]["min"] for m, l in zip(med, labels)]
        hi = [summary[l]["tokens_per_s"]["max"] - m for m, l in zip(med, labels)]
        colors = [f"C{MODES.index(summary[l]['mode']) if summary[l]['mode'] in MODES else 9}" for l in labels]
        ax.bar(range(len(labels)), med, yerr=[lo, hi], color=colors, capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="tokens/s (median, min–max)", title="Tokens/s per configuration")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        files.append(_save(fig, out / "tokens_per_s.png", plt))
    return files


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- putting it together ------------------------------------------------------------------


def finish(result: dict) -> dict:
    """Add the summary, ratios, theory, goals and correctness to a raw bench result."""
    summary = summarize(result["runs"])
    result["summary"] = summary
    result["speedups"] = speedups(summary)
    result["paired_vs_standard"] = paired_vs_standard(result["runs"])
    result["theory"] = theory(summary, result["micro"])
    result["goals"] = [g.to_dict() for g in evaluate_goals(summary, result["micro"])]
    result["correctness"] = correctness(result["runs"])
    return result


def write_outputs(result: dict, out: Path, progress: Progress = _stderr) -> dict[str, Path]:
    """results.json, the plots and report.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(result, out, progress)
    report = write_report(result, out / "report.md", plots)
    results = out / "results.json"
    results.write_text(json.dumps(_jsonable(result), indent=1, default=str) + "\n", encoding="utf-8")
    return {"results": results, "report": report, **{p.stem: p for p in plots}}


def run_bench(settings, args) -> int:
    """`python main.py bench`: load, run, write; the headline table to stdout."""
    started = time.perf_counter()
    options = resolve_options(settings, args)
    prompts = select_prompts(load_prompts(options.prompts_path), options.prompt_limit)
    _stderr(f"{len(prompts)} prompts, modes {','.join(options.modes)}, K {options.ks}, T {options.temperatures}, {options.max_new_tokens} new tokens")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    models = load_models(settings, options)
    context = min(models.target.max_positions, models.draft.max_positions)
    encoded = encode_prompts(models.tokenizer, prompts, options.system_prompt, context - options.max_new_tokens - max(options.ks) - 2)
    deadline = started + options.time_budget_s - TAIL_RESERVE_S if options.time_budget_s else None
    result = bench(models, encoded, options, deadline=deadline, tracker_factory=service_tracker(models))
    result["timing"] = {"load_s": models.load_s, **result["timing"]}
    finish(result)
    result["timing"]["total_s"] = time.perf_counter() - started  # everything but writing the files
    files = write_outputs(result, options.out)
    _stderr(f"wrote {', '.join(str(p) for p in files.values())}; {time.perf_counter() - started:.0f} s in all")
    print(headline_table(result["summary"], result["paired_vs_standard"]))
    for goal in result["goals"]:
        print(f"- goal {goal['goal']} ({goal['title']}): {goal['status']}")
    return 0
