"""The per-token operations of a transformer layer: RMSNorm, RoPE, attention, the MLP's gate (and BERT's
LayerNorm and plain GELU).

Each has a fused C path (native/ops.c) and the plain torch version it must agree with. On CPU a
decode step is dozens of tiny ops whose dispatch costs more than their arithmetic, so the C path
matters for speed; the torch path is the reference, and the fallback when no C compiler exists.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from duskpool.backends.cpu import native

SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)  # Intel Macs stop at torch 2.2


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, use_c: bool = True) -> torch.Tensor:
    # x: [T, dim]
    lib = native.library() if use_c else None
    if lib is None:  # (written out: F.rms_norm is torch >= 2.4, and Intel Macs stop at 2.2)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.dp_rms_norm(_ptr(x), _ptr(weight), eps, _ptr(out), x.shape[0], x.shape[1])
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, dim]; only encoders (BERT) use it, once or twice a layer over a whole input: torch's own is enough
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def rotations(start: int, tokens: int, freqs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, rotated/2] of the angle of each position start..start+T for each rotated pair."""
    return rotations_at(torch.arange(start, start + tokens, dtype=torch.float64), freqs)


def rotations_at(positions: torch.Tensor, freqs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, rotated/2] of the angle of each of the positions (float64 [T]) for each rotated pair."""
    angles = (positions[:, None] * torch.from_numpy(freqs)).float()
    return angles.cos(), angles.sin()


def rope(heads: torch.Tensor, rotations: tuple[torch.Tensor, torch.Tensor], pairing: str) -> torch.Tensor:
    """heads [T, n, head_dim] rotated in place; pairs are adjacent elements (llama.cpp's layout for Llama)
    or the two halves of the rotated dimensions (GPT-NeoX's, Qwen's and Gemma's)."""
    cos, sin = rotations
    if pairing == "adjacent":
        return apply_rope_(heads, cos, sin)
    if pairing != "halves":
        raise ValueError(f"RoPE pairing {pairing!r} is not 'adjacent' or 'halves'")
    half = cos.shape[1]
    x, y = heads[..., :half].clone(), heads[..., half:2 * half].clone()
    c, s = cos[:, None], sin[:, None]
    heads[..., :half], heads[..., half:2 * half] = x * c - y * s, x * s + y * c
    return heads


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_c: bool = True) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] in place; pairs are adjacent elements (llama.cpp's layout). Only the first
    2 * cos.shape[1] dimensions of each head turn (partial rotary); the C path takes whole heads."""
    lib = native.library() if use_c else None
    rotated = 2 * cos.shape[1]
    if lib is None or rotated != x.shape[2] or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        even, odd = x[..., 0:rotated:2].clone(), x[..., 1:rotated:2].clone()
        c, s = cos[:, None], sin[:, None]
        x[..., 0:rotated:2], x[..., 1:rotated:2] = even * c - odd * s, even * s + odd * c
        return x
    lib.dp_rope(_ptr(x), x.shape[0], x.shape[1], x.shape[2], x.stride(0), _ptr(cos), _ptr(sin))
    return x


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float | None = None,
              window: int | None = None, causal: bool = True, use_c: bool = True) -> torch.Tensor:
    """Causal attention of queries q [T, H, d] at positions start.. over keys, values [Hk, start+T, d].

    Query head h reads kv head h // (H / Hk) (grouped-query attention); scores are scaled by `scale`
    (1/sqrt(d) by default); with a `window`, a query sees only its last `window` positions. `causal=False`:
    every query sees every key (an encoder's attention; the C kernel is causal only). Returns [T, H, d].
    """
    T, H, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    if window is not None and start + T <= window:  # every query sees every position: the window changes nothing
        window = None
    lib = native.library() if use_c else None
    if lib is not None and causal and keys.stride(1) == d and keys.stride(2) == 1 \
            and values.stride() == keys.stride() and q.stride(2) == 1 and q.stride(1) == d:
        out = torch.empty(T, H, d)
        lib.dp_attention(_ptr(q), q.stride(0), _ptr(keys), _ptr(values), keys.stride(0) // d, _ptr(out), H * d,
                         T, start, H, keys.shape[0], d, scale, window or 0)
        return out
    if window is not None and T == 1:  # one query: its window is a slice of the cache
        keys, values, start = keys[:, start + 1 - window:], values[:, start + 1 - window:], window - 1
        window = None
    query, key = torch.arange(start, start + T)[:, None], torch.arange(start + T)[None, :]
    visible = (query >= key) & ((query - key < window) if window is not None else True) if causal else None
    if SDPA_GQA:
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=visible, scale=scale,
                                             enable_gqa=True)
    else:  # each kv head serves H / Hk query heads
        group = H // keys.shape[0]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys.repeat_interleave(group, dim=0),
                                             values.repeat_interleave(group, dim=0), attn_mask=visible, scale=scale)
    return out.transpose(0, 1)


def silu_mul(gate_up: torch.Tensor, use_c: bool = True) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2F] = [gate | up] (SwiGLU's gate)."""
    lib = native.library() if use_c else None
    if lib is None:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    T, F2 = gate_up.shape
    out = torch.empty(T, F2 // 2)
    lib.dp_silu_mul(_ptr(gate_up), _ptr(out), T, F2 // 2)
    return out


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """act(x) for an MLP without a gate: "gelu" (exact, with erf: BERT's) or "gelu_tanh"."""
    if name not in ("gelu", "gelu_tanh"):
        raise ValueError(f"activation {name!r} is not 'gelu' or 'gelu_tanh'")
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


def gated(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for gate_up [T, 2F] = [gate | up]: SwiGLU ("silu") or GeGLU ("gelu_tanh")."""
    if activation == "silu":
        return silu_mul(gate_up)
    if activation != "gelu_tanh":
        raise ValueError(f"activation {activation!r} is not 'silu' or 'gelu_tanh'")
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
