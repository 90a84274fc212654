"""The per-token operations of a transformer layer: RMSNorm, RoPE, attention, SwiGLU's gate.

Each has a fused C path (weights/ops.c) and the plain torch version it must agree with. On CPU a
decode step is dozens of tiny ops whose dispatch costs more than their arithmetic, so the C path
matters for speed; the torch path is the reference, and the fallback when no C compiler exists.
"""

import torch
import torch.nn.functional as F

from duskpool.weights import kernels

C_ATTENTION_MAX_QUERIES = 4  # longer prefills go to torch's SDPA, which batches them through BLAS


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, use_c: bool = True) -> torch.Tensor:
    # x: [T, dim]
    lib = kernels.library() if use_c else None
    if lib is None:
        return F.rms_norm(x, weight.shape, weight, eps)
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.dp_rms_norm(_ptr(x), _ptr(weight), eps, _ptr(out), x.shape[0], x.shape[1])
    return out


def rotations(positions: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim/2] of each position's angle for each rotated pair."""
    angles = (positions.double()[:, None] * freqs).float()
    return angles.cos(), angles.sin()


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_c: bool = True) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] in place; pairs are adjacent elements (llama.cpp's layout)."""
    lib = kernels.library() if use_c else None
    if lib is None or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        even, odd = x[..., 0::2].clone(), x[..., 1::2].clone()
        c, s = cos[:, None], sin[:, None]
        x[..., 0::2], x[..., 1::2] = even * c - odd * s, even * s + odd * c
        return x
    lib.dp_rope(_ptr(x), x.shape[0], x.shape[1], x.shape[2], x.stride(0), _ptr(cos), _ptr(sin))
    return x


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
              use_c: bool = True) -> torch.Tensor:
    """Causal attention of queries q [T, H, d] at positions start.. over keys, values [Hk, start+T, d].

    Query head h reads kv head h // (H / Hk) (grouped-query attention). Returns [T, H, d].
    """
    T, H, d = q.shape
    lib = kernels.library() if use_c else None
    if lib is None or T > C_ATTENTION_MAX_QUERIES or keys.stride(2) != 1 or q.stride(2) != 1 \
            or q.stride(1) != d:
        causal = torch.arange(start, start + T)[:, None] >= torch.arange(start + T)[None, :]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=causal, enable_gqa=True)
        return out.transpose(0, 1)
    out = torch.empty(T, H, d)
    scores = torch.empty(start + T)
    lib.dp_attention(_ptr(q), q.stride(0), _ptr(keys), _ptr(values), keys.stride(0) // d, _ptr(out), H * d,
                     T, start, H, keys.shape[0], d, _ptr(scores))
    return out


def silu_mul(gate_up: torch.Tensor, use_c: bool = True) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2F] = [gate | up] (SwiGLU's gate)."""
    lib = kernels.library() if use_c else None
    if lib is None:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    T, F2 = gate_up.shape
    out = torch.empty(T, F2 // 2)
    lib.dp_silu_mul(_ptr(gate_up), _ptr(out), T, F2 // 2)
    return out
