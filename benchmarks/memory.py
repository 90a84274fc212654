"""Memory that scales: each node's and the gateway's RSS beside what it holds, a Llama-3-shaped Q4_0 model
(random weights) split over 3 nodes, with one session open at its full context.

    .venv/bin/python benchmarks/memory.py [--shape 8b | --model PATH] [--stages 3] [--context 2048] [--json]

The bars (issue 17, for the 8B shape): each node's RSS <= an empty node's RSS (its baseline, measured in the same
run: one more node that is given no span) + 1.1 x (its span's weights + its KV cache); the gateway's RSS <= its own
baseline (the gateway process after its imports, before it loads anything) + 1.1 x (its own layers, embedding,
head and KV caches) + a streaming buffer of BUFFER_MB, whatever the model's size. The gateway runs in a child
process of its own, so that nothing this script holds (the model it wrote) counts in its RSS. Beside each RSS:
its anonymous and file-backed parts and its peak (VmHWM), which say where a miss comes from.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for benchmarks.random_gguf

from benchmarks.random_gguf import SHAPES, write_model  # noqa: E402

BUFFER_MB = 64  # the gateway's bounded streaming buffer: what its weight sends and hidden states may hold at once
SLACK = 1.1  # allocator, code and fragmentation on top of what is held
MB = 2**20
PROMPT_TOKENS, DECODE_TOKENS = 64, 8  # fed through the route before measuring: the caches are in use


def memory_mb(pid: int) -> dict:
    """RSS and its anonymous / file-backed parts and peak, in MB (Linux's /proc; elsewhere RSS only)."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return {"rss": psutil.Process(pid).memory_info().rss / MB}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    kb = {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM") if k in fields}
    return {"rss": kb["VmRSS"], "anon": kb.get("RssAnon"), "file": kb.get("RssFile"), "peak": kb.get("VmHWM")}


def layer_bytes(file, layers: range) -> int:
    """The GGUF bytes of layers `layers` (every tensor named blk.N.*)."""
    return sum(t.nbytes for name, t in file.tensors.items()
               if name.startswith("blk.") and int(name.split(".")[1]) in layers)


def gateway_child(model: Path, identity_dir: Path, context: int, addresses: list[str], threads: int) -> None:
    """The gateway's process: start it, open a session at `context`, feed it, report, wait for a line on stdin."""
    from duskpool.backends import backend
    from duskpool.cluster.gateway import Gateway
    from duskpool.security import load_identity
    from duskpool.weights.gguf import GGUFFile

    backend().set_threads(threads)
    baseline = memory_mb(os.getpid())
    gateway = Gateway.start(model, addresses, identity=load_identity(identity_dir), routing="ring",
                            context_length=context, even_split=True, progress=False)
    try:
        session = gateway.open_session(context)
        prompt = list(range(2, 2 + PROMPT_TOKENS))
        token = int(session.forward(prompt, 0).argmax())
        for i in range(DECODE_TOKENS):
            token = int(session.forward([token], PROMPT_TOKENS + i).argmax())
        file = GGUFFile(model)
        own = [gateway.plan.prefix, gateway.plan.suffix]
        edges = sum(t.nbytes for name, t in file.tensors.items() if not name.startswith("blk."))  # embedding, head
        m = gateway.prefix_model
        kv_per_layer = 2 * m.n_kv_heads * m.head_dim * context * m.ops.KV_VALUE_BYTES  # as SpanModel.cache_bytes
        report = {
            "baseline": baseline, "now": memory_mb(os.getpid()),
            "own_weights_mb": (edges + sum(layer_bytes(file, r) for r in own)) / MB,
            "own_kv_mb": (gateway.prefix_model.cache_bytes(context) + gateway.suffix_model.cache_bytes(context)) / MB,
            "stages": [{"address": s.address, "layers": [s.start, s.stop],
                        "weights_mb": layer_bytes(file, range(s.start, s.stop)) / MB,
                        "kv_mb": kv_per_layer * (s.stop - s.start) / MB} for s in gateway.route],
            "prefix": [own[0].start, own[0].stop], "suffix": [own[1].start, own[1].stop],
        }
        print(json.dumps(report), flush=True)
        sys.stdin.readline()  # the parent measures the nodes now, with the session open
        session.close()
    finally:
        gateway.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b",
                        help="a Llama-3-shaped model with random Q4_0 weights, written to a temporary folder")
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file instead of --shape")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--context", type=int, default=2048, help="the open session's KV capacity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    parser.add_argument("--gateway-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gateway_child:
        model, identity, *addresses = args.gateway_child
        gateway_child(Path(model), Path(identity), args.context, addresses, args.threads)
        return

    from duskpool.cluster.swarm import LocalSwarm

    with tempfile.TemporaryDirectory(prefix="duskpool-memory-") as tmp:
        model = args.model or write_model(Path(tmp) / f"llama-{args.shape}-q4_0.gguf", **SHAPES[args.shape])
        shape = f"{args.shape}-shaped" if args.model is None else model.name
        # one node more than the route: it is given nothing, and its RSS is every node's baseline
        with LocalSwarm(args.stages + 1, cache_root=Path(tmp) / "nodes", threads=args.threads) as swarm:
            child = subprocess.Popen(
                [sys.executable, __file__, "--context", str(args.context), "--threads", str(args.threads),
                 "--gateway-child", str(model), str(swarm.pool.gateway_dir), *swarm.addresses[:args.stages]],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                line = child.stdout.readline()
                if not line:
                    raise SystemExit(f"the gateway process failed (exit code {child.wait()})")
                gateway = json.loads(line)
                time.sleep(0.5)
                nodes = [memory_mb(p.pid) for p in swarm.processes]
                child.stdin.write("\n")
                child.stdin.flush()
                child.wait(timeout=60)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            at = {address: i for i, address in enumerate(swarm.addresses)}

    empty = nodes[-1]
    rows = []
    for stage in gateway["stages"]:
        node = nodes[at[stage["address"]]]
        bound = empty["rss"] + SLACK * (stage["weights_mb"] + stage["kv_mb"])
        rows.append({**stage, "rss": node, "bound_mb": bound, "ratio": node["rss"] / bound})
    g_bound = gateway["baseline"]["rss"] + SLACK * (gateway["own_weights_mb"] + gateway["own_kv_mb"]) + BUFFER_MB
    result = {"model": shape, "stages": args.stages, "context": args.context, "empty_node": empty,
              "nodes": rows, "node_worst_ratio": max(r["ratio"] for r in rows),
              "gateway": {**gateway, "bound_mb": g_bound, "ratio": gateway["now"]["rss"] / g_bound},
              "buffer_mb": BUFFER_MB, "slack": SLACK}

    def parts(m: dict) -> str:
        if m.get("anon") is None:
            return f"{m['rss']:.0f} MB"
        return f"{m['rss']:.0f} MB (anon {m['anon']:.0f}, file {m['file']:.0f}, peak {m['peak']:.0f})"

    print(f"model {shape}, {args.stages} nodes, one session of context {args.context} open; "
          f"{psutil.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"empty node (baseline): {parts(empty)}")
    for r in rows:
        print(f"node layers {r['layers'][0]}-{r['layers'][1] - 1}: RSS {parts(r['rss'])}; "
              f"holds {r['weights_mb']:.0f} MB weights + {r['kv_mb']:.0f} MB KV; bound {r['bound_mb']:.0f} MB; "
              f"ratio {r['ratio']:.2f}")
    print(f"gateway baseline: {parts(gateway['baseline'])}")
    print(f"gateway: RSS {parts(gateway['now'])}; holds {gateway['own_weights_mb']:.0f} MB weights (embedding, head, "
          f"layers {gateway['prefix']} and {gateway['suffix']}) + {gateway['own_kv_mb']:.0f} MB KV; "
          f"bound {g_bound:.0f} MB (+{BUFFER_MB} MB buffer); ratio {result['gateway']['ratio']:.2f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
