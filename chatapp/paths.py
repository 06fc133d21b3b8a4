"""Where SpecChat keeps what it builds once per machine.

Contract: `cache_dir()` is the one answer to "where is the cache?" --
$SPECCHAT_CACHE_DIR when set and not empty, else ~/.cache/specchat. Converted
models go under cache_dir()/models (chatapp.models), compiled kernels under
cache_dir()/kernels (chatapp.kernels). Nothing is created here.

It imports nothing of ours: chatapp.kernels is imported by chatapp.llama,
which chatapp.models imports, so a cache helper anywhere above would be a
circular import.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SPECCHAT_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/specchat")


def cache_dir() -> Path:
    """Where converted models and compiled kernels live: $SPECCHAT_CACHE_DIR or ~/.cache/specchat."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()
