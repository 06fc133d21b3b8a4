"""Auto K: the draft length K chosen from measured costs and acceptance.

Contract: `AcceptanceTracker` keeps what auto K needs (acceptance rates of
recent replies, the draft's step cost, the target's forward cost per token
count) and `choose(k, auto)` returns a typed `KChoice` that the service runs
and the UI formats. `calibrate_tracker` seeds a tracker at load. The theory
it applies (expected tokens per round, expected speedup) is in stats.py.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from .engine import Generation, measure_forward_costs
from .settings import K_MAX
from .stats import TurnStats, expected_speedup_with_costs


@dataclass(frozen=True)
class KChoice:
    """K for one reply and why. k = 0 means auto K chose standard decoding."""

    k: int
    auto: bool
    acceptance_rate: float | None = None  # what auto K assumed (auto only)
    cost_ratio: float | None = None  # c = draft step / target step
    verify_slope: float | None = None  # extra target steps per extra verified token
    expected_speedup: float | None = None  # the theory's speedup at the chosen K

    @property
    def speculative(self) -> bool:
        return self.k > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> KChoice | None:
        """A choice read back from stored JSON; None when it is not one."""
        if not isinstance(data, dict):
            return None
        try:
            k = int(data["k"])
            floats = {
                name: None if data.get(name) is None else float(data[name])
                for name in ("acceptance_rate", "cost_ratio", "verify_slope", "expected_speedup")
            }
            return cls(k=k, auto=bool(data.get("auto", False)), **floats)
        except (KeyError, TypeError, ValueError, OverflowError):
            return None


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
    WINDOW = 8  # recent measurements kept per forward size, and of draft steps
    TURN_WINDOW = 16  # recent turns whose acceptance rates auto K averages over
    MIN_TURNS = 3
    MIN_CHECKED = 8  # drafts a turn must have had checked to count as a rate

    def __init__(self):
        self.prior_rate = self.PRIOR_RATE
        self.drafted = 0
        self.accepted = 0
        self.rejected = 0
        self.replies = 0  # real replies recorded (calibration not counted)
        self._draft_steps: list[float] = []  # recent draft step times (a reply's mean, or a calibration step)
        self._forward_s: dict[int, list[float]] = {}  # tokens in one target forward -> recent seconds
        self._turn_rates: list[float] = []  # per-token acceptance of recent speculative turns

    def record(self, stats: TurnStats) -> None:
        """A finished turn: its acceptance counts and its step costs."""
        self.replies += 1
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
        if stats.draft_forwards:
            self._record_draft_step(stats.draft_s / stats.draft_forwards)
        if stats.target_forwards:
            self.record_forward(stats.k + 1, stats.target_s / stats.target_forwards)
        if stats.reference_step_s:  # a standard step timed inside the reply (see engine)
            self.record_forward(1, stats.reference_step_s)

    def _record_draft_step(self, seconds: float) -> None:
        if seconds > 0:
            self._draft_steps = (self._draft_steps + [seconds])[-self.WINDOW :]

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
        for seconds in draft_steps:
            self._record_draft_step(seconds)

    def samples(self) -> dict[str, Any]:
        """How many measurements each figure comes from (the UI says so): replies recorded since load,
        acceptance rates in the turn window, draft steps, and target forwards by token count."""
        return {
            "replies": self.replies,
            "turn_rates": len(self._turn_rates),
            "draft_steps": len(self._draft_steps),
            "forwards": {n: len(times) for n, times in sorted(self._forward_s.items())},
        }

    @property
    def acceptance_rate(self) -> float:
        checked = self.accepted + self.rejected
        return self.accepted / checked if checked else self.prior_rate

    @property
    def target_step_s(self) -> float | None:
        times = self._forward_s.get(1)
        return statistics.median(times) if times else None

    @property
    def draft_step_s(self) -> float | None:
        return statistics.median(self._draft_steps) if self._draft_steps else None

    @property
    def cost_ratio(self) -> float:
        """c = draft step / target step, both medians of recent measurements (one slow period
        ages out of the window instead of skewing every later choice)."""
        draft, step = self.draft_step_s, self.target_step_s
        if draft is None or not step:
            return self.PRIOR_COST_RATIO
        return draft / step

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

    def choose_k(self, k_max: int = K_MAX) -> int:
        """The K with the least expected time per token (ties: the smaller K)."""
        return max(range(1, k_max + 1), key=lambda k: (self.expected_speedup(k), -k))

    def choose(self, k: int, auto: bool) -> KChoice:
        """The K for the next speculative reply: `k` as set, or auto K's pick.
        Auto K answers K = 0 (standard decoding) when even its best K is
        expected to lose to standard decoding (a draft too slow for its
        acceptance rate, as on a CPU whose kernels are slow)."""
        if not auto:
            return KChoice(k=k, auto=False)
        best = self.choose_k()
        expected = self.expected_speedup(best)
        return KChoice(
            k=best if expected >= 1.0 else 0,
            auto=True,
            acceptance_rate=self.acceptance_rate,
            cost_ratio=self.cost_ratio,
            verify_slope=self.verify_slope,
            expected_speedup=expected,
        )


def calibrate_tracker(tracker: AcceptanceTracker, target, draft, ids: list[int], new_tokens: int = 32) -> TurnStats:
    """Seed auto K's tracker on this machine: a standard run (its stats are
    returned: their rate is the speedup baseline), the forward-cost table
    (target forwards of 1..K_MAX+1 tokens, draft steps), then a greedy K=4
    probe whose acceptance is the prior until real turns come in."""
    Generation(target, None, ids, mode="standard", max_new_tokens=4).run()  # warm-up
    standard = Generation(target, None, ids, mode="standard", max_new_tokens=new_tokens)
    standard.run()
    tracker.record_costs(standard.stats)
    tracker.record_calibration(*measure_forward_costs(target, draft, ids, K_MAX + 1))
    probe = Generation(target, draft, ids, mode="speculative", k=4, max_new_tokens=new_tokens)
    probe.run()
    tracker.record_costs(probe.stats)
    if probe.stats.acceptance_rate is not None:
        tracker.prior_rate = probe.stats.acceptance_rate
    return standard.stats
