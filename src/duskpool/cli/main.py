"""The `duskpool` command."""

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

EXIT_BAD_INPUT = 2
DEFAULT_NODE_PORT = 7471
DEFAULT_JOIN_PORT = 7472
INSECURE_WARNING = ("duskpool: WARNING: --insecure: links between machines are plaintext and unauthenticated; "
                    "anyone on the network can join this pool or read its activations. For debugging only.")


def _home() -> Path:
    """Where duskpool keeps its state: the pool's CA and members (gateway), the node's identity."""
    return Path(os.environ.get("DUSKPOOL_HOME") or Path.home() / ".duskpool").expanduser()


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir).expanduser() if getattr(args, "state_dir", None) else _home() / "pool"


def _add_state_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", default=None, metavar="DIR",
                        help="the pool's state: CA, members, tokens (default: $DUSKPOOL_HOME/pool, ~/.duskpool/pool)")


def _add_security_flags(parser: argparse.ArgumentParser) -> None:
    _add_state_dir_flag(parser)
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext, unauthenticated links between machines (debugging only)")


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 means greedy, always the most likely token (default: 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1, off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this fraction of the top one (default: 0, off)")
    g.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="penalize tokens already in the context, e.g. 1.1 (default: 1, off)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the answer contains TEXT (repeatable)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None,
                        help="a GGUF file, or a name `duskpool models` lists, such as llama3.2:3b from Ollama "
                             "(default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--context", type=int, default=None,
                        help="context length of a session in tokens (default: 4096 or the model's, if less)")


def _add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="compute threads (default: the number of CPU cores, at most 8)")


def _add_route_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--privacy-prefix", type=int, default=1, metavar="K",
                        help="first K layers run on this machine, so nodes never see embeddings (default: 1)")
    parser.add_argument("--privacy-suffix", type=int, default=1, metavar="K",
                        help="last K layers run on this machine, next to the head (default: 1)")
    parser.add_argument("--routing", choices=["ring", "star"], default="ring",
                        help="ring: each node pushes to the next (default); star: every hop via the gateway")
    parser.add_argument("--replicas", type=int, default=0, metavar="R",
                        help="R more copies of each span where memory allows, to fail over to when a node dies "
                             "(default: 0: a span whose node dies is loaded onto another)")


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    from duskpool.api import DEFAULT_PORT  # the package alone: FastAPI's import would slow --help

    g = parser.add_argument_group("HTTP API (OpenAI and Ollama compatible, dashboard at /)")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default: 127.0.0.1); any other needs an API key")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default: {DEFAULT_PORT})")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="a key clients must send as 'Authorization: Bearer KEY' (repeatable; "
                        "or set DUSKPOOL_API_KEY)")
    g.add_argument("--max-sessions", type=int, default=4, help="generations served at once (default: 4)")
    g.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for a slot; more get 429 (default: 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duskpool",
        description="Pool idle machines into one private LLM inference service. "
                    "Runs GGUF models (what Ollama and LM Studio store) split by layers across machines.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run", help="answer one prompt with a model in this process",
        description="Answer PROMPT with the model's chat template applied, streaming the answer to stdout. "
                    "Diagnostics go to stderr.")
    run.add_argument("prompt", help="the user message; '-' reads it from stdin")
    run.add_argument("--system", default=None, help="a system message to put before the prompt")
    _add_model_flags(run)
    _add_threads_flag(run)
    _add_generation_flags(run)
    run.set_defaults(handler=cmd_run)

    swarm = commands.add_parser(
        "swarm", help="start N local node processes and a gateway; answer a prompt or serve",
        description="Start N `duskpool node` processes on 127.0.0.1, split the model across them, and print "
                    "the placement. With PROMPT, stream the answer and exit; without, keep the pool up until "
                    "Ctrl-C.")
    swarm.add_argument("prompt", nargs="?", default=None, help="the user message; '-' reads it from stdin")
    swarm.add_argument("--nodes", "-n", type=int, default=3, help="node processes to start (default: 3)")
    swarm.add_argument("--system", default=None, help="a system message to put before the prompt")
    _add_state_dir_flag(swarm)  # where API keys from `duskpool key create` are
    swarm.add_argument("--insecure", action="store_true",
                       help="plaintext links between the local nodes (debugging only; by default the swarm makes "
                            "a throwaway pool and uses mutual TLS like any pool)")
    _add_model_flags(swarm)
    _add_route_flags(swarm)
    _add_threads_flag(swarm)
    _add_generation_flags(swarm)
    _add_serve_flags(swarm)
    swarm.set_defaults(handler=cmd_swarm)

    serve = commands.add_parser(
        "serve", help="serve the OpenAI and Ollama APIs and the dashboard",
        description="Serve a model over HTTP: OpenAI's /v1/chat/completions, /v1/completions, /v1/models; "
                    "Ollama's /api/chat, /api/generate, /api/tags, /api/show, /api/ps; a live dashboard at /; "
                    "Prometheus metrics at /metrics. Without --node the model runs in this process.")
    serve.add_argument("--node", action="append", default=[], metavar="HOST:PORT",
                       help="a node to spread the model over (repeatable); without any, run it here")
    serve.add_argument("--join-port", type=int, default=DEFAULT_JOIN_PORT,
                       help=f"with --node: port where nodes join with a token (default: {DEFAULT_JOIN_PORT})")
    _add_security_flags(serve)
    _add_model_flags(serve)
    _add_route_flags(serve)
    _add_threads_flag(serve)
    _add_serve_flags(serve)
    serve.set_defaults(handler=cmd_serve)

    gateway = commands.add_parser(
        "gateway", help="drive a model over nodes on the network",
        description="Plan the model over the given nodes, stream them their layers, then answer PROMPT "
                    "(or hold the pool until Ctrl-C). The prompt and answer never leave this machine.")
    gateway.add_argument("prompt", nargs="?", default=None, help="the user message; '-' reads it from stdin")
    gateway.add_argument("--node", action="append", default=[], metavar="HOST:PORT",
                         help="a node to use (repeatable); without any, nodes are found by mDNS on the LAN")
    gateway.add_argument("--system", default=None, help="a system message to put before the prompt")
    gateway.add_argument("--join-port", type=int, default=DEFAULT_JOIN_PORT,
                         help=f"port where nodes join with a token (default: {DEFAULT_JOIN_PORT})")
    _add_security_flags(gateway)
    _add_model_flags(gateway)
    _add_route_flags(gateway)
    _add_threads_flag(gateway)
    _add_generation_flags(gateway)
    gateway.set_defaults(handler=cmd_gateway)

    node = commands.add_parser(
        "node", help="lend this machine to a pool: serve spans of layers to a gateway",
        description="Serve spans of model layers over gRPC. The node needs no model file: the gateway streams "
                    "it the weights of its span, which are cached by content under --cache-dir.")
    node.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    node.add_argument("--port", type=int, default=DEFAULT_NODE_PORT,
                      help=f"port to listen on; 0 picks a free one (default: {DEFAULT_NODE_PORT})")
    node.add_argument("--cache-dir", default=None, help="where received weights are kept "
                      "(default: ~/.cache/duskpool/node)")
    node.add_argument("--memory-limit", default=None, metavar="SIZE",
                      help="most memory to lend, e.g. 8G or 512M (default: what is free)")
    node.add_argument("--no-announce", action="store_true", help="do not announce this node by mDNS")
    node.add_argument("--join", default=None, metavar="TOKEN@HOST:PORT",
                      help="join the pool of the gateway at HOST:PORT with a token from its `duskpool token`")
    node.add_argument("--identity", default=None, metavar="DIR",
                      help="this node's certificate and key (default: $DUSKPOOL_HOME/node, ~/.duskpool/node)")
    node.add_argument("--insecure", action="store_true",
                      help="plaintext, unauthenticated links (debugging only)")
    lend = node.add_argument_group("lending (when this machine serves the pool)")
    lend.add_argument("--lend", choices=["idle", "always", "never"], default="idle",
                      help="idle: only while the owner is away (default); always: a dedicated machine; never")
    lend.add_argument("--idle-after", default="5m", metavar="DURATION",
                      help="the owner counts as away after this long without input (default: 5m)")
    lend.add_argument("--require-ac", action="store_true", help="lend only on mains power")
    lend.add_argument("--min-battery", type=float, default=None, metavar="PERCENT",
                      help="on battery, lend only above this charge")
    lend.add_argument("--max-temp", type=float, default=95.0, metavar="CELSIUS",
                      help="stop lending above this CPU temperature (default: 95)")
    lend.add_argument("--schedule", action="append", default=[], metavar="WINDOW",
                      help="lend only inside this window, e.g. 'mon-fri 22:00-07:00' (repeatable)")
    lend.add_argument("--drain-timeout", default="2m", metavar="DURATION",
                      help="when the owner returns, finish requests in flight for at most this long, then hand "
                           "them to other nodes (default: 2m)")
    _add_threads_flag(node)
    node.set_defaults(handler=cmd_node)

    init = commands.add_parser(
        "init", help="create this gateway's pool: its certificate authority and member list",
        description="Create the pool's certificate authority and state (SQLite) in --state-dir. Nodes join "
                    "with tokens from `duskpool token`; every link in the pool is then mutual TLS.")
    _add_state_dir_flag(init)
    init.set_defaults(handler=cmd_init)

    token = commands.add_parser(
        "token", help="print a single-use join token for one node",
        description="Print a short-lived, single-use token. On the machine to add: "
                    "duskpool node --join TOKEN@THIS_HOST:7472")
    token.add_argument("--ttl", default="10m", help="how long the token is valid, e.g. 10m, 1h (default: 10m)")
    _add_state_dir_flag(token)
    token.set_defaults(handler=cmd_token)

    nodes = commands.add_parser("nodes", help="list the pool's members, or revoke one",
                                description="List the members of this gateway's pool; `nodes revoke ID` ends one: "
                                            "its connections are refused from then on.")
    nodes.add_argument("action", nargs="?", choices=["list", "revoke"], default="list")
    nodes.add_argument("member", nargs="?", type=int, default=None, metavar="ID", help="the member to revoke")
    _add_state_dir_flag(nodes)
    nodes.set_defaults(handler=cmd_nodes)

    service = commands.add_parser(
        "service", help="install or remove the node as a background service (launchd on macOS, systemd on Linux)",
        description="install: write and load a launchd agent (macOS) or systemd user unit (Linux) that runs "
                    "`duskpool node` with the flags given after --, e.g. "
                    "`duskpool service install -- --lend idle --require-ac`. uninstall: stop and remove it.")
    service.add_argument("action", choices=["install", "uninstall"])
    service.add_argument("--dry-run", action="store_true", help="write the file, run nothing")
    service.set_defaults(handler=cmd_service)

    key = commands.add_parser("key", help="make an API key for serving beyond this machine",
                              description="`duskpool key create` prints a new key for the HTTP API (shown once; "
                                          "only its hash is kept in the pool's state). Clients send it as "
                                          "'Authorization: Bearer KEY'.")
    key.add_argument("action", choices=["create"])
    _add_state_dir_flag(key)
    key.set_defaults(handler=cmd_key)

    models = commands.add_parser(
        "models", help="list the GGUF models already on this machine",
        description="List the GGUF models of Ollama (~/.ollama/models), LM Studio (~/.lmstudio/models, "
                    "~/.cache/lm-studio/models), the Hugging Face cache and the bundled default. --model "
                    "accepts the names in the first column.")
    models.set_defaults(handler=cmd_models)

    plan = commands.add_parser(
        "plan", help="show how a model would be split over nodes, and why",
        description="Ask each node for its memory and speed, then print the placement the gateway would use.")
    plan.add_argument("--node", action="append", default=[], metavar="HOST:PORT", help="a node (repeatable)")
    plan.add_argument("--explain", action="store_true", help="print the full table and the reasons (default)")
    _add_security_flags(plan)
    _add_model_flags(plan)
    _add_route_flags(plan)
    plan.set_defaults(handler=cmd_plan)
    return parser


def _generation_params(args: argparse.Namespace):
    from duskpool.engine.generate import GenerationParams
    from duskpool.engine.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed)
    return GenerationParams(max_tokens=args.max_tokens, stop=args.stop, sampling=sampling)


def _read_prompt(prompt: str) -> str:
    return sys.stdin.read() if prompt == "-" else prompt


def _messages(args: argparse.Namespace) -> list[dict[str, str]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": _read_prompt(args.prompt)}]


def _set_threads(args: argparse.Namespace) -> None:
    from duskpool.engine.runner import set_threads

    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    set_threads(args.threads or min(os.cpu_count() or 1, 8))


def _answer(engine, args: argparse.Namespace) -> int:
    """Stream the answer to stdout, then one line of timing on stderr."""
    from duskpool.engine.generate import GenerationStats

    stats = GenerationStats()
    for piece in engine.chat(_messages(args), _generation_params(args), stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    rate = stats.generated_tokens / stats.decode_seconds if stats.decode_seconds else 0.0
    print(f"duskpool: {stats.prompt_tokens} prompt tokens in {stats.prefill_seconds:.2f} s, "
          f"{stats.generated_tokens} generated at {rate:.1f} tok/s ({stats.finish_reason})", file=sys.stderr)
    return 0


def _wait_for_ctrl_c(what: str) -> int:
    print(f"duskpool: {what}; press Ctrl-C to stop", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("duskpool: stopping", file=sys.stderr)
        return 0


def _key_check(args: argparse.Namespace):
    """What the HTTP API accepts as a key: --api-key / DUSKPOOL_API_KEY, and the keys `duskpool key create`
    stored in the pool's state; None when there are none (then it may serve on loopback only)."""
    from duskpool.api.server import key_checker
    from duskpool.security import PoolState

    given = key_checker(args.api_key + ([os.environ["DUSKPOOL_API_KEY"]] if os.environ.get("DUSKPOOL_API_KEY")
                                        else []))
    pool = PoolState(_state_dir(args))
    stored = pool.check_api_key if pool.exists and pool.has_api_keys() else None
    if given is None or stored is None:
        return given or stored
    return lambda key: given(key) | stored(key)  # both, always: no early exit to time


def _model_name(model: str | None, path: Path) -> str:
    """What the APIs call the model: the name it was asked by (`duskpool models` names), else the file's stem."""
    from duskpool.weights.catalog import BUNDLED_NAME

    if model is None:
        return BUNDLED_NAME
    return path.stem if Path(model).expanduser().exists() else model


def _serve(engine, args: argparse.Namespace, check_key) -> int:
    from duskpool.api.server import serve
    from duskpool.api.service import Service
    from duskpool.weights.catalog import resolve_model

    path = resolve_model(args.model)
    service = Service(engine, _model_name(args.model, path), path, max_active=args.max_sessions,
                      max_queue=args.max_queue)

    def ready(url: str) -> None:
        print(f"duskpool: serving {service.model_name} at {url}  (dashboard: {url}/, OpenAI: {url}/v1, "
              f"Ollama: {url}/api); Ctrl-C stops", file=sys.stderr, flush=True)

    try:
        serve(service, args.host, args.port, check_key, on_ready=ready)
    finally:
        service.close()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from duskpool.engine.runner import LocalEngine
    from duskpool.weights.catalog import resolve_model

    _generation_params(args)  # bad flags fail before the model loads
    _set_threads(args)
    path = resolve_model(args.model)
    print(f"duskpool: loading {path}", file=sys.stderr)
    engine = LocalEngine.load(path, args.context, progress=True)
    return _answer(engine, args)


def _pool(args: argparse.Namespace):
    """The gateway's pool state, which must exist (`duskpool init`)."""
    from duskpool.security import PoolState

    pool = PoolState(_state_dir(args))
    if not pool.exists:
        raise ValueError(f"no pool at {pool.state_dir}: run `duskpool init` first (or pass --insecure to debug "
                         "without TLS)")
    return pool


def _gateway_security(args: argparse.Namespace):
    """(identity, pool) of a gateway: its certificate and the pool's state, or (None, None) with --insecure."""
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
        return None, None
    pool = _pool(args)
    return pool.gateway_identity(), pool


@contextmanager
def _join_server(pool, port: int):
    """Where nodes join the pool with a token, while the block runs (nothing with --insecure)."""
    from duskpool.security import start_join_server

    if pool is None:
        yield
        return
    server, bound = start_join_server(pool, "0.0.0.0", port)
    print(f"duskpool: nodes join at port {bound} (`duskpool token` prints a token)", file=sys.stderr)
    try:
        yield
    finally:
        server.stop(grace=0)


def _start_gateway(args: argparse.Namespace, addresses: list[str], identity, pool, even_split: bool = False):
    from duskpool.cluster.gateway import Gateway
    from duskpool.weights.catalog import resolve_model

    path = resolve_model(args.model)
    print(f"duskpool: planning {path.name} over {len(addresses)} node(s)", file=sys.stderr)
    gateway = Gateway(path, addresses, identity=identity, pool=pool, prefix=args.privacy_prefix,
                      suffix=args.privacy_suffix,
                      routing=args.routing, context_length=args.context, even_split=even_split,
                      replicas=args.replicas, progress=True)
    print(_placement(gateway), file=sys.stderr)
    return gateway


def _placement(gateway) -> str:
    stages = ", ".join(f"{s.address} [{s.start}, {s.stop})" for s in gateway.route)
    p = gateway.plan
    return (f"duskpool: placement: gateway [{p.prefix.start}, {p.prefix.stop}) -> {stages} -> gateway "
            f"[{p.suffix.start}, {p.suffix.stop}) ({gateway.routing} routing)")


def cmd_swarm(args: argparse.Namespace) -> int:
    from duskpool.api.server import check_bind
    from duskpool.cluster.swarm import LocalSwarm

    check_key = None
    if args.prompt is not None:
        _generation_params(args)
    else:
        check_key = _key_check(args)
        check_bind(args.host, check_key is not None)  # before minutes of starting nodes, not after
    _set_threads(args)
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    print(f"duskpool: starting {args.nodes} local node(s)", file=sys.stderr)
    with LocalSwarm(args.nodes, threads=args.threads, insecure=args.insecure) as swarm:
        # local nodes share this machine's CPU, so the swarm splits evenly to show a real pipeline
        pool = swarm.pool.pool if swarm.pool is not None else None
        gateway = _start_gateway(args, swarm.addresses, swarm.gateway_identity, pool, even_split=True)
        try:
            if args.prompt is None:
                return _serve(gateway, args, check_key)
            return _answer(gateway, args)
        finally:
            gateway.close()


def cmd_gateway(args: argparse.Namespace) -> int:
    from duskpool.cluster.discovery import browse

    if args.prompt is not None:
        _generation_params(args)
    _set_threads(args)
    identity, pool = _gateway_security(args)
    with _join_server(pool, args.join_port):
        addresses = args.node
        if not addresses:
            print("duskpool: looking for nodes on the local network (mDNS); waiting until one joins or announces "
                  "itself (Ctrl-C stops)", file=sys.stderr)
            while not (addresses := browse(timeout=3.0)):
                pass
        gateway = _start_gateway(args, addresses, identity, pool)
        try:
            if args.prompt is None:
                return _wait_for_ctrl_c("gateway is up")
            return _answer(gateway, args)
        finally:
            gateway.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from duskpool.api.server import check_bind
    from duskpool.engine.runner import LocalEngine
    from duskpool.weights.catalog import resolve_model

    check_key = _key_check(args)
    check_bind(args.host, check_key is not None)
    _set_threads(args)
    if not args.node:
        path = resolve_model(args.model)
        print(f"duskpool: loading {path}", file=sys.stderr)
        return _serve(LocalEngine.load(path, args.context, progress=True), args, check_key)
    identity, pool = _gateway_security(args)
    with _join_server(pool, args.join_port):
        gateway = _start_gateway(args, args.node, identity, pool)
        try:
            return _serve(gateway, args, check_key)
        finally:
            gateway.close()


def cmd_node(args: argparse.Namespace) -> int:
    from duskpool.cluster.node import serve
    from duskpool.weights.store import default_cache_dir

    _set_threads(args)
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir() / "node"
    limit = _parse_size(args.memory_limit) if args.memory_limit else None
    from duskpool.idle import LendPolicy, parse_duration, parse_window

    policy = LendPolicy(lend=args.lend, idle_after_s=parse_duration(args.idle_after), require_ac=args.require_ac,
                        min_battery=args.min_battery, max_temp_c=args.max_temp,
                        windows=tuple(parse_window(w) for w in args.schedule),
                        drain_timeout_s=parse_duration(args.drain_timeout))
    identity = _node_identity(args)
    try:
        serve(args.host, args.port, cache_dir, identity, limit, announce=not args.no_announce, policy=policy)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from duskpool.idle.service import ServiceError, install, uninstall

    node_args = args.node_args
    build_parser().parse_args(["node", *node_args])  # bad node flags fail now, not in a log later
    try:
        if args.action == "install":
            install([sys.executable, "-m", "duskpool.cli.main", "node", *node_args], dry_run=args.dry_run)
        else:
            uninstall(dry_run=args.dry_run)
    except ServiceError as e:
        raise RuntimeError(str(e)) from None
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    from duskpool.security import PoolState

    pool = PoolState(_state_dir(args))
    if not pool.exists:
        pool.init()
        print(f"duskpool: created the pool's state in {pool.state_dir}", file=sys.stderr)
    print(pool.create_api_key())
    print("duskpool: shown once; clients send it as 'Authorization: Bearer KEY'", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from duskpool.weights.catalog import find_models, format_models

    print(format_models(find_models()))
    return 0


def _node_identity(args: argparse.Namespace):
    """The node's certificate: joined now with --join, or saved by an earlier join; None with --insecure."""
    import platform

    from duskpool.security import join, load_identity, save_identity, split_join_arg

    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
        return None
    directory = Path(args.identity).expanduser() if args.identity else _home() / "node"
    if args.join:
        token, gateway = split_join_arg(args.join)
        address = None if args.host in ("0.0.0.0", "::", "") else args.host
        identity = _join_when_up(lambda: join(token, gateway, platform.node() or "node", address), gateway)
        save_identity(identity, directory)
        print(f"duskpool: joined the pool at {gateway} as member {identity.member_id}; identity saved in "
              f"{directory}", file=sys.stderr)
        return identity
    try:
        return load_identity(directory)
    except (FileNotFoundError, ValueError, PermissionError) as e:
        raise ValueError(f"this node has no pool identity ({e}); join a pool with `duskpool node --join "
                         "TOKEN@GATEWAY:7472` (a token comes from `duskpool token` on the gateway), or use "
                         "--insecure to debug") from None


def _join_when_up(join, gateway: str, patience_s: float = 120.0):
    """Join, retrying while the gateway's join server is not up yet (nodes and gateway start in any order)."""
    from duskpool.security import CAMismatch, JoinError

    deadline = time.monotonic() + patience_s
    while True:
        try:
            return join()
        except CAMismatch:
            raise
        except JoinError as e:
            if time.monotonic() > deadline:
                raise
            if "could not reach" not in str(e):  # the server is there but refused: retrying will not help
                raise
            print(f"duskpool: waiting for the gateway's join server at {gateway}...", file=sys.stderr)
            time.sleep(2)


def cmd_init(args: argparse.Namespace) -> int:
    from duskpool.security import PoolState

    pool = PoolState(_state_dir(args))
    try:
        pool.init()
    except FileExistsError:
        raise ValueError(f"a pool already exists at {pool.state_dir}") from None
    print(f"duskpool: created a pool in {pool.state_dir}")
    print(f"CA fingerprint (sha256): {pool.ca_fingerprint}")
    print("next: `duskpool token` on this machine, then `duskpool node --join TOKEN@THIS_HOST:"
          f"{DEFAULT_JOIN_PORT}` on each machine to add")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from duskpool.idle.policy import parse_duration

    ttl = parse_duration(args.ttl)
    token = _pool(args).issue_token(ttl)
    print(token.text)
    print(f"duskpool: single use, valid {args.ttl}; on the machine to add: duskpool node --join "
          f"{token.text[:12]}…@THIS_HOST:{DEFAULT_JOIN_PORT}", file=sys.stderr)
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    pool = _pool(args)
    if args.action == "revoke":
        if args.member is None:
            raise ValueError("say which member to revoke: duskpool nodes revoke ID (IDs from `duskpool nodes`)")
        try:
            member = pool.revoke(args.member)
        except KeyError:
            raise ValueError(f"no member {args.member} in this pool") from None
        print(f"duskpool: revoked member {member.id} ({member.name}); a running gateway tells its nodes "
              "within seconds")
        return 0
    rows = [("ID", "NAME", "ROLE", "ADDRESS", "JOINED", "STATE")]
    for m in pool.members():
        joined = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.joined_at))
        rows.append((str(m.id), m.name, m.role, m.address or "-", joined, "revoked" if m.revoked else "member"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from duskpool.cluster import planner
    from duskpool.cluster.gateway import GATEWAY_PROFILE, NodeClient, model_profile, node_profile
    from duskpool.engine.runner import DEFAULT_CONTEXT
    from duskpool.models import LlamaConfig
    from duskpool.weights.catalog import resolve_model
    from duskpool.weights.gguf import GGUFFile

    if not args.node:
        raise ValueError("give the nodes to plan over with --node HOST:PORT")
    file = GGUFFile(resolve_model(args.model))
    profile = model_profile(file, LlamaConfig.from_gguf(file.metadata))
    identity, _ = _gateway_security(args)
    nodes = [node_profile(NodeClient(a, identity), profile.layer_bytes) for a in args.node]
    config = planner.PlanConfig(context=args.context or DEFAULT_CONTEXT, privacy_prefix=args.privacy_prefix,
                                privacy_suffix=args.privacy_suffix)
    placement = planner.with_replicas(planner.plan(profile, GATEWAY_PROFILE, nodes, config), profile, nodes,
                                      args.replicas, config)
    print(planner.explain(placement, profile, GATEWAY_PROFILE, nodes, config))
    return 0


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1] if value and value[-1] in units else ""
    try:
        return int(float(value.removesuffix(unit)) * units[unit])
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (examples: 8G, 512M)") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    # `service install -- NODE FLAGS`: what follows -- is for the node the service will run
    after = argv.index("--") if argv[:1] == ["service"] and "--" in argv else len(argv)
    args = parser.parse_args(argv[:after])
    args.node_args = argv[after + 1:]
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    from duskpool.security import JoinError, JoinRefused
    from duskpool.weights.gguf import ModelFileError

    try:
        return args.handler(args)
    except (ModelFileError, ValueError, RuntimeError, JoinError, JoinRefused) as e:  # bad input, failed pool
        print(f"duskpool: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\nduskpool: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
