"""Tests of chatapp.autok: the tracker's cost table, auto K's choice, the typed KChoice."""

from __future__ import annotations

import pytest

from chatapp.autok import AcceptanceTracker, KChoice
from chatapp.settings import K_MAX
from chatapp.stats import TurnStats, expected_speedup_with_costs


def _turn(mode, k=0, *, accepted=0, rejected=0, rounds=1, draft_ms=0.0, verify_ms=0.0, forwards=1):
    return TurnStats(
        mode=mode,
        k=k,
        rounds=rounds,
        drafted=k * rounds,
        accepted=accepted,
        rejected=rejected,
        draft_forwards=k * rounds,
        draft_s=draft_ms / 1000 * k * rounds,
        target_forwards=forwards,
        target_s=verify_ms / 1000 * forwards,
    )


def test_auto_k_uses_measured_costs():
    tracker = AcceptanceTracker()
    tracker.record(_turn("standard", verify_ms=30.0, forwards=20))  # target step 30 ms
    # K=4 turns: draft 9 ms/step, verify of 5 tokens 36 ms (+0.05 step per token), a = 0.95
    tracker.record(
        _turn("speculative", 4, accepted=95, rejected=5, rounds=25, draft_ms=9.0, verify_ms=36.0, forwards=25)
    )
    assert tracker.acceptance_rate == pytest.approx(0.95)
    assert tracker.cost_ratio == pytest.approx(0.3)
    assert tracker.verify_slope == pytest.approx(0.05)
    k = tracker.choose_k()
    speedups = {j: expected_speedup_with_costs(0.95, j, 0.3, 1 + 0.05 * j) for j in range(1, 17)}
    assert k == max(speedups, key=speedups.get)
    # A verify that costs a full step per extra token makes small K best.
    tracker.record(
        _turn("speculative", 8, accepted=8, rejected=0, rounds=1, draft_ms=9.0, verify_ms=30.0 * 9, forwards=1)
    )
    assert tracker.choose_k() < k


def test_auto_k_averages_over_the_recent_turns():
    def tracker_with(rates):
        tracker = AcceptanceTracker()
        tracker.record_calibration({n: [0.020 * (1 + 0.05 * (n - 1))] for n in range(1, 18)}, [0.006] * 4)
        for a in rates:  # 200 checked drafts per turn at rate a
            tracker.record(
                _turn(
                    "speculative",
                    6,
                    accepted=round(200 * a),
                    rejected=200 - round(200 * a),
                    rounds=40,
                    draft_ms=6.0,
                    verify_ms=26.0,
                    forwards=40,
                )
            )
        return tracker

    def best(rates):  # the K with the least mean time per token over the rates
        cost = {k: sum(1 / expected_speedup_with_costs(a, k, 0.3, 1 + 0.05 * k) for a in rates) for k in range(1, 17)}
        return min(cost, key=cost.get)

    mixed = tracker_with([0.995, 0.9] * 4)
    assert mixed.acceptance_rate == pytest.approx(0.9475)
    steady = tracker_with([0.9475] * 8)
    # Same pooled rate; replies that differ call for a shorter draft.
    assert mixed.choose_k() == best([0.995, 0.9]) < steady.choose_k() == best([0.9475])
    # Two turns are too few to go by: the pooled rate decides.
    assert tracker_with([0.995, 0.9]).choose_k() == best([0.9475])


def test_verify_cost_table_interpolates_and_extrapolates():
    tracker = AcceptanceTracker()
    for tokens, ms in [(1, 30.0), (4, 30.0), (5, 40.0), (8, 40.0)]:
        tracker.record_forward(tokens, ms / 1000)
    assert tracker.verify_ratio(3) == pytest.approx(1.0)  # measured: 4 tokens
    assert tracker.verify_ratio(1) == pytest.approx(1.0)  # between 1 and 4 tokens
    assert tracker.verify_ratio(5) == pytest.approx(4 / 3)  # between 5 and 8 tokens
    slope = tracker.verify_slope
    assert slope > 0
    assert tracker.verify_ratio(10) == pytest.approx(4 / 3 + 3 * slope)  # past 8 tokens


def test_auto_k_follows_a_step_shaped_verify_cost():
    # Up to 4 tokens a forward costs one step, from 5 tokens two: the kink of
    # kernels that take rows four at a time, which no line through (1, 1) fits.
    tracker = AcceptanceTracker()
    tracker.prior_rate = 0.9
    forwards = {n: [0.030 if n <= 4 else 0.060] for n in range(1, 18)}
    tracker.record_calibration(forwards, draft_steps=[0.003] * 4)
    assert tracker.cost_ratio == pytest.approx(0.1)
    table = {k: expected_speedup_with_costs(0.9, k, 0.1, 1.0 if k + 1 <= 4 else 2.0) for k in range(1, 17)}
    assert tracker.choose_k() == max(table, key=table.get) == 3


def test_a_fixed_k_is_taken_as_set():
    choice = AcceptanceTracker().choose(5, auto=False)
    assert choice == KChoice(k=5, auto=False) and choice.speculative


def test_auto_k_reports_what_it_assumed():
    tracker = AcceptanceTracker()
    tracker.record_calibration({n: [0.020] for n in range(1, K_MAX + 2)}, [0.004] * 4)
    tracker.prior_rate = 0.9
    choice = tracker.choose(4, auto=True)
    assert choice.auto and 1 <= choice.k <= K_MAX and choice.k == tracker.choose_k()
    assert choice.acceptance_rate == pytest.approx(0.9) and choice.cost_ratio == pytest.approx(0.2)
    assert choice.expected_speedup == pytest.approx(tracker.expected_speedup(choice.k)) and choice.expected_speedup > 1


def test_auto_k_chooses_standard_decoding_when_every_k_would_lose():
    # A draft as slow as the target with a low acceptance rate: no K pays for itself.
    tracker = AcceptanceTracker()
    tracker.record_calibration({n: [0.020] for n in range(1, K_MAX + 2)}, [0.020] * 4)
    tracker.prior_rate = 0.3
    choice = tracker.choose(4, auto=True)
    assert choice.k == 0 and not choice.speculative and choice.expected_speedup < 1
    # The same costs with a cheap draft do speculate (the rule is not "always standard").
    tracker = AcceptanceTracker()
    tracker.record_calibration({n: [0.020] for n in range(1, K_MAX + 2)}, [0.002] * 4)
    tracker.prior_rate = 0.3
    assert tracker.choose(4, auto=True).k >= 1


def test_k_choice_survives_json_and_refuses_garbage():
    choice = KChoice(k=6, auto=True, acceptance_rate=0.97, cost_ratio=0.3, verify_slope=0.05, expected_speedup=2.1)
    assert KChoice.from_dict(choice.to_dict()) == choice
    for junk in (None, "auto (a=0.9)", {}, {"k": "many"}, {"k": 3, "cost_ratio": "x"}, [1, 2]):
        assert KChoice.from_dict(junk) is None


def test_costs_come_from_recent_replies_not_from_load_time():
    tracker = AcceptanceTracker()
    # A busy machine during calibration: draft steps of 30 ms against a 20 ms target step.
    tracker.record_calibration({1: [0.020] * 3}, [0.030] * 4)
    assert tracker.cost_ratio == pytest.approx(1.5) and tracker.replies == 0
    for _ in range(AcceptanceTracker.WINDOW):  # then quiet replies: 5 ms draft steps, 20 ms reference steps
        stats = _turn("speculative", 4, accepted=30, rejected=2, rounds=8, draft_ms=5.0, verify_ms=22.0, forwards=8)
        stats.reference_step_s = 0.020
        tracker.record(stats)
    assert tracker.cost_ratio == pytest.approx(0.25) and tracker.replies == AcceptanceTracker.WINDOW
    assert tracker.draft_step_s == pytest.approx(0.005) and tracker.target_step_s == pytest.approx(0.020)
