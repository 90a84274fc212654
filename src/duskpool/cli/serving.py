"""The commands that run a model or lend a machine: run, serve, swarm, gateway, node; and their helpers."""

import argparse
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from duskpool.cli.pool import INSECURE_WARNING, gateway_security, home, state_dir


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
    """Resolve --backend (args.backend becomes the one picked) and give it its threads."""
    from duskpool.backends import backend, pick
    from duskpool.idle import performance_cores

    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    args.backend = pick(args.backend)
    backend(args.backend).set_threads(args.threads or min(performance_cores(), 8))  # efficiency cores slow a step


def _answer(engine, args: argparse.Namespace) -> int:
    """Stream the answer to stdout, then one line of timing on stderr."""
    from duskpool.engine.generate import GenerationStats

    stats, params = GenerationStats(), _generation_params(args)
    if args.raw or engine.tokenizer.chat_template is None:
        if args.system:
            raise ValueError("--system needs the chat template; a raw completion has none")
        if not args.raw:
            print("duskpool: this model has no chat template (a base model): completing the prompt as raw text",
                  file=sys.stderr)
        pieces = engine.generate(engine.tokenizer.encode(_read_prompt(args.prompt), add_special=True), params, stats)
    else:
        pieces = engine.chat(_messages(args), params, stats)
    for piece in pieces:
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


def key_check(args: argparse.Namespace):
    """What the HTTP API accepts as a key: --api-key-file / DUSKPOOL_API_KEY, and the keys `duskpool key create`
    stored in the pool's state; None when there are none (then it may serve on loopback only)."""
    from duskpool.api.server import key_checker
    from duskpool.security import PoolState

    from_files = [line.strip() for path in args.api_key_file for line in Path(path).read_text().splitlines()
                  if line.strip()]
    given = key_checker(from_files + ([os.environ["DUSKPOOL_API_KEY"]] if os.environ.get("DUSKPOOL_API_KEY") else []))
    pool = PoolState(state_dir(args))
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
    engine = LocalEngine.load(path, args.context, progress=True, backend_name=args.backend)
    return _answer(engine, args)


@contextmanager
def _sigterm_unwinds():
    """SIGTERM (a service manager's stop, `kill PID`) unwinds the block as Ctrl-C does, its `finally`s and `with`s
    run, then exits 143 (128 + SIGTERM), as the shell reports a process it ended."""

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one does not cut the unwinding short
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    gateway = Gateway.start(path, addresses, identity=identity, pool=pool, prefix=args.privacy_prefix,
                            suffix=args.privacy_suffix, routing=args.routing, context_length=args.context,
                            even_split=even_split, replicas=args.replicas, progress=True, backend_name=args.backend)
    print(_placement(gateway), file=sys.stderr)
    from duskpool.audit.published import privacy_line

    print(privacy_line(path.name, gateway.plan.prefix.stop), file=sys.stderr)
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
        check_key = key_check(args)
        check_bind(args.host, check_key is not None)  # before minutes of starting nodes, not after
    _set_threads(args)
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    print(f"duskpool: starting {args.nodes} local node(s)", file=sys.stderr)
    # stopped by SIGTERM, the gateway closes and the nodes are stopped (killed, the nodes see it: exit_with)
    with _sigterm_unwinds(), LocalSwarm(args.nodes, threads=args.threads, insecure=args.insecure,
                                        backend=args.backend) as swarm:
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
    identity, pool = gateway_security(args)
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

    check_key = key_check(args)
    check_bind(args.host, check_key is not None)
    _set_threads(args)
    if not args.node:
        path = resolve_model(args.model)
        print(f"duskpool: loading {path}", file=sys.stderr)
        return _serve(LocalEngine.load(path, args.context, progress=True, backend_name=args.backend), args, check_key)
    identity, pool = gateway_security(args)
    with _join_server(pool, args.join_port):
        gateway = _start_gateway(args, args.node, identity, pool)
        try:
            return _serve(gateway, args, check_key)
        finally:
            gateway.close()


def cmd_node(args: argparse.Namespace) -> int:
    _check_port(args.host, args.port)  # before seconds of imports, and before a join, which spends the token
    models = _model_dirs(args.models)
    from duskpool.cluster.node import serve
    from duskpool.weights.store import default_cache_dir

    if args.exit_with is not None:
        from duskpool.cluster.swarm import exit_with

        exit_with(args.exit_with)
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
        serve(args.host, args.port, cache_dir, identity, limit, announce=not args.no_announce, policy=policy,
              backend_name=args.backend, identity_dir=_identity_dir(args), models=models)
    except KeyboardInterrupt:
        pass
    except OSError as e:  # such as the port taken, or an address not this machine's
        raise RuntimeError(f"the node cannot start: {e}") from None
    return 0


def _check_port(host: str, port: int) -> None:
    """Fail now, saying why, if host:port is taken. gRPC's servers share a port (SO_REUSEPORT), so a second node
    there would start anyway and quietly get some of the first one's connections."""
    import errno
    import socket

    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a socket left in TIME_WAIT is no holder
            probe.bind(address)
    except OSError as e:
        hint = "; is a node already running there? (--port 0 picks a free port)" if e.errno == errno.EADDRINUSE else ""
        raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None


def _node_identity(args: argparse.Namespace):
    """The node's certificate: joined now with --join, or saved by an earlier join; None with --insecure."""
    import platform

    from duskpool.security import join, load_identity, save_identity, split_join_arg

    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
        return None
    directory = _identity_dir(args)
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


def _model_dirs(dirs: list[str]) -> tuple[Path, ...]:
    """--models DIR ...: each must be a directory (a typo would otherwise stream every span silently)."""
    paths = tuple(Path(d).expanduser() for d in dirs)
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"--models {path}: no such directory")
    return paths


def _identity_dir(args: argparse.Namespace) -> Path:
    """Where the node's certificate and key are kept (a renewed certificate replaces them there)."""
    return Path(args.identity).expanduser() if args.identity else home() / "node"


def _join_when_up(join, gateway: str, patience_s: float = 120.0):
    """Join, retrying while the gateway's join server is not up yet (nodes and gateway start in any order)."""
    from duskpool.security.join import JoinServerUnreachable

    deadline = time.monotonic() + patience_s
    while True:
        try:  # any other JoinError: the server is there but refused, and retrying will not help
            return join()
        except JoinServerUnreachable:
            if time.monotonic() > deadline:
                raise
            print(f"duskpool: waiting for the gateway's join server at {gateway}...", file=sys.stderr)
            time.sleep(2)


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1] if value and value[-1] in units else ""
    try:
        return int(float(value.removesuffix(unit)) * units[unit])
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (examples: 8G, 512M)") from None
