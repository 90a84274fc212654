"""The per-token operations of a transformer layer over mx.array, each one of MLX's fused kernels where it has one.

The residual stream stays float32 (what the CPU backend computes in); on a GPU, projections, RoPE, the cache and
attention run in float16, the type the quantized weights' scales are kept in (quant.COMPUTE says why not on the CPU).

A step is lazy: the family's calls build a graph that runs when its bytes or logits are asked for. Building it
costs Python time per op (2.4 ms of a 10 ms Llama-3-8B step on an H200), so each layer's attention starts the
graph so far on the device (mx.async_eval) and the building of the rest overlaps it (+40% tok/s there).
"""

from typing import Any

import mlx.core as mx
import numpy as np

from duskpool.backends.mlx.quant import EVAL_LOCK

ASYNC = True  # start each layer on the device from its attention (see above)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    # x: [T, dim]
    return mx.fast.rms_norm(x, weight, eps)


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    # x: [T, dim] (BERT's norm)
    return mx.fast.layer_norm(x, weight, bias, eps)


_inverse_freqs: dict[bytes, mx.array] = {}


def rotations(start: int, tokens: int, freqs: np.ndarray) -> tuple[int, mx.array]:
    """What mx.fast.rope needs for positions start..: the offset and each rotated pair's period (1 / freq)."""
    key = freqs.tobytes()
    if key not in _inverse_freqs:  # one array per model, not one per step
        _inverse_freqs[key] = mx.array((1.0 / freqs).astype(np.float32))
    return start, _inverse_freqs[key]


def rope(heads: mx.array, rotations: tuple[int, mx.array], pairing: str) -> mx.array:
    """heads [T, n, head_dim] rotated; pairs are adjacent elements ("adjacent", llama.cpp's layout for Llama) or
    element i and i + rotated/2 ("halves", GPT-NeoX's)."""
    if pairing not in ("adjacent", "halves"):
        raise ValueError(f"RoPE pairing {pairing!r} is not 'adjacent' or 'halves'")
    start, periods = rotations
    rotated = mx.fast.rope(by_head(heads), 2 * periods.shape[0], traditional=pairing == "adjacent",
                           base=None, scale=1.0, offset=start, freqs=periods)  # over [n, T, head_dim]
    return by_token(rotated)


def by_head(x: mx.array) -> mx.array:
    """[T, n, d] -> [n, T, d]; one token's is a reshape (no copy, no kernel on a decode step)."""
    return x.reshape(x.shape[1], 1, x.shape[2]) if x.shape[0] == 1 else x.transpose(1, 0, 2)


def by_token(x: mx.array) -> mx.array:
    """[n, T, d] -> [T, n, d]."""
    return x.reshape(1, x.shape[0], x.shape[2]) if x.shape[1] == 1 else x.transpose(1, 0, 2)


def attention(q: mx.array, keys: mx.array, values: mx.array, start: int, scale: float,
              window: int | None = None, causal: bool = True) -> mx.array:
    """Causal grouped-query attention of q [T, H, d] at positions start.. over keys, values [Hk, start+T, d];
    with a `window`, a query sees only its last `window` positions; `causal=False`: every query sees every key
    (an encoder's). Returns [T, H, d]."""
    T = q.shape[0]
    if window is not None and T == 1 and start + 1 > window:  # one query: its window is a slice of the cache
        keys, values, start, window = keys[:, start + 1 - window:], values[:, start + 1 - window:], window - 1, None
    mask: Any = None  # without one, every query sees every key
    if T > 1 and causal and window is None:
        mask = "causal"  # the queries are the last T of the keys
    elif T > 1 and causal:
        query, key = mx.arange(start, start + T)[:, None], mx.arange(start + T)[None, :]
        mask = (query >= key) & (query - key < window)
    out = mx.fast.scaled_dot_product_attention(by_head(q.astype(keys.dtype))[None], keys[None], values[None],
                                               scale=scale, mask=mask)
    if ASYNC:
        with EVAL_LOCK:  # the device starts on the layers so far while Python builds the rest of the step
            mx.async_eval(out)
    return by_token(out[0])


@mx.compile
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    g = gate.astype(mx.float32)
    return (g * mx.sigmoid(g) * up.astype(mx.float32)).astype(gate.dtype)


@mx.compile
def _geglu(gate: mx.array, up: mx.array) -> mx.array:
    g = gate.astype(mx.float32)
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) (g + 0.044715 g^3)
    return (0.5 * g * (1 + mx.tanh(inner)) * up.astype(mx.float32)).astype(gate.dtype)


def activation(x: mx.array, name: str) -> mx.array:
    """act(x) for an MLP without a gate: "gelu" (exact, with erf: BERT's) or "gelu_tanh", in float32."""
    g = x.astype(mx.float32)
    if name == "gelu":
        return (0.5 * g * (1 + mx.erf(g * 0.7071067811865476))).astype(x.dtype)  # 1 / sqrt(2)
    if name != "gelu_tanh":
        raise ValueError(f"activation {name!r} is not 'gelu' or 'gelu_tanh'")
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return (0.5 * g * (1 + mx.tanh(inner))).astype(x.dtype)


def gated(gate_up: mx.array, activation: str) -> mx.array:
    """act(gate) * up for gate_up [T, 2F] = [gate | up]: SwiGLU ("silu") or GeGLU ("gelu_tanh"), in float32."""
    gate, up = mx.split(gate_up, 2, axis=-1)
    if activation == "silu":
        return _swiglu(gate, up)
    if activation != "gelu_tanh":
        raise ValueError(f"activation {activation!r} is not 'silu' or 'gelu_tanh'")
    return _geglu(gate, up)
