"""A scripted stand-in for `chatapp.service.ChatService`, for the UI tests.

Same interface as the real service (start_turn -> a Turn-like object that
yields TurnEvents, with .stats/.tokens/.notice/.k_choice/.text/.stop()/.record();
tokenizer.decode; pair.target.info etc.; baseline; tracker; context) but no
model: the reply is a fixed word sequence that echoes the user's message, cut
into rounds with a repeating accept pattern, so every token source appears.
Timings are simulated, so tokens/s and speedups are deterministic; `delay`
adds real sleep per round (to test Stop).
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

from chatapp.autok import AcceptanceTracker, KChoice
from chatapp.chat import EmptyPromptError, PromptTooLongError, StreamDecoder
from chatapp.engine import Token
from chatapp.lm import ModelInfo
from chatapp.service import Turn, TurnEvent
from chatapp.stats import Baseline, TurnStats

EOS = 0
REPLY = (
    "Speculative decoding lets a small **draft** propose tokens that the target verifies in one pass.\n\n"
    "```python\nprint('same output, fewer target steps')\n```\n\nThat is all."
)
ACCEPT_PATTERN = (99, 1, 0, 3, 99, 2)  # accepted drafts per round, capped at K (99 = all)
STANDARD_STEP_S, DRAFT_STEP_S, VERIFY_STEP_S, PREFILL_S = 0.02, 0.004, 0.022, 0.01


class FakeTokenizer:
    """Word-level: each distinct piece of text gets an id; 0 is the end of turn."""

    def __init__(self):
        self.pieces = ["<|im_end|>"]
        self.ids = {"<|im_end|>": EOS}

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in re.findall(r"\s*\S+|\s+", text):
            if piece not in self.ids:
                self.ids[piece] = len(self.pieces)
                self.pieces.append(piece)
            out.append(self.ids[piece])
        return out

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == EOS))


class FakeTurn:
    record = Turn.record  # the real service's record of a reply: it reads only .stats, .k_choice and .notice

    def __init__(
        self,
        service,
        tokens: list[int],
        mode: str,
        k: int,
        k_choice: KChoice | None,
        max_new: int,
        notice,
        prompt: list[str],
        reused: int,
        keep: bool,
    ):
        self.service, self.notice, self.k_choice = service, notice, k_choice
        self._ids, self._k, self._max = tokens, k, max_new
        self.text = ""
        self._decoder = StreamDecoder(service.tokenizer)  # as the service: a split character is held back
        self.tokens: list[Token] = []
        self._stop = False
        b = service.baseline
        self._prompt, self._keep = prompt, keep
        self.stats = TurnStats(
            mode=mode,
            k=k if mode == "speculative" else 0,
            prompt_tokens=len(prompt),
            prefix_reused=reused,
            baseline_tokens_per_s=b.tokens_per_s,
            baseline_source=b.source,
            int8_path="int8 weight-only per-channel (fake)" if mode == "speculative" else "",
            draft_prefill="copied from the target" if mode == "speculative" else "",
            source_counts={s: 0 for s in ("draft", "target", "bonus", "standard")},
        )

    def stop(self) -> None:
        self._stop = True

    def _round(self, i: int) -> list[Token]:
        pos = len(self.tokens)
        if self.stats.mode == "standard":
            return [Token(self._ids[pos], "standard")]
        k = min(self._k, max(1, self._max - pos - 1))
        accepted = min(ACCEPT_PATTERN[i % len(ACCEPT_PATTERN)], k, len(self._ids) - pos)
        out = [Token(t, "draft") for t in self._ids[pos : pos + accepted]]
        if pos + accepted < len(self._ids):
            out.append(Token(self._ids[pos + accepted], "bonus" if accepted == k else "target"))
        s = self.stats
        s.rounds, s.drafted, s.accepted = s.rounds + 1, s.drafted + k, s.accepted + accepted
        s.rejected += accepted < k  # the round ended at a rejected draft
        s.draft_forwards, s.draft_s = s.draft_forwards + k, s.draft_s + k * DRAFT_STEP_S
        return out

    def __iter__(self):
        s = self.stats
        s.wall_s = s.prefill_s = PREFILL_S
        try:
            for i in range(10**6):
                if len(self.tokens) >= min(self._max, len(self._ids)) or self._stop:
                    s.stop_reason = "stopped" if self._stop else "max_new_tokens"
                    break
                if self.service.delay:
                    time.sleep(self.service.delay)
                emitted = self._round(i)[: self._max - len(self.tokens)]
                step = STANDARD_STEP_S if s.mode == "standard" else VERIFY_STEP_S
                s.target_forwards, s.target_s = s.target_forwards + 1, s.target_s + step
                s.wall_s = s.prefill_s + s.draft_s + s.target_s  # simulated time: deterministic rates
                if s.mode == "speculative" and not s.reference_steps:  # as the engine: a standard step timed
                    s.reference_step_s, s.reference_steps, s.reference_s = STANDARD_STEP_S, 1, STANDARD_STEP_S
                if s.first_token_s is None:
                    s.first_token_s = s.wall_s
                self.tokens += emitted
                s.new_tokens = len(self.tokens)
                for t in emitted:
                    s.source_counts[t.source] += 1
                delta = self._decoder.push([t.id for t in emitted])
                self.text += delta
                yield TurnEvent(delta, emitted)
                if emitted and emitted[-1].id == EOS:
                    s.stop_reason = "eos"
                    break
        finally:
            self.text += self._decoder.flush()
            if not s.stop_reason:
                s.stop_reason = "stopped"
            self.service.tracker.record(s)
            if self._keep:  # as the service: the next reply of the conversation reuses this prefix
                self.service.kept_prompt = self._prompt + self.text.split()
            if s.mode == "standard" and s.stop_reason in ("eos", "max_new_tokens") and s.new_tokens >= 8:
                self.service.baseline.record(s.tokens_per_s, "standard-mode turns")
            self.service.turns.append(self)


def fake_loader(settings, progress, delay: float = 0.0, step_s: float = 0.05):
    """What the Model tab's Load builds a pair with, scripted: progress lines, then a FakeService named after
    the chosen target and draft; a draft whose name says "incompatible" fails the vocabulary check, and a
    target that says "missing" cannot be found (the errors load_pair raises)."""
    from chatapp.models import IncompatibleModelsError, ModelLoadError

    model = settings.model
    progress(f"loading {model.target} (fake)")
    time.sleep(step_s)
    if "missing" in model.target:
        raise ModelLoadError(f"model '{model.target}' was not found on the Hugging Face hub")
    progress(f"preparing the draft ({model.draft or 'an INT8 copy of the target'}, {model.draft_quantization})")
    time.sleep(step_s)
    if "incompatible" in model.draft:
        raise IncompatibleModelsError(
            f"'{model.draft}' does not speak '{model.target}''s vocabulary: token 5 is 'foo' in the draft's and "
            "'bar' in the target's"
        )
    return FakeService(delay=delay, target=model.target, draft=model.draft)


class FakeService:
    """ChatService's interface over a script. `max_message_chars` / `context_chars`
    play the context limits: a longer message fails, a longer history drops old turns."""

    def __init__(
        self,
        delay: float = 0.0,
        max_message_chars: int = 2000,
        context_chars: int = 4000,
        tokenizer=None,
        target: str = "FakeLM-135M",
        draft: str = "",
    ):
        self.delay, self.max_message_chars, self.context_chars = delay, max_message_chars, context_chars
        self.tokenizer = tokenizer or FakeTokenizer()  # or a real one whose id 0 is a special token
        self.baseline = Baseline()
        self.baseline.record(1 / STANDARD_STEP_S, "calibration at load (fake)")
        self.tracker = AcceptanceTracker()
        self.turns: list[FakeTurn] = []
        self.histories: list[list[dict]] = []  # what each start_turn was given
        self.fresh: list[bool] = []  # and its fresh= flag
        self.kept_prompt: list[str] = []  # the "prefix cache": the words of the latest kept prompt and reply
        self.context = 2048
        info = dict(source="embedded:fake", device="cpu", parameters=134_515_008, implementation="fake (scripted)")
        target_info = ModelInfo(name=target, dtype="float32", quantization="none", weight_bytes=538_060_032, **info)
        draft_info = ModelInfo(
            name=draft or target,
            dtype="int8 weights, float32 activations",
            quantization="int8 weight-only per-channel (fake)",
            weight_bytes=162_000_000,
            **info,
        )
        compatibility = (
            f"compatible: {draft} speaks {target}'s vocabulary (fake)"
            if draft
            else "compatible: the draft is a quantized copy of the target"
        )
        self.pair = SimpleNamespace(
            target=SimpleNamespace(info=target_info),
            draft=SimpleNamespace(info=draft_info),
            tokenizer=self.tokenizer,
            compatibility=compatibility,
            load_s=0.25,
        )

    @property
    def last(self) -> FakeTurn:
        return self.turns[-1]

    def start_turn(self, history: list[dict], decoding, system: str | None = None, *, fresh: bool = False) -> FakeTurn:
        self.histories.append([dict(m) for m in history])
        self.fresh.append(fresh)  # the real service would not reuse the latest reply's keys/values
        if not history or history[-1]["role"] != "user":
            raise ValueError("the chat history must end with a user message")
        message = history[-1]["content"]
        if not message.strip():
            raise EmptyPromptError("the message is empty")
        if len(message) > self.max_message_chars:
            raise PromptTooLongError(
                f"the message is too long: {len(message)} characters, "
                f"but the context leaves room for {self.max_message_chars}"
            )
        earlier, dropped = list(history[:-1]), 0
        while earlier and sum(len(m["content"]) for m in earlier) + len(message) > self.context_chars:
            earlier = earlier[2:] if len(earlier) > 1 else []
            dropped += 1
        notice = f"{dropped} earlier turn(s) dropped to fit the context" if dropped else None
        words = REPLY if decoding.temperature == 0 else f"(seed {decoding.seed}) {REPLY}"
        ids = self.tokenizer.encode(f"You said: {message.strip()[:60]}. {words}") + [EOS]
        # As ChatService.start_turn: the tracker picks K (auto K may pick 0: standard decoding).
        choice = self.tracker.choose(decoding.k, decoding.auto_k) if decoding.mode == "speculative" else None
        speculative = choice is not None and choice.speculative
        mode, k = ("speculative", choice.k) if speculative else ("standard", decoding.k)
        prompt = [word for m in [*earlier, history[-1]] for word in m["content"].split()]  # one "token" per word
        reused = 0 if fresh else _common_prefix(prompt[:-1], self.kept_prompt)
        return FakeTurn(self, ids, mode, k, choice, decoding.max_new_tokens, notice, prompt, reused, not fresh)


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
