"""The CPU backend: torch float32 activations, weights packed in their GGUF blocks, our C kernels (native/).

This module is the `Ops` a family is computed with (models/base.py), plus what a node says about its
machine: its name, its device, a speed probe for the planner and its thread count.
"""

import platform
import sys
import time
from collections.abc import Callable, Sequence

import torch
from gguf import GGMLQuantizationType

from duskpool.backends.cpu import native
from duskpool.backends.cpu.cache import KVCache
from duskpool.backends.cpu.ops import activation, attention, gated, layer_norm, rms_norm, rope, rotations
from duskpool.backends.cpu.quant import SUPPORTED_TYPES, Linear, QuantTensor
from duskpool.backends.cpu.sessions import Sessions
from duskpool.models.base import Segment
from duskpool.weights.gguf import PackedTensor

NAME = "cpu"
KV_VALUE_BYTES = 4  # the cache holds float32 keys and values
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def linear(parts: list[PackedTensor], bias: list[PackedTensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    return Linear([QuantTensor.from_packed(p) for p in parts],
                  torch.cat([vector(b) for b in bias]) if bias else None)


def vector(tensor: PackedTensor) -> torch.Tensor:
    weight = QuantTensor.from_packed(tensor)
    return weight.data.view(torch.float32)[0] if tensor.qtype == GGMLQuantizationType.F32 else weight.dequantize()[0]


class Embedding:
    def __init__(self, table: QuantTensor):
        self.table = table

    def rows(self, tokens: Sequence[int]) -> torch.Tensor:
        return self.table.rows(torch.as_tensor(tokens))


def embedding(tensor: PackedTensor) -> Embedding:
    return Embedding(QuantTensor.from_packed(tensor))


def sessions(segments: Sequence[Segment]) -> Sessions:
    return Sessions(sys.modules[__name__], segments)


def new_cache(layers: range, n_kv_heads: int, head_dim: int, capacity: int) -> KVCache:
    return KVCache(layers, n_kv_heads, head_dim, capacity)


def to_bytes(hidden: torch.Tensor, dtype: str) -> bytes:
    # little-endian, as on every platform duskpool runs on
    return hidden.to(WIRE_DTYPES[dtype]).contiguous().view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes, tokens: int, dim: int, dtype: str) -> torch.Tensor:
    hidden = torch.frombuffer(bytearray(data), dtype=WIRE_DTYPES[dtype]).view(tokens, dim).float()
    if not hidden.isfinite().all():
        raise ValueError("hidden state contains NaN or Inf")
    return hidden


def logits(x: torch.Tensor) -> torch.Tensor:
    return x


def concat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts)


def evaluate(*arrays: torch.Tensor) -> None:
    """Nothing to do: torch computes eagerly."""


# --- the machine ---------------------------------------------------------------------------------
def device() -> str:
    return platform.processor() or platform.machine()


def set_threads(threads: int) -> None:
    """Compute threads for the C kernels, which do every heavy op; torch keeps one (its elementwise ops between
    them are short, and from 32k elements its OpenMP threads would meet at a barrier after each one: on a machine
    others share, a thread that does not get a core stalls them all). Without the kernels torch gets them."""
    lib = native.library()
    torch.set_num_threads(1 if lib is not None else threads)
    if lib is not None:
        lib.dp_set_threads(threads)


def matmul_bytes_per_ms() -> float:
    """Bytes of Q4_0 weights this machine multiplies per ms at batch 1 (the planner's speed estimate before a
    span is loaded and timed)."""
    rows, cols = 2048, 2048
    weight = QuantTensor(torch.randint(0, 255, (rows, cols // 32 * 18), dtype=torch.uint8), 2, (rows, cols))
    weight.data.view(rows, -1, 18)[:, :, :2] = torch.tensor([0, 0x20], dtype=torch.uint8)  # d = 2^-7
    x, out = torch.randn(1, cols), torch.empty(1, rows)
    weight.matmul_into(x, out)
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        weight.matmul_into(x, out)
        timings.append(time.perf_counter() - started)
    return weight.nbytes / (sorted(timings)[2] * 1000)


__all__ = ["KV_VALUE_BYTES", "NAME", "SUPPORTED_TYPES", "activation", "attention", "concat", "device", "embedding",
           "evaluate", "from_bytes", "gated", "layer_norm", "linear", "logits", "matmul_bytes_per_ms", "new_cache",
           "rms_norm", "rope", "rotations", "sessions", "set_threads", "to_bytes", "vector"]
