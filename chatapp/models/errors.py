"""The errors of model loading.

Contract: every failure to find, download, convert or load a model is a
`ModelLoadError` whose message is one line the user can act on;
`IncompatibleModelsError` is the one kind callers may want to tell apart (a
draft that does not speak the target's vocabulary). `load_error` turns a
message into a ModelLoadError without shortening it.
"""

from __future__ import annotations

from ..errors import one_line

# Model errors name paths and the underlying cause, which the user needs whole:
# only the line breaks go, not the length (chatapp.errors.one_line caps at 300).
MESSAGE_LIMIT = 10_000


class ModelLoadError(Exception):
    """A model could not be found, downloaded, converted or loaded (one-line message)."""


class IncompatibleModelsError(ModelLoadError):
    """The target and the draft do not share a tokenizer vocabulary."""


def load_error(text: str) -> ModelLoadError:
    """A ModelLoadError whose message is `text` on one line (for wrapping a library's multi-line error)."""
    return ModelLoadError(one_line(text, limit=MESSAGE_LIMIT))
