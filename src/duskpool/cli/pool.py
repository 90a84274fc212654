"""Commands on the pool and this machine: init, token, nodes, key, service, models, plan, audit, simulate; and what
the serving commands share with them: where the pool's state is, and the gateway's identity in it."""

import argparse
import sys
import time
from pathlib import Path

DEFAULT_JOIN_PORT = 7472
INSECURE_WARNING = ("duskpool: WARNING: --insecure: links between machines are plaintext and unauthenticated; "
                    "anyone on the network can join this pool or read its activations. For debugging only.")


def home() -> Path:
    """Where duskpool keeps its state: the pool's CA and members (gateway), the node's identity."""
    from duskpool import paths

    return paths.state_dir()


def state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir).expanduser() if getattr(args, "state_dir", None) else home() / "pool"


def _pool(args: argparse.Namespace):
    """The gateway's pool state, which must exist (`duskpool init`)."""
    from duskpool.security import PoolState

    pool = PoolState(state_dir(args))
    if not pool.exists:
        raise ValueError(f"no pool at {pool.state_dir}: run `duskpool init` first (or pass --insecure to debug "
                         "without TLS)")
    return pool


def gateway_security(args: argparse.Namespace):
    """(identity, pool) of a gateway: its certificate and the pool's state, or (None, None) with --insecure."""
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
        return None, None
    pool = _pool(args)
    return pool.gateway_identity(), pool


def cmd_init(args: argparse.Namespace) -> int:
    from duskpool.security import PoolState

    pool = PoolState(state_dir(args))
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


def cmd_key(args: argparse.Namespace) -> int:
    from duskpool.security import PoolState

    pool = PoolState(state_dir(args))
    if not pool.exists:
        pool.init()
        print(f"duskpool: created the pool's state in {pool.state_dir}", file=sys.stderr)
    print(pool.create_api_key())
    print("duskpool: shown once; clients send it as 'Authorization: Bearer KEY'", file=sys.stderr)
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from duskpool.cli.parser import build_parser
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


def cmd_models(args: argparse.Namespace) -> int:
    from duskpool.weights.catalog import find_models, format_models

    print(format_models(find_models()))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses

    from duskpool.backends import backend, describe_model, pick
    from duskpool.cluster import planner
    from duskpool.cluster.membership import GATEWAY_PROFILE, NodeClient, model_profile, node_profile
    from duskpool.engine.runner import DEFAULT_CONTEXT
    from duskpool.weights.catalog import resolve_model
    from duskpool.weights.folder import open_model

    if not args.node:
        raise ValueError("give the nodes to plan over with --node HOST:PORT")
    file = open_model(resolve_model(args.model))
    profile = model_profile(describe_model(file))
    identity, _ = gateway_security(args)
    nodes = [node_profile(NodeClient(a, identity), profile.layer_bytes) for a in args.node]
    config = planner.PlanConfig(context=args.context or DEFAULT_CONTEXT, privacy_prefix=args.privacy_prefix,
                                privacy_suffix=args.privacy_suffix)
    here = pick("auto")  # what a gateway started here computes its own layers with
    gateway = dataclasses.replace(GATEWAY_PROFILE, backend=f"{here} ({backend(here).device()})")
    placement = planner.with_replicas(planner.plan(profile, gateway, nodes, config), profile, nodes,
                                      args.replicas, config)
    print(planner.explain(placement, profile, gateway, nodes, config))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import json

    from duskpool.audit import DEFAULT_MAX_PREFIX, DEFAULT_MAX_SUFFIX, run_audit
    from duskpool.weights.catalog import resolve_model

    prefix = DEFAULT_MAX_PREFIX if args.max_prefix is None else args.max_prefix
    suffix = DEFAULT_MAX_SUFFIX if args.max_suffix is None else args.max_suffix
    if min(prefix, suffix) < 0:
        raise ValueError("--max-prefix and --max-suffix must be >= 0")
    started = time.monotonic()
    report = run_audit(resolve_model(args.model), prefix, suffix,
                       progress=lambda step: print(f"duskpool audit: {time.monotonic() - started:4.0f} s: {step}",
                                                   file=sys.stderr, flush=True))
    if args.plot:
        print(f"duskpool audit: plot written to {report.plot(args.plot)}", file=sys.stderr)
    print(json.dumps(report.to_dict()) if args.json else report.table())
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import json

    from duskpool.simulate import Config, simulate
    from duskpool.simulate.report import plot

    config = Config(nodes=args.nodes, hours=args.hours, shape=args.model_shape, seed=args.seed,
                    start_hour=args.start_hour, requests_per_hour=args.requests_per_hour, replicas=args.replicas,
                    max_tokens=args.max_tokens or None)
    config.validate()
    if args.plot:  # say so now, not after an hour of simulation
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib, which is not installed: "
                             "pip install 'duskpool[simulate]'") from None
    started = time.monotonic()
    report, world = simulate(config, progress=lambda line: print(
        f"duskpool simulate: {time.monotonic() - started:5.0f} s: {line}", file=sys.stderr, flush=True))
    wall = time.monotonic() - started
    print(f"duskpool simulate: done in {wall:.1f} s", file=sys.stderr)
    if args.plot:
        title = f"{config.nodes} nodes, {config.shape}, seed {config.seed}"
        print(f"duskpool simulate: plot written to {plot(world, args.plot, title)}", file=sys.stderr)
    print(json.dumps(report.to_dict()) if args.json else report.table(wall))
    return 0
