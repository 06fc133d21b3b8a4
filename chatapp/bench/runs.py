"""One configuration on one prompt: the bench's unit of measurement.

Contract: a `Config` is (mode, K, temperature); its `label` ("speculative K=4
T=0.7") is the key every later stage groups by. `run_config` runs one prompt
in one configuration from fresh caches and returns the run's record, plain
JSON: the configuration and prompt, then the measurements (for our engine
`TurnStats.to_dict()` plus the bench's own wall clock, the K choice as
`KChoice.to_dict()` and the token ids; for transformers, baselines.run_hf),
the peak memory and tokens/s. In a record "mode" is the bench's mode (e.g.
"auto-k") and "decoding" what our engine ran. auto-k takes K from the
tracker before the run, as the app's service does; when auto K picks K = 0
the run is standard decoding, recorded with k = 0.

A `Slot` is a configuration on one pair of models: the main runs put every
configuration on the app's pair, the variant section (variants.py) standard
and speculative decoding on each CPU kernel variant's pair. `run_slot` runs
one, its record tagged with the slot's variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..autok import AcceptanceTracker, KChoice
from ..engine import Generation, clock
from ..sampling import SamplingParams
from ..settings import K_MIN
from .baselines import Models, run_hf
from .machine import reset_peak_memory, run_peak_memory
from .options import HF_MODES, Options
from .prompts import BenchPrompt


@dataclass(frozen=True)
class Config:
    mode: str
    k: int  # 0 except for speculative
    temperature: float

    @property
    def label(self) -> str:
        k = f" K={self.k}" if self.mode == "speculative" else ""
        return f"{self.mode}{k} T={self.temperature:g}"


@dataclass(frozen=True)
class Slot:
    """One configuration on one pair of models: what the interleaved loop runs on every prompt."""

    config: Config
    models: Models
    variant: str | None = None  # the pair's CPU kernel variant (the variant section); None: the app's pair

    @property
    def label(self) -> str:
        return self.config.label + (f" [{self.variant}]" if self.variant else "")


def build_configs(options: Options) -> list[Config]:
    """Every configuration of a bench: per temperature, each mode (speculative once per K)."""
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
        "config": config.label,
        "mode": config.mode,
        "k": config.k,
        "temperature": config.temperature,
        "prompt_id": prompt.id,
        "category": prompt.category,
        "prompt_tokens": len(prompt.ids),
        "seed": seed,
    }
    reset_peak_memory(device)
    if config.mode in HF_MODES:
        measured = run_hf(
            models,
            config.mode,
            config.temperature,
            prompt.ids,
            max_new_tokens=max_new_tokens,
            seed=seed,
            options=options,
        )
    else:
        measured = _run_engine(models, config, prompt, max_new_tokens, seed, options, tracker)
    record.update(measured)
    record["peak_rss_bytes"], record["peak_cuda_bytes"] = run_peak_memory(device)
    record["tokens_per_s"] = record["new_tokens"] / record["wall_s"] if record["wall_s"] > 0 else 0.0
    if record.get("prefill_s") is not None:  # our engine: the rate after the prompt's prefill
        decode = record["wall_s"] - record["prefill_s"]
        record["decode_tokens_per_s"] = record["new_tokens"] / decode if decode > 0 else None
    return record


def run_slot(
    slot: Slot,
    prompt: BenchPrompt,
    *,
    max_new_tokens: int,
    seed: int,
    options: Options,
    tracker: AcceptanceTracker | None = None,
) -> dict:
    """run_config on the slot's pair; the record carries "variant" when the slot has one."""
    record = run_config(
        slot.models,
        slot.config,
        prompt,
        max_new_tokens=max_new_tokens,
        seed=seed,
        options=options,
        tracker=tracker,
    )
    if slot.variant is not None:
        record["variant"] = slot.variant
    return record


def k_choice_for(config: Config, tracker: AcceptanceTracker | None) -> KChoice | None:
    """The K choice of one run: None for standard, the fixed K for speculative, the tracker's for auto-k."""
    if config.mode == "standard":
        return None
    auto = config.mode == "auto-k"
    if tracker is None:
        if auto:
            raise ValueError("auto-k needs an AcceptanceTracker")
        return KChoice(k=config.k, auto=False)
    return tracker.choose(config.k, auto)


def _run_engine(models, config, prompt, max_new_tokens, seed, options, tracker) -> dict:
    choice = k_choice_for(config, tracker)
    speculative = choice is not None and choice.speculative
    device = models.target.device
    start = clock(device)
    generation = Generation(
        models.target,
        models.draft if speculative else None,
        prompt.ids,
        mode="speculative" if speculative else "standard",
        k=choice.k if speculative else K_MIN,  # a standard run ignores K; the engine still checks it
        sampling=SamplingParams(config.temperature, options.top_k, options.top_p),
        max_new_tokens=max_new_tokens,
        stop_ids=models.stop_ids,
        seed=seed,
        record_baseline=False,
        # The app times 3 target steps in each speculative reply for its own speedup figure (one inside
        # the reply, two after it); the bench measures standard decoding itself, so it leaves them out.
        reference_steps=0,
    )
    generation.run()
    wall = clock(device) - start
    if tracker is not None:
        tracker.record(generation.stats)
    measured = generation.stats.to_dict()
    measured["decoding"] = measured.pop("mode")  # the record's "mode" is the bench's (auto-k, ...)
    # The engine's clock starts at its prefill; the bench's also covers building the Generation.
    measured["engine_wall_s"] = measured.pop("wall_s")
    measured.update(wall_s=wall, k_choice=choice.to_dict() if choice else None, token_ids=generation.token_ids)
    return measured


def describe_k_choice(data: dict | None) -> str:
    """A record's "k_choice" in a few words: "fixed K=4", "auto: a=0.98 c=0.29 → K=7" (or "→ standard")."""
    choice = KChoice.from_dict(data)
    if choice is None:
        return "standard"
    if not choice.auto:
        return f"fixed K={choice.k}"
    picked = f"K={choice.k}" if choice.speculative else "standard"
    return f"auto: a={choice.acceptance_rate:.2f} c={choice.cost_ratio:.2f} → {picked}"
