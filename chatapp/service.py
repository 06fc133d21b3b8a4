"""A chat session over a loaded model pair: the glue between settings,
models, the engine and the stats, shared by the CLI and the UI.

It owns what outlives one reply: the measured standard-decoding baseline
(calibrated at load, refreshed by standard-mode turns) and the running
acceptance/cost figures that auto K chooses from.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

from .chat import StreamDecoder, build_prompt
from .engine import Generation, Token, measure_forward_costs
from .models import ModelPair, stop_token_ids
from .sampling import SamplingParams
from .settings import DecodingSettings
from .stats import AcceptanceTracker, Baseline, TurnStats

CALIBRATION_PROMPT = "Write a short paragraph about the history of the bicycle."
MAX_K = 16  # the largest K auto K may choose (settings allow 1..16)


@dataclass
class TurnEvent:
    """What one round added to the reply."""

    text: str  # new text (may be empty while a multi-byte character is incomplete)
    tokens: list[Token]


@dataclass
class Turn:
    """One reply in progress. Iterate for `TurnEvent`s; `stats` is final after."""

    generation: Generation
    decoder: StreamDecoder
    notice: str | None
    k_choice: str  # "fixed" or "auto (a=..., c=...)"
    text: str = ""
    _tracker: AcceptanceTracker | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[TurnEvent]:
        try:
            for tokens in self.generation:
                delta = self.decoder.push([t.id for t in tokens])
                self.text += delta
                yield TurnEvent(delta, tokens)
        finally:
            self.generation.close()
            self.text += self.decoder.flush()
            if self._tracker is not None:
                self._tracker.record(self.generation.stats)

    @property
    def stats(self) -> TurnStats:
        return self.generation.stats

    @property
    def tokens(self) -> list[Token]:
        return self.generation.tokens

    def stop(self) -> None:
        self.generation.stop()


def calibrate_tracker(tracker: AcceptanceTracker, target, draft, ids: list[int], new_tokens: int = 32) -> TurnStats:
    """Seed auto K's tracker on this machine: a standard run (its stats are
    returned: their rate is the speedup baseline), the forward-cost table
    (target forwards of 1..MAX_K+1 tokens, draft steps), then a greedy K=4
    probe whose acceptance is the prior until real turns come in."""
    Generation(target, None, ids, mode="standard", max_new_tokens=4).run()  # warm-up
    standard = Generation(target, None, ids, mode="standard", max_new_tokens=new_tokens)
    standard.run()
    tracker.record_costs(standard.stats)
    tracker.record_calibration(*measure_forward_costs(target, draft, ids, MAX_K + 1))
    probe = Generation(target, draft, ids, mode="speculative", k=4, max_new_tokens=new_tokens)
    probe.run()
    tracker.record_costs(probe.stats)
    if probe.stats.acceptance_rate is not None:
        tracker.prior_rate = probe.stats.acceptance_rate
    return standard.stats


class ChatService:
    def __init__(self, pair: ModelPair):
        self.pair = pair
        self.tokenizer = pair.tokenizer
        self.stop_ids = stop_token_ids(pair.tokenizer)
        self.baseline = Baseline()
        self.tracker = AcceptanceTracker()
        # One generation at a time: the models and their kernels are shared.
        self.lock = threading.Lock()

    @property
    def context(self) -> int:
        return min(self.pair.target.max_positions, self.pair.draft.max_positions)

    def calibrate(self, new_tokens: int = 32) -> float | None:
        """Measure standard decoding on this machine for the speedup baseline,
        and seed auto K's costs and acceptance."""
        ids = build_prompt(
            self.tokenizer, [{"role": "user", "content": CALIBRATION_PROMPT}], None, self.context
        ).ids
        with self.lock:
            standard = calibrate_tracker(self.tracker, self.pair.target, self.pair.draft, ids, new_tokens)
        self.baseline.record(standard.tokens_per_s, f"calibration at load ({standard.new_tokens} tokens)")
        return self.baseline.tokens_per_s

    def start_turn(self, history: list[dict], decoding: DecodingSettings, system: str | None = None) -> Turn:
        """Build the prompt (dropping old turns if needed) and start a reply.

        Raises ValueError subclasses with one-line messages for bad input.
        """
        system = decoding.system_prompt if system is None else system
        reserve = min(decoding.max_new_tokens, self.context // 2)
        prompt = build_prompt(self.tokenizer, history, system or None, self.context - reserve)
        k, k_choice = decoding.k, "fixed"
        if decoding.auto_k and decoding.mode == "speculative":
            k = self.tracker.choose_k(MAX_K)
            k_choice = (
                f"auto (a={self.tracker.acceptance_rate:.2f}, c={self.tracker.cost_ratio:.2f}, "
                f"verify +{self.tracker.verify_slope:.2f} step/token)"
            )
        generation = Generation(
            self.pair.target,
            self.pair.draft,
            prompt.ids,
            mode=decoding.mode,
            k=k,
            sampling=SamplingParams(decoding.temperature, decoding.top_k, decoding.top_p),
            max_new_tokens=decoding.max_new_tokens,
            stop_ids=self.stop_ids,
            seed=decoding.seed,
            baseline=self.baseline,
        )
        return Turn(generation, StreamDecoder(self.tokenizer), prompt.notice, k_choice, _tracker=self.tracker)
