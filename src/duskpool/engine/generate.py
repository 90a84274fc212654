"""The generate loop: prefill the prompt, then decode token by token until a stop condition.

The loop only needs `forward(token_ids, start) -> logits of the last position`, so the same loop
drives the single-process engine here and a pipeline of nodes in `cluster`.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from duskpool.engine.sampling import Sampler, SamplingParams
from duskpool.engine.tokenizer import Tokenizer
from duskpool.models import ContextOverflowError

Forward = Callable[[list[int], int], torch.Tensor]  # (token ids, first position) -> logits [vocab]

PREFILL_CHUNK = 512  # bounds the attention scores and activations a long prompt needs at once


@dataclass
class GenerationParams:
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings; the model's end tokens always stop
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = ""  # "stop" (end token or stop string) or "length" (max tokens or context)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


def check_prompt(prompt: list[int], context_length: int) -> None:
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= context_length:
        raise ContextOverflowError(f"the prompt has {len(prompt)} tokens; the context holds {context_length}")


def generate(forward: Forward, tokenizer: Tokenizer, prompt: list[int], params: GenerationParams,
             context_length: int, stats: GenerationStats | None = None) -> Iterator[str]:
    """Yield the answer's text as it is produced; `stats` is filled in as it goes."""
    stats = stats if stats is not None else GenerationStats()
    check_prompt(prompt, context_length)
    stats.prompt_tokens = len(prompt)
    sampler = Sampler(params.sampling)
    budget = min(params.max_tokens, context_length - len(prompt))
    text, stream = _StopText(params.stop), tokenizer.stream()

    started = time.perf_counter()
    for start in range(0, len(prompt), PREFILL_CHUNK):
        logits = forward(prompt[start:start + PREFILL_CHUNK], start)
    stats.prefill_seconds = time.perf_counter() - started

    context, generated = list(prompt), []
    started = time.perf_counter()
    stats.finish_reason = "length"
    while True:
        token = sampler(logits, context)
        if token in tokenizer.stop_ids:
            stats.finish_reason = "stop"
            break
        context.append(token)
        generated.append(token)
        stats.generated_tokens = len(generated)
        piece, stopped = text.feed(stream.feed(token))
        if piece:
            yield piece
        if stopped:
            stats.finish_reason = "stop"
            break
        if len(generated) >= budget:
            break
        logits = forward([token], len(context) - 1)
    stats.decode_seconds = time.perf_counter() - started
    text.feed(stream.flush())
    tail = text.flush()
    if tail:
        yield tail


class _StopText:
    """Passes decoded text on, holding back what may begin a stop string and cutting at one."""

    def __init__(self, stop: list[str]):
        self.stop, self.sent = [s for s in stop if s], 0
        self.text = ""

    def feed(self, new_text: str) -> tuple[str, bool]:
        """(the text that is now safe to send, whether a stop string was reached)."""
        self.text = text = self.text + new_text
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            end, stopped = len(text), False
            # hold back the longest suffix that could still grow into a stop string
            end -= max((n for s in self.stop for n in range(1, min(len(s), end - self.sent + 1))
                        if text[:end].endswith(s[:n])), default=0)
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        if stopped:
            self.text = text[:end]
        return piece, stopped

    def flush(self) -> str:
        piece = self.text[self.sent:]
        self.sent = len(self.text)
        return piece
