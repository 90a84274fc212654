"""What a batched forward costs against one session's: one stage's decode step at batch 1, 4, 16 and 64.

    .venv/bin/python benchmarks/batch_scaling.py [--model PATH] [--layers 10] [--batches 1,4,16,64]
        [--context 64] [--threads N] [--backend cpu|mlx] [--profile B]

Each of B sessions has `context` positions in its own cache and sends one decode step; the B rows go through
`layers` layers as one `forward_batch` (models/base.py `Batch`), as a stage of a swarm runs them. Printed per
batch: the median ms of a forward, ms per session, and the ratio to batch 1 (B means no gain from batching,
1 means a batch costs what one session does); then the same in CPU time of the process (all its threads),
the steadier figure on a machine others share. `--profile B`: cProfile of the forwards at batch B, by own time.
"""

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duskpool.backends import backend, load_span  # noqa: E402
from duskpool.models.base import Segment  # noqa: E402
from duskpool.weights.catalog import bundled_model_path  # noqa: E402
from duskpool.weights.gguf import GGUFFile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--layers", type=int, default=10, help="layers of the stage (a third of SmolLM2-135M's 30)")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--context", type=int, default=64, help="positions each session already holds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--profile", type=int, default=None, metavar="B", help="profile the forwards at batch B")
    args = parser.parse_args()
    if args.threads:
        backend(args.backend).set_threads(args.threads)
    model = load_span(GGUFFile(Path(args.model)), range(args.layers), embed=False, head=False,
                      backend_name=args.backend)
    dim = model.spec.dim
    rng = np.random.default_rng(0)

    def hidden(rows: int):
        noise = (rng.standard_normal((rows, dim)) * 0.1).astype(np.float32)
        return model.hidden_from_bytes(noise.tobytes(), rows, "float32")

    results = {}
    for b in [int(n) for n in args.batches.split(",")]:
        caches = [model.new_cache(args.context + args.repeats + 4) for _ in range(b)]
        for cache in caches:  # each session's prompt, alone
            model.forward_span(hidden(args.context), cache, 0)
        step = hidden(b)
        timings, cpu = [], []
        profiler = cProfile.Profile() if b == args.profile else None
        for i in range(args.repeats + 2):
            segments = [Segment(cache, args.context + i, 1) for cache in caches]
            started, started_cpu = time.perf_counter(), time.process_time()
            if profiler and i >= 2:
                profiler.enable()
            model.hidden_to_bytes(model.forward_batch(step, segments), "float32")  # waits for a lazy backend
            if profiler:
                profiler.disable()
            timings.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        results[b] = statistics.median(timings[2:]) * 1000, statistics.median(cpu[2:]) * 1000
        (wall, cpu_ms), (wall_1, cpu_1) = results[b], results[min(results)]
        print(f"batch {b:3d}: {wall:8.2f} ms {wall / b:6.2f} ms/session {wall / wall_1:6.2f}x batch 1 | "
              f"CPU {cpu_ms:8.2f} ms {cpu_ms / b:6.2f} ms/session {cpu_ms / cpu_1:6.2f}x", flush=True)
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
