"""Many one-token continuations of one prefix, computed in one batch: the attacker's tool.

A node that knows the public model can ask "which token at position p, after this prefix, gives the hidden
state I received?" by running each candidate through the layers it lacks. One candidate is a decode step;
`CandidateOps` makes a batch of T rows mean T *alternative* tokens at the same position p, each seeing the
prefix held in the cache and itself, not each other. With an empty prefix (p = 0) every row is a token on
its own: the embedding table pushed through the layers.

It wraps the CPU backend's ops (models/base.py `Ops`) and changes two of them while `alternatives(True)`
is on: `rotations` (every row at position p) and `attention` (prefix + the row itself). A family file is
loaded with it unchanged, so the audit runs any family the backend runs.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np
import torch

from duskpool.backends import backend


class CandidateOps:
    """The CPU backend's ops, plus a mode in which the rows of a batch are alternatives at one position."""

    def __init__(self, base: ModuleType | None = None):
        self.base = base or backend("cpu")
        self.alternative_rows = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    @contextmanager
    def alternatives(self, on: bool = True) -> Iterator[None]:
        """Inside: forward_span(rows [T, dim], cache, p) computes T candidate tokens at position p."""
        before, self.alternative_rows = self.alternative_rows, on
        try:
            yield
        finally:
            self.alternative_rows = before

    def rotations(self, start: int, tokens: int, freqs: np.ndarray) -> Any:
        if not self.alternative_rows:
            return self.base.rotations(start, tokens, freqs)
        cos, sin = self.base.rotations(start, 1, freqs)  # one position, shared by every row
        return cos.expand(tokens, -1).contiguous(), sin.expand(tokens, -1).contiguous()

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                  scale: float | None = None, window: int | None = None) -> torch.Tensor:
        if not self.alternative_rows:
            return self.base.attention(q, keys, values, start, scale, window)
        # q: [T, H, d]; keys, values: [Hk, start + T, d] = the prefix [0, start), then one row per candidate
        T, H, d = q.shape
        group = H // keys.shape[0]
        first = 0 if window is None else max(0, start - window + 1)  # the prefix a sliding window still sees
        k_prefix = keys[:, first:start].repeat_interleave(group, dim=0)  # [H, P, d]
        v_prefix = values[:, first:start].repeat_interleave(group, dim=0)
        k_self = keys[:, start:start + T].transpose(0, 1).repeat_interleave(group, dim=1)  # [T, H, d]
        v_self = values[:, start:start + T].transpose(0, 1).repeat_interleave(group, dim=1)
        scale = d ** -0.5 if scale is None else scale
        scores = torch.cat([torch.einsum("thd,hpd->thp", q, k_prefix), (q * k_self).sum(-1, keepdim=True)], -1)
        probs = torch.softmax(scores * scale, dim=-1)  # [T, H, P + 1]
        return torch.einsum("thp,hpd->thd", probs[..., :-1], v_prefix) + probs[..., -1:] * v_self
