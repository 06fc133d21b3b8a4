"""Choosing between candidate decode paths by timing them on this machine.

Contract: `faster(candidates)` times each zero-argument callable (one decode
step of the loaded model on one path), every repetition interleaved over the
candidates so a burst of load from other processes hits them alike, and
returns the name of the faster and every path's median in milliseconds. The
first candidate is the preferred one: another replaces it only when it is
faster by more than its margin (`margins[name]`, else `margin`): plain torch
ops must win by 10%, since the kernels' batch invariance (exact greedy
equality) is worth a few percent and the timing on a shared machine is not
finer than that; another kernel variant, exact too, by a smaller one. Of the
candidates that clear their margins, the fastest is chosen. `memory_allows(nbytes)` says whether a second copy of the
weights fits comfortably.

It knows nothing about models: chatapp.llama builds the candidates.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPS = 5
MARGIN = 0.10  # another path (torch ops) must be this much faster than the preferred kernels
VARIANT_MARGIN = 0.03  # another kernel variant: as exact, so only the timing's noise counts


def faster(
    candidates: dict[str, Callable[[], Any]],
    *,
    reps: int = REPS,
    margin: float = MARGIN,
    margins: dict[str, float] | None = None,
) -> tuple[str, dict[str, float]]:
    """(name of the path to use, {name: median ms}); one untimed warm-up call each."""
    for step in candidates.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, step in candidates.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return pick(medians, margin=margin, margins=margins), medians


def pick(medians: dict[str, float], *, margin: float = MARGIN, margins: dict[str, float] | None = None) -> str:
    """The first name unless another is faster than it by more than its margin; then the fastest such."""
    preferred = next(iter(medians))
    margins = margins or {}
    clear = [name for name in medians if medians[name] < medians[preferred] * (1 - margins.get(name, margin))]
    return min(clear, key=medians.__getitem__) if clear else preferred


def available_memory() -> int | None:
    """Bytes the kernel says new allocations can take (Linux MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_allows(nbytes: int) -> bool:
    """Whether a temporary second copy of `nbytes` leaves at least as much free again."""
    free = available_memory()
    return free is None or 2 * nbytes <= free
