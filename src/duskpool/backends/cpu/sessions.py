"""The per-session part of a forward of several sessions (models/base.py `Batch`), for all of them at once.

RoPE: one table of angles for every row, each at its own session's position, and one rotation. Attention: one
C call per layer (native/ops.c dp_attention_batch) stores every session's keys and values in its cache and
attends each over its own, the queries in pieces (up to 16 rows, one kv head's query heads) over the thread pool.
"""

from collections.abc import Sequence

import numpy as np
import torch

from duskpool.backends.cpu import native, ops
from duskpool.models.base import EachSession, Ops, Segment


class Sessions(EachSession):
    """`Sessions` of the CPU backend; `EachSession` where no C library is built or attention is not causal."""

    def __init__(self, backend: Ops, segments: Sequence[Segment]):
        super().__init__(backend, segments)
        self.positions = torch.cat([torch.arange(s.start, s.start + s.length, dtype=torch.float64)
                                    for s in self.segments])
        # per session: its cache's k and v at its first layer, capacity, first layer, start, rows
        self.table = np.array([(s.cache.k.data_ptr(), s.cache.v.data_ptr(), s.cache.capacity, s.cache.layers.start,
                                s.start, s.length) for s in self.segments], dtype=np.int64)
        for s in self.segments:
            s.cache.check_room(s.start + s.length)

    def rope(self, heads: torch.Tensor, freqs: np.ndarray, pairing: str) -> torch.Tensor:
        rotations = self._rotations.get(id(freqs))
        if rotations is None:
            rotations = self._rotations[id(freqs)] = ops.rotations_at(self.positions, freqs)
        return ops.rope(heads, rotations, pairing)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  window: int | None, causal: bool = True) -> torch.Tensor:
        # q: [rows, H, d]; k, v: [rows, Hk, d], views into the fused projection's output
        lib = native.library()
        rows, H, d = q.shape
        if lib is None or not causal or any(t.stride(2) != 1 or t.stride(1) != d for t in (q, k, v)):
            return super().attention(layer, q, k, v, scale, window, causal)
        out = torch.empty(rows, H, d)
        lib.dp_attention_batch(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                               out.data_ptr(), H * d, self.table.ctypes.data, len(self.segments), layer, H, k.shape[1],
                               d, scale, window or 0)
        return out
