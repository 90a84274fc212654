"""Does `duskpool simulate` agree with a real pool? One small configuration run both ways, printed side by side.

    .venv/bin/python benchmarks/simulator_validation.py [--nodes 3] [--requests 6] [--prompt 48] [--tokens 48]
                                                        [--netns DELAY_MS]

Real: local swarms as `duskpool swarm` starts them (`duskpool node` processes on loopback, the bundled model split
evenly, privacy prefix 2 and suffix 1; plaintext links) serving a fixed trace: --requests requests one after another,
each a prompt of --prompt token ids and --tokens greedy tokens. Simulated: the same model's profile, the same
placement decision (planner.first_plan with the swarm's even split), the same trace.

Calibration, from measurements only: the link is loopback with the real nodes' median gRPC round trip and the head
takes its measured time; a layer's time starts from what a node measures after loading its span (SpanModel.ms_per_layer,
taken here between requests: the nodes' own figures are measured while the others load, and swing 3x on a loaded
machine); then two figures the simulator's model has, a layer's time and a fixed cost per forward (a process waking
after its peers ran, Python, decoding the hidden state), are fitted on a 1-node and a 2-node swarm. The --nodes swarm
(3) is predicted, not fitted. The three swarms run side by side and take requests in turn, so that whatever else loads
the machine weighs on calibration and validation alike. Prints both placements and per-token latencies.
"""

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.cluster.netns

from tests.cluster.netns import Hosts, unavailable_reason  # noqa: E402

from duskpool import backends
from duskpool.cluster import planner
from duskpool.cluster.gateway import Gateway
from duskpool.cluster.membership import model_profile
from duskpool.cluster.swarm import LocalSwarm
from duskpool.idle.policy import LendPolicy
from duskpool.simulate.fleet import HOUR, Day, Link, Machine
from duskpool.simulate.world import Options, Request, SimNode, World
from duskpool.weights.catalog import bundled_model_path
from duskpool.weights.gguf import GGUFFile

PREFIX, SUFFIX = 2, 1  # the CLI's defaults


def start_pool(stack: ExitStack, model: Path, n_nodes: int, hosts: Hosts | None = None,
               indices: list[int] = ()) -> Gateway:
    """A swarm as `duskpool swarm` starts it (plaintext here: TLS is not what is measured), closed with `stack`;
    with `hosts`, node i runs in network namespace indices[i]."""
    where = {} if hosts is None else {"hosts": [hosts.address(i) for i in indices],
                                      "prefixes": [hosts.exec_prefix(i) for i in indices]}
    swarm = stack.enter_context(LocalSwarm(n_nodes, insecure=True, **where))
    gateway = Gateway.start(model, swarm.addresses, identity=None, prefix=PREFIX, suffix=SUFFIX, even_split=True,
                            progress=False)
    stack.callback(gateway.close)
    return gateway


def per_token_s(gateway: Gateway, prompt: list[int], tokens: int) -> list[float]:
    """One greedy request: the seconds of each decode step after the first token."""
    session = gateway.open_session(len(prompt) + tokens + 1)
    try:
        token = int(torch.argmax(session.forward(prompt, 0)))
        steps = []
        for i in range(tokens - 1):
            started = time.perf_counter()
            token = int(torch.argmax(session.forward([token], len(prompt) + i)))
            steps.append(time.perf_counter() - started)
        return steps
    finally:
        session.close()


def describe(gateway: Gateway) -> dict:
    """Placement, the nodes' own figures, the gRPC round trip and the head's time."""
    rtts, head = [], []
    for s in gateway.route:
        for _ in range(20):
            started = time.perf_counter()
            gateway.node_info(s.address)
            rtts.append((time.perf_counter() - started) * 1000)
    hidden = gateway.suffix_model.hidden_from_bytes(bytes(4 * gateway.spec.dim), 1, "float32")
    for _ in range(20):
        started = time.perf_counter()
        gateway.suffix_model.head(hidden)
        head.append((time.perf_counter() - started) * 1000)
    infos = {s.node_id: gateway.node_info(s.address) for s in gateway.route}
    return {"placement": [(s.node_id, s.start, s.stop) for s in gateway.route],
            "ms_per_layer": {k: v.ms_per_layer for k, v in infos.items()}, "rtt_ms": statistics.median(rtts),
            "head_ms": statistics.median(head)}


def simulated_run(model: Path, real: dict, requests: int, prompt: int, tokens: int, ms_per_layer: float,
                  overhead_ms: float) -> dict:
    """The same configuration in the simulator: every machine computes a layer in `ms_per_layer` and pays
    `overhead_ms` per forward; links are loopback with the real swarm's gRPC round trip; the head takes its time."""
    profile = model_profile(backends.describe_model(GGUFFile(model)))
    loopback = Link("loopback", real["rtt_ms"], 0.0, 1e9)
    # the planner's speed model inverted: matmul_bytes_per_ms = layer bytes / ms_per_layer; the CPU backend streams
    # 60% of its bandwidth, so this is the bandwidth that gives it; FLOPs high enough not to bind
    bandwidth_gbs = profile.layer_bytes / ms_per_layer / 1e6 / 0.6
    box = Machine("this machine's CPU", 1e3, bandwidth_gbs, 1e3, "cpu", "server", 0.0, 1.0)
    always = Day((), ((0.0, 24 * HOUR),), True)
    nodes = [SimNode(node_id, box, loopback, LendPolicy(lend="always"), [always], overhead_ms=overhead_ms)
             for node_id, _, _ in real["placement"]]
    gateway = SimNode("gateway", box, loopback, LendPolicy(lend="always"), overhead_ms=overhead_ms,
                      head_ms=real["head_ms"])
    # one request after another, each long after the one before has finished
    trace = [Request(10.0 + 60.0 * i, prompt, tokens) for i in range(requests)]
    options = Options(config=planner.PlanConfig(privacy_prefix=PREFIX, privacy_suffix=SUFFIX), even=True)
    world = World(profile, 1.0, gateway, nodes, trace, 60.0 * requests + 60.0, seed=0, options=options)
    world.run()
    return {"placement": [(node_id, span[0], span[1]) for span, node_id in world.route],
            "per_token_p50_s": world.token_latency.quantile(0.5), "completed": world.completed}


def file_layers(model: Path) -> int:
    return backends.describe_model(GGUFFile(model)).n_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, help="the swarm predicted (1- and 2-node swarms calibrate)")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--prompt", type=int, default=48, help="prompt tokens per request")
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per request")
    parser.add_argument("--netns", type=float, default=None, metavar="DELAY_MS",
                        help="run every node in a network namespace whose link adds DELAY_MS (netem; where the kernel "
                             "has none, a rate limit alone: tbf) at 1 Gbit/s; needs root and iproute2")
    args = parser.parse_args()
    if args.nodes < 3:
        raise SystemExit("--nodes must be at least 3: the 1- and 2-node swarms are the calibration")
    model = bundled_model_path()
    prompt = list(range(100, 100 + args.prompt))  # fixed token ids: the trace, not the text, is what is compared
    sizes = (1, 2, args.nodes)
    where = "on loopback" if args.netns is None else "in network namespaces on a bridge"
    print(f"simulator_validation: swarms of {sizes} nodes {where}, {model.name}, {args.requests} requests of "
          f"{args.prompt} + {args.tokens} tokens on each, one at a time, alternating", file=sys.stderr, flush=True)
    file = GGUFFile(model)
    span = backends.load_span(file, range(PREFIX, file_layers(model) - SUFFIX), embed=False, head=False)
    steps: dict[int, list[float]] = {k: [] for k in sizes}
    layer_ms = []
    with ExitStack() as stack:
        hosts, first = None, 0
        if args.netns is not None:
            if (why := unavailable_reason()) is not None:
                raise SystemExit(f"--netns: {why}")
            hosts = stack.enter_context(Hosts(sum(sizes), delay_ms=args.netns))
            print(f"simulator_validation: links: {hosts.link}", file=sys.stderr, flush=True)
        pools = {}
        for k in sizes:
            pools[k] = start_pool(stack, model, k, hosts, list(range(first, first + k)))
            first += k
        for gateway in pools.values():
            per_token_s(gateway, prompt, args.tokens)  # warm every route up
        # alternate, so that calibration and validation share whatever else loads this machine
        for _ in range(args.requests):
            for k, gateway in pools.items():
                steps[k] += per_token_s(gateway, prompt, args.tokens)
            layer_ms.append(span.ms_per_layer())  # what a node measures after loading its span
        info = {k: describe(gateway) for k, gateway in pools.items()}
    real = {k: statistics.median(v) for k, v in steps.items()}
    m0 = statistics.median(layer_ms)

    def sim(k: int, ms_per_layer: float, overhead: float) -> float:
        return simulated_run(model, info[k], args.requests, args.prompt, args.tokens, ms_per_layer,
                             overhead)["per_token_p50_s"]

    # what the simulator without per-forward overhead misses, on 1 and 2 nodes: (layers) x (a layer's error) +
    # (forwards: gateway, k nodes, gateway) x (overhead per forward); two swarms, two unknowns
    r1, r2 = real[1] - sim(1, m0, 0.0), real[2] - sim(2, m0, 0.0)
    layers = file_layers(model)  # the gateway's 3 layers count too: one machine model for all
    overhead = max(0.0, r2 - r1)
    ms_per_layer = m0 + (r1 - 3 * overhead) * 1000 / layers
    placement = simulated_run(model, info[args.nodes], args.requests, args.prompt, args.tokens, ms_per_layer,
                              overhead * 1000)["placement"]
    predicted = sim(args.nodes, ms_per_layer, overhead * 1000)
    print(f"calibration: a layer {ms_per_layer:.3f} ms (measured between requests: {m0:.3f}; the nodes' own Info, "
          f"taken while the others loaded: " + ", ".join(f"{v:.3f}" for v in info[args.nodes]["ms_per_layer"].values())
          + f"), {overhead * 1000:.2f} ms per forward beyond its layers, fitted on the 1- and 2-node swarms "
          f"({real[1] * 1000:.2f} and {real[2] * 1000:.2f} ms/token); head {info[1]['head_ms']:.2f} ms; gRPC round "
          f"trip {info[args.nodes]['rtt_ms']:.2f} ms")
    same = "same" if placement == info[args.nodes]["placement"] else "DIFFERENT"
    print(f"placement  real: {info[args.nodes]['placement']}")
    print(f"placement   sim: {placement}  ({same})")
    print(f"per token  real: p50 {real[args.nodes] * 1000:.2f} ms over {len(steps[args.nodes])} steps")
    print(f"per token   sim: p50 {predicted * 1000:.2f} ms ({predicted / real[args.nodes] - 1:+.1%} vs real)")


if __name__ == "__main__":
    main()
