"""Where a decode step's time goes in a ring of local nodes: the median of each stretch of one step.

    .venv/bin/python benchmarks/pipeline_trace.py [--model PATH] [--stages 3] [--tokens 64] [--threads 2] [--pin]
        [--json]

The gateway (this process) and the node processes get timestamped wrappers around the data path's
functions: a message arriving, a hidden state decoded, a span computed, a message handed to gRPC.
Node processes install them through a sitecustomize put first on their PYTHONPATH; nothing in
duskpool changes. Timestamps are CLOCK_MONOTONIC, which every process on one machine shares, so
a stretch that starts in one process and ends in the next is the time between them. The wrappers
cost a few microseconds each; the decode rate printed is the traced one, next to an untraced
single-process run. --pin as in pipeline.py. --json adds one line, last: the totals of each kind and the hop's
transit plus Python per hop (the ring's stages + 1 hops: gateway -> node 1 -> ... -> gateway).
"""

import argparse
import functools
import json
import os
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

TRACE_DIR = "DUSKPOOL_BENCH_TRACE_DIR"
FLUSH_S = 0.2  # each process writes its marks out this often


def install(out_dir: str) -> None:
    """Wrap the data path's functions in this process so that each call leaves a timestamped line."""
    from duskpool.cluster import gateway, node, transport, wire
    from duskpool.models.llama import Llama

    log, marks = open(Path(out_dir) / f"{os.getpid()}.txt", "a"), []

    def mark(tag: str) -> None:
        marks.append((time.monotonic_ns(), tag))  # no I/O here: a write would give up the GIL mid-step

    def flush() -> None:
        while True:
            time.sleep(FLUSH_S)
            taken = len(marks)
            log.write("".join(f"{t} {tag}\n" for t, tag in marks[:taken]))
            log.flush()
            del marks[:taken]
    threading.Thread(target=flush, daemon=True).start()

    def wrap(owner, name: str, before: str | None, after: str | None) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def wrapper(*args, **kwargs):
            if before:
                mark(before)
            result = inner(*args, **kwargs)
            if after:
                mark(after)
            return result
        setattr(owner, name, wrapper)

    def arrivals(owner, name: str) -> None:
        receive = getattr(owner, name)

        @functools.wraps(receive)
        def wrapper(self, request_iterator, context):
            def stamped():
                for request in request_iterator:
                    mark("arrived")
                    yield request
            return receive(self, stamped(), context)
        setattr(owner, name, wrapper)

    arrivals(node.NodeService, "Forward")
    arrivals(gateway.Sink, "Deliver")
    wrap(wire, "from_wire", None, "decoded")
    wrap(wire, "to_wire", "encode", None)
    wrap(transport.Pusher, "send", "send", None)
    wrap(Llama, "embed", "embed", None)
    wrap(Llama, "forward_span", "layers", "layers done")
    wrap(Llama, "forward_batch", "layers", "layers done")  # what a node's and the gateway's batchers call
    wrap(Llama, "head", "head", "head done")
    wrap(gateway.RemoteSession, "_forward", "step", "step done")


def stretches(trace_dir: Path, gateway_pid: int) -> tuple[list[str], list[list[float]], int]:
    """The stretches of the most common step timeline in order, each one's durations in us, and how many
    steps had that timeline."""
    events = []
    for file in trace_dir.glob("*.txt"):
        pid = int(file.stem)
        for line in file.read_text().splitlines():
            t, tag = line.split(" ", 1)
            events.append((int(t), pid, tag))
    events.sort()
    steps, current = [], None
    for t, pid, tag in events:
        if pid == gateway_pid and tag == "step":
            current = [(t, pid, tag)]
        elif current is not None:
            current.append((t, pid, tag))
            if pid == gateway_pid and tag == "step done":
                steps.append(current)
                current = None
    timelines = []
    for step in steps:
        roles: dict[int, str] = {gateway_pid: "gateway"}
        for _, pid, _ in step:
            roles.setdefault(pid, f"node {len(roles)}")
        timelines.append([(t, f"{roles[pid]}: {tag}") for t, pid, tag in step])
    signatures = [tuple(label for _, label in tl) for tl in timelines]
    common, count = Counter(signatures).most_common(1)[0]
    names = [f"{a} -> {b}" for a, b in zip(common, common[1:], strict=False)]
    durations: list[list[float]] = [[] for _ in names]
    for tl, signature in zip(timelines, signatures, strict=True):
        if signature == common:
            for i, ((t0, _), (t1, _)) in enumerate(zip(tl, tl[1:], strict=False)):
                durations[i].append((t1 - t0) / 1000)
    return names, durations, count


def kind(name: str) -> str:
    a, b = name.split(" -> ")
    if a.split(":")[0] != b.split(":")[0]:
        return "transit (gRPC, between processes)"
    if a.endswith(("layers", "head")):
        return "compute (layers, head)"
    return "Python around it (checks, wire, queues)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pin", action="store_true", help="give each process cores of its own (taskset)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    args = parser.parse_args()
    from pipeline import measure, pin, single_process

    try:
        prefixes = pin(args.stages, args.threads) if args.pin else None
    except ValueError as e:
        parser.error(str(e))
    from duskpool.cluster.gateway import Gateway
    from duskpool.cluster.swarm import LocalSwarm
    from duskpool.weights.catalog import bundled_model_path

    model = args.model or bundled_model_path()
    _, prompt, _, single_rate = single_process(model, args.threads, args.tokens)

    with tempfile.TemporaryDirectory() as work:
        work_dir, trace_dir = Path(work), Path(work) / "trace"
        trace_dir.mkdir()
        (work_dir / "sitecustomize.py").write_text(
            f"import os, sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            f"import pipeline_trace\npipeline_trace.install(os.environ[{TRACE_DIR!r}])\n")
        os.environ[TRACE_DIR] = str(trace_dir)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [work, os.environ.get("PYTHONPATH")]))
        with LocalSwarm(args.stages, threads=args.threads, prefixes=prefixes) as swarm:
            install(str(trace_dir))
            gateway = Gateway.start(model, swarm.addresses, identity=swarm.gateway_identity, routing="ring",
                                    even_split=True, progress=False)
            try:
                measure(gateway, prompt, 8)
                time.sleep(3 * FLUSH_S)  # the warm-up's marks are written out before they are dropped
                for file in trace_dir.glob("*.txt"):
                    file.write_text("")  # only the measured decode below
                _, rate = measure(gateway, prompt, args.tokens)
                time.sleep(3 * FLUSH_S)  # every process has written its marks
            finally:
                gateway.close()
        names, durations, steps = stretches(trace_dir, os.getpid())

    print(f"model {model.name}, {args.stages} stages, ring, {args.threads} threads per process, {os.cpu_count()} CPUs"
          f"{', each process pinned to its own' if args.pin else ''}")
    print(f"single process {1000 / single_rate:.2f} ms/token ({single_rate:.1f} tok/s, untraced); "
          f"ring {1000 / rate:.2f} ms/token ({rate:.1f} tok/s, traced)")
    print(f"median of each stretch over the {steps} steps with the usual timeline:")
    totals: dict[str, float] = defaultdict(float)
    for name, times in zip(names, durations, strict=True):
        median = statistics.median(times)
        totals[kind(name)] += median
        print(f"  {name:<48}{median:>9.0f} us")
    for category, total in totals.items():
        print(f"{category:<48}{total / 1000:>11.2f} ms")
    print(f"{'sum of the medians':<48}{sum(totals.values()) / 1000:>11.2f} ms")
    if args.json:
        hops = args.stages + 1
        transit, python = (sum(us for k, us in totals.items() if k.startswith(w)) for w in ("transit", "Python"))
        print(json.dumps({"model": model.name, "stages": args.stages, "threads": args.threads, "cpus": os.cpu_count(),
                          "pinned": args.pin, "single_tok_s": single_rate, "ring_tok_s": rate, "steps": steps,
                          "totals_us": totals, "hops": hops, "transit_us_per_hop": transit / hops,
                          "python_us_per_hop": python / hops, "hop_us": (transit + python) / hops}))


if __name__ == "__main__":
    main()
