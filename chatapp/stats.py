"""Per-turn statistics, the measured standard-decoding baseline, and the
speculative-decoding theory (expected tokens per round, expected speedup,
the auto-K rule) that the UI and the benchmark compare measurements with.

Theory (Leviathan et al. 2023, Chen et al. 2023), acceptance rate a, K draft
tokens per round, draft/target cost ratio c:
    expected tokens per round  E = (1 - a^(K+1)) / (1 - a)
    expected speedup           S = E / (1 + K c)
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import asdict, dataclass, field


def expected_tokens_per_round(a: float, k: int) -> float:
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def expected_speedup(a: float, k: int, c: float) -> float:
    return expected_tokens_per_round(a, k) / (1.0 + k * c)


def best_k(a: float, c: float, k_max: int = 16) -> int:
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
    draft_prefill: str = ""  # "computed", or "copied from the target" (same weights; see engine)
    draft_s: float = 0.0
    target_s: float = 0.0
    baseline_tokens_per_s: float | None = None
    baseline_source: str = "none"
    int8_path: str = ""
    stop_reason: str = ""  # "eos", "max_new_tokens", "stopped", "context"
    source_counts: dict[str, int] = field(default_factory=dict)

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
    def speedup(self) -> float | None:
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
        out = asdict(self)
        for name in (
            "acceptance_rate",
            "drafted_kept",
            "mean_accepted_per_round",
            "tokens_per_s",
            "speedup",
            "draft_step_s",
            "verify_step_s",
        ):
            out[name] = getattr(self, name)
        return out


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


class AcceptanceTracker:
    """Running acceptance rate and step costs, for auto K.

    Auto K maximises E(a, K) / (K c + v(K)), the speedup of the literature's
    formula with the verify cost measured rather than assumed, taken over the
    acceptance rates a of the recent turns (see expected_speedup): c = draft step
    / target step, v(K) = cost of one target forward over K+1 tokens in
    target steps. v comes from a table of measured forward times per token
    count (a calibration at load, refreshed by every speculative turn):
    verify costs are not a line on CPU kernels that take rows four at a time.
    Between measured sizes v is interpolated; past the largest it grows by
    the fitted slope per token.
    """

    PRIOR_RATE = 0.7
    PRIOR_COST_RATIO = 0.3
    PRIOR_VERIFY_SLOPE = 0.05  # extra target steps per extra verified token
    WINDOW = 8  # recent measurements kept per forward size
    TURN_WINDOW = 16  # recent turns whose acceptance rates auto K averages over
    MIN_TURNS = 3
    MIN_CHECKED = 8  # drafts a turn must have had checked to count as a rate

    def __init__(self):
        self.prior_rate = self.PRIOR_RATE
        self.drafted = 0
        self.accepted = 0
        self.rejected = 0
        self.draft_s = 0.0
        self.draft_forwards = 0
        self.verify_s = 0.0
        self.verify_forwards = 0
        self._forward_s: dict[int, list[float]] = {}  # tokens in one target forward -> recent seconds
        self._turn_rates: list[float] = []  # per-token acceptance of recent speculative turns

    def record(self, stats: TurnStats) -> None:
        """A finished turn: its acceptance counts and its step costs."""
        if stats.mode == "speculative":
            self.drafted += stats.drafted
            self.accepted += stats.accepted
            self.rejected += stats.rejected
            if stats.accepted + stats.rejected >= self.MIN_CHECKED:
                self._turn_rates = (self._turn_rates + [stats.acceptance_rate])[-self.TURN_WINDOW :]
        self.record_costs(stats)

    def record_costs(self, stats: TurnStats) -> None:
        """Only the step costs of a turn (e.g. a calibration run)."""
        if stats.mode == "standard":
            if stats.target_forwards:
                self.record_forward(1, stats.target_s / stats.target_forwards)
            return
        self.draft_s += stats.draft_s
        self.draft_forwards += stats.draft_forwards
        self.verify_s += stats.target_s
        self.verify_forwards += stats.target_forwards
        if stats.target_forwards:
            self.record_forward(stats.k + 1, stats.target_s / stats.target_forwards)

    def record_forward(self, tokens: int, seconds: float) -> None:
        """One measured target forward over `tokens` tokens (or a turn's mean)."""
        if tokens >= 1 and seconds > 0:
            self._forward_s[tokens] = (self._forward_s.get(tokens, []) + [seconds])[-self.WINDOW :]

    def record_calibration(self, forwards: dict[int, list[float]], draft_steps: list[float]) -> None:
        """Measured target forward times per token count and 1-token draft steps
        (engine.measure_forward_costs)."""
        for tokens, times in forwards.items():
            for seconds in times:
                self.record_forward(tokens, seconds)
        self.draft_s += sum(draft_steps)
        self.draft_forwards += len(draft_steps)

    @property
    def acceptance_rate(self) -> float:
        checked = self.accepted + self.rejected
        return self.accepted / checked if checked else self.prior_rate

    @property
    def target_step_s(self) -> float | None:
        times = self._forward_s.get(1)
        return statistics.median(times) if times else None

    @property
    def cost_ratio(self) -> float:
        """c = draft step / target step (falls back to the verify step before
        any standard-decoding step has been timed)."""
        if not self.draft_forwards:
            return self.PRIOR_COST_RATIO
        reference = self.target_step_s or (self.verify_s / self.verify_forwards)
        return (self.draft_s / self.draft_forwards) / reference

    def _measured_ratios(self) -> dict[int, float]:
        """Tokens -> median forward time in target steps, for the sizes measured."""
        step = self.target_step_s
        if not step:
            return {}
        return {n: statistics.median(times) / step for n, times in sorted(self._forward_s.items())}

    @property
    def verify_slope(self) -> float:
        """Extra target steps per extra verified token, a line through (1, 1)
        fitted to the measured sizes (the summary shown to the user, and the
        growth past the largest size measured)."""
        points = [(n - 1, r - 1.0) for n, r in self._measured_ratios().items() if n > 1]
        if not points:
            return self.PRIOR_VERIFY_SLOPE
        return max(0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points))

    def verify_ratio(self, k: int) -> float:
        """v(K): the cost of verifying K+1 tokens, in target steps."""
        n = k + 1
        ratios = self._measured_ratios()
        ratios.setdefault(1, 1.0)
        if n in ratios:
            return ratios[n]
        below = max(m for m in ratios if m < n)
        above = [m for m in ratios if m > n]
        if above:
            hi = min(above)
            t = (n - below) / (hi - below)
            return ratios[below] + t * (ratios[hi] - ratios[below])
        return ratios[below] + self.verify_slope * (n - below)

    def expected_speedup(self, k: int) -> float:
        """The theory's speedup at K over the recent turns: 1 / the mean time
        per token, in target steps, at each turn's acceptance rate (the pooled
        rate until there are a few turns). Replies differ, and a long draft
        that pays off on an easy reply costs more on a hard one. With c = 0.3
        and +0.05 step per verified token, the pooled a = 0.95 of turns at
        0.995 and 0.9 makes K=7 look best, yet K=6 gives the shorter wait per
        token across those turns."""
        rates = self._turn_rates if len(self._turn_rates) >= self.MIN_TURNS else [self.acceptance_rate]
        c, v = self.cost_ratio, self.verify_ratio(k)
        # min(.., 0.99): a perfect streak must not pin K at the maximum.
        return 1.0 / statistics.fmean(1.0 / expected_speedup_with_costs(min(a, 0.99), k, c, v) for a in rates)

    def choose_k(self, k_max: int = 16) -> int:
        return max(range(1, k_max + 1), key=lambda k: (self.expected_speedup(k), -k))
