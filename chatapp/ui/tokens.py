"""The token view: a reply's tokens as (text piece, source) pairs for the
HighlightedText, each piece colored by where its token came from.

Contract: `TokenView(tokenizer, tokens)` returns the pairs of a whole reply;
`TokenView.stream(tokenizer)` returns a `TokenStream` whose `push(tokens)`
gives the pairs of a reply as it streams and `flush()` what is held at its
end. Tokens are anything with `.id` and `.source` (engine.Token).

A character whose bytes are split over several tokens (an emoji, an accented
letter in a byte-level BPE) decodes to U+FFFD token by token; such tokens are
shown as one piece, the character, colored by the source of the token that
completed it. Each id is decoded once (a cache per tokenizer); only those
groups are decoded together. Nothing here knows Gradio.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

INCOMPLETE = "\ufffd"  # what a decoder returns for bytes that do not form a character yet


class TokenView:
    """Token ids to text pieces, each id decoded once per tokenizer."""

    MAX_CACHED = 200_000

    def __init__(self) -> None:
        self._tokenizer: Any = None
        self._pieces: dict[int, str] = {}

    def __call__(self, tokenizer: Any, tokens: Iterable[Any]) -> list[tuple[str, str]]:
        stream = self.stream(tokenizer)
        return stream.push(tokens) + stream.flush()

    def stream(self, tokenizer: Any) -> TokenStream:
        return TokenStream(self, tokenizer)

    def piece(self, tokenizer: Any, token_id: int) -> str:
        if tokenizer is not self._tokenizer:  # another model pair: its ids mean other text
            self._tokenizer, self._pieces = tokenizer, {}
        text = self._pieces.get(token_id)
        if text is None:
            text = decode(tokenizer, [token_id])
            if len(self._pieces) < self.MAX_CACHED:
                self._pieces[token_id] = text
        return text


def decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids)
    except Exception:  # a tokenizer that cannot decode these ids alone: still show where they are
        return "".join(f"<{i}>" for i in ids)


class TokenStream:
    """The pieces of one reply as its tokens arrive; a split character is held until it is whole."""

    MAX_GROUP = 8  # a UTF-8 character has at most 4 bytes; past this, show what there is

    def __init__(self, view: TokenView, tokenizer: Any):
        self._view, self._tokenizer = view, tokenizer
        self._held: list[Any] = []  # tokens whose text does not end in a whole character yet

    def push(self, tokens: Iterable[Any]) -> list[tuple[str, str]]:
        out = []
        for token in tokens:
            self._held.append(token)
            text = self._text()
            if not text.endswith(INCOMPLETE) or len(self._held) >= self.MAX_GROUP:
                out.append((text, token.source))
                self._held = []
        return out

    def flush(self) -> list[tuple[str, str]]:
        """What is still held at the end of the reply (one cut inside a character), as it decodes."""
        if not self._held:
            return []
        out = [(self._text(), self._held[-1].source)]
        self._held = []
        return out

    def _text(self) -> str:
        if len(self._held) == 1:
            return self._view.piece(self._tokenizer, self._held[0].id)
        return decode(self._tokenizer, [t.id for t in self._held])
