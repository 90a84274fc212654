"""Many streams at once through the HTTP API of a 3-node local swarm: what continuous batching and speculative
decoding give.

    .venv/bin/python benchmarks/concurrency.py [--model PATH] [--shape 1b] [--streams 1,4,16,64] [--nodes 3]
        [--tokens 128] [--rounds 1] [--spec-tokens 48] [--threads N] [--pin [--cores N]] [--no-speculative]
        [--direct] [--backend cpu|mlx] [--json]

Part 1: for each count N of concurrent streams (OpenAI streaming chat, greedy, distinct prompts, one httpx
client per stream), aggregate tok/s (completion tokens of all streams / wall time from the first request to
the last [DONE]), time to first token and the gaps between text chunks (inter-token) p50 and p99; each figure
also as a ratio to N = 1 in the same run. The bar: 16 streams >= 6x the aggregate tok/s of 1 stream. With --rounds
R every count runs R times and the table shows medians, and each round's ratio beside them: one stream's speed
depends on every hop's wake-up latency, which a shared host varies from run to run. 128 tokens per stream by
default: a chat answer's length, over which the ramp (16 prompts prefilled at once) and the tail (streams ending
at different times) weigh what they do in use; 24 tokens was mostly ramp. The clients
run in a process of their own (with --pin, on the CPUs left over), as a real client's HTTP work is not the gateway's.
Part 2: one stream, speculative decoding on vs off (Engine.speculative), on a repeat-the-text prompt and on
chat: tok/s ratio, and the acceptance rate (accepted / drafted tokens, from the service's counters).
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.api.conftest

from benchmarks.pipeline import pin  # noqa: E402
from benchmarks.random_gguf import SHAPES, write_model  # noqa: E402
from tests.api.conftest import live_server  # noqa: E402

from duskpool.api.service import Service  # noqa: E402
from duskpool.backends import backend  # noqa: E402
from duskpool.cluster.gateway import Gateway  # noqa: E402
from duskpool.cluster.swarm import LocalSwarm  # noqa: E402
from duskpool.engine.generate import GenerationParams, GenerationStats  # noqa: E402
from duskpool.engine.sampling import SamplingParams  # noqa: E402
from duskpool.weights.catalog import BUNDLED_NAME, bundled_model_path  # noqa: E402

TOPICS = ["the sea", "a city at night", "prime numbers", "recursion", "coffee", "the moon", "a lost key", "rain",
          "mountains", "a library", "trains", "winter", "a garden", "music", "the desert", "an old clock"]
REPEAT = ("Repeat this text exactly, word for word: The quick brown fox jumps over the lazy dog while the cat sleeps "
          "on the warm windowsill, and the rain falls softly on the old stone roof of the house by the river.")
CHAT = "Explain how a bicycle stays upright, step by step."


def stream(url: str, prompt: str, max_tokens: int, out: list) -> None:
    """One streaming chat: (when it was sent, when each text chunk came, completion tokens, text) appended to `out`."""
    body = {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    times, usage, text = [], {}, []
    with httpx.Client(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                usage.update(chunk.get("usage") or {})
                for choice in chunk.get("choices") or []:
                    if choice.get("delta", {}).get("content"):
                        times.append(time.perf_counter())
                        text.append(choice["delta"]["content"])
    out.append((started, times, usage.get("completion_tokens", 0), "".join(text)))


def chat(engine: Gateway, prompt: str, max_tokens: int, out: list) -> None:
    """`stream` without HTTP: the engine's own chat, in this process (--direct)."""
    params = GenerationParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0))
    stats, times, text = GenerationStats(), [], []
    started = time.perf_counter()
    for piece in engine.chat([{"role": "user", "content": prompt}], params, stats):
        if piece:
            times.append(time.perf_counter())
            text.append(piece)
    out.append((started, times, stats.generated_tokens, "".join(text)))


def run_streams(url: str, prompts: list[str], max_tokens: int) -> dict:
    return run_at_once(stream, url, prompts, max_tokens)


def run_at_once(one: Callable, target: Any, prompts: list[str], max_tokens: int) -> dict:
    """`one(target, prompt, max_tokens, out)` for every prompt at once, a thread each: the figures of part 1."""
    out: list = []
    threads = [threading.Thread(target=one, args=(target, p, max_tokens, out)) for p in prompts]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttfts = sorted(times[0] - sent for sent, times, _, _ in out)
    gaps = sorted(b - a for _, times, _, _ in out for a, b in zip(times, times[1:], strict=False))
    tokens = sum(o[2] for o in out)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"streams": len(prompts), "tokens": tokens, "tok_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p99": pct(ttfts, 0.99), "itl_p50": pct(gaps, 0.5), "itl_p99": pct(gaps, 0.99),
            "texts": [o[3] for o in out]}


def summarize(results: list[dict]) -> list[dict]:
    """Per count of streams (in the order run): the median of each figure over the rounds, and each round's aggregate
    tok/s as a ratio to 1 stream (the first count) in that same round, with their median."""
    first = {r["round"]: r["tok_s"] for r in results if r["streams"] == results[0]["streams"]}
    rows = []
    for n in dict.fromkeys(r["streams"] for r in results):
        runs = [r for r in results if r["streams"] == n]
        ratios = [r["tok_s"] / first[r["round"]] for r in runs]
        figures = ("tok_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99")
        row = {k: statistics.median(r[k] for r in runs) for k in figures}
        row |= {"streams": n, "ratio": statistics.median(ratios), "ratios": ratios,
                "batch": [statistics.median(b) for b in zip(*(r["batch"] for r in runs), strict=True)],
                "busy": [statistics.median(b) for b in zip(*(r["busy"] for r in runs), strict=True)]}
        rows.append(row)
    return rows


def _pinned(prefixes: list[list[str]]) -> set[int]:
    """The CPUs --pin gave this process and the nodes (each prefix is ["taskset", "-c", "a,b,.."])."""
    return os.sched_getaffinity(0) | {int(c) for prefix in prefixes for c in prefix[2].split(",")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a Llama-3-shaped model with random Q4_0 weights and "
                        "--model's tokenizer and chat template (written to a temporary folder) instead of --model")
    parser.add_argument("--streams", default="1,4,16,64")
    parser.add_argument("--tokens", type=int, default=128, help="completion tokens per stream")
    parser.add_argument("--rounds", type=int, default=1, help="run every count this many times; the table shows "
                        "each figure's median over the rounds, and every round's ratio to 1 stream")
    parser.add_argument("--spec-tokens", type=int, default=48, help="tokens of part 2's runs (0: skip part 2)")
    parser.add_argument("--nodes", type=int, default=3, help="node processes of the swarm (the issue's bar: 3)")
    parser.add_argument("--threads", type=int, default=None, help="compute threads per process")
    parser.add_argument("--pin", action="store_true",
                        help="give the gateway and each node --threads cores of their own (taskset)")
    parser.add_argument("--cores", type=int, default=None,
                        help="with --pin, cores per process (default --threads; one more leaves gRPC a core)")
    parser.add_argument("--no-speculative", action="store_true",
                        help="part 1 without speculative decoding (one stream drafts by prompt lookup by default)")
    parser.add_argument("--backend", default="cpu", help="what the gateway and the nodes compute with (cpu, mlx)")
    parser.add_argument("--direct", action="store_true", help="part 1 without HTTP: each stream a thread in the "
                        "gateway's process calling its chat, so the table shows what the ring gives and, beside a "
                        "run without it, what the HTTP layer costs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.pin and not args.threads:
        parser.error("--pin needs --threads")
    try:
        prefixes = pin(args.nodes, args.cores or args.threads) if args.pin else None
    except ValueError as e:
        parser.error(str(e))
    # the clients' HTTP work runs in a process of its own, on the CPUs --pin left free (else beside the others): in the
    # gateway's process it would take the gateway's cores, which no real client does
    cpus = sorted(os.sched_getaffinity(0) if not args.pin else set(range(os.cpu_count() or 1)) - _pinned(prefixes))
    clients = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), os.sched_setaffinity,
                                  (0, cpus or range(os.cpu_count() or 1)))
    direct = ThreadPoolExecutor(1)  # --direct: the streams' threads are started from here, in this process
    if args.threads:
        backend(args.backend).set_threads(args.threads)
    args.model = args.model or bundled_model_path()
    counts = [int(n) for n in args.streams.split(",")]
    results, spec = [], {}
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(args.nodes, cache_root=Path(tmp), threads=args.threads,
                                                                     prefixes=prefixes, backend=args.backend) as swarm:
        model = args.model
        if args.shape:
            print(f"writing a random {args.shape}-shaped model with {args.model.name}'s tokenizer ...",
                  file=sys.stderr, flush=True)
            model = write_model(Path(tmp) / f"random-{args.shape}.gguf", **SHAPES[args.shape], tokenizer=args.model)
        gateway = Gateway.start(model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                                progress=False, backend_name=args.backend)
        service = Service(gateway, BUNDLED_NAME, Path(model))
        gateway.speculative = not args.no_speculative
        try:
            with live_server(service) as url:
                for round_ in range(args.rounds):
                    for n in counts:
                        prompts = [f"A poem about {TOPICS[i % len(TOPICS)]} (number {i})" for i in range(n)]
                        # warm-up at this count: MLX's CUDA build compiles kernels for each new batch shape (NVRTC,
                        # seconds each) the first time it meets one; the figures are the steady state
                        if args.direct:
                            run_at_once(chat, gateway, prompts, 4)
                            running, busy = direct.submit(run_at_once, chat, gateway, prompts, args.tokens), []
                        else:
                            clients.submit(run_streams, url, prompts, 4).result()
                            running, busy = clients.submit(run_streams, url, prompts, args.tokens), []
                        while not running.done():  # how busy each stage is (share of 2 s in forwards), every second
                            time.sleep(1.0)
                            busy.append([gateway.batcher.busy()] + [gateway.node_info(a).busy for a in swarm.addresses])
                        result = running.result() | {"round": round_}
                        # how full the batches were: sessions per forward over each stage's last 64 forwards; how busy
                        # the stages were while the streams ran (the median of the samples): near 100%, the route waits
                        result["batch"] = [gateway.batcher.mean_sessions()] + [
                            gateway.node_info(a).batch_sessions for a in swarm.addresses]
                        result["busy"] = [statistics.median(b) for b in zip(*busy, strict=True)] if busy else []
                        results.append(result)
                        print(f"  round {round_ + 1}, {n} streams: {result['tok_s']:.1f} tok/s", file=sys.stderr,
                              flush=True)
                for name, prompt in (("repeat-the-text", REPEAT), ("chat", CHAT)) if args.spec_tokens else ():
                    for on in (False, True):
                        gateway.speculative = on
                        drafted, accepted = service.metrics.drafted._value.get(), service.metrics.accepted._value.get()
                        r = clients.submit(run_streams, url, [prompt], args.spec_tokens).result()
                        d = service.metrics.drafted._value.get() - drafted
                        a = service.metrics.accepted._value.get() - accepted
                        spec[(name, on)] = (r, a / d if d else 0.0)
                    same = spec[(name, True)][0]["texts"] == spec[(name, False)][0]["texts"]
                    spec[(name, "same")] = same
                gateway.speculative = True
        finally:
            clients.shutdown()
            direct.shutdown()
            service.close()
            gateway.close()
    rows = summarize(results)
    if args.json:
        runs = [{k: v for k, v in r.items() if k != "texts"} for r in results]
        print(json.dumps({"concurrency": rows, "rounds": runs,
                          "speculative": {f"{n}/{'on' if on else 'off'}": {"tok_s": r["tok_s"], "acceptance": acc}
                                          for (n, on), v in spec.items() if on != "same" for r, acc in [v]}}))
        return
    print(f"{'--direct (no HTTP)' if args.direct else 'through the HTTP API'}: medians over {args.rounds} round(s) of "
          f"{args.tokens} tokens per stream; × 1 stream: each round's own ratio")
    print("| streams | agg tok/s | × 1 stream (median; each round) | TTFT p50 s (×) | TTFT p99 s (×) "
          "| inter-token p50 ms (×) | inter-token p99 ms (×) | sessions/forward (gateway, nodes) "
          "| busy (gateway, nodes) |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows[0]
    for r in rows:
        print(f"| {r['streams']} | {r['tok_s']:.1f} | {r['ratio']:.2f}; {', '.join(f'{x:.2f}' for x in r['ratios'])} "
              f"| {r['ttft_p50']:.2f} ({r['ttft_p50'] / base['ttft_p50']:.1f}) "
              f"| {r['ttft_p99']:.2f} ({r['ttft_p99'] / base['ttft_p99']:.1f}) "
              f"| {r['itl_p50'] * 1000:.0f} ({r['itl_p50'] / base['itl_p50']:.1f}) "
              f"| {r['itl_p99'] * 1000:.0f} ({r['itl_p99'] / base['itl_p99']:.1f}) "
              f"| {', '.join(f'{b:.1f}' for b in r['batch'])} | {', '.join(f'{b:.0%}' for b in r['busy'])} |")
    print()
    print("| task | tok/s off | tok/s on | on / off | acceptance | same text |")
    print("|---|---|---|---|---|---|")
    for name in ("repeat-the-text", "chat") if args.spec_tokens else ():
        (off, _), (on, acc) = spec[(name, False)], spec[(name, True)]
        print(f"| {name} | {off['tok_s']:.1f} | {on['tok_s']:.1f} | {on['tok_s'] / off['tok_s']:.2f} "
              f"| {acc:.0%} | {spec[(name, 'same')]} |")


if __name__ == "__main__":
    main()
