"""Turning logits into token choices.

The same `SamplingParams` are applied to the draft's and the target's logits,
so the speculative accept/reject test compares the two *processed*
distributions and the output follows the processed target distribution --
exactly what standard sampling with those params would draw from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .settings import TEMPERATURE_FLOOR


class NonFiniteProbabilitiesError(ValueError):
    """Probabilities came out NaN or infinite: nothing may be sampled from them."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax); else at least TEMPERATURE_FLOOR
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1.0 means off

    def __post_init__(self):
        t = self.temperature
        if not (t == 0 or (math.isfinite(t) and t >= TEMPERATURE_FLOOR)):
            raise ValueError(f"temperature must be 0 (greedy) or at least {TEMPERATURE_FLOOR}, got {t}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens while the mass before each is below top_p
    (so the most likely token always survives); renormalize."""
    vocab = probs.shape[-1]
    k = min(vocab, 64)
    while True:  # a partial sort: the cut almost always lies in the top few dozen
        top, order = torch.topk(probs, k, dim=-1)
        before = torch.cumsum(top, dim=-1) - top
        if k == vocab or bool((before[..., -1] >= top_p).all()):
            break  # every token past the top k has even more mass before it
        k = min(vocab, k * 8)
    top = top.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, top)
    return kept / kept.sum(dim=-1, keepdim=True)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, V] logits -> [n, V] float32 probabilities after temperature, top-k, top-p."""
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    return probs


def all_finite(probs: torch.Tensor) -> torch.Tensor:
    """Whether every probability is finite, as a 0-d bool tensor on the device: no host sync, so the
    engine reads it with the rest of its round (a NaN would otherwise sample a garbage token)."""
    return torch.isfinite(probs).all()


def non_finite_error(who: str) -> NonFiniteProbabilitiesError:
    return NonFiniteProbabilitiesError(
        f"the {who} probabilities are not finite (NaN or infinity): the logits overflowed; "
        "nothing was sampled from them"
    )


def sample_index(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token id from a [V] distribution as a 0-d tensor on its device, by
    inverting its CDF with one uniform draw (torch.multinomial took ~1 ms on a
    49k vocabulary on CPU). Nothing here waits for the device, so a GPU round
    can sample without a host sync."""
    cdf = torch.cumsum(probs, dim=0, dtype=torch.float64)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[-1]
    index = torch.searchsorted(cdf, u, right=True)[0]
    # u rounded up to the total: take the last token with mass instead.
    last = probs.shape[0] - 1 - torch.argmax((probs > 0).flip(0).to(torch.uint8))
    return torch.where(index >= probs.shape[0], last, index)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """sample_index as a Python int; NonFiniteProbabilitiesError for NaN or infinite probabilities."""
    index, finite = torch.stack([sample_index(probs, generator), all_finite(probs).long()]).tolist()
    if not finite:
        raise non_finite_error("sampling")
    return index


def new_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
