"""The generate loop: prefill the prompt, then decode token by token until a stop condition.

The loop only needs `forward(token_ids, start) -> logits of the last position`, so the same loop
drives the single-process engine here and a pipeline of nodes in `cluster`.
"""

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from duskpool.engine.sampling import Sampler, SamplingParams, logprobs
from duskpool.engine.speculative import Speculation, Verify
from duskpool.engine.tokenizer import Tokenizer
from duskpool.models import ContextOverflowError

if TYPE_CHECKING:
    from duskpool.engine.grammar import Grammar

Forward = Callable[[list[int], int], torch.Tensor]  # (token ids, first position) -> logits [vocab]

PREFILL_CHUNK = 512  # bounds the attention scores and activations a long prompt needs at once
MAX_STOP_STRINGS = 16  # OpenAI takes 4; these bound the matching each token costs
MAX_STOP_CHARS = 256


@dataclass
class GenerationParams:
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings; the model's end tokens always stop
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprobs: int | None = None  # None: none; n: each token's log-probability and the n most likely
    grammar: "Grammar | None" = None  # every token must keep the text within it (structured output)
    speculative: bool = True  # draft by prompt lookup where the context repeats (engine/speculative.py)
    cancel: threading.Event | None = None  # set: the generation ends before its next token (the client left)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(self.stop)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"a stop string is longer than {MAX_STOP_CHARS} characters")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("top logprobs must be between 0 and 20")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely tokens at its position, under the logits the
    sampler drew from (after the repetition penalty and the grammar's mask, before temperature and filters)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Piece(str):
    """A piece of the answer's text; with `logprobs` asked for, `tokens` holds those of the tokens that
    produced it (a token whose text is held back, as a possible stop string, comes with a later piece)."""

    tokens: tuple[TokenLogprob, ...]

    def __new__(cls, text: str, tokens: tuple[TokenLogprob, ...] = ()) -> "Piece":
        piece = super().__new__(cls, text)
        piece.tokens = tokens
        return piece


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = ""  # "stop" (end token, stop string or a finished grammar) or "length" (max tokens, context)
    stop_string: str | None = None  # the stop string that ended it, if one did
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    mask_seconds: float = 0.0  # computing the grammar's masks, over `masks` steps
    masks: int = 0
    drafted_tokens: int = 0  # speculative drafts verified, and those accepted
    accepted_tokens: int = 0
    token_seconds: list[float] = field(default_factory=list)  # each generated token's own time


def check_prompt(prompt: list[int], context_length: int) -> None:
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= context_length:
        raise ContextOverflowError(f"the prompt has {len(prompt)} tokens; the context holds {context_length}")


def generate(forward: Forward, tokenizer: Tokenizer, prompt: list[int], params: GenerationParams,
             context_length: int, stats: GenerationStats | None = None,
             verify: Verify | None = None) -> Iterator[Piece]:
    """Yield the answer's text as it is produced; `stats` is filled in as it goes. `verify`: the session's
    logits of every row, for speculative decoding (params.speculative)."""
    stats = stats if stats is not None else GenerationStats()
    check_prompt(prompt, context_length)
    stats.prompt_tokens = len(prompt)
    sampler = Sampler(params.sampling)
    constraint = params.grammar.constraint() if params.grammar is not None else None
    budget = min(params.max_tokens, context_length - len(prompt))
    text, stream = _StopText(params.stop), tokenizer.stream()
    pending: list[TokenLogprob] = []  # of tokens whose text has not gone out yet

    def piece(new: str) -> Piece:
        tokens = tuple(pending)
        pending.clear()
        return Piece(new, tokens)

    started = time.perf_counter()
    for start in range(0, len(prompt), PREFILL_CHUNK):
        logits = forward(prompt[start:start + PREFILL_CHUNK], start)
    stats.prefill_seconds = time.perf_counter() - started

    context, generated = list(prompt), []
    speculation = Speculation(forward, verify if params.speculative else None, capacity=context_length)
    started = last = time.perf_counter()
    stats.finish_reason = "length"
    stopped = False
    while params.cancel is None or not params.cancel.is_set():  # checked every token: text may be held back
        allowed = None
        if constraint is not None:
            masked = time.perf_counter()
            allowed = constraint.allowed()
            stats.mask_seconds += time.perf_counter() - masked
            stats.masks += 1
        adjusted = sampler.adjust(logits, context, allowed)
        token = sampler.draw(adjusted)
        if token in tokenizer.stop_ids:
            stats.finish_reason = "stop"
            break
        if params.logprobs is not None:
            pending.append(TokenLogprob(token, *logprobs(adjusted, token, params.logprobs)))
        if constraint is not None:
            constraint.advance(token)
        context.append(token)
        generated.append(token)
        stats.generated_tokens = len(generated)
        now = time.perf_counter()
        stats.token_seconds.append(now - last)
        last = now
        new, stopped = text.feed(stream.feed(token))
        if new:
            yield piece(new)
        if stopped:
            stats.finish_reason, stats.stop_string = "stop", text.hit
            break
        if constraint is not None and constraint.finished:  # nothing but the end token could follow
            stats.finish_reason = "stop"
            break
        if len(generated) >= budget:
            break
        logits = speculation.next_logits(token, len(context) - 1, context)
        stats.drafted_tokens, stats.accepted_tokens = speculation.drafted, speculation.accepted
    stats.decode_seconds = time.perf_counter() - started
    tail = ""
    if not stopped:
        tail, stopped = text.feed(stream.flush())
        if stopped:
            stats.finish_reason, stats.stop_string = "stop", text.hit
    tail += text.flush()
    if tail or (pending and not stopped):
        yield piece(tail)


class _StopText:
    """Passes decoded text on, holding back what may begin a stop string and cutting at one.

    Each stop string is matched as Knuth-Morris-Pratt does: per string, the length of its longest prefix that
    the text ends with, updated per new character; only the text not sent yet is kept (shorter than the longest
    stop string, plus the newest token's text). A token costs its characters times the stop strings."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.fallback = [_prefix_lengths(s) for s in self.stop]
        self.matched = [0] * len(self.stop)  # per stop string: how much of it the text ends with
        self.held = ""  # decoded, not sent yet: it may begin a stop string
        self.hit: str | None = None  # the stop string reached

    def feed(self, new_text: str) -> tuple[str, bool]:
        """(the text that is now safe to send, whether a stop string was reached)."""
        held, hits = self.held + new_text, []
        for position, char in enumerate(new_text, len(self.held)):
            for i, stop in enumerate(self.stop):
                q = self.matched[i]
                while q and stop[q] != char:
                    q = self.fallback[i][q - 1]
                q += stop[q] == char
                if q == len(stop):
                    hits.append((position + 1 - q, stop))
                    q = self.fallback[i][q - 1]
                self.matched[i] = q
        if hits:  # the one that starts first (a longer one may end later in the same piece)
            (end, self.hit) = min(hits)
            self.held = ""
            return held[:end], True
        keep = max(self.matched, default=0)  # the longest suffix that could still grow into a stop string
        self.held = held[len(held) - keep:]
        return held[:len(held) - keep], False

    def flush(self) -> str:
        piece, self.held = self.held, ""
        return piece


def _prefix_lengths(s: str) -> list[int]:
    """For each i, the length of the longest proper prefix of s[:i + 1] that is also its suffix (KMP's table)."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        k += s[i] == s[k]
        table[i] = k
    return table
