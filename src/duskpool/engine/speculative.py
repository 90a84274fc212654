"""Speculative decoding by prompt lookup: drafts from the context itself, verified in one pass.

`lookup` finds the last time the context's final n tokens (n = 3, then 2) appeared before and proposes the k
tokens that followed them (no second model: answers that quote, repeat or edit their prompt are full of such
runs). The session computes the token just drawn and the drafts at once (`verify`: logits of every row), so one
trip through the route can yield several tokens.

Drafts change no output. A prompt-lookup draft is a single token, not a distribution, and the standard rejection
rule for a draft q = one-hot(d) (accept with probability min(1, p(d) / q(d)) = p(d), else draw from
norm(max(0, p - q)), which is p without d) draws exactly from p: so the loop draws each token from its own
adjusted logits as always, and a draft is accepted when the draw equals it. Greedy output is the same tokens;
sampled output keeps its distribution. The logits of the rows after a rejected draft are dropped, and the next
step starts before them: every cache (the gateway's, each node's) zeroes those positions (KVCache.truncate).
"""

from collections.abc import Callable

import torch

Verify = Callable[[list[int], int], torch.Tensor]  # (token ids, first position) -> logits [T, vocab] of every row
DRAFT_TOKENS = 3  # the C kernels read each weight once for up to 4 rows: 1 + 3 rows cost about what 1 does
NGRAMS = (3, 2)  # a single repeated token predicts too little to pay for its rows


def lookup(context: list[int], k: int = DRAFT_TOKENS, ngrams: tuple[int, ...] = NGRAMS) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's last n tokens."""
    for n in ngrams:
        if len(context) <= n:
            continue
        tail = context[-n:]
        for i in range(len(context) - n - 1, -1, -1):  # latest first, the tail itself excluded
            if context[i:i + n] == tail:
                return context[i + n:i + n + k]
    return []


class Verifier:
    """A session's `verify`, and whether drafting pays now: while few sessions run, a stage's forward costs about
    the same for 4 rows as for 1; once batches fill the stages, every draft row costs compute the others wait for."""

    def __init__(self, verify: Verify, pays: Callable[[], bool]):
        self.verify, self.pays = verify, pays

    def __call__(self, tokens: list[int], start: int) -> torch.Tensor:
        return self.verify(tokens, start)


class Speculation:
    """The logits of each next position: from the last verify pass while its drafts hold, else a new pass."""

    def __init__(self, forward: Callable[[list[int], int], torch.Tensor], verify: Verify | None,
                 k: int = DRAFT_TOKENS, capacity: int | None = None):
        """`capacity`: the positions the session's caches hold; drafts stop short of it."""
        self.forward, self.verify, self.k, self.capacity = forward, verify, k, capacity
        self.pays: Callable[[], bool] = getattr(verify, "pays", lambda: True)
        self.drafts: list[int] = []  # drafted tokens not yet drawn, and the logits that follow each
        self.ahead: list[torch.Tensor] = []
        self.drafted = self.accepted = 0

    def next_logits(self, token: int, position: int, context: list[int]) -> torch.Tensor:
        """Logits after `token` (drawn for `position`, the last of `context`)."""
        if self.drafts and token == self.drafts[0]:  # the draft was right: its pass computed what follows
            self.drafts.pop(0)
            self.accepted += 1
            return self.ahead.pop(0)
        room = self.k if self.capacity is None else min(self.k, self.capacity - position - 1)
        drafts = lookup(context, room) if self.verify is not None and room > 0 and self.pays() else []
        if not drafts:
            self.drafts, self.ahead = [], []
            return self.forward([token], position)
        logits = self.verify([token, *drafts], position)
        self.drafted += len(drafts)
        self.drafts, self.ahead = drafts, list(logits[1:])
        return logits[0]
