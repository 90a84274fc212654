"""Preallocated per-session key/value cache for the layers one process holds."""

import torch

from duskpool.backends.cpu import native
from duskpool.models.base import ContextOverflowError


class KVCache:
    """Keys and values of one session for layers [layers.start, layers.stop), allocated once."""

    def __init__(self, layers: range, n_kv_heads: int, head_dim: int, capacity: int):
        self.layers, self.capacity = layers, capacity
        # [layer, kv_head, position, head_dim]: a decode step reads each layer's prefix as one view
        self.k = torch.zeros(len(layers), n_kv_heads, capacity, head_dim)
        self.v = torch.zeros(len(layers), n_kv_heads, capacity, head_dim)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [T, kv_heads, head_dim] at positions start..start+T; all keys, values [kv_heads, end, d]."""
        end = start + k.shape[0]
        self.check_room(end)
        i = layer - self.layers.start
        lib = native.library()
        if lib is not None and k.stride(1) == v.stride(1) == k.shape[2] and k.stride(2) == v.stride(2) == 1 \
                and k.stride(0) == v.stride(0):  # one C call instead of two strided torch copies
            lib.dp_store_kv(k.data_ptr(), v.data_ptr(), k.stride(0), k.shape[0], k.shape[1], k.shape[2],
                            self.k[i].data_ptr(), self.v[i].data_ptr(), self.capacity, start)
        else:
            self.k[i, :, start:end] = k.transpose(0, 1)
            self.v[i, :, start:end] = v.transpose(0, 1)
        return self.k[i, :, :end], self.v[i, :, :end]

    def check_room(self, end: int) -> None:
        """Raise ContextOverflowError unless positions up to `end` fit."""
        if end > self.capacity:
            raise ContextOverflowError(f"context overflow: position {end} is past this session's "
                                       f"context of {self.capacity} tokens")

    def clear(self) -> None:
        """Zero the buffers so nothing of the session outlives it."""
        self.k.zero_()
        self.v.zero_()

    def truncate(self, length: int) -> None:
        """Zero positions length.. (what a rejected speculative draft wrote)."""
        self.k[:, :, length:].zero_()
        self.v[:, :, length:].zero_()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
