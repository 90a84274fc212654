"""Pipeline speed: decode tok/s and time to first token for 1-4 stages, ring vs star, vs one process.

    .venv/bin/python benchmarks/pipeline.py [--model PATH | --shape 1b] [--tokens 64] [--max-stages 4] [--netns] [--pin]
        [--json]

Nodes are real `duskpool node` processes on loopback (and, with --netns as root, in network
namespaces whose links are shaped like a LAN; the figures are printed next to a latency + bandwidth
model's prediction). Greedy decode with end tokens ignored; all figures come from this one run.

With --pin (Linux, needs (max stages + 1) x threads CPUs) each process gets cores of its own, as nodes
on separate machines would: the gateway and the single-process baseline the first `threads` cores,
node i the next ones. Without it, all processes share whatever cores the machine has.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.cluster.netns

from benchmarks.random_gguf import SHAPES, write_model  # noqa: E402

from duskpool.backends import backend  # noqa: E402
from duskpool.cluster.gateway import Gateway  # noqa: E402
from duskpool.cluster.swarm import LocalSwarm  # noqa: E402
from duskpool.engine.runner import LocalEngine  # noqa: E402
from duskpool.weights.catalog import bundled_model_path  # noqa: E402

QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def measure(engine, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(time to first token in ms, decode tokens per second)."""
    session = engine.open_session(len(prompt) + tokens + 1)
    try:
        started = time.perf_counter()
        token = int(torch.argmax(session.forward(prompt, 0)))
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(tokens):
            token = int(torch.argmax(session.forward([token], len(prompt) + i)))
        return ttft * 1000, tokens / (time.perf_counter() - started)
    finally:
        session.close()


def single_process(model: Path, threads: int, tokens: int) -> tuple[LocalEngine, list[int], float, float]:
    """The whole model in this process: the engine, the benchmark's prompt, TTFT in ms and decode tok/s."""
    backend().set_threads(threads)
    local = LocalEngine.load(model)
    if local.tokenizer.chat_template:
        prompt = local.tokenizer.encode(local.tokenizer.render_chat([{"role": "user", "content": QUESTION}]))
    else:  # a random-weight model: its vocabulary is made up, so the prompt is token ids of the question's length
        prompt = list(range(2, 2 + 32))
    measure(local, prompt, 8)  # warm-up
    return local, prompt, *measure(local, prompt, tokens)


def pin(stages: int, cores: int) -> list[list[str]]:
    """Give this process the first `cores` CPUs (before torch or gRPC start threads: they inherit them)
    and return a command prefix per node that gives node i the next ones. Raises if too few CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < (stages + 1) * cores:
        raise ValueError(f"--pin needs {(stages + 1) * cores} CPUs; this process may use {len(cpus)}")
    os.sched_setaffinity(0, cpus[:cores])
    return [["taskset", "-c", ",".join(map(str, cpus[(i + 1) * cores:(i + 2) * cores]))] for i in range(stages)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a Llama-3-shaped model with random Q4_0 weights "
                        "(written to a temporary folder) instead of --model")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--max-stages", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--netns", action="store_true", help="also run 4 stages across network namespaces")
    parser.add_argument("--pin", action="store_true", help="give each process cores of its own (taskset)")
    parser.add_argument("--cores", type=int, default=None,
                        help="with --pin, cores per process (default --threads; one more leaves gRPC a core)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    args = parser.parse_args()
    try:
        prefixes = pin(args.max_stages, args.cores or args.threads) if args.pin else None
    except ValueError as e:
        parser.error(str(e))
    if args.shape:
        model = write_model(Path(tempfile.mkdtemp()) / f"llama-{args.shape}-q4_0.gguf", **SHAPES[args.shape])
    else:
        model = args.model or bundled_model_path()
    local, prompt, base_ttft, base_rate = single_process(model, args.threads, args.tokens)
    base_ms = 1000 / base_rate
    print(f"model {model.name}, {args.threads} threads per process, prompt {len(prompt)} tokens, "
          f"decode {args.tokens} tokens, {os.cpu_count()} CPUs{', each process pinned to its own' if args.pin else ''}")
    print(f"{'setup':<24}{'decode tok/s':>13}{'x single':>10}{'TTFT ms':>10}{'us/hop':>9}")
    print(f"{'single process':<24}{base_rate:>13.1f}{1.0:>10.2f}{base_ttft:>10.1f}{'':>9}")
    figures = {"model": model.name, "threads": args.threads, "cpus": os.cpu_count(), "pinned": args.pin,
               "single": {"tok_s": base_rate, "ttft_ms": base_ttft}, "setups": []}

    with LocalSwarm(args.max_stages, threads=args.threads, prefixes=prefixes) as swarm:
        for stages in range(1, args.max_stages + 1):
            for routing in ("ring", "star"):
                gateway = Gateway.start(model, swarm.addresses[:stages], identity=swarm.gateway_identity,
                                        routing=routing, even_split=True, progress=False)
                try:
                    measure(gateway, prompt, 8)
                    ttft, rate = measure(gateway, prompt, args.tokens)
                finally:
                    gateway.close()
                hops = stages + 1 if routing == "ring" else 2 * stages
                per_hop_us = (1000 / rate - base_ms) / hops * 1000
                figures["setups"].append({"stages": stages, "routing": routing, "tok_s": rate,
                                          "ratio": rate / base_rate, "ttft_ms": ttft, "us_per_hop": per_hop_us})
                print(f"{f'{stages} stage(s), {routing}':<24}{rate:>13.1f}{rate / base_rate:>10.2f}{ttft:>10.1f}"
                      f"{per_hop_us:>9.0f}")
        rss = [psutil.Process(p.pid).memory_info().rss / 2**20 for p in swarm.processes]
        print("node RSS MB (each has served every span size above): " + ", ".join(f"{r:.0f}" for r in rss))
    print(f"gateway process RSS MB: {psutil.Process(os.getpid()).memory_info().rss / 2**20:.0f}")
    if args.json:
        print(json.dumps({**figures, "node_rss_mb": rss}))

    if args.netns:
        from tests.cluster.netns import Hosts, unavailable_reason

        reason = unavailable_reason()
        if reason:
            print(f"netns: skipped ({reason})")
            return
        with Hosts(args.max_stages) as hosts, LocalSwarm(
                args.max_stages, threads=args.threads, hosts=[hosts.address(i) for i in range(args.max_stages)],
                prefixes=[hosts.exec_prefix(i) for i in range(args.max_stages)]) as swarm:
            gateway = Gateway.start(model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                                    progress=False)
            try:
                measure(gateway, prompt, 8)
                ttft, rate = measure(gateway, prompt, args.tokens)
            finally:
                gateway.close()
            hops = args.max_stages + 1
            delay = hosts.delay_ms if hosts.link.startswith("netem") else 0.0
            wire_ms = local.model.spec.dim * 4 * 8 / 1e9 * 1000  # fp32 hidden state over 1 Gbit/s
            predicted = base_ms + hops * (delay + wire_ms)
            print(f"netns, {args.max_stages} stages, ring ({hosts.link}): {rate:.1f} tok/s, TTFT {ttft:.1f} ms; "
                  f"model predicts {1000 / predicted:.1f} tok/s (single-process {base_ms:.2f} ms + {hops} hops x "
                  f"({delay:.1f} ms delay + {wire_ms * 1000:.0f} us wire), not counting software overhead)")


if __name__ == "__main__":
    main()
