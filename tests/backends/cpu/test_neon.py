"""The NEON kernels (native/matmul_neon.c), built for 64-bit ARM with gcc-aarch64-linux-gnu and run under
qemu-aarch64: for each quant type they cover, dp_matmul on fixed random blocks against the scalar matmul of the
same build and a float64 matmul of gguf-py's dequantized weights. Skipped where the cross compiler or qemu is
missing (setup.sh's test install adds both on Debian when run as root)."""

import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from duskpool.backends.cpu import native
from tests.conftest import random_quantized

Q = gguf.GGMLQuantizationType
CC, QEMU, SYSROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", "/usr/aarch64-linux-gnu"
NEON_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL, Q.IQ4_XS, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F32, Q.F16,
              Q.BF16]
SCALAR_TYPES = [Q.Q2_K, Q.Q3_K]  # left to the scalar matmul on ARM: the driver must say so
N, K = 37, 512  # weight rows (odd: the thread pool's last range is short), values per row


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    missing = [tool for tool in (CC, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: apt-get install gcc-aarch64-linux-gnu qemu-user)")
    binary = tmp_path_factory.mktemp("neon") / "neon_driver"
    flags = [f for f in native.FLAGS if f not in ("-march=native", "-shared", "-fPIC")]
    sources = [*map(str, native.SOURCES), str(Path(__file__).with_name("neon_driver.c"))]
    subprocess.run([CC, *flags, *sources, "-o", str(binary), "-lm"], check=True)
    return binary


def run(driver: Path, tmp_path: Path, qtype: Q, M: int, seed: int, K: int = K) -> tuple[bool, np.ndarray, ...]:
    """(whether a SIMD kernel ran, dp_matmul's y, the scalar matmul's y, the float64 reference), each [M, N]."""
    rng = np.random.default_rng(seed)
    weight = random_quantized(rng, N, K, qtype)
    blocks = np.ascontiguousarray(weight).view(np.uint8).reshape(N, -1)
    x = rng.standard_normal((M, K)).astype(np.float32)
    (tmp_path / "in").write_bytes(np.array([qtype, N, K, M, blocks.shape[1]], np.int32).tobytes()
                                  + blocks.tobytes() + x.tobytes())
    subprocess.run([QEMU, "-L", SYSROOT, str(driver), str(tmp_path / "in"), str(tmp_path / "out")], check=True,
                   timeout=120)
    out = np.frombuffer((tmp_path / "out").read_bytes(), np.float32, offset=4).reshape(2, M, N)
    reference = x.astype(np.float64) @ gguf.quants.dequantize(weight, qtype).reshape(N, K).astype(np.float64).T
    return bool(np.frombuffer((tmp_path / "out").read_bytes()[:4], np.int32)[0]), out[0], out[1], reference


@pytest.mark.parametrize("M", [1, 3, 4, 30])  # 30: the gemm (gemm.c)
@pytest.mark.parametrize("qtype", NEON_TYPES, ids=lambda q: q.name)
def test_neon_kernels_match_the_scalar_matmul_and_gguf(driver, tmp_path, qtype, M):
    simd, y, scalar, reference = run(driver, tmp_path, qtype, M, seed=int(qtype) * 10 + M)
    assert simd, f"no NEON kernel ran for {qtype.name}"
    scale = np.abs(reference).max()
    # the same sums in another order (and, for Q4_0/Q4_1, x rearranged per block): fp32 rounding apart
    np.testing.assert_allclose(y, scalar, rtol=0, atol=2e-5 * scale, err_msg=f"{qtype.name}: NEON vs scalar C")
    np.testing.assert_allclose(y, reference, rtol=0, atol=2e-5 * scale, err_msg=f"{qtype.name}: NEON vs gguf-py")


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_float_rows_of_an_odd_width(driver, tmp_path, qtype):
    simd, y, scalar, reference = run(driver, tmp_path, qtype, 2, seed=int(qtype), K=77)  # the last 1 value alone
    assert simd
    np.testing.assert_allclose(y, scalar, rtol=0, atol=2e-5 * np.abs(reference).max())
    np.testing.assert_allclose(y, reference, rtol=0, atol=2e-5 * np.abs(reference).max())


@pytest.mark.parametrize("qtype", SCALAR_TYPES, ids=lambda q: q.name)
def test_types_without_a_neon_kernel_use_the_scalar_matmul(driver, tmp_path, qtype):
    simd, y, scalar, reference = run(driver, tmp_path, qtype, 2, seed=int(qtype))
    assert not simd
    np.testing.assert_array_equal(y, scalar)
    np.testing.assert_allclose(y, reference, rtol=0, atol=2e-5 * np.abs(reference).max())
