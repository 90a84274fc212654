"""The fused C ops agree with their torch definitions."""

import numpy as np
import pytest
import torch

from duskpool.backends.cpu import native as kernels
from duskpool.backends.cpu import ops

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: only the torch path exists")


def test_rms_norm():
    x, w = torch.randn(5, 576), torch.randn(576)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), ops.rms_norm(x, w, 1e-5, use_c=False))


def test_rope_on_strided_heads_in_place():
    heads = torch.randn(3, 15, 64)  # q | k | v heads of 3 tokens; rotate only the first 12
    freqs = 1 / 10000 ** (np.arange(0, 64, 2, dtype=np.float64) / 64)
    cos, sin = ops.rotations(7, 3, freqs)
    ours, reference = heads.clone(), heads.clone()
    ops.apply_rope_(ours[:, :12], cos, sin)
    ops.apply_rope_(reference[:, :12], cos, sin, use_c=False)
    torch.testing.assert_close(ours, reference)
    assert torch.equal(ours[:, 12:], heads[:, 12:])


@pytest.mark.parametrize("pairing", ["adjacent", "halves"])
def test_partial_rotary_turns_only_the_rotated_dimensions(pairing):
    heads = torch.randn(3, 6, 64)
    freqs = 1 / 10000 ** (np.arange(0, 32, 2, dtype=np.float64) / 32)  # 32 of 64 dimensions rotate
    turned = ops.rope(heads.clone(), ops.rotations(7, 3, freqs), pairing)
    first = heads[..., :32].clone()
    torch.testing.assert_close(turned[..., :32], ops.rope(first, ops.rotations(7, 3, freqs), pairing))
    assert torch.equal(turned[..., 32:], heads[..., 32:])


@pytest.mark.parametrize(("queries", "start"), [(1, 0), (1, 300), (3, 20), (4, 0)])
def test_grouped_causal_attention(queries, start):
    keys, values = torch.randn(3, 512, 64), torch.randn(3, 512, 64)  # a cache of capacity 512
    q = torch.randn(queries, 15, 64)[:, :9]  # 9 query heads over 3 kv heads, strided like the model's
    end = start + queries
    torch.testing.assert_close(ops.attention(q, keys[:, :end], values[:, :end], start),
                               ops.attention(q, keys[:, :end], values[:, :end], start, use_c=False))


def test_silu_mul():
    gate_up = torch.randn(2, 3072) * 8
    torch.testing.assert_close(ops.silu_mul(gate_up), ops.silu_mul(gate_up, use_c=False), rtol=1e-5, atol=1e-5)
