"""`python main.py bench --ttft`: time to first token over a long chat, with and without the prefix cache.

Contract: `conversation_ttft(service, turns, ...)` plays one scripted chat of
`turns` user messages through a ChatService and returns each reply's time to
first token (prefill + first round) and how many prompt tokens came from the
conversation's cache; `fresh=True` makes every reply prefill the whole
conversation, as before the prefix cache. `run_ttft(settings, args)` loads the
configured pair, runs both ways alternately turn by turn (so drift hits them
alike) and writes ttft.json and ttft.md. It knows nothing of the main bench.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..errors import progress_to_stderr
from ..models import load_pair
from ..service import ChatService
from ..settings import DecodingSettings

MESSAGES = [
    "Tell me about the history of the bicycle.",
    "Who invented the pedal?",
    "How did tyres change cycling?",
    "What about gears?",
    "Which races made bicycles popular?",
    "How are frames made today?",
    "What is a fixed-gear bike?",
    "Are electric bikes bicycles?",
    "How should I choose my first bike?",
    "Summarize our conversation in two sentences.",
]
GOAL = 1.3  # issue 15: time to first token at turn 10 within 1.3x of turn 1, with the cache


def conversation_ttft(services: dict[str, ChatService], turns: int, max_new_tokens: int) -> dict[str, list[dict]]:
    """Per way ("cached", "fresh"): a record per turn. The ways advance one turn at a time, alternately,
    each with its own history (greedy, so both histories are the same text)."""
    decoding = DecodingSettings(k=4, max_new_tokens=max_new_tokens, temperature=0.0)
    histories = {way: [] for way in services}
    out: dict[str, list[dict]] = {way: [] for way in services}
    for turn in range(turns):
        for way, service in services.items():
            history = histories[way] + [{"role": "user", "content": MESSAGES[turn % len(MESSAGES)]}]
            reply = service.start_turn(history, decoding, fresh=way == "fresh")
            list(reply)
            stats = reply.stats
            histories[way] = history + [{"role": "assistant", "content": reply.text}]
            out[way].append(
                {
                    "turn": turn + 1,
                    "prompt_tokens": stats.prompt_tokens,
                    "prefix_reused": stats.prefix_reused,
                    "first_token_s": stats.first_token_s,
                    "prefill_s": stats.prefill_s,
                }
            )
    return out


def summarize(records: dict[str, list[dict]]) -> dict:
    summary = {}
    for way, rows in records.items():
        first, last = rows[0]["first_token_s"], rows[-1]["first_token_s"]
        summary[way] = {
            "turn_1_s": first,
            f"turn_{len(rows)}_s": last,
            "last_over_first": last / first if first else None,
            "median_s": statistics.median(r["first_token_s"] for r in rows),
        }
    cached = summary.get("cached", {}).get("last_over_first")
    summary["goal"] = {"within": GOAL, "cached_last_over_first": cached, "pass": cached is not None and cached <= GOAL}
    return summary


def report(records: dict[str, list[dict]], summary: dict) -> str:
    lines = [
        "# Time to first token over a chat",
        "",
        "| turn | prompt tokens | cached: reused | cached: TTFT (ms) | fresh: TTFT (ms) |",
        "|---|---|---|---|---|",
    ]
    for cached, fresh in zip(records["cached"], records["fresh"]):
        lines.append(
            f"| {cached['turn']} | {cached['prompt_tokens']} | {cached['prefix_reused']} | "
            f"{1000 * cached['first_token_s']:.0f} | {1000 * fresh['first_token_s']:.0f} |"
        )
    goal = summary["goal"]
    verdict = "PASS" if goal["pass"] else "FAIL"
    ratio = goal["cached_last_over_first"]
    lines += ["", f"Goal (last turn within {GOAL}x of turn 1, with the cache): {verdict} ({ratio:.2f}x)."]
    return "\n".join(lines) + "\n"


def run_ttft(settings, args) -> int:
    say = progress_to_stderr("bench")
    turns, new_tokens = (4, 16) if getattr(args, "quick", False) else (10, 48)
    pair = load_pair(settings.model, progress=say)
    service = ChatService(pair)
    services = {"cached": service, "fresh": service}  # one pair; "fresh" replies pass fresh=True
    say(f"{turns} turns, {new_tokens} new tokens each, cached and fresh alternately")
    records = conversation_ttft(services, turns, new_tokens)
    summary = summarize(records)
    out = Path(getattr(args, "out", None) or "bench-out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ttft.json").write_text(json.dumps({"records": records, "summary": summary}, indent=2))
    text = report(records, summary)
    (out / "ttft.md").write_text(text)
    print(text)
    return 0
