"""The chi-square goodness-of-fit test that the distribution tests share (engine, sampling)."""

from __future__ import annotations

import math

import torch

ALPHA = 1e-3  # significance level of the distribution tests


def chi_square(probs: torch.Tensor, counts: torch.Tensor) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of counts against probs.

    Cells expected >= 5 stand alone; the rest are pooled (into the smallest
    kept cell if the pool itself expects < 5). A count where the probability is
    exactly 0 (e.g. cut by top-p) is impossible and gives p = 0."""
    expected = probs.flatten().double() * counts.sum()
    observed = counts.flatten().double()
    if observed[expected == 0].sum() > 0:
        return math.inf, 0, 0.0
    big = expected >= 5
    exp_cells, obs_cells = expected[big].clone(), observed[big].clone()
    pool_exp, pool_obs = expected[~big].sum(), observed[~big].sum()
    if pool_exp >= 5:
        exp_cells = torch.cat([exp_cells, pool_exp.view(1)])
        obs_cells = torch.cat([obs_cells, pool_obs.view(1)])
    elif pool_exp > 0:
        smallest = torch.argmin(exp_cells)
        exp_cells[smallest] += pool_exp
        obs_cells[smallest] += pool_obs
    statistic = float(((obs_cells - exp_cells) ** 2 / exp_cells).sum())
    df = len(exp_cells) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(statistic / 2)))
    return statistic, df, p_value
