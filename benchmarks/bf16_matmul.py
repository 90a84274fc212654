"""How the CPU backend should multiply by a bf16 weight (a Hugging Face folder's): three ways, timed.

    .venv/bin/python benchmarks/bf16_matmul.py [--threads 2] [--reps 15]

- the C kernels (what QuantTensor.matmul_into runs: the fused one for a few rows, the gemm from 8): read bf16,
  compute in float32;
- torch's bf16 matmul: the input rounded to bf16, `x.bfloat16() @ W.T`;
- float32: the weight dequantized per call, then BLAS (QuantTensor's path from 96 rows before the gemm).
Figures are the best of --reps, in ms; "error" is the largest difference from the C kernel's output.
"""

import argparse
import time
from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

from duskpool.backends.cpu import native, set_threads
from duskpool.backends.cpu.quant import QuantTensor


def best(run: Callable[[], object], reps: int) -> float:
    run()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def measure(rows: int, cols: int, batch: int, reps: int) -> str:
    lib = native.library()
    weight = (torch.randn(rows, cols) * 0.02).bfloat16()
    packed = QuantTensor(weight.view(torch.uint8).view(rows, cols * 2), GGMLQuantizationType.BF16, (rows, cols))
    x, out = torch.randn(batch, cols), torch.empty(batch, rows)
    kernel = best(lambda: lib.dp_matmul(GGMLQuantizationType.BF16, packed.data.data_ptr(), cols * 2, 0, rows, cols,
                                        x.data_ptr(), batch, out.data_ptr(), out.stride(0)), reps)
    exact = out.clone()
    bf16 = best(lambda: out.copy_((x.bfloat16() @ weight.t()).float()), reps)
    bf16_error = (out - exact).abs().max().item()
    fp32 = best(lambda: out.copy_(x @ packed.dequantize().t()), reps)
    fp32_error = (out - exact).abs().max().item()
    return (f"{rows}x{cols}, {batch:3} rows: C kernel {kernel:7.2f} ms | torch bf16 {bf16:7.2f} ms "
            f"(error {bf16_error:.0e}) | float32 {fp32:7.2f} ms (error {fp32_error:.0e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    set_threads(args.threads)
    for rows, cols in [(2048, 2048), (8192, 2048)]:
        for batch in (1, 4, 24, 64, 128):
            print(measure(rows, cols, batch, args.reps))


if __name__ == "__main__":
    main()
