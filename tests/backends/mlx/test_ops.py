"""The MLX ops compute what the CPU backend's compute, and hidden states leave and arrive as the same bytes."""

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

import duskpool.backends.cpu as cpu  # noqa: E402
import duskpool.backends.mlx as mlx_backend  # noqa: E402
from duskpool.models.base import ContextOverflowError  # noqa: E402


def as_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x.astype(mx.float32)))


def close(ours, theirs: torch.Tensor, tolerance: float = 1e-5) -> None:
    torch.testing.assert_close(as_torch(ours), theirs, rtol=tolerance, atol=tolerance * theirs.abs().max().item())


def rotated_reference(heads: np.ndarray, start: int, freqs: np.ndarray, pairing: str) -> torch.Tensor:
    """RoPE in float64 as the papers write it: pair i is (2i, 2i + 1) or (i, i + rotated / 2)."""
    out, half = heads.astype(np.float64), len(freqs)
    angles = np.arange(start, start + heads.shape[0])[:, None, None] * freqs
    first, second = (np.arange(0, 2 * half, 2), np.arange(1, 2 * half, 2)) if pairing == "adjacent" \
        else (np.arange(half), np.arange(half, 2 * half))
    x, y = out[..., first], out[..., second]
    out[..., first], out[..., second] = x * np.cos(angles) - y * np.sin(angles), x * np.sin(angles) + y * np.cos(angles)
    return torch.from_numpy(out.astype(np.float32))


@pytest.mark.parametrize("pairing", ["adjacent", "halves"])
@pytest.mark.parametrize("rotated", [64, 32])  # all of a head, or its first half (partial rotary)
def test_rope(pairing, rotated):
    heads = np.random.default_rng(0).standard_normal((3, 12, 64)).astype(np.float32)
    freqs = 1 / 10000 ** (np.arange(0, rotated, 2, dtype=np.float64) / rotated)
    ours = mlx_backend.rope(mx.array(heads), mlx_backend.rotations(300, 3, freqs), pairing)
    close(ours, rotated_reference(heads, 300, freqs, pairing), 1e-4)  # float32 angles, at position 300
    if rotated == 64:  # (the CPU backend's C path rotates whole heads only)
        close(ours, cpu.rope(torch.from_numpy(heads.copy()), cpu.rotations(300, 3, freqs), pairing), 1e-4)


@pytest.mark.parametrize(("queries", "start", "window"),
                         [(1, 0, None), (1, 300, None), (5, 20, None), (1, 300, 64), (5, 100, 16), (4, 0, 2)])
def test_grouped_causal_attention(queries, start, window):
    end = start + queries
    q, keys, values = torch.randn(queries, 9, 64), torch.randn(3, end, 64), torch.randn(3, end, 64)
    theirs = cpu.attention(q, keys, values, start, 0.1, window)
    ours = mlx_backend.attention(*(mx.array(t.numpy()) for t in (q, keys, values)), start, 0.1, window)
    close(ours, theirs)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated(activation):
    gate_up = torch.randn(2, 3072) * 4
    close(mlx_backend.gated(mx.array(gate_up.numpy()), activation), cpu.gated(gate_up, activation))


def test_rms_norm():
    x, w = torch.randn(5, 576) * 3, torch.randn(576)
    close(mlx_backend.rms_norm(mx.array(x.numpy()), mx.array(w.numpy()), 1e-5), cpu.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_hidden_states_cross_the_wire_as_the_cpu_backend_writes_them(dtype):
    hidden = torch.randn(3, 576) * 10
    hidden[0, :4] = torch.tensor([1 + 2 ** -9, 1 + 3 * 2 ** -9, 65519.0, 1e-8])  # rounding ties, overflow edge
    data = cpu.to_bytes(hidden, dtype)
    assert mlx_backend.to_bytes(mx.array(hidden.numpy()), dtype) == data
    assert torch.equal(as_torch(mlx_backend.from_bytes(data, 3, 576, dtype)), cpu.from_bytes(data, 3, 576, dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_hidden_state_that_is_not_finite_is_refused(dtype, bad):
    hidden = torch.ones(2, 8)
    hidden[1, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        mlx_backend.from_bytes(cpu.to_bytes(hidden, dtype), 2, 8, dtype)


def test_the_cache_is_written_in_place_and_read_up_to_the_end():
    cache = mlx_backend.new_cache(range(4, 6), 2, 8, capacity=16)
    k, v = mx.ones((3, 2, 8)), 2 * mx.ones((3, 2, 8))
    keys, values = cache.update(5, 0, k, v)
    assert keys.shape == (2, 3, 8) and np.all(np.array(values) == 2)
    keys, _ = cache.update(5, 3, 3 * mx.ones((1, 2, 8)), v[:1])
    assert keys.shape == (2, 4, 8) and np.array(keys)[:, 3].min() == 3 and np.array(keys)[:, :3].max() == 1
    assert np.array(cache.k[0]).max() == 0, "another layer's buffer changed"
    assert cache.nbytes == 2 * 2 * 2 * 16 * 8 * mlx_backend.KV_VALUE_BYTES
    with pytest.raises(ContextOverflowError):
        cache.update(4, 15, k, v)
    cache.clear()
    assert all(np.array(b).max() == 0 for b in (*cache.k, *cache.v))
