"""Message text made safe to render as Markdown in the page.

Contract: `without_remote_content(text)` returns `text` with every Markdown
image turned into a link to it ("![cat](https://...)" shows as a link
"🖼 cat") and every raw HTML tag shown as text, outside code (fenced blocks
and inline code are left as written). An image or an HTML element that loads
from another address would tell that server who read the chat, and when; a
model can be led to put chat text into such an address. Nothing here knows
where the text comes from: user text and model text are treated alike.
"""

from __future__ import annotations

import re

IMAGE_MARK = "🖼 "  # what an image's link text starts with
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)(?:.+?)\1")
_IMAGE = re.compile(r"!\[")
# "<" that opens an HTML tag, a comment or a declaration; autolinks (<https://...>, <a@b.c>) stay links.
_TAG = re.compile(r"<(?=[A-Za-z/!?])(?![A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]*>)(?![^\s<>@]+@[^\s<>@]+>)")


def _prose(text: str) -> str:
    return _TAG.sub("&lt;", _IMAGE.sub("[" + IMAGE_MARK, text))


def _line(line: str) -> str:
    """One line outside fenced code: prose rewritten, inline code spans kept."""
    out, end = [], 0
    for span in _INLINE_CODE.finditer(line):
        out += [_prose(line[end : span.start()]), span.group()]
        end = span.end()
    out.append(_prose(line[end:]))
    return "".join(out)


def without_remote_content(text: str) -> str:
    """`text` with images as links and HTML tags as text, outside code (see the module docstring)."""
    if "![" not in text and "<" not in text:
        return text
    out, fence = [], ""
    for line in text.splitlines(keepends=True):
        opening = _FENCE.match(line)
        if fence:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = ""
            out.append(line)
        elif opening:
            fence = opening.group(1)
            out.append(line)
        else:
            out.append(_line(line))
    return "".join(out)
