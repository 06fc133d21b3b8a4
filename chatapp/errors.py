"""Turning errors and sizes into the short lines the user reads.

Every layer reports failures as one line (settings, model loading, the UI,
the CLI, the benchmark), so this tiny module is the one place that decides
how an exception or a byte count is written. It imports nothing of ours.
"""

from __future__ import annotations

import sys

MAX_LINE = 300  # the longest error line shown to a user


def one_line(error: BaseException | str, limit: int = MAX_LINE) -> str:
    """An error (or any text) as one line of at most `limit` characters:
    whitespace collapsed, the exception's class name when it has no text."""
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def megabytes(nbytes: float | None) -> str:
    """A byte count for people: "12.3 MB" (decimal), "n/a" when unknown."""
    return "n/a" if nbytes is None else f"{nbytes / 1e6:,.1f} MB"


def progress_to_stderr(prefix: str):
    """A progress callback printing "prefix: message" lines to stderr."""

    def say(message: str) -> None:
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)

    return say
