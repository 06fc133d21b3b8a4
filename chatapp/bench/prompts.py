"""The bench's prompts: the JSONL file, a balanced subset, and token ids.

Contract: `load_prompts(path)` reads one {"id", "category", "prompt"} object
per line (the shipped set is prompts.jsonl beside this module) and raises
ValueError naming the file and line for a bad one; `select_prompts` takes at
most N round-robin over the categories; `encode_prompts` chat-templates each
prompt as one user turn with the app's own build_prompt, giving
`BenchPrompt`s of token ids. Knows nothing about models beyond the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..chat import build_prompt


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    ids: tuple[int, ...]


FIELDS = ("id", "category", "prompt")


def _is_prompt(item) -> bool:
    return isinstance(item, dict) and all(isinstance(item.get(k), str) and item[k].strip() for k in FIELDS)


def load_prompts(path: Path) -> list[dict]:
    """The JSONL prompt file: one {"id", "category", "prompt"} object per line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"cannot read the prompt file {path}: {error.strerror or error}") from None
    prompts, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not _is_prompt(item):
            raise ValueError(f"{path}:{number}: each line needs non-empty string fields id, category and prompt")
        if item["id"] in seen:
            raise ValueError(f"{path}:{number}: duplicate prompt id {item['id']!r}")
        seen.add(item["id"])
        prompts.append(item)
    if not prompts:
        raise ValueError(f"the prompt file {path} has no prompts")
    return prompts


def select_prompts(prompts: list[dict], limit: int | None) -> list[dict]:
    """At most `limit` prompts, taken round-robin over the categories (all when limit is None)."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    by_category: dict[str, list[dict]] = {}
    for item in prompts:
        by_category.setdefault(item["category"], []).append(item)
    picked: list[dict] = []
    while len(picked) < limit:
        for items in by_category.values():
            if items and len(picked) < limit:
                picked.append(items.pop(0))
    return picked


def encode_prompts(tokenizer, prompts: list[dict], system: str | None, max_prompt_tokens: int) -> list[BenchPrompt]:
    """Chat-template each prompt as one user turn (the app's own build_prompt)."""
    encoded = []
    for item in prompts:
        result = build_prompt(tokenizer, [{"role": "user", "content": item["prompt"]}], system, max_prompt_tokens)
        encoded.append(BenchPrompt(item["id"], item["category"], tuple(result.ids)))
    return encoded
