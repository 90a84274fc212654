"""What MLX's one-row quantized matmul reaches on this device, per weight shape and format (GB/s of weight bytes).

    python benchmarks/mlx_qmv.py

The decode step of a model is a chain of these; `mlx_decode.py` compares the whole step to the roofline, this
says how much of the gap is the kernel's. Each figure: 64 calls in one graph, the median of 5 runs.
"""

import json
import statistics
import time

import mlx.core as mx

SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (16384, 8192),
          (8192, 16384), (16032, 8192)]
FORMATS = [(4, 32), (4, 64), (4, 128), (8, 32), (5, 32), (6, 32), (None, None)]  # (bits, group); None: float16
CALLS = 64


def gbps(rows: int, cols: int, bits: int | None, group: int | None) -> float:
    w = mx.random.normal((rows, cols), key=mx.random.key(0)).astype(mx.float16) * 0.02
    x = mx.random.normal((1, cols), key=mx.random.key(1)).astype(mx.float16)
    if bits is None:
        arrays = (w,)

        def call(x: mx.array) -> mx.array:
            return x @ w.T
    else:
        arrays = mx.quantize(w, group_size=group, bits=bits)

        def call(x: mx.array) -> mx.array:
            return mx.quantized_matmul(x, *arrays, transpose=True, group_size=group, bits=bits)
    mx.eval(*arrays)
    nbytes = sum(a.nbytes for a in arrays)

    def run() -> mx.array:
        return mx.stack([call(x) for _ in range(CALLS)])

    mx.eval(run())
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        mx.eval(run())
        timings.append(time.perf_counter() - started)
    return CALLS * nbytes / statistics.median(timings) / 1e9


def main() -> None:
    results = {}
    for rows, cols in SHAPES:
        line = {}
        for bits, group in FORMATS:
            name = "f16" if bits is None else f"q{bits}g{group}"
            line[name] = round(gbps(rows, cols, bits, group))
        results[f"{rows}x{cols}"] = line
        print(f"{rows:6d}x{cols:<6d} " + " ".join(f"{k}={v}" for k, v in line.items()), flush=True)
    print(json.dumps({"device": str(mx.default_device()), "mlx": mx.__version__, "GBps": results}))


if __name__ == "__main__":
    main()
