"""The C kernels against gguf-py: matmul_into close to a float64 matmul of the dequantized weight,
rows() exactly the dequantized rows, for every supported type, several M and 1 or 2 threads."""

import gguf
import numpy as np
import pytest
import torch

from duskpool.backends.cpu import native as kernels
from duskpool.backends.cpu.quant import SUPPORTED_TYPES, QuantTensor
from tests.conftest import random_quantized

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: only the numpy path exists")

Q = gguf.GGMLQuantizationType


def weight(qtype: Q, rows: int, cols: int, seed: int = 0) -> tuple[QuantTensor, np.ndarray]:
    blocks = random_quantized(np.random.default_rng(seed), rows, cols, qtype)
    data = torch.from_numpy(np.ascontiguousarray(blocks).view(np.uint8).reshape(rows, -1).copy())
    reference = gguf.quants.dequantize(np.asarray(blocks), qtype).reshape(rows, cols)
    return QuantTensor(data, qtype, (rows, cols)), reference.astype(np.float64)


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    lib = kernels.library()
    before = lib.dp_get_threads()
    lib.dp_set_threads(request.param)
    yield request.param
    lib.dp_set_threads(before)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_matmul_and_rows_match_gguf(qtype, threads):
    # 512 columns: two K-quant super-blocks; 300 rows: enough bytes to be split over threads
    w, reference = weight(qtype, 300, 512)
    rng = np.random.default_rng(1)
    for M in (1, 3, 5, 8, 12, 24, 37):  # the fused kernels; from 8, 12 or 24 rows (by type) the gemm
        x = torch.from_numpy(rng.standard_normal((M, 512)).astype(np.float32))
        # write into a column slice of a wider buffer, as a fused projection does
        buffer = torch.full((M, 310), 7.0)
        w.matmul_into(x, buffer[:, 4:304])
        expected = x.double().numpy() @ reference.T
        scale = np.abs(x.double().numpy()) @ np.abs(reference.T) + 1e-6
        np.testing.assert_array_less(np.abs(buffer[:, 4:304].double().numpy() - expected) / scale, 1e-4)
        assert (buffer[:, :4] == 7).all() and (buffer[:, 304:] == 7).all()
    index = torch.tensor([5, 0, 299, 5, 123])
    assert torch.equal(w.rows(index), torch.from_numpy(reference[index.numpy()]).float())
    assert torch.equal(w.dequantize(), torch.from_numpy(reference).float())


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.IQ4_NL, Q.F32], ids=lambda q: q.name)
def test_kernel_path_for_every_small_m(qtype, threads):
    # the fused kernels' tiles (4 weight rows x 1 row of x, 2 x 2 or 1 x 4, and a tail of single rows), then
    # the gemm's (16 rows of x, the last 8 or fewer; 6 weight rows, a tail of fewer), with odd sizes
    w, reference = weight(qtype, 1001, 96, seed=2)
    rng = np.random.default_rng(3)
    for M in [*range(1, 11), 15, 16, 17, 23, 40]:
        x = torch.from_numpy(rng.standard_normal((M, 96)).astype(np.float32))
        out = torch.empty(M, 1001)
        w.matmul_into(x, out)
        expected = x.double().numpy() @ reference.T
        scale = np.abs(x.double().numpy()) @ np.abs(reference.T) + 1e-6
        np.testing.assert_array_less(np.abs(out.double().numpy() - expected) / scale, 1e-4)


def test_float_types_with_odd_width(threads):
    # F32/F16/BF16 have a block size of 1: widths that are not a multiple of the vector length
    for qtype in (Q.F32, Q.F16, Q.BF16):
        w, reference = weight(qtype, 200, 77, seed=4)
        for M in (2, 30):  # the fused kernels, the gemm
            x = torch.from_numpy(np.random.default_rng(5).standard_normal((M, 77)).astype(np.float32))
            out = torch.empty(M, 200)
            w.matmul_into(x, out)
            np.testing.assert_allclose(out.double().numpy(), x.double().numpy() @ reference.T, rtol=1e-4, atol=1e-4)


def test_sequential_calls_from_other_threads():
    # the pool is shared: dispatch from several Python threads in turn (and at once) stays correct
    import threading

    lib = kernels.library()
    before = lib.dp_get_threads()
    lib.dp_set_threads(2)
    try:
        w, reference = weight(Q.Q4_1, 2048, 256, seed=6)
        x = torch.from_numpy(np.random.default_rng(7).standard_normal((1, 256)).astype(np.float32))
        expected = x.double().numpy() @ reference.T
        errors = []

        def run():
            out = torch.empty(1, 2048)
            for _ in range(50):
                w.matmul_into(x, out)
                if not np.allclose(out.double().numpy(), expected, rtol=1e-4, atol=1e-4):
                    errors.append("mismatch")

        run()
        workers = [threading.Thread(target=run) for _ in range(3)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert not errors
    finally:
        lib.dp_set_threads(before)


def test_denormals_count_as_zero_inside_the_kernels_only():
    # x86 cores take a microcode assist per operation on a denormal: the kernels flush them (native.h), and the
    # caller's thread gets its own floating-point mode back
    w, _ = weight(Q.F32, 4, 64, seed=8)
    x = torch.full((1, 64), 1e-40)  # denormal float32
    out = torch.empty(1, 4)
    w.matmul_into(x, out)
    assert torch.equal(out, torch.zeros(1, 4))
    assert np.float32(1e-38) * np.float32(1e-2) > 0  # a denormal product on this thread, not flushed
