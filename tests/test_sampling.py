"""Tests of chatapp.sampling: parameters, the inverse-CDF sampler (chi-square, with an
off-by-one negative control), top-p against its full-sort definition."""

from __future__ import annotations

import pytest
import torch

from chatapp.sampling import (
    NonFiniteProbabilitiesError,
    SamplingParams,
    all_finite,
    logits_to_probs,
    sample,
    sample_index,
)
from tests.chisquare import ALPHA, chi_square

BAD_SAMPLING = {
    "negative temperature": (dict(temperature=-0.5), r"temperature must be 0 \(greedy\) or at least 0.01, got -0.5"),
    "below the floor": (dict(temperature=1e-40), r"temperature must be 0 \(greedy\) or at least 0.01, got 1e-40"),
    "just below the floor": (dict(temperature=0.0099), r"must be 0 \(greedy\) or at least 0.01, got 0.0099"),
    "NaN temperature": (dict(temperature=float("nan")), r"must be 0 \(greedy\) or at least 0.01, got nan"),
    "infinite temperature": (dict(temperature=float("inf")), r"must be 0 \(greedy\) or at least 0.01, got inf"),
    "top_p=0": (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    "top_p>1": (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    "negative top_k": (dict(top_k=-1), "top_k must be >= 0, got -1"),
}


@pytest.mark.parametrize("kwargs, message", BAD_SAMPLING.values(), ids=BAD_SAMPLING.keys())
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


# -- sampling primitives ------------------------------------------------------

SAMPLER_PROBS = torch.tensor([0.5, 0.0, 0.2, 0.1, 0.0, 0.15, 0.05, 0.0])


def _draw(sampler, probs: torch.Tensor, n: int = 20_000, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bincount(torch.tensor([sampler(probs, generator) for _ in range(n)]), minlength=len(probs))


def test_sample_follows_its_distribution():
    counts = _draw(sample, SAMPLER_PROBS)
    assert counts[SAMPLER_PROBS == 0].sum() == 0  # zero-probability tokens never come out
    assert chi_square(SAMPLER_PROBS, counts)[2] > ALPHA


def test_sample_test_catches_an_off_by_one_sampler():
    def shifted(probs, generator):  # the CDF's left edges: each draw lands one token early
        cdf = torch.cumsum(probs, 0, dtype=torch.float64)
        u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
        return max(0, int(torch.searchsorted(cdf, u, right=True)) - 1)

    assert chi_square(SAMPLER_PROBS, _draw(shifted, SAMPLER_PROBS))[2] < ALPHA


def test_sample_never_draws_a_trailing_zero_when_the_uniform_rounds_up(monkeypatch):
    probs = torch.tensor([0.3, 0.7, 0.0, 0.0])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(1, dtype=torch.float64))
    assert sample(probs, torch.Generator()) == 1


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("spread", [0.5, 3.0])
def test_top_p_matches_the_full_sort_definition(top_p, spread):
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(3)) * spread
    probs = torch.softmax(logits / 0.7, dim=-1)
    ordered, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered
    expected = torch.zeros_like(probs).scatter_(-1, order, ordered.masked_fill(before >= top_p, 0.0))
    expected = expected / expected.sum(dim=-1, keepdim=True)
    got = logits_to_probs(logits, SamplingParams(temperature=0.7, top_p=top_p))
    assert torch.allclose(got, expected, atol=1e-7)
    assert ((got > 0) == (expected > 0)).all()


def test_sample_index_stays_a_tensor_on_the_device():
    probs = torch.tensor([0.1, 0.0, 0.9])
    index = sample_index(probs, torch.Generator().manual_seed(0))
    assert isinstance(index, torch.Tensor) and index.dim() == 0 and index.device == probs.device
    assert int(index) in (0, 2)


def test_the_floor_and_greedy_are_accepted():
    assert SamplingParams(temperature=0.01).temperature == 0.01 and SamplingParams(temperature=0.0).greedy


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_sampling_from_non_finite_probabilities_is_refused(bad):
    logits = torch.tensor([[1.0, bad, 0.5, -2.0]])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0))[0]
    assert not bool(all_finite(probs))  # what the engine checks at each round's sync
    with pytest.raises(NonFiniteProbabilitiesError, match="not finite") as caught:
        sample(probs, torch.Generator().manual_seed(0))
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)


def test_finite_probabilities_pass_the_check_without_a_sync():
    probs = logits_to_probs(torch.tensor([[1.0, -float("inf"), 0.5]]), SamplingParams(temperature=0.5))[0]
    flag = all_finite(probs)
    assert isinstance(flag, torch.Tensor) and flag.dim() == 0 and bool(flag)
