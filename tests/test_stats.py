"""Tests of chatapp.stats: the theory's formulas, the measured baseline, the turn record."""

from __future__ import annotations

import json
import math

import pytest

from chatapp.stats import Baseline, TurnStats, best_k, expected_speedup, expected_tokens_per_round


def test_baseline_is_the_median_of_a_window():
    baseline = Baseline(window=3)
    for rate, origin in [(100.0, "a"), (1.0, "b"), (4.0, "c"), (2.0, "c")]:
        baseline.record(rate, origin)
    baseline.record(0.0, "ignored")
    assert baseline.tokens_per_s == 2.0  # median of 1, 4, 2: the 100 fell out of the window
    assert baseline.source == "median of 3 standard-decoding run(s) on this machine: b, c"


@pytest.mark.parametrize(
    "a, k, expected",
    [(0.5, 3, 1.875), (0.8, 1, 1.8), (0.8, 4, 3.3616), (0.0, 5, 1.0), (1.0, 4, 5.0)],
)
def test_expected_tokens_per_round(a, k, expected):
    assert expected_tokens_per_round(a, k) == pytest.approx(expected)


@pytest.mark.parametrize(
    "a, k, c, expected",
    [(0.5, 3, 0.1, 1.875 / 1.3), (0.8, 4, 0.05, 3.3616 / 1.2), (1.0, 4, 0.0, 5.0), (0.0, 2, 0.5, 0.5)],
)
def test_expected_speedup(a, k, c, expected):
    assert expected_speedup(a, k, c) == pytest.approx(expected)


@pytest.mark.parametrize(
    "a, c, k_max, expected",
    [
        (0.8, 0.05, 16, 8),  # speedups 3.0823, 3.0921, 3.0780 at k = 7, 8, 9
        (0.8, 0.05, 4, 4),  # still rising at the cap
        (0.5, 0.5, 16, 1),  # 1.0 at k=1, 0.875 at k=2
        (1.0, 0.0, 16, 16),  # k+1 keeps growing
        (0.0, 0.0, 16, 1),  # all equal: the smallest k wins the tie
    ],
)
def test_best_k(a, c, k_max, expected):
    assert best_k(a, c, k_max) == expected


def test_turn_record_is_plain_json_with_derived_rates():
    stats = TurnStats(
        mode="speculative",
        k=4,
        rounds=5,
        drafted=20,
        accepted=15,
        rejected=3,
        new_tokens=20,
        wall_s=0.5,
        target_forwards=5,
        target_s=0.2,
        draft_forwards=20,
        draft_s=0.1,
    )
    record = stats.to_dict()
    assert record["acceptance_rate"] == pytest.approx(15 / 18)
    assert record["tokens_per_s"] == pytest.approx(40.0)
    assert record["verify_step_s"] == pytest.approx(0.04)
    json.dumps(record, allow_nan=False)


def test_turn_record_writes_non_finite_numbers_as_none():
    stats = TurnStats(mode="standard", new_tokens=3, wall_s=0.0, baseline_tokens_per_s=math.inf)
    record = stats.to_dict()
    assert record["baseline_tokens_per_s"] is None
    json.dumps(record, allow_nan=False)
