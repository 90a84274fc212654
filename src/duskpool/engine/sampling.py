"""Choosing the next token from logits: greedy, or sampled with the usual filters."""

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL-style)
    seed: int | None = None  # same seed, same prompt -> same text

    def __post_init__(self) -> None:
        checks = [(self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class Sampler:
    """Holds the random generator of one session, so a seeded session is reproducible."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, context: list[int], allowed: torch.Tensor | None = None) -> int:
        # logits: [vocab] of the last position; context: the token ids so far (prompt + generated)
        return self.draw(self.adjust(logits, context, allowed))

    def adjust(self, logits: torch.Tensor, context: list[int], allowed: torch.Tensor | None = None) -> torch.Tensor:
        """The logits the draw starts from (and logprobs report): after the repetition penalty and, with
        `allowed` (bool [n <= vocab], a grammar's mask; tokens past n are not allowed), with every other token
        at -inf. float64: a temperature, top_p or penalty near 0 (down to 5e-324) must not round to 0."""
        p = self.params
        logits = logits.double()
        if p.repetition_penalty != 1.0 and context:
            seen = torch.tensor(sorted(set(context)), dtype=torch.int64)
            scores = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
            logits = logits.nan_to_num()  # an extreme penalty overflows: ±inf to the largest finite values
        if allowed is not None:
            keep = torch.zeros(logits.shape[0], dtype=torch.bool)
            keep[:allowed.shape[0]] = allowed[:logits.shape[0]]
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits

    def draw(self, logits: torch.Tensor) -> int:
        """A token from adjusted logits (float64 [vocab]): the top one, or drawn after temperature and filters."""
        p = self.params
        if p.temperature == 0:
            return int(logits.argmax())
        # scaled down from the top logit: a tiny temperature sends the others to -inf (never drawn), never to nan
        logits = (logits - logits.max()) / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """(log-probability of `token`, the `top` most likely (token, log-probability)) under adjusted logits."""
    logp = torch.log_softmax(logits, dim=-1)
    best = torch.topk(logp, min(top, logp.numel())) if top else None
    alternatives = zip(best.indices.tolist(), best.values.tolist(), strict=True) if best is not None else ()
    return float(logp[token]), tuple((t, v) for t, v in alternatives if v > float("-inf"))  # a mask's -inf: none
