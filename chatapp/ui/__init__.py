"""The Gradio chat UI: chat with streaming speculative decoding, per-reply
stats, a token view, a Stats tab (measured vs theoretical speedup), a Compare
tab (standard vs speculative on one prompt) and a Model tab (the pair, and a
picker that loads another).

One job per module:
    handle      the service (possibly still loading or being swapped) and per-browser sessions
    format      stats lines, the model info, the comparison in words (no Gradio)
    state       the chat stored in the browser, and how the Chatbot shows it
    tokens      the token view: (piece, source) pairs, split characters whole
    stats_tab   the Stats tab's table, plot frames and summary
    sidebar     the decoding inputs and the one DecodingSettings built from them
    picker      the Model tab's choice of pair, as [model] settings
    handlers    chat / regenerate / undo / edit / stop / clear / restore / compare / stats / load
    conversations_panel  the saved conversations beside the chat: list, new, rename, delete, saving
    layout      build_app: the Blocks layout and the wiring
    launch      launch_app, serve, loading the service

The names below are imported on first use: the CLI reads `format` for its
stats line and must not pay for Gradio's import (~2 s) to print it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_app": "layout",
    "GENERATION": "layout",
    "SOURCE_COLORS": "layout",
    "launch_app": "launch",
    "serve": "launch",
    "CHAT_OUTPUTS": "handlers",
    "COMPARE_OUTPUTS": "handlers",
    "STATS_OUTPUTS": "handlers",
    "ServiceHandle": "handle",
    "UnavailableError": "handle",
    "decoding_settings": "sidebar",
    "CURSOR": "format",
    "stats_line": "format",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
