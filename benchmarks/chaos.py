"""Chaos: concurrent greedy streams on a local swarm while nodes are killed (kill -9) and restarted.

    .venv/bin/python benchmarks/chaos.py [--kills 100] [--nodes 5] [--replicas 1] [--streams 8]
                                         [--max-tokens 24] [--seed 0]

Each kill lands at a random moment (after a random pause of --pause seconds), on a random node; the node is
restarted at once (same cache and identity, new port) and added back to the gateway, where it takes the
spans short of copies. Every answer is compared with the same prompt's answer from a fault-free run on the
same gateway. Prints: requests ok / failed, gaps, duplicates, identical texts, detection and recovery times.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.cluster.chaos

from tests.cluster.chaos import PROMPTS, chat_prompt, fault_free, greedy, run_chaos  # noqa: E402

from duskpool.cluster.gateway import Gateway  # noqa: E402
from duskpool.cluster.swarm import LocalSwarm  # noqa: E402
from duskpool.weights.catalog import bundled_model_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pause", type=float, nargs=2, default=(0.3, 1.5), metavar=("MIN", "MAX"),
                        help="seconds between a node's rejoin and the next kill, uniformly (default: 0.3 1.5)")
    args = parser.parse_args()
    model = args.model or bundled_model_path()

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as cache, LocalSwarm(args.nodes, cache_root=Path(cache)) as swarm:
        gateway = Gateway.start(model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                                replicas=args.replicas, progress=False)
        try:
            spans = ", ".join(f"[{a}, {b}) x{len(h)}" for (a, b), h in gateway.holders.items())
            print(f"model {model.name}; {args.nodes} nodes, spans {spans}; {args.streams} streams of "
                  f"{args.max_tokens} greedy tokens over {len(PROMPTS)} prompts; {args.kills} kills, seed {args.seed}; "
                  f"{sys.platform}, {len(os.sched_getaffinity(0))} cores", flush=True)
            prompts, params = [chat_prompt(gateway, text) for text in PROMPTS], greedy(args.max_tokens)
            references = fault_free(gateway, prompts, params)
            report = run_chaos(swarm, gateway, prompts, references, params, streams=args.streams, kills=args.kills,
                               seed=args.seed, pause=tuple(args.pause))
            print(report.summary())
            print(f"route at the end: {', '.join(f'{s.address} [{s.start}, {s.stop})' for s in gateway.route)}; "
                  f"{len(gateway.deaths)} nodes counted gone; total {time.monotonic() - started:.0f} s")
        finally:
            gateway.close()


if __name__ == "__main__":
    main()
