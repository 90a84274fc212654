"""Long prompts: time to first token of a 1000-token prompt on a 3-stage ring of local nodes vs one process.

    .venv/bin/python benchmarks/long_prompt.py [--shape 1b | --model PATH] [--prompt-tokens 1000] [--stages 3]
        [--threads 2] [--runs 2] [--json]

Both go through Engine.generate with max_tokens=1, as a request would: the prompt is prefilled in chunks of
PREFILL_CHUNK tokens, then one token is drawn; TTFT is the time from the call to that token's text. The model is a
Llama-3-shaped one with random Q4_0 weights (--shape, written to a temporary folder; its made-up vocabulary
means the prompt is token ids) or --model. Each figure is the best of --runs after one warm-up, the single
process's and the ring's measured in turn. The bar (issue 17, for the 8B shape, a core per process):
ring TTFT <= 1.2 x single process.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for benchmarks.random_gguf

from benchmarks.random_gguf import SHAPES, write_model  # noqa: E402

from duskpool.backends import backend  # noqa: E402
from duskpool.cluster.gateway import Gateway  # noqa: E402
from duskpool.cluster.swarm import LocalSwarm  # noqa: E402
from duskpool.engine.generate import PREFILL_CHUNK, GenerationParams  # noqa: E402
from duskpool.engine.runner import LocalEngine  # noqa: E402


def ttft_ms(engine, prompt: list[int]) -> float:
    """Milliseconds from Engine.generate's call to the first token's text (greedy, one token)."""
    started = time.perf_counter()
    pieces = engine.generate(prompt, GenerationParams(max_tokens=1, speculative=False))
    try:
        next(pieces)
        return (time.perf_counter() - started) * 1000
    finally:
        pieces.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file instead of --shape")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="duskpool-long-prompt-") as tmp:
        model = args.model or write_model(Path(tmp) / f"llama-{args.shape}-q4_0.gguf", **SHAPES[args.shape])
        name = f"{args.shape}-shaped" if args.model is None else model.name
        prompt = [2 + i % 1000 for i in range(args.prompt_tokens)]  # token ids: a random model has no real text
        backend().set_threads(args.threads)
        local = LocalEngine.load(model)
        with LocalSwarm(args.stages, cache_root=Path(tmp) / "nodes", threads=args.threads) as swarm:
            gateway = Gateway.start(model, swarm.addresses, identity=swarm.gateway_identity, routing="ring",
                                    even_split=True, progress=False)
            try:
                ttft_ms(local, prompt[:64])  # warm-up: kernels, allocator, every stage's first step
                ttft_ms(gateway, prompt[:64])
                single, ring = [], []
                for _ in range(args.runs):
                    single.append(ttft_ms(local, prompt))
                    ring.append(ttft_ms(gateway, prompt))
            finally:
                gateway.close()

    result = {"model": name, "prompt_tokens": args.prompt_tokens, "stages": args.stages, "threads": args.threads,
              "prefill_chunk": PREFILL_CHUNK, "processes": args.stages + 1, "cpus": os.cpu_count(),
              "single_ttft_ms": min(single), "ring_ttft_ms": min(ring), "ratio": min(ring) / min(single),
              "single_runs_ms": single, "ring_runs_ms": ring}
    print(f"model {name}, prompt {args.prompt_tokens} tokens (chunks of {PREFILL_CHUNK}), {args.threads} threads per "
          f"process, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; best of {args.runs}")
    print(f"single process TTFT {result['single_ttft_ms']:.0f} ms; {args.stages}-stage ring TTFT "
          f"{result['ring_ttft_ms']:.0f} ms; ratio {result['ratio']:.2f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
