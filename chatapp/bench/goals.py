"""The benchmark's goals: one table of thresholds, and PASS / FAIL with the numbers behind it.

Contract: `GOALS` and `VARIANT_GOALS` below are the only place the
thresholds live (the issues' targets, not measurements). `evaluate_goals(summary, micro)` reads it and
returns the five `Goal`s, each a list of `Check`s (a measured value against
a threshold, with its direction) and, for a failure, sentences saying why
with the numbers (what the measured a and c allow at most, where a round's
time goes). Inputs are summary.summarize's and micro.py's dicts; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..settings import K_MAX, K_MIN
from ..stats import best_k, expected_speedup, expected_tokens_per_round
from .summary import best_fixed_k, median_of, median_tps, mode_label, speedups, standard_label, theory, theory_a

GOALS = {
    "standard_vs_hf": 2.0,  # 1: our standard decoding's tokens/s >= this x hf-generate's, at each temperature
    "step_vs_bound": 1.5,  # 1: the target's 1-token step <= this x the time to read its weights at measured bandwidth
    "agreement": 0.95,  # 2: the int8 draft's greedy argmax equals the target's at >= this share of positions
    "draft_cost": 0.35,  # 2: the draft's step <= this x the target's step (c)
    "speculative_vs_standard": {0.0: 2.0, 0.7: 1.5},  # 3: best fixed K's tokens/s >= this x standard's, per temperature
    "measured_vs_theory": 0.85,  # 4: each K's measured speedup >= this x the verify-cost theory's
    "auto_vs_best": 0.95,  # 5: auto-K's tokens/s >= this x the best fixed K's, at each temperature
    "auto_vs_hf_assisted": 1.0,  # 5: auto-K's tokens/s >= this x hf-assisted's, at each temperature
    "quick_run_s": 300.0,  # a --quick run takes < this many seconds in all (report.py's budget line)
}

EVERY_VARIANT = "every variant"
# The variant section's targets (chatapp.bench.variants), per CPU kernel variant (2 cores, T=0).
VARIANT_GOALS: dict[str, dict[str, float]] = {
    "avx2": {
        "standard_vs_hf": 2.5,
        "target_step_vs_bound": 1.3,
        "speculative_vs_standard": 1.6,
        "prefill_vs_avx512": 2.0,
    },
    "avx512": {"draft_step_vs_bound": 1.3, "verify_vs_step": 1.3, "speculative_vs_standard": 2.2},
    # On no CPU is any mode slower than transformers generate() with the same model: torch ops included.
    EVERY_VARIANT: {"standard_vs_hf": 1.0, "speculative_vs_hf": 1.0},
}


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

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "higher_is_better": self.higher_is_better,
            "ok": self.ok,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Check:
        return cls(data["name"], data["value"], data["threshold"], data.get("higher_is_better", True))


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
            "goal": self.number,
            "title": self.title,
            "status": self.status,
            "explanation": self.explanation,
            "checks": [c.to_dict() for c in self.checks],
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ms(seconds: float | None) -> str:
    """Seconds as "1.23 ms"; "n/a" when unknown."""
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
        std, hf = median_tps(summary, standard_label(t)), median_tps(summary, mode_label("hf-generate", t))
        check = Check(f"standard / hf-generate tokens/s at T={t:g}", _ratio(std, hf), th["standard_vs_hf"])
        checks.append(check)
        if check.ok is False:
            why.append(
                f"At T={t:g} our standard decodes {std:.1f} tok/s and hf-generate {hf:.1f} tok/s "
                f"(ratio {check.value:.2f})."
            )
    step, bound = micro.get("target_step_s"), micro.get("weight_bound_s")
    check = Check("decode step / weight-reading bound", _ratio(step, bound), th["step_vs_bound"], False)
    checks.append(check)
    if check.ok is False:
        bw = micro["bandwidth"]["bandwidth_gb_s"]
        weights = micro["target_step_weight_bytes"]
        why.append(
            f"The target's 1-token step takes {ms(step)}; reading its {weights / 1e6:.0f} MB of weights "
            f"at the measured {bw:.1f} GB/s takes {ms(bound)}, so {step / bound:.2f}x the bound: the step is "
            f"{'compute- or overhead-bound' if step > bound else 'at the bound'}, "
            f"effective {weights / step / 1e9:.1f} GB/s."
        )
    title = (
        f"our standard >= {th['standard_vs_hf']:g}x hf-generate; "
        f"decode step <= {th['step_vs_bound']:g}x weight-reading bound"
    )
    return Goal(1, title, checks, why)


def _goal_draft(micro, th) -> Goal:
    agreement = (micro.get("agreement") or {}).get("agreement")
    step, draft = micro.get("target_step_s"), micro.get("draft_step_s")
    checks = [
        Check("draft greedy agreement", agreement, th["agreement"]),
        Check("draft step / target step", _ratio(draft, step), th["draft_cost"], higher_is_better=False),
    ]
    why = []
    if checks[0].ok is False:
        positions = micro["agreement"]["positions"]
        why.append(
            f"The int8 draft's argmax matches the target's at {agreement:.3f} of {positions} teacher-forced positions."
        )
    if checks[1].ok is False:
        why.append(_draft_cost_why(micro))
    title = f"INT8 draft agreement >= {th['agreement']:g} and draft step <= {th['draft_cost']:g}x target step"
    return Goal(2, title, checks, why)


def _draft_cost_why(micro: dict) -> str:
    step, draft = micro.get("target_step_s"), micro.get("draft_step_s")
    text = f"The draft step takes {ms(draft)} vs the target's {ms(step)}."
    wb = micro.get("draft_step_weight_bytes")
    if not wb:
        return text
    bw = micro["bandwidth"]["bandwidth_gb_s"]
    bound = wb / (bw * 1e9)
    return (
        f"The draft step takes {ms(draft)} vs the target's {ms(step)}. Its weights are {wb / 1e6:.0f} MB "
        f"({wb / micro['target_step_weight_bytes']:.2f}x the target's); at {bw:.1f} GB/s reading them takes "
        f"{ms(bound)}, so the draft step runs at {draft / bound:.2f}x its own weight-reading bound."
    )


def speedup_ceiling(a: float, c: float) -> tuple[int, float]:
    """The best K in K_MIN..K_MAX and its simple-theory speedup for acceptance a and cost ratio c."""
    k = best_k(min(a, 0.999), c)
    return k, expected_speedup(min(a, 0.999), k, c)


def cost_needed(a: float, target: float) -> float | None:
    """The largest c for which some K in K_MIN..K_MAX reaches `target` simple-theory speedup at acceptance a."""
    best = None
    for k in range(K_MIN, K_MAX + 1):
        e = expected_tokens_per_round(min(a, 0.999), k)
        if e >= target:
            c = (e / target - 1.0) / k
            best = c if best is None else max(best, c)
    return best


def acceptance_needed(c: float, target: float) -> float | None:
    """The smallest a (to 0.001) for which some K in K_MIN..K_MAX reaches `target` at cost ratio c."""
    for step in range(0, 1000):
        a = step / 1000
        if speedup_ceiling(a, c)[1] >= target:
            return a
    return None


def _goal_speculative(summary, micro, th) -> Goal:
    checks, why = [], []
    needs = sorted(th["speculative_vs_standard"].items())
    for t, need in needs:
        best = best_fixed_k(summary, t)
        std = median_tps(summary, standard_label(t))
        value = _ratio(median_tps(summary, best), std) if best else None
        check = Check(f"best fixed K / standard at T={t:g}" + (f" ({best})" if best else ""), value, need)
        checks.append(check)
        if check.ok is False:
            why.append(_speculative_why(summary, micro, best, t, need))
    title = "speculative (best K) >= " + ", ".join(f"{v:g}x standard at T={t:g}" for t, v in needs)
    return Goal(3, title, checks, why)


def _speculative_why(summary: dict, micro: dict, best: str, t: float, need: float) -> str:
    """Why the best fixed K falls short: what the measured a and c allow at most, and the round's costs."""
    a = theory_a(summary[best])
    std = median_tps(summary, standard_label(t))
    text = (
        f"At T={t:g} the best fixed K is {summary[best]['k']} "
        f"({median_tps(summary, best):.1f} vs {std:.1f} tok/s standard, a={a:.3f})."
    )
    step, draft = micro.get("target_step_s"), micro.get("draft_step_s")
    if step and draft is not None:
        c = draft / step
        k, ceiling = speedup_ceiling(a, c)
        text += f" With a={a:.3f} and c={c:.3f} the simple theory allows at most {ceiling:.2f}x (K={k})"
        need_c, need_a = cost_needed(a, need), acceptance_needed(c, need)
        ways = []
        if need_c is not None:
            ways.append(f"c <= {need_c:.3f} at this a")
        if need_a is not None:
            ways.append(f"a >= {need_a:.3f} at this c")
        else:
            ways.append(f"a lower c (no a <= 0.999 suffices at c={c:.3f})")
        text += f"; reaching {need:g}x needs " + " or ".join(ways) + "."
    return text + _round_costs(summary, micro, best, t)


def _round_costs(summary: dict, micro: dict, label: str, t: float) -> str:
    """Where a round's time goes for `label`: verify vs 1-token step, draft step, prefill, decode-only speedup."""
    k = summary[label]["k"]
    step, verify = micro.get("target_step_s"), micro.get("verify_s", {}).get(str(k))
    parts = []
    if step and verify:
        parts.append(
            f"verifying K+1={k + 1} tokens costs {verify / step:.2f}x a 1-token step "
            "(micro; 1.00x if verify were weight-bound)"
        )
    run_step = median_of(summary, standard_label(t), "verify_step_s")
    run_draft, run_verify = median_of(summary, label, "draft_step_s"), median_of(summary, label, "verify_step_s")
    if run_step and run_draft is not None and run_verify:
        parts.append(
            f"in the runs a standard step took {ms(run_step)}, a draft step {ms(run_draft)} "
            f"(c={run_draft / run_step:.2f}) and a verify {ms(run_verify)} ({run_verify / run_step:.2f}x the step)"
        )
    if micro.get("target_prefill_s") and micro.get("draft_prefill_s") is not None:
        copied = micro.get("draft_prefill") == "copied from the target"
        how = "copies the target's prompt keys/values into the draft" if copied else "also prefills the draft"
        parts.append(
            f"speculative decoding {how}: {ms(micro['draft_prefill_s'])} on top of the target's prefill, "
            f"{ms(micro['target_prefill_s'])} at {micro['context_tokens'] - 1} tokens"
        )
    decode = speedups(summary)[label]["decode_vs_standard"]
    if decode is not None:
        parts.append(f"excluding prefill the speedup is {decode:.2f}x")
    return (" Costs: " + "; ".join(parts) + ".") if parts else ""


def _goal_theory(summary, micro, th) -> Goal:
    rows = theory(summary, micro)
    checks, why = [], []
    for label, row in sorted(rows.items(), key=lambda item: (item[1]["temperature"], item[1]["k"])):
        name = f"measured / theoretical (verify-cost formula) for {label}"
        check = Check(name, row["measured_over_with_verify"], th["measured_vs_theory"])
        checks.append(check)
        if check.ok is False:
            why.append(_theory_why(summary, micro, label, row))
    title = f"measured speedup >= {th['measured_vs_theory']:.0%} of theoretical (measured a, K, draft and verify costs)"
    return Goal(4, title, checks, why)


def _theory_why(summary: dict, micro: dict, label: str, row: dict) -> str:
    split = summary[label].get("time_split") or {}
    run_draft, run_verify = median_of(summary, label, "draft_step_s"), median_of(summary, label, "verify_step_s")
    decode, in_run = row.get("measured_decode"), row.get("with_verify_in_run_costs")
    return (
        f"{label}: measured {row['measured']:.2f}x vs theoretical {row['with_verify']:.2f}x "
        f"(simple {row['simple']:.2f}x)"
        + (f"; excluding prefill measured {decode:.2f}x" if decode is not None else "")
        + (f"; the formula with the runs' own step costs gives {in_run:.2f}x" if in_run is not None else "")
        + f". In the runs the draft step was {ms(run_draft)} (micro {ms(micro.get('draft_step_s'))}) and the verify "
        f"{ms(run_verify)} (micro {ms(row['verify_s'])}); wall time split: "
        + ", ".join(f"{k} {v:.0%}" for k, v in split.items())
        + "."
    )


def _goal_auto(summary, temps, th) -> Goal:
    checks, why = [], []
    for t in temps:
        auto = median_tps(summary, mode_label("auto-k", t))
        best = best_fixed_k(summary, t)
        hf = median_tps(summary, mode_label("hf-assisted", t))
        best_tps = median_tps(summary, best) if best else None
        vs_best = Check(f"auto-K / best fixed K at T={t:g}", _ratio(auto, best_tps), th["auto_vs_best"])
        vs_hf = Check(f"auto-K / hf-assisted at T={t:g}", _ratio(auto, hf), th["auto_vs_hf_assisted"])
        checks += [vs_best, vs_hf]
        if vs_best.ok is False:
            why.append(_auto_why(summary, t, best))
        if vs_hf.ok is False:
            why.append(f"At T={t:g} auto-K ran {auto:.1f} tok/s vs hf-assisted {hf:.1f} tok/s.")
    title = f"auto-K within {1 - th['auto_vs_best']:.0%} of the best fixed K, and faster than hf-assisted"
    return Goal(5, title, checks, why)


def _auto_why(summary: dict, t: float, best: str) -> str:
    auto_label = mode_label("auto-k", t)
    chosen = summary.get(auto_label, {}).get("chosen_k")
    auto, best_tps = median_tps(summary, auto_label), median_tps(summary, best)
    text = (
        f"At T={t:g} auto-K ran {auto:.1f} tok/s choosing K in {chosen} "
        f"vs the best fixed {best} at {best_tps:.1f} tok/s"
    )
    auto_decode = median_of(summary, auto_label, "decode_tokens_per_s")
    best_decode = median_of(summary, best, "decode_tokens_per_s")
    if auto_decode and best_decode:
        text += f"; excluding prefill {auto_decode:.1f} vs {best_decode:.1f} tok/s ({auto_decode / best_decode:.2f}x)"
    auto_new, best_new = median_of(summary, auto_label, "new_tokens"), median_of(summary, best, "new_tokens")
    if auto_new is not None and best_new is not None and auto_new != best_new:
        text += (
            f"; median reply {auto_new:.0f} vs {best_new:.0f} tokens "
            "(a shorter reply spreads the prefill over fewer tokens)"
        )
    auto_verify = median_of(summary, auto_label, "verify_step_s")
    step = median_of(summary, standard_label(t), "verify_step_s")
    if auto_verify and step:
        text += f"; its verify forwards took {auto_verify / step:.2f}x a standard step"
    return text + "."
