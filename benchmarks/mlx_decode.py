"""MLX decode speed on Llama-3-shaped GGUFs with random 4-bit weights, against the weight-bytes roofline.

    python benchmarks/mlx_decode.py --shape 8b [--layers N] [--dir /tmp] [--tokens 64]

Writes the model with gguf's writer (Q4_0 matrices, float32 norms, a made-up vocabulary; the steps are fed
their own greedy tokens), loads it with the MLX backend and times decode steps (embedding, every layer, the head, the
logits back to the sampler). The roofline is the bytes MLX reads per token (its 4-bit weights and float16
scales and biases) over the copy bandwidth measured in the same run. Variants, on the same loaded weights:

- `step`: a decode step as a node and the single-process engine run it.
- `sync`: the same without the backend's mx.async_eval after each layer's attention (the whole graph is built,
  then run).
- `matmuls`: only the step's quantized matmuls, chained in one graph: what the kernels alone reach.
Each prints the Python graph-building time and the time spent waiting for the device.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.random_gguf import SHAPES, write_model  # noqa: E402

import duskpool.backends.mlx as mlx_backend  # noqa: E402
from duskpool.backends import load_span  # noqa: E402
from duskpool.backends.mlx import ops, quant  # noqa: E402
from duskpool.weights.gguf import GGUFFile  # noqa: E402


def model_path(directory: Path, shape: str, layers: int) -> Path:
    return directory / f"llama3-{shape}-{layers}l-q4_0.gguf"


def copy_bandwidth(nbytes: int) -> float:
    """Bytes per second an elementwise copy moves (read + write) on MLX's device."""
    a = mx.zeros((nbytes // 2 // 4096, 4096), dtype=mx.float16)
    mx.eval(a)
    timings = []
    for _ in range(6):
        started = time.perf_counter()
        b = a + 1  # reads and writes nbytes
        mx.eval(b)
        timings.append(time.perf_counter() - started)
        del b
    return 2 * nbytes / min(timings[1:])


def weight_bytes(model) -> int:
    """What MLX reads per decode step: every layer's matrices and the head (one embedding row: nothing)."""
    total = sum(linear.nbytes for block in model.blocks
                for linear in (block.attention.wqkv, block.attention.wo, block.mlp.w_gate_up, block.mlp.w_down))
    return total + model.output.nbytes


def decode(model, tokens: int, prompt_tokens: int = 8) -> dict:
    cache = model.new_cache(prompt_tokens + tokens + 1)
    token = int(np.argmax(model.head(model.forward_span(model.embed(list(range(1, prompt_tokens + 1))), cache, 0))
                          [-1].numpy()))
    build, wait, total = [], [], []
    for position in range(prompt_tokens, prompt_tokens + tokens):
        started = time.perf_counter()
        hidden = model.forward_span(model.embed([token]), cache, position)
        out = model.output(model.ops.rms_norm(hidden, model.norm, model.config.norm_eps))
        built = time.perf_counter()
        logits = model.ops.logits(out)
        done = time.perf_counter()
        token = int(logits[-1].argmax())
        build.append(built - started)
        wait.append(done - built)
        total.append(done - started)
    return {"ms_per_token": 1000 * statistics.median(total), "build_ms": 1000 * statistics.median(build),
            "wait_ms": 1000 * statistics.median(wait)}


def matmuls_only(model, tokens: int) -> dict:
    """The step's quantized matmuls alone, chained (each input from the last output) in one graph."""
    dim = model.spec.dim
    x = mx.random.normal((1, dim)).astype(quant.COMPUTE) * 0.1

    def step(x: mx.array) -> mx.array:
        for block in model.blocks:
            a = block.attention.wqkv(x)[:, :dim]
            x = block.attention.wo(a)
            g = block.mlp.w_gate_up(x)
            x = block.mlp.w_down(g[:, :g.shape[1] // 2]) * 0.1
        return model.output(x)

    mx.eval(step(x))
    timings = []
    for _ in range(tokens):
        started = time.perf_counter()
        mx.eval(step(x))
        timings.append(time.perf_counter() - started)
    return {"ms_per_token": 1000 * statistics.median(timings)}


def check(model, path: Path) -> dict:
    """The logits of one prefill on MLX against the CPU backend's on the same file."""
    tokens = list(range(1, 9))
    ours = model.head(model.forward_span(model.embed(tokens), model.new_cache(8), 0))
    cpu = load_span(GGUFFile(path), backend_name="cpu")
    theirs = cpu.head(cpu.forward_span(cpu.embed(tokens), cpu.new_cache(8), 0))
    top = [len(set(a.topk(5).indices.tolist()) & set(b.topk(5).indices.tolist()))
           for a, b in zip(ours, theirs, strict=True)]
    return {"max_abs_diff": float((ours - theirs).abs().max()), "max_abs_logit": float(theirs.abs().max()),
            "argmax_equal": int((ours.argmax(-1) == theirs.argmax(-1)).sum()), "of": len(tokens),
            "top5_overlap": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="8b")
    parser.add_argument("--layers", type=int, help="fewer layers than the shape's (same layer size)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--residual", choices=["float32", "float16"], default="float32",
                        help="the residual stream's type (the backend's default: float32)")
    parser.add_argument("--check", action="store_true",
                        help="also compare a prefill's logits with the CPU backend's (float16 on a GPU vs float32)")
    args = parser.parse_args()
    shape = dict(SHAPES[args.shape], **({"layers": args.layers} if args.layers else {}))
    path = model_path(args.dir, args.shape, shape["layers"])
    quant.RESIDUAL = getattr(mx, args.residual)
    report: dict = {"shape": args.shape, **shape, "device": mlx_backend.device(), "mlx": mx.__version__,
                    "residual": args.residual, "env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")}}
    if not path.exists():
        started = time.perf_counter()
        write_model(path, **shape)
        report["write_s"] = time.perf_counter() - started
    report["file_bytes"] = path.stat().st_size
    report["copy_GBps"] = copy_bandwidth(4 << 30 if mlx_backend.available() else 256 << 20) / 1e9
    print(json.dumps(report), flush=True)

    mx.reset_peak_memory()
    started = time.perf_counter()
    model = load_span(GGUFFile(path), backend_name="mlx")
    report["load_s"] = time.perf_counter() - started
    report["active_bytes"], report["peak_bytes"] = mx.get_active_memory(), mx.get_peak_memory()
    nbytes = weight_bytes(model)
    report["weight_bytes_per_token"] = nbytes
    roofline = report["copy_GBps"] * 1e9 / nbytes
    report["roofline_tok_s"] = roofline
    print(json.dumps(report), flush=True)

    if args.check:
        report["check"] = check(model, path)
        print(json.dumps(report["check"]), flush=True)
    variants = {}
    decode(model, 4)  # warm-up: kernels compiled, graphs cached
    variants["step"] = decode(model, args.tokens)
    ops.ASYNC = False
    decode(model, 4)
    variants["sync"] = decode(model, args.tokens)
    ops.ASYNC = True
    variants["matmuls"] = matmuls_only(model, args.tokens)
    for name, figures in variants.items():
        figures["tok_s"] = 1000 / figures["ms_per_token"]
        figures["of_roofline"] = figures["tok_s"] / roofline
        print(f"{name:8s} " + " ".join(f"{k}={v:.3f}" for k, v in figures.items()), flush=True)
    report["variants"] = variants
    print(json.dumps(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
