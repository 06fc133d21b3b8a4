"""Per-turn statistics, the measured standard-decoding baseline, and the
speculative-decoding theory (expected tokens per round, expected speedup)
that the UI and the benchmark compare measurements with. Choosing K from
these lives in chatapp.autok.

Theory (Leviathan et al. 2023, Chen et al. 2023), acceptance rate a, K draft
tokens per round, draft/target cost ratio c:
    expected tokens per round  E = (1 - a^(K+1)) / (1 - a)
    expected speedup           S = E / (1 + K c)
"""

from __future__ import annotations

import math
import statistics
import threading
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from .settings import K_MAX


def expected_tokens_per_round(a: float, k: int) -> float:
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def expected_speedup(a: float, k: int, c: float) -> float:
    return expected_tokens_per_round(a, k) / (1.0 + k * c)


def best_k(a: float, c: float, k_max: int = K_MAX) -> int:
    """The K in 1..k_max that maximises the expected speedup."""
    return max(range(1, k_max + 1), key=lambda k: (expected_speedup(a, k, c), -k))


@dataclass
class TurnStats:
    mode: str  # "speculative" or "standard"
    k: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0  # rounds that ended at a rejected draft
    new_tokens: int = 0
    prompt_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    first_token_s: float | None = None  # time to the first shown token: prefill + the first round
    prefix_reused: int = 0  # prompt positions whose keys/values came from the conversation's cache
    draft_prefill: str = ""  # "computed", or "copied from the target" (same weights; see engine)
    draft_s: float = 0.0
    target_s: float = 0.0
    baseline_tokens_per_s: float | None = None  # the standard rate measured in earlier turns (drift only)
    baseline_source: str = "none"
    # One-token target steps (forward + token choice: standard decoding's work per token) timed
    # inside this reply; their median prices standard decoding under this reply's conditions.
    reference_step_s: float | None = None
    reference_steps: int = 0
    reference_s: float = 0.0  # time spent on them, left out of wall_s
    int8_path: str = ""
    stop_reason: str = ""  # "eos", "max_new_tokens", "stopped", "context", "time limit", "out of memory", "error"
    fallback: str = ""  # why a speculative reply finished with standard decoding ("draft failed: ..."), if it did
    source_counts: dict[str, int] = field(default_factory=dict)

    # The rates derived from the fields above that the record (to_dict) carries too.
    DERIVED: ClassVar[tuple[str, ...]] = (
        "acceptance_rate",
        "drafted_kept",
        "mean_accepted_per_round",
        "tokens_per_s",
        "speedup",
        "standard_estimate_s",
        "baseline_ratio",
        "draft_step_s",
        "verify_step_s",
    )

    @property
    def acceptance_rate(self) -> float | None:
        """Per-token acceptance rate a: accepted / drafts the target checked.

        Drafts after a rejection in the same round are never checked, so
        accepted/drafted would understate a more and more as K grows; this is
        the a of the theory's (1 - a^(K+1)) / (1 - a)."""
        checked = self.accepted + self.rejected
        return self.accepted / checked if checked else None

    @property
    def drafted_kept(self) -> float | None:
        """Fraction of all drafted tokens that were kept (accepted / drafted)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_per_round(self) -> float | None:
        return self.accepted / self.rounds if self.rounds else None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def standard_estimate_s(self) -> float | None:
        """What standard decoding would have taken for this reply, measured under its conditions:
        the same prefill (both modes share it) plus one reference step per new token."""
        if self.reference_step_s is None:
            return None
        return self.prefill_s + self.new_tokens * self.reference_step_s

    @property
    def speedup(self) -> float | None:
        """This reply against standard decoding of the same reply: 1.0 for a standard reply by
        definition; for a speculative one, standard_estimate_s / wall_s (None when unmeasured)."""
        if self.mode == "standard":
            return 1.0 if self.new_tokens else None
        estimate = self.standard_estimate_s
        if estimate is None or self.wall_s <= 0 or not self.new_tokens:
            return None
        return estimate / self.wall_s

    @property
    def baseline_ratio(self) -> float | None:
        """This reply's rate over the baseline of earlier standard turns: drift, not a speedup."""
        if not self.baseline_tokens_per_s or not self.new_tokens:
            return None
        return self.tokens_per_s / self.baseline_tokens_per_s

    @property
    def draft_step_s(self) -> float | None:
        return self.draft_s / self.draft_forwards if self.draft_forwards else None

    @property
    def verify_step_s(self) -> float | None:
        return self.target_s / self.target_forwards if self.target_forwards else None

    def to_dict(self) -> dict:
        """Plain JSON: derived rates included, non-finite numbers as None."""
        out = asdict(self)
        for name in self.DERIVED:
            out[name] = getattr(self, name)
        return {key: None if isinstance(v, float) and not math.isfinite(v) else v for key, v in out.items()}


class Baseline:
    """The standard-decoding rate of one target on this machine.

    Seeded by a calibration run at load time, then refreshed by every
    standard-mode turn: the median of the most recent measurements.
    """

    def __init__(self, window: int = 5):
        self._window = window
        self._rates: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def record(self, tokens_per_s: float, origin: str) -> None:
        if tokens_per_s <= 0:
            return
        with self._lock:
            self._rates.append((tokens_per_s, origin))
            self._rates = self._rates[-self._window :]

    @property
    def tokens_per_s(self) -> float | None:
        with self._lock:
            return statistics.median(r for r, _ in self._rates) if self._rates else None

    @property
    def source(self) -> str:
        with self._lock:
            if not self._rates:
                return "none"
            origins = sorted({o for _, o in self._rates})
            return f"median of {len(self._rates)} standard-decoding run(s) on this machine: " + ", ".join(origins)


def expected_speedup_with_costs(a: float, k: int, c: float, verify_ratio: float) -> float:
    """Speedup when verifying K+1 tokens costs `verify_ratio` target steps
    (1.0 in the simple formula; more when the verify is not purely
    weight-bound)."""
    return expected_tokens_per_round(a, k) / (k * c + verify_ratio)
