"""MLX's packed weights on the CPU backend (Q4_1, or Q8_0 and a bias per group) against MLX's own dequantize."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from duskpool.backends.cpu import linear
from duskpool.backends.cpu.quant import QuantTensor
from duskpool.weights.affine import Affine
from duskpool.weights.gguf import PackedTensor

mx = pytest.importorskip("mlx.core")
Q = GGMLQuantizationType


def packed(rows: int, cols: int, bits: int, group_size: int, seed: int) -> tuple[PackedTensor, torch.Tensor]:
    """A random bf16 weight (its first row zeros, as a padding token's embedding) as mx.quantize packs it, and the
    values MLX dequantizes it to (float32 scales: no rounding of its own)."""
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    weight[0] = 0
    w, scales, biases = mx.quantize(mx.array(weight).astype(mx.bfloat16), group_size=group_size, bits=bits)
    values = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size, bits=bits)
    affine = Affine(bits, group_size, Q.BF16)
    data = affine.join(np.array(w), np.array(scales.view(mx.uint16)), np.array(biases.view(mx.uint16)))
    return PackedTensor(data, affine, (rows, cols)), torch.from_numpy(np.array(values))


@pytest.mark.parametrize(("bits", "group_size"), [(2, 32), (3, 64), (4, 64), (4, 128), (5, 32), (6, 64), (8, 64)])
def test_packed_weights_compute_what_mlx_dequantizes_them_to(bits, group_size):
    tensor, values = packed(96, 256, bits, group_size, seed=bits)
    weight = QuantTensor.from_packed(tensor)
    assert weight.qtype == (Q.Q4_1 if bits == 4 else Q.Q8_0)
    blocks = 96 * 256 // 32  # Q4_1's are 20 bytes; Q8_0's 34, plus a float32 bias per group
    assert weight.nbytes == (blocks * 20 if bits == 4 else blocks * 34 + 96 * 256 // group_size * 4)
    torch.testing.assert_close(weight.dequantize(), values, rtol=0, atol=1e-6)
    assert not weight.rows(torch.tensor([0])).any(), "a row of zeros is no longer zeros"

    fused = linear([tensor, packed(32, 256, bits, group_size, seed=99)[0]])  # q|k-like parts joined
    reference = torch.cat([values, packed(32, 256, bits, group_size, seed=99)[1]])
    for batch in (1, 5, 24):  # the fused kernels and the gemm (plus the groups' bias)
        x = torch.randn(batch, 256)
        torch.testing.assert_close(fused(x), x @ reference.T, rtol=1e-5, atol=1e-5)
