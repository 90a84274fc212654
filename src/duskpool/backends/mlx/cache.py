"""Preallocated per-session key/value cache for the layers one process holds, as mx.arrays."""

import mlx.core as mx

from duskpool.backends.mlx.ops import by_head
from duskpool.backends.mlx.quant import COMPUTE, evaluate
from duskpool.models.base import ContextOverflowError


class KVCache:
    """Keys and values of one session for layers [layers.start, layers.stop), allocated once."""

    def __init__(self, layers: range, n_kv_heads: int, head_dim: int, capacity: int):
        self.layers, self.capacity = layers, capacity
        # per layer [kv_head, position, head_dim]: a step writes its rows in place and reads the prefix as a view
        self.k = [mx.zeros((n_kv_heads, capacity, head_dim), dtype=COMPUTE) for _ in layers]
        self.v = [mx.zeros((n_kv_heads, capacity, head_dim), dtype=COMPUTE) for _ in layers]
        evaluate(*self.k, *self.v)

    def update(self, layer: int, start: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store k, v [T, kv_heads, head_dim] at positions start..start+T; all keys, values [kv_heads, end, d]."""
        end = start + k.shape[0]
        if end > self.capacity:
            raise ContextOverflowError(f"context overflow: position {end} is past this session's "
                                       f"context of {self.capacity} tokens")
        i = layer - self.layers.start
        keys, values = self.k[i], self.v[i]
        keys[:, start:end] = by_head(k).astype(COMPUTE)  # in place: the buffer has no other reader
        values[:, start:end] = by_head(v).astype(COMPUTE)
        return keys[:, :end], values[:, :end]

    def clear(self) -> None:
        """Zero the buffers so nothing of the session outlives it."""
        for buffer in (*self.k, *self.v):
            buffer[:] = 0  # in place: a fresh buffer would leave the old one's bytes in MLX's free list
        evaluate(*self.k, *self.v)

    def truncate(self, length: int) -> None:
        """Zero positions length.. (what a rejected speculative draft wrote)."""
        for buffer in (*self.k, *self.v):
            buffer[:, length:] = 0
        evaluate(*self.k, *self.v)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)
