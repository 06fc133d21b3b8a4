"""Standard and speculative decoding, as one engine.

Contract: the engine knows nothing about text. It takes prompt token ids,
stop ids and two already-loaded `DecoderLM`s that share a vocabulary, and
yields the new tokens after every round, each tagged with where it came from:

    "draft"     a draft token the target accepted
    "target"    the target's replacement for a rejected draft token
    "bonus"     the target's extra token after all K drafts were accepted
    "standard"  a token of standard (target-only) decoding

Speculative sampling follows Leviathan et al. (2023) / Chen et al. (2023):
accept draft token x with probability min(1, p(x)/q(x)); on rejection draw
from normalize(max(0, p - q)); after K acceptances draw a bonus token from p.
With temperature 0 both p and q are one-hot argmaxes, so the output is
token-for-token the target's greedy decode. p and q are the target's and the
draft's distributions after the same temperature/top-k/top-p processing.

Prefill covers the prompt except its last token; every generated token then
comes out of a round, so the first token of a reply can already be drafted.

One module past ~400 lines on purpose: the round, its fallbacks (a failing
draft, the time limit), the in-reply reference steps and the prefix cache all
work on the same generator state; split, each would reach into the others.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .errors import one_line
from .lm import DecoderLM
from .sampling import SamplingParams, all_finite, logits_to_probs, new_generator, non_finite_error, sample_index
from .settings import K_MAX, K_MIN, SEED_MAX
from .stats import Baseline, TurnStats

MODES = ("speculative", "standard")
SOURCES = ("draft", "target", "bonus", "standard")
# Errors that mean memory ran out: they end the reply (chatapp.service turns them into a notice) and
# are never a reason to go on without the draft, since going on needs memory too.
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)


class DraftFailure(Exception):
    """The draft raised (or gave non-finite probabilities) during a reply: the reply goes on with
    standard decoding. `error` is what it raised."""

    def __init__(self, error: BaseException):
        super().__init__(one_line(error))
        self.error = error


@dataclass(frozen=True)
class Token:
    id: int
    source: str


@dataclass
class PrefixCache:
    """A target cache kept after a reply: it holds the keys/values of `ids` at positions
    0..len(ids)-1, so the next reply of the conversation prefills only what is new."""

    cache: Any
    ids: list[int]


def clock(device: torch.device) -> float:
    """Seconds, after the device has finished what was queued on it."""
    # CUDA launches are asynchronous: time only what has actually run.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor, proposals: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept/reject rule of speculative sampling, on the device.

    p: [k+1, V] target distributions, q: [k, V] draft distributions, proposals:
    [k] draft tokens (each drawn from its row of q). Returns 0-d tensors: how
    many were accepted and the token that ends the round (a resample or the
    bonus). Nothing waits for the device.
    """
    k = proposals.shape[0]
    rows = torch.arange(k, device=p.device)
    r = torch.rand(k, generator=generator, device=p.device)
    # r < p/q, written without a division; q(x) > 0 because x was drawn from q.
    keep = r * q[rows, proposals] < p[rows, proposals]
    accepted = torch.cumprod(keep.to(torch.long), dim=0).sum()
    # A zero row k in q makes row k's residual p[k] itself: the bonus token's distribution.
    q = torch.cat([q, q.new_zeros(1, q.shape[1])])
    residual = torch.clamp(p[accepted] - q[accepted], min=0.0)
    total = residual.sum()
    # p(x) < q(x) guarantees mass; guard against float underflow anyway.
    residual = torch.where(total > 0, residual / total.clamp(min=torch.finfo(total.dtype).tiny), p[accepted])
    return accepted, sample_index(residual, generator)


class RoundTimer:
    """Timestamps within a round that never wait for the device: CUDA events
    there (read after the round's one sync), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        """Only after the device has passed `end` (the round's sync)."""
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start


class Generation:
    """One reply. Iterate it for per-round token lists; `stats` is live and
    final once iteration ends or `close()` is called (e.g. on Stop).

    Faults: when the draft fails (it raises, or its probabilities are not
    finite) the reply finishes with standard decoding -- the target's own
    tokens, so a greedy reply is unchanged -- and stats.fallback says why. A
    target failure propagates (stop_reason "error"), and so does running out
    of memory anywhere (stop_reason "out of memory"). With max_seconds a
    reply ends after the round that reaches that many seconds (stop_reason
    "time limit"); 0 or None means no limit."""

    def __init__(
        self,
        target: DecoderLM,
        draft: DecoderLM | None,
        prompt_ids: Sequence[int],
        *,
        mode: str = "speculative",
        k: int = 4,
        sampling: SamplingParams = SamplingParams(),
        max_new_tokens: int = 256,
        stop_ids: Sequence[int] = (),
        seed: int = 0,
        baseline: Baseline | None = None,
        record_baseline: bool = True,
        reference_steps: int = 3,
        prefix: PrefixCache | None = None,
        keep_cache: bool = False,
        max_seconds: float | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "speculative" and draft is None:
            raise ValueError("speculative mode needs a draft model")
        if not K_MIN <= k <= K_MAX:
            raise ValueError(f"k must be in {K_MIN}..{K_MAX}, got {k}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # torch takes an unsigned 64-bit seed; a bigger one failed mid-reply ("Overflow when unpacking long long").
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
            raise ValueError(f"seed must be an integer in 0..{SEED_MAX}, got {seed!r}")
        if max_seconds is not None and not max_seconds >= 0:
            raise ValueError(f"max_seconds must be >= 0 (0 = no limit), got {max_seconds}")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.max_positions = min(target.max_positions, draft.max_positions if draft else 1 << 30)
        if len(prompt_ids) >= self.max_positions:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context holds {self.max_positions}")
        vocab_limit = min(target.vocab_size, draft.vocab_size if draft else target.vocab_size)
        if not all(0 <= t < vocab_limit for t in prompt_ids):
            raise ValueError(f"the prompt has token ids outside the vocabulary of {vocab_limit}")
        self.target = target
        self.draft = draft if mode == "speculative" else None
        self.mode = mode
        self.k = k
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.seed = seed
        self.max_seconds = max_seconds or None
        self.prompt_ids = prompt_ids
        self.tokens: list[Token] = []
        self._baseline = baseline if record_baseline else None
        # Speculative replies time this many one-token target steps (after the first round and at
        # the end) to price standard decoding under their own conditions; see TurnStats.speedup.
        self._reference_steps = reference_steps if self.draft is not None else 0
        self._reference_times: list[float] = []
        vocab = target.vocab_size if self.draft is None else min(target.vocab_size, self.draft.vocab_size)
        self._vocab = vocab  # a padded vocabulary's extra rows are never proposed or compared
        self.stats = TurnStats(
            mode=mode,
            k=k if mode == "speculative" else 0,
            prompt_tokens=len(prompt_ids),
            baseline_tokens_per_s=baseline.tokens_per_s if baseline else None,
            baseline_source=baseline.source if baseline else "none",
            int8_path=self.draft.info.quantization if self.draft else "",
            source_counts={s: 0 for s in SOURCES},
        )
        self._prefix = prefix
        self._keep_cache = keep_cache
        self.kept: PrefixCache | None = None  # with keep_cache: the target's cache once the reply ends
        self._stop_requested = False
        self._iterator: Iterator[list[Token]] | None = None

    # -- public -------------------------------------------------------------

    def __iter__(self) -> Iterator[list[Token]]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    def stop(self) -> None:
        """Ask the generation to end after the current round (thread-safe)."""
        self._stop_requested = True

    def close(self) -> None:
        """End the generation now; nothing more is generated after this."""
        self._stop_requested = True
        if self._iterator is not None:
            self._iterator.close()  # a started run frees its caches in its finally
        if not self.stats.stop_reason:
            self.stats.stop_reason = "stopped"
        self._iterator = iter(())

    def run(self) -> list[Token]:
        """Generate to the end; return all tokens."""
        for _ in self:
            pass
        return self.tokens

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    # -- decoding -----------------------------------------------------------

    def _run(self) -> Iterator[list[Token]]:
        device = self.target.device
        self._generator = new_generator(self.seed, device)
        self._timer = RoundTimer(device)
        self._reference_generator = new_generator((self.seed + 1) & SEED_MAX, device)  # wraps, as torch's seeds do
        self._ids = list(self.prompt_ids)
        capacity = min(self.max_positions, len(self._ids) + self.max_new_tokens + self.k + 1)
        if self._keep_cache:
            capacity = self.max_positions  # room for the rest of the conversation
        start = clock(device)
        try:
            self._target_cache, cached = self._resume_or_new_cache(capacity)
            self._target_len = self._prefill(self.target, self._target_cache, cached)
            if self.draft is not None:
                try:
                    with self._draft_faults():
                        self._draft_cache = self.draft.new_cache(capacity)
                        self._draft_len = self._prefill_draft()
                except DraftFailure as failure:
                    self._fall_back(failure)
            self.stats.prefill_s = clock(device) - start
            while not self.stats.stop_reason:
                if self._stop_requested:
                    self.stats.stop_reason = "stopped"
                    break
                room = min(self.max_new_tokens - len(self.tokens), self.max_positions - len(self._ids))
                if self.stats.rounds == 1 and self._reference_steps and not self._reference_times:
                    self._time_reference_step()  # early in the reply, under the first tokens' conditions
                emitted = self._emit(self._next_tokens(room), room)
                # Decided before the yield, so a caller that stops reading
                # after the last chunk still sees why the reply ended.
                if emitted[-1].id in self.stop_ids:
                    self.stats.stop_reason = "eos"
                elif len(self.tokens) >= self.max_new_tokens:
                    self.stats.stop_reason = "max_new_tokens"
                elif len(self._ids) >= self.max_positions:
                    self.stats.stop_reason = "context"
                elif self.max_seconds is not None and time.perf_counter() - start >= self.max_seconds:
                    self.stats.stop_reason = "time limit"
                self.stats.wall_s = time.perf_counter() - start - self.stats.reference_s  # the round has synced
                if self.stats.first_token_s is None:
                    self.stats.first_token_s = self.stats.wall_s
                yield emitted
            if self.stats.stop_reason not in ("stopped", "time limit"):
                while len(self._reference_times) < self._reference_steps:
                    self._time_reference_step()  # after the last token was shown
            if self._keep_cache:
                self.kept = PrefixCache(self._target_cache, self._ids[: self._target_len])
        except GeneratorExit:
            self.stats.stop_reason = self.stats.stop_reason or "stopped"
            raise
        except OUT_OF_MEMORY:
            self.stats.stop_reason = "out of memory"
            raise
        except Exception:
            self.stats.stop_reason = "error"
            raise
        finally:
            self.stats.wall_s = clock(device) - start - self.stats.reference_s
            # Free what the turn held: caches can be hundreds of MB.
            self._target_cache = self._draft_cache = None
            if (
                self._baseline is not None
                and self.mode == "standard"
                and self.stats.stop_reason in ("eos", "max_new_tokens")
                and self.stats.new_tokens >= 8
            ):
                self._baseline.record(self.stats.tokens_per_s, "standard-mode turns")

    def _resume_or_new_cache(self, capacity: int) -> tuple[Any, int]:
        """The prefix cache when the target can resume it, with how many leading prompt positions it
        already holds (their ids match: the longest common prefix); else a new cache and 0."""
        resume = getattr(self.target, "resume_cache", None)
        if self._prefix is not None and resume is not None:
            cache = resume(self._prefix.cache, capacity)
            if cache is not None:
                held = 0
                for mine, theirs in zip(self._ids[:-1], self._prefix.ids):
                    if mine != theirs:
                        break
                    held += 1
                self.stats.prefix_reused = held
                return cache, held
        return self.target.new_cache(capacity), 0

    def _prefill(self, lm: DecoderLM, cache, cached: int = 0) -> int:
        """Feed the prompt but its last token, from position `cached` on (what the cache lacks)."""
        if len(self._ids) - 1 > cached:
            lm.forward(self._ids[cached:-1], cached, cache, logits=False)
        return len(self._ids) - 1

    def _next_tokens(self, room: int) -> list[Token]:
        """One round's tokens: a speculative round, or a standard step once there is no draft (standard
        mode, or a draft that failed: the step then goes on from where the target is)."""
        if self.draft is not None:
            try:
                # Near the end a round drafts no more than fits; a bonus past the limit is dropped by _emit.
                return self._speculative_round(min(self.k, room))
            except DraftFailure as failure:
                self._fall_back(failure)
        return self._target_step()

    @contextmanager
    def _draft_faults(self) -> Iterator[None]:
        """Turn what the draft raises into a DraftFailure; running out of memory stays what it is."""
        try:
            yield
        except OUT_OF_MEMORY:
            raise
        except Exception as error:
            raise DraftFailure(error) from error

    def _fall_back(self, failure: DraftFailure) -> None:
        """Finish the reply with standard decoding. The target's cache and position are untouched
        by a failed round (its tokens were never emitted), so standard steps go on exactly."""
        self.draft = self._draft_cache = None
        self.stats.fallback = f"draft failed: {failure}; finished with standard decoding"

    def _prefill_draft(self) -> int:
        self.stats.draft_prefill = prefill_draft(
            self.draft, self._draft_cache, self.target, self._target_cache, self._ids
        )
        return len(self._ids) - 1

    def _pending(self, fed: int) -> torch.Tensor:
        """The tokens after the first `fed`, as ids on the target's device."""
        return torch.tensor(self._ids[fed:], dtype=torch.long, device=self.target.device)

    def _choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A token (0-d tensor) from one row of logits, and the distribution it came from."""
        if self.sampling.greedy:
            return torch.argmax(logits), None
        probs = logits_to_probs(logits.view(1, -1), self.sampling)[0]
        return sample_index(probs, self._generator), probs

    def _target_step(self) -> list[Token]:
        """Standard decoding: one target forward on the last token."""
        t0 = self._timer.mark()
        logits = self.target.forward(self._pending(self._target_len), self._target_len, self._target_cache)
        token, probs = self._choose(logits[-1, : self._vocab])
        t1 = self._timer.mark()
        token = self._read(token, probs)  # the step's one host sync
        self.stats.target_forwards += 1
        self.stats.target_s += self._timer.seconds(t0, t1)
        return [Token(token, "standard")]

    def _time_reference_step(self) -> None:
        """One standard-decoding step, timed and thrown away: a target forward of the pending token (the
        last one, never fed yet) at its own position, which the next forward overwrites, and a token
        choice. Its random draw uses a generator of its own, so the reply's draws are untouched."""
        start = time.perf_counter()
        logits = self.target.forward(self._pending(self._target_len), self._target_len, self._target_cache)
        if self.sampling.greedy:
            int(torch.argmax(logits[-1, : self._vocab]))
        else:
            probs = logits_to_probs(logits[-1:, : self._vocab], self.sampling)[0]
            self._read(sample_index(probs, self._reference_generator), probs)
        elapsed = time.perf_counter() - start  # int() above waited for the device
        self._reference_times.append(elapsed)
        self.stats.reference_s += elapsed
        self.stats.reference_steps = len(self._reference_times)
        self.stats.reference_step_s = statistics.median(self._reference_times)

    def _speculative_round(self, k: int) -> list[Token]:
        assert self.draft is not None
        n, vocab, device = len(self._ids), self._vocab, self.target.device
        # Everything stays on the device until the round's tokens are read
        # once at its end: no host sync per draft token.
        t0 = self._timer.mark()
        # Draft proposes k tokens. Its pending input is 1 token, or 2 after a
        # round that ended with a bonus (the last draft token was never fed).
        # Sampling and acceptance happen on the target's device, with one generator.
        proposals: list[torch.Tensor] = []
        draft_probs: list[torch.Tensor] = []
        with self._draft_faults():
            logits = self.draft.forward(self._pending(self._draft_len), self._draft_len, self._draft_cache)[-1]
            for i in range(k):
                token, probs = self._choose(logits[:vocab].to(device))
                proposals.append(token)
                if probs is not None:
                    draft_probs.append(probs)
                if i < k - 1:
                    logits = self.draft.forward(token.view(1), n + i, self._draft_cache)[-1]
        proposed = torch.stack(proposals)
        self._draft_len = n + k - 1

        # Target scores the pending token and all k proposals in one forward.
        t1 = self._timer.mark()
        fed = torch.cat([self._pending(self._target_len), proposed])
        target_logits = self.target.forward(fed, self._target_len, self._target_cache)[-(k + 1) :, :vocab]
        checks: list[torch.Tensor] = []  # sampled rounds: are p and q finite? (read with the tokens)
        if self.sampling.greedy:
            choices = torch.argmax(target_logits, dim=-1)
            accepted = torch.cumprod((proposed == choices[:k]).to(torch.long), dim=0).sum()
            final = choices[accepted]
        else:
            p, q = logits_to_probs(target_logits, self.sampling), torch.stack(draft_probs)
            accepted, final = speculative_accept(p, q, proposed, self._generator)
            checks = [all_finite(p).view(1), all_finite(q).view(1)]
        t2 = self._timer.mark()
        *tokens, final, accepted = self._read_round(  # the round's one host sync
            [proposed, torch.as_tensor(final, device=device).view(1), torch.as_tensor(accepted, device=device).view(1)],
            checks,
        )
        self.stats.draft_s += self._timer.seconds(t0, t1)
        self.stats.target_s += self._timer.seconds(t1, t2)
        self.stats.draft_forwards += k
        self.stats.target_forwards += 1
        self.stats.rounds += 1
        self.stats.drafted += k
        self.stats.accepted += accepted
        self.stats.rejected += accepted < k

        out = [Token(t, "draft") for t in tokens[:accepted]]
        out.append(Token(final, "bonus" if accepted == k else "target"))
        return out

    def _read(self, token: torch.Tensor, probs: torch.Tensor | None) -> int:
        """A token as an int (a host sync); in the same read, refuse it when the distribution it was
        drawn from was not finite (NaN probabilities draw garbage)."""
        if probs is None:
            return int(token)
        token, finite = torch.stack([token, all_finite(probs).to(token.dtype)]).tolist()
        if not finite:
            raise non_finite_error("target's")
        return token

    def _read_round(self, values: list[torch.Tensor], checks: list[torch.Tensor]) -> list[int]:
        """The round's values as ints in one host sync, read together with its finiteness checks
        (the target's, then the draft's); raises NonFiniteProbabilitiesError for the target's, and
        a DraftFailure (the reply goes on without the draft) for the draft's."""
        out = torch.cat([*values, *(check.to(values[0].dtype) for check in checks)]).tolist()
        if checks:
            *out, target_finite, draft_finite = out
            if not target_finite:
                raise non_finite_error("target's")
            if not draft_finite:
                raise DraftFailure(non_finite_error("draft's"))
        return out

    def _emit(self, proposed: list[Token], room: int) -> list[Token]:
        """Cut at a stop token or at `room` tokens, then advance the caches."""
        emitted: list[Token] = []
        for token in proposed[:room]:
            emitted.append(token)
            if token.id in self.stop_ids:
                break
        self.tokens.extend(emitted)
        self._ids.extend(t.id for t in emitted)
        self.stats.new_tokens = len(self.tokens)
        for t in emitted:
            self.stats.source_counts[t.source] += 1
        # Every emitted token but the last has been fed to the target; rejected
        # positions beyond that are overwritten by the next forward.
        self._target_len = min(self._target_len + len(proposed), len(self._ids) - 1)
        if self.draft is not None:
            self._draft_len = min(self._draft_len, len(self._ids) - 1)
        return emitted


def prefill_draft(draft: DecoderLM, draft_cache, target: DecoderLM, target_cache, ids: Sequence[int]) -> str:
    """Fill the draft's cache for ids[:-1] (the target's already holds them):
    a copy of the target's keys/values when the draft can take them (see
    DecoderLM.copy_cache_prefix), else the draft's own prefill. Returns which
    ran: "copied from the target" or "computed"."""
    length = len(ids) - 1
    adopt = getattr(draft, "copy_cache_prefix", None)
    if length and adopt is not None and adopt(draft_cache, target, target_cache, length):
        return "copied from the target"
    if length:
        draft.forward(list(ids[:-1]), 0, draft_cache, logits=False)
    return "computed"


def measure_forward_costs(
    target: DecoderLM,
    draft: DecoderLM,
    prompt_ids: Sequence[int],
    max_tokens: int,
    *,
    reps: int = 3,
    budget_s: float = 5.0,
) -> tuple[dict[int, list[float]], list[float]]:
    """Seconds of target forwards over 1..max_tokens tokens, and of 1-token
    draft steps, at the end of a prefilled prompt: the costs a speculative
    round pays, for choosing K. Sizes are interleaved across repetitions so
    drift hits them alike; past `budget_s` only the 1-token step is timed."""
    n0 = len(prompt_ids)
    target_cache, draft_cache = target.new_cache(n0 + max_tokens), draft.new_cache(n0 + 1)
    target.forward(list(prompt_ids), 0, target_cache, logits=False)
    draft.forward(list(prompt_ids), 0, draft_cache, logits=False)
    token = int(prompt_ids[-1])  # the content does not change the cost
    target.forward([token], n0, target_cache)  # warm-up
    draft.forward([token], n0, draft_cache)
    forwards: dict[int, list[float]] = {}
    draft_steps: list[float] = []
    deadline = clock(target.device) + budget_s
    for _ in range(reps):
        for n in range(1, max_tokens + 1):
            t0 = clock(target.device)
            if n > 1 and t0 > deadline:
                break
            target.forward([token] * n, n0, target_cache)
            forwards.setdefault(n, []).append(clock(target.device) - t0)
        t0 = clock(draft.device)
        draft.forward([token], n0, draft_cache)
        draft_steps.append(clock(draft.device) - t0)
    return forwards, draft_steps


def generate(target: DecoderLM, draft: DecoderLM | None, prompt_ids: Sequence[int], **kwargs) -> Generation:
    """Start a generation; see `Generation` for the arguments."""
    return Generation(target, draft, prompt_ids, **kwargs)
