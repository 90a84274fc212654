"""The MLX backend: Metal on Apple silicon, CUDA on NVIDIA GPUs (mlx[cuda13]), the CPU elsewhere (mlx[cpu]).

This module is the `Ops` a family is computed with (models/base.py) over mx.array, plus what a node says about
its machine. Weights are converted from their GGUF blocks to MLX's affine groups once, at load (quant.py);
hidden states cross the wire as the same bytes as the CPU backend's, so MLX and CPU nodes share a route.
MLX is lazy: a step's graph is built by the family's code and runs when its bytes or logits are asked for.
"""

import platform
import sys
import time
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np
import torch

from duskpool.backends.mlx import quant
from duskpool.backends.mlx.cache import KVCache
from duskpool.backends.mlx.ops import activation, attention, gated, layer_norm, rms_norm, rope, rotations
from duskpool.backends.mlx.quant import (
    COMPUTE,
    EVAL_LOCK,
    SUPPORTED_TYPES,
    Embedding,
    Linear,
    convert_once,
    evaluate,
    reference,
)
from duskpool.models.base import EachSession, Segment
from duskpool.weights.gguf import PackedTensor

NAME = "mlx"
KV_VALUE_BYTES = COMPUTE.size  # the cache holds float16 keys and values on a GPU, float32 on the CPU
WIRE_DTYPES = {"float32": (mx.float32, np.float32), "float16": (mx.float16, np.float16),
               "bfloat16": (mx.bfloat16, np.uint16)}  # numpy has no bfloat16: its bytes travel as uint16


def linear(parts: list[PackedTensor], bias: list[PackedTensor] | None = None) -> Callable[[mx.array], mx.array]:
    return Linear([convert_once(p) for p in parts], mx.concatenate([vector(b) for b in bias]) if bias else None)


def vector(tensor: PackedTensor) -> mx.array:
    """A norm's weight or a bias [n], in the residual stream's type."""
    values = mx.array(reference(tensor).reshape(-1)).astype(quant.RESIDUAL)
    evaluate(values)
    return values


def embedding(tensor: PackedTensor) -> Embedding:
    return Embedding(convert_once(tensor))


def new_cache(layers: range, n_kv_heads: int, head_dim: int, capacity: int) -> KVCache:
    return KVCache(layers, n_kv_heads, head_dim, capacity)


def to_bytes(hidden: mx.array, dtype: str) -> bytes:
    # little-endian, as on every platform duskpool runs on; rounding as torch's (to nearest even)
    ours, theirs = WIRE_DTYPES[dtype]
    wire = hidden.astype(ours)
    wire = wire.view(mx.uint16) if ours == mx.bfloat16 else wire
    with EVAL_LOCK:
        return np.array(wire, copy=False).tobytes()


def from_bytes(data: bytes, tokens: int, dim: int, dtype: str) -> mx.array:
    ours, theirs = WIRE_DTYPES[dtype]
    wire = np.frombuffer(data, dtype=theirs).reshape(tokens, dim)
    # checked here, not on the device: a check there would wait for the device once per hop
    finite = ((wire & 0x7F80) != 0x7F80).all() if ours == mx.bfloat16 else np.isfinite(wire).all()
    if not finite:
        raise ValueError("hidden state contains NaN or Inf")
    hidden = mx.array(wire)
    return (hidden.view(mx.bfloat16) if ours == mx.bfloat16 else hidden).astype(quant.RESIDUAL)


def logits(x: mx.array) -> torch.Tensor:
    with EVAL_LOCK:
        return torch.from_numpy(np.array(x.astype(mx.float32)))


def concat(parts: list[mx.array]) -> mx.array:
    return mx.concatenate(parts)


def sessions(segments: Sequence[Segment]) -> EachSession:
    """One session at a time: the projections carry every row at once, RoPE and attention go per session."""
    return EachSession(sys.modules[__name__], segments)


# --- the machine ---------------------------------------------------------------------------------
def device() -> str:
    info = mx.device_info()
    name = info.get("device_name") or platform.processor() or platform.machine()
    return f"{name} ({mx.default_device().type.name})"


def set_threads(threads: int) -> None:
    """MLX sizes its CPU thread pool itself; the thread count is the CPU backend's setting."""


def matmul_bytes_per_ms() -> float:
    """Bytes of 4-bit weights this machine multiplies per ms at batch 1 (the planner's speed estimate before a
    span is loaded and timed): a chain of matmuls in one graph, so a GPU's launch latency is not what is timed."""
    rows = cols = 2048
    w, scales, biases = mx.quantize(mx.random.normal((rows, cols), key=mx.random.key(0)).astype(COMPUTE) * 0.02,
                                    group_size=32, bits=4)
    x = mx.random.normal((1, cols), key=mx.random.key(1)).astype(COMPUTE)
    chain = 8

    def step(x: mx.array) -> mx.array:
        for _ in range(chain):
            x = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=32, bits=4)
        return x

    evaluate(step(x))
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        evaluate(step(x))
        timings.append(time.perf_counter() - started)
    nbytes = w.nbytes + scales.nbytes + biases.nbytes
    return chain * nbytes / (sorted(timings)[2] * 1000)


def available() -> bool:
    """Whether MLX computes on a GPU here (Metal or CUDA)."""
    return mx.metal.is_available() or mx.cuda.is_available()


__all__ = ["KV_VALUE_BYTES", "NAME", "SUPPORTED_TYPES", "activation", "attention", "available", "concat", "device",
           "embedding", "evaluate", "from_bytes", "gated", "layer_norm", "linear", "logits", "matmul_bytes_per_ms",
           "new_cache", "rms_norm", "rope", "rotations", "sessions", "set_threads", "to_bytes", "vector"]
