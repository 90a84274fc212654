"""Preallocated per-session key/value cache for the layers one process holds."""

import torch

from duskpool.weights import kernels


class ContextOverflowError(ValueError):
    """A session asked for more positions than its cache was sized for."""


class KVCache:
    """Keys and values of one session for layers [layers.start, layers.stop), allocated once."""

    def __init__(self, layers: range, n_kv_heads: int, head_dim: int, capacity: int):
        self.layers, self.capacity = layers, capacity
        # [layer, kv_head, position, head_dim]: a decode step reads each layer's prefix as one view
        self.k = torch.zeros(len(layers), n_kv_heads, capacity, head_dim)
        self.v = torch.zeros(len(layers), n_kv_heads, capacity, head_dim)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [kv_heads, T, head_dim] at positions start..start+T; return all keys, values so far."""
        end = start + k.shape[1]
        if end > self.capacity:
            raise ContextOverflowError(f"context overflow: position {end} is past this session's "
                                       f"context of {self.capacity} tokens")
        i = layer - self.layers.start
        lib = kernels.library()
        if lib is not None and k.stride(0) == v.stride(0) == k.shape[2] and k.stride(2) == v.stride(2) == 1 \
                and k.stride(1) == v.stride(1):  # one C call instead of two strided torch copies
            lib.dp_store_kv(k.data_ptr(), v.data_ptr(), k.stride(1), k.shape[1], k.shape[0], k.shape[2],
                            self.k[i].data_ptr(), self.v[i].data_ptr(), self.capacity, start)
        else:
            self.k[i, :, start:end] = k
            self.v[i, :, start:end] = v
        return self.k[i, :, :end], self.v[i, :, :end]

    def clear(self) -> None:
        """Zero the buffers so nothing of the session outlives it."""
        self.k.zero_()
        self.v.zero_()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_for(n_layers: int, n_kv_heads: int, head_dim: int, capacity: int) -> int:
        """What a cache of this size will hold, before allocating it (float32 keys and values)."""
        return 2 * n_layers * n_kv_heads * capacity * head_dim * 4
