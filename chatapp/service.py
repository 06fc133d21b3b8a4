"""A chat session over a loaded model pair: the glue between settings,
models, the engine and the stats, shared by the CLI and the UI.

It owns what outlives one reply: the measured standard-decoding baseline
(calibrated at load, refreshed by standard-mode turns), the running
acceptance/cost figures that auto K chooses from, and the per-reply time
limit (settings [limits]).

Faults in a reply: running out of memory ends the reply with a notice
(`Turn.notice`, stop_reason "out of memory") and gives the memory back, so
the next reply can run; a failing draft makes the engine finish the reply
with standard decoding, and the notice says so; other errors propagate to
the caller, which keeps the conversation as it was. A pair without a draft
(load_pair(draft_fallback=True) could not load it) runs standard decoding
only, and each reply that asked for speculative decoding says why.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .autok import AcceptanceTracker, KChoice, calibrate_tracker
from .chat import PromptResult, StreamDecoder, build_prompt
from .engine import OUT_OF_MEMORY, Generation, PrefixCache, Token
from .errors import one_line
from .models import ModelPair, stop_token_ids
from .sampling import SamplingParams
from .settings import DecodingSettings, LimitsSettings
from .stats import Baseline, TurnStats

CALIBRATION_PROMPT = "Write a short paragraph about the history of the bicycle."


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
    k_choice: KChoice | None  # None for a standard-mode reply the user asked for
    text: str = ""
    _tracker: AcceptanceTracker | None = field(default=None, repr=False)
    _keep: Callable[[PrefixCache | None], None] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[TurnEvent]:
        out_of_memory = None
        try:
            for tokens in self.generation:
                delta = self.decoder.push([t.id for t in tokens])
                self.text += delta
                yield TurnEvent(delta, tokens)
        except OUT_OF_MEMORY as error:  # the reply ends here, readably; what it said so far stays
            out_of_memory = _out_of_memory_notice(error)
        finally:
            self.generation.close()
            self.text += self.decoder.flush()
            if self._tracker is not None:
                self._tracker.record(self.generation.stats)
            if self._keep is not None:
                self._keep(self.generation.kept)  # None after a failure: the kept cache is let go too
            if out_of_memory:
                release_memory()  # after the failed reply's tensors (and its traceback) are gone
            self._say_how_it_ended(out_of_memory)

    def _say_how_it_ended(self, out_of_memory: str | None) -> None:
        """Add what changed or cut the reply (a draft fallback, the time limit, memory) to the notice."""
        stats = self.generation.stats
        limit = self.generation.max_seconds
        said = [
            stats.fallback,
            f"the reply reached its time limit of {limit:g} s" if stats.stop_reason == "time limit" else "",
            out_of_memory or "",
        ]
        self.notice = "; ".join(part for part in [self.notice, *said] if part) or None

    @property
    def stats(self) -> TurnStats:
        return self.generation.stats

    @property
    def tokens(self) -> list[Token]:
        return self.generation.tokens

    def stop(self) -> None:
        self.generation.stop()

    def record(self) -> dict:
        """The one plain-JSON record of this reply: its stats, how K was
        chosen and the notice -- the prompt's, and once the reply has ended
        what changed or cut it (the UI stores it in the browser, the CLI
        prints it, the benchmark keeps it)."""
        return {
            **self.stats.to_dict(),
            "k_choice": self.k_choice.to_dict() if self.k_choice else None,
            "notice": self.notice,
        }


def _out_of_memory_notice(error: BaseException) -> str:
    where = "GPU memory" if isinstance(error, torch.OutOfMemoryError) else "memory"
    return f"out of {where} ({one_line(error, limit=120)}); the reply was cut here"


def release_memory() -> None:
    """Give freed memory back: collect the dropped tensors, and empty CUDA's cache where there is one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ChatService:
    def __init__(self, pair: ModelPair, *, max_reply_seconds: float = LimitsSettings().max_reply_seconds):
        self.pair = pair
        self.max_reply_seconds = max_reply_seconds  # limits.max_reply_seconds: a reply's wall clock; 0 = none
        self.tokenizer = pair.tokenizer
        self.stop_ids = stop_token_ids(pair.tokenizer)
        self.baseline = Baseline()
        self.tracker = AcceptanceTracker()
        # One generation at a time: the models and their kernels are shared.
        self.lock = threading.Lock()
        # The target's keys/values of the latest reply: the next reply of a conversation prefills only
        # what follows its longest common prefix with them (another chat's reply shares less, not nothing).
        self._kept: PrefixCache | None = None

    @property
    def context(self) -> int:
        draft = self.pair.draft
        return min(self.pair.target.max_positions, draft.max_positions if draft else self.pair.target.max_positions)

    @property
    def standard_only(self) -> str | None:
        """Why every reply runs standard decoding (the pair has no draft: see load_pair(draft_fallback=...)),
        or None when speculative decoding can run."""
        if self.pair.draft is not None:
            return None
        return f"standard decoding only: {getattr(self.pair, 'draft_error', '') or 'there is no draft model'}"

    def calibrate(self, new_tokens: int = 32) -> float | None:
        """Measure standard decoding on this machine for the speedup baseline,
        and seed auto K's costs and acceptance (when there is a draft)."""
        ids = build_prompt(self.tokenizer, [{"role": "user", "content": CALIBRATION_PROMPT}], None, self.context).ids
        with self.lock:
            if self.pair.draft is None:
                standard = Generation(self.pair.target, None, ids, mode="standard", max_new_tokens=new_tokens)
                standard.run()
                standard = standard.stats
            else:
                standard = calibrate_tracker(self.tracker, self.pair.target, self.pair.draft, ids, new_tokens)
        self.baseline.record(standard.tokens_per_s, f"calibration at load ({standard.new_tokens} tokens)")
        return self.baseline.tokens_per_s

    def prompt(self, history: list[dict], decoding: DecodingSettings, system: str | None = None) -> PromptResult:
        """The prompt of the next reply: the history checked against its limits, then built (oldest turns
        dropped if needed). Raises ValueError subclasses with one-line messages for bad input.

        It takes no lock: a caller with a single generation slot should build the prompt before it
        queues for the slot, so that a client's history never holds the slot (its cost is bounded by
        the history limits in chatapp.settings and by the context, not by the history's length)."""
        system = decoding.system_prompt if system is None else system
        reserve = min(decoding.max_new_tokens, self.context // 2)
        return build_prompt(self.tokenizer, history, system or None, self.context - reserve)

    def start_turn(
        self,
        history: list[dict],
        decoding: DecodingSettings,
        system: str | None = None,
        *,
        fresh: bool = False,
        prompt: PromptResult | None = None,
    ) -> Turn:
        """Start a reply to `history`, from `prompt` when the caller built it already (see `prompt`).
        fresh=True prefills the whole prompt instead of reusing the latest reply's keys/values (the
        comparison's runs must pay alike).

        Raises ValueError subclasses with one-line messages for bad input.
        """
        if prompt is None:
            prompt = self.prompt(history, decoding, system)
        choice = self.choose_k(decoding)
        notice = prompt.notice
        if decoding.mode == "speculative" and self.standard_only:
            notice = "; ".join(part for part in (prompt.notice, self.standard_only) if part)
        generation = Generation(
            self.pair.target,
            self.pair.draft,
            prompt.ids,
            mode="speculative" if choice and choice.speculative else "standard",
            k=choice.k if choice and choice.speculative else decoding.k,
            sampling=SamplingParams(decoding.temperature, decoding.top_k, decoding.top_p),
            max_new_tokens=decoding.max_new_tokens,
            stop_ids=self.stop_ids,
            seed=decoding.seed,
            baseline=self.baseline,
            prefix=None if fresh else self._kept,
            keep_cache=not fresh,
            max_seconds=self.max_reply_seconds,
        )
        keep = None if fresh else self._keep_prefix
        return Turn(generation, StreamDecoder(self.tokenizer), notice, choice, _tracker=self.tracker, _keep=keep)

    def _keep_prefix(self, kept: PrefixCache | None) -> None:
        self._kept = kept

    def choose_k(self, decoding: DecodingSettings) -> KChoice | None:
        """How the next reply picks K; None when the user chose standard mode, or when there is no draft
        (`standard_only` says why)."""
        if decoding.mode != "speculative" or self.pair.draft is None:
            return None
        return self.tracker.choose(decoding.k, decoding.auto_k)
