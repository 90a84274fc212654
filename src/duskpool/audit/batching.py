"""Two ways to batch what a backend computes one sequence at a time: the attacker's tools.

- `alternatives()`: the T rows of a batch are T *alternative* tokens at one position p, each seeing the prefix
  held in the cache and itself, not each other: "which token at p, after this prefix, gives the hidden state
  I received?" in one call, not one decode step per candidate. With an empty prefix (p = 0) every row is a
  token on its own: the embedding table pushed through the layers.
- `packed(lengths)`: the rows are several sequences one after the other, each from position 0, each seeing
  only itself: one call through a layer for all the audit's texts (one matrix product per weight, not one
  per text).

`BatchOps` wraps the CPU backend's ops (models/base.py `Ops`) and changes only `rotations` and `attention`
inside those two modes. A family file is loaded with it unchanged, so the audit runs any family the backend
runs; outside the modes it is the backend itself.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np
import torch

from duskpool.backends import backend


class BatchOps:
    """The CPU backend's ops, plus the two batching modes."""

    def __init__(self, base: ModuleType | None = None):
        self.base = base or backend("cpu")
        self.mode: str | None = None
        self.lengths: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    @contextmanager
    def alternatives(self) -> Iterator[None]:
        """Inside: forward_span(rows [T, dim], cache, p) computes T candidate tokens at position p."""
        with self._mode("alternatives", []):
            yield

    @contextmanager
    def packed(self, lengths: Sequence[int]) -> Iterator[None]:
        """Inside: forward_span(rows [sum(lengths), dim], cache, 0) computes each sequence on its own."""
        with self._mode("packed", list(lengths)):
            yield

    @contextmanager
    def _mode(self, mode: str, lengths: list[int]) -> Iterator[None]:
        before = self.mode, self.lengths
        self.mode, self.lengths = mode, lengths
        try:
            yield
        finally:
            self.mode, self.lengths = before

    def rotations(self, start: int, tokens: int, freqs: np.ndarray) -> Any:
        if self.mode == "alternatives":
            cos, sin = self.base.rotations(start, 1, freqs)  # one position, shared by every row
            return cos.expand(tokens, -1).contiguous(), sin.expand(tokens, -1).contiguous()
        if self.mode == "packed":
            cos, sin = self.base.rotations(0, max(self.lengths), freqs)
            positions = torch.cat([torch.arange(n) for n in self.lengths])  # each sequence from 0
            return cos[positions].contiguous(), sin[positions].contiguous()
        return self.base.rotations(start, tokens, freqs)

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                  scale: float | None = None, window: int | None = None, causal: bool = True) -> torch.Tensor:
        # q: [T, H, d]; keys, values: [Hk, start + T, d]
        if self.mode is None:
            return self.base.attention(q, keys, values, start, scale, window, causal)
        scale = q.shape[2] ** -0.5 if scale is None else scale
        if self.mode == "alternatives":
            return _alternatives(q, keys, values, start, scale, window)
        else:  # packed
            out, first = torch.empty_like(q), 0
            for n in self.lengths:
                rows = slice(first, first + n)
                out[rows] = _causal(q[rows], keys[:, rows], values[:, rows], scale, window)
                first += n
            return out


def _alternatives(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float,
                  window: int | None) -> torch.Tensor:
    """Row t attends to the prefix [0, start) (within the window) and to itself, kept at start + t."""
    T, H, d = q.shape
    group = H // keys.shape[0]
    first = 0 if window is None else max(0, start - window + 1)
    k_prefix = keys[:, first:start].repeat_interleave(group, dim=0)  # [H, P, d]
    v_prefix = values[:, first:start].repeat_interleave(group, dim=0)
    k_self = keys[:, start:start + T].transpose(0, 1).repeat_interleave(group, dim=1)  # [T, H, d]
    v_self = values[:, start:start + T].transpose(0, 1).repeat_interleave(group, dim=1)
    scores = torch.cat([torch.einsum("thd,hpd->thp", q, k_prefix), (q * k_self).sum(-1, keepdim=True)], -1)
    probs = torch.softmax(scores * scale, dim=-1)  # [T, H, P + 1]
    return torch.einsum("thp,hpd->thd", probs[..., :-1], v_prefix) + probs[..., -1:] * v_self


def _causal(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
            window: int | None) -> torch.Tensor:
    """Plain causal attention of one sequence from position 0: q [n, H, d], keys, values [Hk, n, d]."""
    n, H, _ = q.shape
    group = H // keys.shape[0]
    k, v = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)  # [H, n, d]
    query, key = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = (key <= query) & ((query - key < window) if window is not None else True)
    scores = (q.transpose(0, 1) @ k.transpose(1, 2)) * scale  # [H, n, n]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (probs @ v).transpose(0, 1)
