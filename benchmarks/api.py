"""What the HTTP API costs: time to first token and decode tok/s through OpenAI streaming chat vs the direct
engine call, for the in-process engine and for a 3-node local swarm behind a gateway.

    .venv/bin/python benchmarks/api.py [--model PATH] [--tokens 32] [--reps 3] [--threads 2] [--node-threads 1]

Three paths to the same engine, same prompts, greedy:
- direct, main thread: `engine.chat(messages, params)` called here, as `duskpool run` does;
- direct, new thread: the same call on a fresh thread, as the server runs each generation, so that what
  differs from the API path is HTTP alone (torch's threads behave differently on the main thread);
- API: `POST /v1/chat/completions` with `stream: true` through httpx (one kept-alive connection) to a live
  uvicorn server in this process; the token count comes from `stream_options.include_usage`.
TTFT runs from the call (or sending the request) to the first piece of text, so it includes tokenizing and
the chat template on every path. Decode tok/s = (tokens - 1) / (last piece - first piece). Each prompt runs
--reps times on each path, the paths interleaved in rotating order after one warm-up each; figures are
medians, ratios are against the direct call on the main thread, all from this run. "same text" counts the
runs whose text equals the main-thread direct call's.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.api.conftest

from tests.api.conftest import live_server  # noqa: E402

from duskpool.api.service import Service  # noqa: E402
from duskpool.backends import backend  # noqa: E402
from duskpool.cluster.gateway import Gateway  # noqa: E402
from duskpool.cluster.swarm import LocalSwarm  # noqa: E402
from duskpool.engine.generate import GenerationParams, GenerationStats  # noqa: E402
from duskpool.engine.runner import Engine, LocalEngine  # noqa: E402
from duskpool.weights.catalog import BUNDLED_NAME, bundled_model_path  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, step by step.",
    "Describe a busy market in the morning, with its sounds and smells.",
]


@dataclass
class Run:
    ttft_ms: float
    tok_s: float
    text: str


def timed(pieces, started: float, tokens) -> Run:
    """Drain `pieces` (an iterator of text), timing the first and the last; `tokens()` counts after."""
    text, first, last = [], None, None
    for piece in pieces:
        if not piece:
            continue
        last = time.perf_counter()
        first = first or last
        text.append(piece)
    n = tokens()
    rate = (n - 1) / (last - first) if n > 1 and last > first else float("nan")
    return Run((first - started) * 1000, rate, "".join(text))


def direct(engine: Engine, prompt: str, max_tokens: int) -> Run:
    stats = GenerationStats()
    started = time.perf_counter()
    pieces = engine.chat([{"role": "user", "content": prompt}], GenerationParams(max_tokens=max_tokens), stats)
    return timed(pieces, started, lambda: stats.generated_tokens)


def through_api(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> Run:
    body = {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    usage = {}

    def pieces():
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise RuntimeError(f"the server failed mid-stream: {chunk['error']}")
                usage.update(chunk.get("usage") or {})
                for choice in chunk["choices"]:
                    yield choice["delta"].get("content") or ""

    started = time.perf_counter()
    return timed(pieces(), started, lambda: usage["completion_tokens"])


def on_a_thread(call, *args) -> Run:
    """`call(*args)` on a fresh thread, as the server runs each generation."""
    result: list[Run] = []
    thread = threading.Thread(target=lambda: result.append(call(*args)))
    thread.start()
    thread.join()
    return result[0]


def medians(runs: list[Run]) -> tuple[float, float]:
    return statistics.median(r.ttft_ms for r in runs), statistics.median(r.tok_s for r in runs)


PATHS = ("direct, main thread", "direct, new thread", "API (OpenAI SSE)")


def compare(engine: Engine, model: Path, tokens: int, reps: int) -> dict[str, list[Run]]:
    service = Service(engine, BUNDLED_NAME, model)
    try:
        with live_server(service) as url, httpx.Client(timeout=300) as client:
            calls = {PATHS[0]: lambda prompt, n: direct(engine, prompt, n),
                     PATHS[1]: lambda prompt, n: on_a_thread(direct, engine, prompt, n),
                     PATHS[2]: lambda prompt, n: through_api(client, url, prompt, n)}
            for call in calls.values():
                call(PROMPTS[0], 4)  # warm-up
            runs: dict[str, list[Run]] = {path: [] for path in PATHS}
            for rep in range(reps):
                for i, prompt in enumerate(PROMPTS):
                    shift = (rep + i) % len(PATHS)  # each path goes first, second and third in turn
                    for path in PATHS[shift:] + PATHS[:shift]:
                        runs[path].append(calls[path](prompt, tokens))
    finally:
        service.close()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=32, help="max tokens per answer")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each prompt")
    parser.add_argument("--threads", type=int, default=2, help="compute threads of this process")
    parser.add_argument("--node-threads", type=int, default=1, help="compute threads of each swarm node")
    args = parser.parse_args()
    model = args.model or bundled_model_path()
    backend().set_threads(args.threads)
    began, load_before = time.perf_counter(), os.getloadavg()[0]

    results = {"in-process engine": compare(LocalEngine.load(model), model, args.tokens, args.reps)}
    with tempfile.TemporaryDirectory() as cache, \
            LocalSwarm(3, cache_root=Path(cache), threads=args.node_threads) as swarm:
        gateway = Gateway.start(model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                                progress=False)
        try:
            results["3-node swarm + gateway"] = compare(gateway, model, args.tokens, args.reps)
        finally:
            gateway.close()

    print(f"model {model.name}, {args.threads} threads here, {args.node_threads} per node; {len(PROMPTS)} prompts x "
          f"{args.reps} reps, greedy, up to {args.tokens} tokens; medians; x = this path / direct on the main thread")
    print(f"{'engine':<24}{'path':<22}{'TTFT ms':>9}{'x':>7}{'tok/s':>8}{'x':>7}{'same text':>11}")
    for name, runs in results.items():
        base = runs[PATHS[0]]
        base_ttft, base_rate = medians(base)
        for path in PATHS:
            ttft, rate = medians(runs[path])
            same = sum(r.text == b.text for r, b in zip(runs[path], base, strict=True))
            print(f"{name if path == PATHS[0] else '':<24}{path:<22}{ttft:>9.1f}{ttft / base_ttft:>7.2f}"
                  f"{rate:>8.1f}{rate / base_rate:>7.2f}{same:>6}/{len(base)}")
        (thread_ttft, thread_rate), (api_ttft, api_rate) = medians(runs[PATHS[1]]), medians(runs[PATHS[2]])
        print(f"{'':<24}HTTP alone (API / direct on a new thread): TTFT x{api_ttft / thread_ttft:.2f} "
              f"({api_ttft - thread_ttft:+.1f} ms), tok/s x{api_rate / thread_rate:.2f}")
    print(f"total {time.perf_counter() - began:.0f} s; 1-min load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs (other work on the machine skews the figures)")


if __name__ == "__main__":
    main()
