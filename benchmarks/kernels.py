"""Per-call time of the decode matmuls (M=1) of the bundled SmolLM2-135M Q4_1, at 1 and 2 threads.

    .venv/bin/python benchmarks/kernels.py [--model PATH] [--threads 1,2] [--repeats 200] [--rows 1]

Real weights from the GGUF, fused the way the model fuses them (q|k|v, gate|up). Two timings per shape:
"hot" repeats one tensor (it stays in cache), "stream" walks the 30 layers' tensors in turn, so the
weights come from memory as in a real decode step. "token" times one whole decode step's matmuls in
model order (30 layers x 4 + the LM head). Medians over --repeats; the VM is noisy.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from duskpool.backends.cpu import native as kernels  # noqa: E402
from duskpool.backends.cpu.quant import Linear, QuantTensor  # noqa: E402
from duskpool.weights.catalog import bundled_model_path  # noqa: E402
from duskpool.weights.gguf import GGUFFile  # noqa: E402


def load(path: Path) -> tuple[list[dict[str, QuantTensor]], QuantTensor]:
    file = GGUFFile(path)
    n_layers = int(file.metadata[f"{file.architecture}.block_count"])
    layers = []
    for i in range(n_layers):
        def r(name: str, i: int = i) -> QuantTensor:
            return QuantTensor.from_packed(file.read(f"blk.{i}.{name}.weight"))
        qkv = Linear([r("attn_q"), r("attn_k"), r("attn_v")]).parts[0]
        gate_up = Linear([r("ffn_gate"), r("ffn_up")]).parts[0]
        layers.append({"qkv": qkv, "o": r("attn_output"), "gate_up": gate_up, "down": r("ffn_down")})
    head_name = "output.weight" if "output.weight" in file.tensors else "token_embd.weight"
    return layers, QuantTensor.from_packed(file.read(head_name))


def label(w: QuantTensor) -> str:
    return f"{w.shape[0]}x{w.shape[1]} {w.qtype.name}"


def timed(calls: list, repeats: int) -> float:
    """Median seconds per pass over `calls` (each a zero-argument callable)."""
    for call in calls[:4]:
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rows", type=int, default=1, help="M, the rows of x (1 = decode)")
    args = parser.parse_args()
    lib = kernels.library()
    assert lib is not None, "no C compiler"
    torch.manual_seed(0)
    layers, head = load(args.model or bundled_model_path())
    M = args.rows

    def call(w: QuantTensor):
        x = torch.randn(M, w.shape[1])
        out = torch.empty(M, w.shape[0])
        return lambda: w.matmul_into(x, out)

    names = ["qkv", "o", "gate_up", "down"]
    print(f"M={M}, {len(layers)} layers; µs per call (median of {args.repeats})")
    for threads in [int(t) for t in args.threads.split(",")]:
        if hasattr(lib, "dp_set_threads"):
            lib.dp_set_threads(threads)
        print(f"\nthreads={threads}")
        print(f"  {'shape':<18}{'hot':>10}{'stream':>10}")
        for name in names:
            hot = timed([call(layers[0][name])], args.repeats * 5)
            stream = timed([call(layer[name]) for layer in layers], args.repeats) / len(layers)
            print(f"  {label(layers[0][name]):<18}{hot * 1e6:>10.1f}{stream * 1e6:>10.1f}")
        hot = timed([call(head)], args.repeats)
        print(f"  {label(head):<18}{hot * 1e6:>10.1f}{'':>10}  (head)")
        token = timed([call(layer[name]) for layer in layers for name in names] + [call(head)], args.repeats // 4 or 1)
        print(f"  per-token total (all {len(layers) * 4 + 1} matmuls in model order): {token * 1e3:.2f} ms")
    if hasattr(lib, "dp_set_threads"):
        lib.dp_set_threads(1)


if __name__ == "__main__":
    main()
