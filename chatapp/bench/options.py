"""What a bench run is asked to do: `Options`, from the CLI flags.

Contract: `resolve_options(settings, args)` turns the `bench` sub-command's
flags (argparse namespace; absent flags are None) into a frozen `Options`, on
top of the full defaults or `QUICK`, and the sampling settings of
settings.toml. Bad flags raise ValueError with a one-line message naming the
flag; the limits are the app's own (chatapp.settings). Knows nothing about
models or measurements.

The variant section (variants.py: every CPU kernel variant end to end) runs
in a full bench unless --no-variants, alone with --variants, and not in a
--quick run unless asked for. It has its own, smaller prompt count and reply
length, which --prompt-limit and --max-new-tokens override as they do the
main runs'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import K_MAX, K_MIN, TEMPERATURE_MAX

MODES = ("hf-generate", "hf-assisted", "standard", "speculative", "auto-k")
HF_MODES = ("hf-generate", "hf-assisted")
DEFAULT_PROMPTS = Path(__file__).with_name("prompts.jsonl")
DEFAULT_OUT = Path("bench-out")


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
    bandwidth_mb: int = 1024  # the bandwidth tensor in MiB (>= 512 for a real measurement)
    time_budget_s: float | None = None  # the whole command's budget (quick); prompts are dropped to keep it
    top_k: int = 0
    top_p: float = 1.0
    system_prompt: str | None = None
    seed: int = 0
    variants: bool = True  # run the variant section (variants.py)
    variants_only: bool = False  # `--variants`: only that section
    variant_k: int | None = None  # its speculative K; None: the main runs' best K at T=0, else variants.VARIANT_K
    variant_prompt_limit: int = 6
    variant_max_new_tokens: int = 64


# `--quick`: a smoke test of a few minutes (report.py judges it against goals.GOALS["quick_run_s"]).
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
    "variants": False,  # the quick budget has no room for it; `--quick --variants` runs it alone, this small
    "variant_prompt_limit": 4,
    "variant_max_new_tokens": 48,
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


def _check(modes: tuple[str, ...], ks: tuple[int, ...], temperatures: tuple[float, ...]) -> None:
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"--modes: unknown mode {bad[0]!r}; choose from {','.join(MODES)}")
    if any(not K_MIN <= k <= K_MAX for k in ks):
        raise ValueError(f"--k: every K must be in {K_MIN}..{K_MAX}, got {','.join(map(str, ks))}")
    if any(not 0 <= t <= TEMPERATURE_MAX for t in temperatures):
        raise ValueError(f"--temperature: every temperature must be in 0..{TEMPERATURE_MAX:g}")


def _variant_flags(args) -> tuple[bool, bool, int | None, int | None]:
    """(--variants, --no-variants, --variant-k, --prompt-limit), checked."""
    only, off = bool(getattr(args, "variants", False)), bool(getattr(args, "no_variants", False))
    if only and off:
        raise ValueError("--variants runs only the variant section and --no-variants leaves it out: choose one")
    variant_k, limit = getattr(args, "variant_k", None), getattr(args, "prompt_limit", None)
    if variant_k is not None and not K_MIN <= variant_k <= K_MAX:
        raise ValueError(f"--variant-k must be in {K_MIN}..{K_MAX}, got {variant_k}")
    if limit is not None and limit < 1:
        raise ValueError(f"--prompt-limit must be >= 1, got {limit}")
    return only, off, variant_k, limit


def resolve_options(settings, args) -> Options:
    """Options from the CLI flags (args) on top of the quick or full defaults and the settings."""
    quick = bool(getattr(args, "quick", False))
    base = Options(**QUICK) if quick else Options()
    ks = parse_list(getattr(args, "k", None), int, "k") or base.ks
    temps = parse_list(getattr(args, "temperature", None), float, "temperature") or base.temperatures
    modes = parse_list(getattr(args, "modes", None), str, "modes") or base.modes
    _check(modes, ks, temps)
    explicit_max_new = getattr(args, "max_new_tokens", None)
    max_new = explicit_max_new or base.max_new_tokens
    repeats = getattr(args, "repeats", None) or base.repeats
    if max_new < 1 or repeats < 1:
        raise ValueError("--max-new-tokens and --repeats must be >= 1")
    variants_only, no_variants, variant_k, prompt_limit = _variant_flags(args)
    decoding = settings.decoding
    return Options(
        prompts_path=Path(getattr(args, "prompts", None) or DEFAULT_PROMPTS).expanduser(),
        max_new_tokens=int(max_new),
        ks=tuple(sorted(ks)),
        temperatures=tuple(sorted(temps)),
        modes=tuple(m for m in MODES if m in modes),
        repeats=int(repeats),
        out=Path(getattr(args, "out", None) or DEFAULT_OUT).expanduser(),
        quick=quick,
        prompt_limit=prompt_limit or base.prompt_limit,
        warmup_tokens=min(base.warmup_tokens, int(max_new)),
        micro_reps=base.micro_reps,
        bandwidth_mb=base.bandwidth_mb,
        time_budget_s=base.time_budget_s,
        top_k=decoding.top_k,
        top_p=decoding.top_p,
        system_prompt=decoding.system_prompt or None,
        seed=decoding.seed,
        variants=variants_only or (base.variants and not no_variants),
        variants_only=variants_only,
        variant_k=variant_k,
        variant_prompt_limit=prompt_limit or base.variant_prompt_limit,
        variant_max_new_tokens=int(explicit_max_new or base.variant_max_new_tokens),
    )


def jsonable(value):
    """Options (and results holding them) as plain JSON: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
