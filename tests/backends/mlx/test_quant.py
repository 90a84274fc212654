"""GGUF blocks become MLX affine groups that hold the values gguf-py dequantizes: bit for bit for the legacy
formats, with exact codes for the K-quants, within a measured error for Q6_K."""

import gguf
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from duskpool.backends.mlx import quant  # noqa: E402
from duskpool.weights.gguf import PackedTensor  # noqa: E402
from tests.conftest import Q, random_quantized  # noqa: E402

EXACT = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]


def packed(qtype: Q, rows: int = 48, cols: int = 512, seed: int = 0) -> PackedTensor:
    rng = np.random.default_rng(seed)
    if qtype == Q.BF16:  # conftest writes BF16 through gguf-py's quantize, which keeps the float32 shape
        data = gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.08).astype(np.float32), qtype)
    else:
        data = random_quantized(rng, rows, cols, qtype)
    return PackedTensor(np.ascontiguousarray(data).view(np.uint8).reshape(-1), qtype, (rows, cols))


@pytest.mark.parametrize("qtype", EXACT, ids=lambda q: q.name)
def test_the_legacy_formats_convert_bit_for_bit(qtype):
    tensor = packed(qtype)
    weight = quant.convert(tensor)
    if qtype not in (Q.F32, Q.F16, Q.BF16):
        assert weight.scales.dtype == mx.float16 and weight.bits == quant.BITS[qtype]
    ours, theirs = np.array(weight.dequantize()), quant.reference(tensor)
    assert ours.dtype == theirs.dtype == np.float32
    same_bits = ours.view(np.uint32) == theirs.view(np.uint32)
    assert np.all(same_bits | (ours == theirs)), f"{qtype.name}: {np.count_nonzero(ours != theirs)} values differ"
    # where they differ in bits it is a zero's sign: gguf-py's d * 0 is -0.0 for a negative d, d * 8 - 8 d is +0.0
    assert np.all(same_bits | (ours == 0))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K], ids=lambda q: q.name)
def test_k_quants_keep_their_codes_and_round_only_the_scales(qtype):
    tensor = packed(qtype)
    theirs = quant.reference(tensor)
    exact = np.array(quant.convert(tensor, scale_dtype=mx.float32).dequantize())
    assert np.array_equal(exact, theirs), "with float32 scales a K-quant converts bit for bit"
    stored = quant.convert(tensor)
    assert stored.scales.dtype == mx.float16
    # each value is scale * code + bias with scale, bias rounded to float16: at most 2^-11 of each, relatively
    codes = np.array(mx.dequantize(stored.w, mx.ones_like(stored.scales).astype(mx.float32),
                                   mx.zeros_like(stored.biases).astype(mx.float32), group_size=32, bits=stored.bits))
    scale, bias = (np.repeat(np.array(a.astype(mx.float32)), 32, axis=1) for a in (stored.scales, stored.biases))
    bound = (np.abs(scale) * codes + np.abs(bias)) * 2.0 ** -11
    assert np.all(np.abs(np.array(stored.dequantize()) - theirs) <= bound)


def test_q6_k_goes_to_the_nearest_6_bit_groups():
    """Q6_K's 16-value sub-blocks each have a scale; a group of 32 takes the larger one (measured: 1.3% rms of the
    weights on random blocks, 1.6% on Gemma 3's Q6_K tensors, where Q6_K's own rounding is about 2%)."""
    tensor = packed(Q.Q6_K)
    weight = quant.convert(tensor)
    assert weight.bits == 6 and weight.nbytes <= 1.07 * tensor.data.nbytes
    ours, theirs = np.array(weight.dequantize()), quant.reference(tensor)
    assert np.sqrt(np.mean((ours - theirs) ** 2) / np.mean(theirs ** 2)) < 0.02
    # in every group, the half with the larger scale keeps its values (up to that scale's float16 rounding)
    kept = np.abs(ours - theirs) <= 2.0 ** -11 * np.abs(theirs)
    assert kept.reshape(-1, 2, 16).all(axis=2).any(axis=1).all()


@pytest.mark.parametrize(("qtype", "bound"), [(Q.Q4_0, 1.12), (Q.Q4_1, 1.0), (Q.Q5_0, 1.1), (Q.Q5_1, 1.0),
                                              (Q.Q8_0, 1.06), (Q.Q4_K, 1.12), (Q.Q5_K, 1.1), (Q.F16, 1.0)],
                         ids=lambda v: v.name if isinstance(v, Q) else str(v))
def test_weights_stay_packed(qtype, bound):
    tensor = packed(qtype)
    assert quant.convert(tensor).nbytes <= bound * tensor.data.nbytes


def test_a_float16_overflow_keeps_float32_scales():
    tensor = packed(Q.Q8_0)
    blocks = tensor.data.reshape(48, -1, 34)
    blocks[0, 0, :2] = np.frombuffer(np.float16(1024).tobytes(), np.uint8)  # -128 d overflows float16
    weight = quant.convert(tensor)
    assert weight.scales.dtype == mx.float32
    assert np.array_equal(np.array(weight.dequantize()), quant.reference(tensor))


def test_a_fused_projection_of_mixed_types_is_one_matmul_per_form():
    parts = [packed(Q.Q4_K, 32, seed=1), packed(Q.Q4_K, 16, seed=2), packed(Q.Q6_K, 16, seed=3)]
    linear = quant.Linear([quant.convert(p) for p in parts])
    assert [p.shape for p in linear.parts] == [(48, 512), (16, 512)]
    x = np.random.default_rng(4).standard_normal((3, 512)).astype(np.float32)
    ours = np.array(linear(mx.array(x)).astype(mx.float32))
    theirs = x @ np.concatenate([np.array(p.dequantize()) for p in linear.parts]).T
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())


def test_a_tied_head_shares_the_embedding_table():
    import duskpool.backends.mlx as backend

    tensor = packed(Q.Q8_0)
    head, table = backend.linear([tensor]), backend.embedding(tensor)
    assert head.parts[0] is table.table
    rows = np.array(table.rows([3, 0, 47]))
    assert np.array_equal(rows, quant.reference(tensor)[[3, 0, 47]])

