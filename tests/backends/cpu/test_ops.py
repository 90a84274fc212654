"""The fused C ops agree with their torch definitions."""

import numpy as np
import pytest
import torch

import duskpool.backends.cpu as cpu
from duskpool.backends.cpu import native as kernels
from duskpool.backends.cpu import ops
from duskpool.models.base import ContextOverflowError, EachSession, Segment

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


@pytest.mark.parametrize(("window", "scale"), [(None, 0.125), (5, 0.1)])
def test_grouped_causal_attention_with_a_window_and_a_scale(window, scale):
    keys, values = torch.randn(3, 64, 64), torch.randn(3, 64, 64)
    q = torch.randn(3, 9, 64)
    torch.testing.assert_close(ops.attention(q, keys[:, :23], values[:, :23], 20, scale, window),
                               ops.attention(q, keys[:, :23], values[:, :23], 20, scale, window, use_c=False))


@pytest.mark.parametrize("window", [None, 6])
def test_sessions_at_once_compute_what_each_session_computes(window):
    # decode steps at different positions, a step of 3 rows and a prompt chunk past C's queries (torch's SDPA)
    segments = [(0, 1), (40, 1), (7, 3), (0, 9), (12, 1)]
    H, Hk, d, freqs = 9, 3, 64, 1 / 10000 ** (np.arange(0, 64, 2, dtype=np.float64) / 64)
    rows = sum(n for _, n in segments)
    heads = torch.randn(rows, H + 2 * Hk, d)  # q | k | v of every row, as the fused projection gives them
    results = []
    for sessions in (cpu.sessions, lambda segs: EachSession(cpu, segs)):
        caches = [cpu.new_cache(range(4, 6), Hk, d, 64) for _ in segments]
        for cache in caches:  # what each session already holds
            cache.k.copy_(torch.randn_like(cache.k, generator=torch.Generator().manual_seed(1)))
            cache.v.copy_(torch.randn_like(cache.v, generator=torch.Generator().manual_seed(2)))
        batch = sessions([Segment(c, start, n) for c, (start, n) in zip(caches, segments, strict=True)])
        qk = batch.rope(heads[:, :H + Hk].clone(), freqs, "adjacent")
        out = batch.attention(5, qk[:, :H], qk[:, H:], heads[:, H + Hk:], 0.125, window)
        results.append((qk, out, [(c.k, c.v) for c in caches]))
    (qk, out, kv), (qk_each, out_each, kv_each) = results
    torch.testing.assert_close(qk, qk_each)
    torch.testing.assert_close(out, out_each)
    for (k, v), (k_each, v_each) in zip(kv, kv_each, strict=True):
        assert torch.equal(k, k_each) and torch.equal(v, v_each), "a cache holds other keys or values"


def test_sessions_past_their_context_raise():
    cache = cpu.new_cache(range(2), 3, 64, 8)
    with pytest.raises(ContextOverflowError, match="past this session's context of 8"):
        cpu.sessions([Segment(cpu.new_cache(range(2), 3, 64, 8), 0, 1), Segment(cache, 8, 1)])


def test_silu_mul():
    gate_up = torch.randn(2, 3072) * 8
    torch.testing.assert_close(ops.silu_mul(gate_up), ops.silu_mul(gate_up, use_c=False), rtol=1e-5, atol=1e-5)
