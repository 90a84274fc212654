"""A Llama-3-shaped model split over N node processes on one machine (one GPU), against one process, same run.

    python benchmarks/mlx_swarm.py --shape 70b [--nodes 4] [--dir /dev/shm] [--cache /tmp/swarm] [--tokens 32]

The model is mlx_decode.py's (random Q4_0 weights, written if absent). The single process loads it whole on the
MLX backend and decodes; then N `node` processes of this script (each a NodeService on the MLX backend, the
pool's mutual TLS on loopback) get even spans from a gateway in this process, whose own layers (the first and
last, the embedding and the head) are on MLX too, and the same decode runs through them. Prints time to first
token (a 16-token prompt) and decode tok/s of both, and their ratio.
"""

import argparse
import functools
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mlx_decode import SHAPES, model_path, write_model  # noqa: E402

import duskpool.backends as backends  # noqa: E402
from duskpool.engine.runner import LocalEngine  # noqa: E402
from duskpool.weights.gguf import GGUFFile  # noqa: E402


def measure(engine, tokens: int, prompt_tokens: int = 16) -> dict:
    prompt = list(range(2, 2 + prompt_tokens))
    session = engine.open_session(prompt_tokens + tokens + 1)
    try:
        started = time.perf_counter()
        token = int(session.forward(prompt, 0).argmax())
        ttft = time.perf_counter() - started
        steps = []
        for position in range(prompt_tokens, prompt_tokens + tokens):
            started = time.perf_counter()
            token = int(session.forward([token], position).argmax())
            steps.append(time.perf_counter() - started)
    finally:
        session.close()
    return {"ttft_ms": 1000 * ttft, "ms_per_token": 1000 * statistics.median(steps[2:]),
            "tok_s": 1 / statistics.median(steps[2:])}


def node(identity_dir: str, cache_dir: str, backend: str) -> None:
    """One node process: serve until killed."""
    from duskpool.cluster.node import NodeService
    from duskpool.cluster.transport import start_server
    from duskpool.security import load_identity

    identity = load_identity(Path(identity_dir))
    service = NodeService(Path(cache_dir), identity=identity, backend_name=backend)
    _, port = start_server(service, "127.0.0.1", 0, identity, lambda fingerprint: False)
    print(f"listening on 127.0.0.1:{port}", flush=True)
    threading.Event().wait()


def start_nodes(n: int, pool, cache: Path, backend: str) -> tuple[list[subprocess.Popen], list[str]]:
    processes = [subprocess.Popen([sys.executable, __file__, "node", str(pool.node_dirs[i]), str(cache / f"node-{i}"),
                                   backend], stdout=subprocess.PIPE, text=True) for i in range(n)]
    addresses = []
    for p in processes:
        line = p.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"a node did not start: {line!r}")
        addresses.append(line.split()[-1])
    return processes, addresses


def main() -> None:
    if sys.argv[1:2] == ["node"]:
        return node(*sys.argv[2:5])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="70b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/duskpool-swarm"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--backend", default="mlx", help="the nodes' and the gateway's backend")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from duskpool.cluster.gateway import Gateway
    from duskpool.security import local_pool

    shape = dict(SHAPES[args.shape], **({"layers": args.layers} if args.layers else {}))
    path = model_path(args.dir, args.shape, shape["layers"])
    report: dict = {"shape": args.shape, **shape, "nodes": args.nodes, "backend": args.backend}
    if not path.exists():
        started = time.perf_counter()
        write_model(path, **shape)
        report["write_s"] = time.perf_counter() - started
    file = GGUFFile(path)

    started = time.perf_counter()
    whole = LocalEngine(backends.load_span(file, backend_name=args.backend), None, 4096)
    report["single_load_s"] = time.perf_counter() - started
    measure(whole, 4)
    report["single"] = measure(whole, args.tokens)
    print(json.dumps(report), flush=True)
    del whole
    mx.clear_cache()

    # the gateway's own layers on the same backend as the nodes'
    backends.load_span = functools.partial(backends.load_span, backend_name=args.backend)
    pool = local_pool(args.nodes, address=None)
    processes, addresses = start_nodes(args.nodes, pool, args.cache, args.backend)
    try:
        started = time.perf_counter()
        gateway = Gateway.start(path, addresses, identity=pool.gateway, pool=pool.pool, even_split=True,
                                progress=False)
        report["swarm_start_s"] = time.perf_counter() - started
        report["route"] = [(s.start, s.stop) for s in gateway.plan.stages]
        try:
            measure(gateway, 4)
            report["swarm"] = measure(gateway, args.tokens)
        finally:
            gateway.close()
    finally:
        for p in processes:
            p.kill()
    report["tok_s_ratio"] = report["swarm"]["tok_s"] / report["single"]["tok_s"]
    report["ttft_ratio"] = report["single"]["ttft_ms"] / report["swarm"]["ttft_ms"]
    print(json.dumps(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
