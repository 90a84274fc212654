"""The `duskpool` command line: its commands and their flags. Each command's handler is in serving or pool."""

import argparse

from duskpool.cli import pool, serving
from duskpool.cli.pool import DEFAULT_JOIN_PORT

DEFAULT_NODE_PORT = 7471


def _add_state_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", default=None, metavar="DIR",
                        help="the pool's state: CA, members, tokens (default: $DUSKPOOL_HOME/pool, else pool/ in the "
                             "state directory: ~/.local/state/duskpool; on macOS ~/Library/Application Support)")


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


def _add_prompt_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="a system message to put before the prompt")
    parser.add_argument("--raw", action="store_true",
                        help="complete PROMPT as raw text, without the chat template (so always for a base model, "
                             "which has none)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None,
                        help="a GGUF file, a model folder (Hugging Face safetensors, or MLX), or a name "
                             "`duskpool models` lists, such as llama3.2:3b from Ollama "
                             "(default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--context", type=int, default=None,
                        help="context length of a session in tokens (default: 4096 or the model's, if less)")


def _add_compute_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="compute threads (default: the performance cores, at most 8)")
    parser.add_argument("--backend", choices=["auto", "mlx", "cpu"], default="auto",
                        help="what computes the layers: mlx (Apple silicon's GPU, or MLX's CUDA build), cpu (our C "
                             "kernels), auto: MLX where it has a GPU, else cpu (default: auto)")


def _add_route_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--privacy-prefix", type=int, default=2, metavar="K",
                        help="first K layers run on this machine, so nodes never see embeddings (default: 2: where "
                             "`duskpool audit` of the bundled model found a node's cheapest attack falls from "
                             "71%% to 17%% of prompt tokens; docs/privacy.md)")
    parser.add_argument("--privacy-suffix", type=int, default=1, metavar="K",
                        help="last K layers run on this machine, next to the head (default: 1)")
    parser.add_argument("--routing", choices=["ring", "star"], default="ring",
                        help="ring: each node pushes to the next (default); star: every hop via the gateway")
    parser.add_argument("--replicas", type=int, default=0, metavar="R",
                        help="R more copies of each span where memory allows, to fail over to when a node dies "
                             "(default: 0: a span whose node dies is loaded onto another)")


class RefuseKeyOnArgv(argparse.Action):
    """--api-key KEY is refused: a key on the command line is readable by every user of the machine (ps, /proc)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is refused: every user of this machine can read a command line (ps, /proc); "
                     "put the key in a file and pass --api-key-file PATH, or set DUSKPOOL_API_KEY")


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    from duskpool.api import DEFAULT_PORT  # the package alone: FastAPI's import would slow --help

    g = parser.add_argument_group("HTTP API (OpenAI and Ollama compatible, dashboard at /)")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default: 127.0.0.1); any other needs an API key")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default: {DEFAULT_PORT})")
    g.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                   help="a file of keys (one per line) clients must send as 'Authorization: Bearer KEY' "
                        "(repeatable; or set DUSKPOOL_API_KEY, or store keys with `duskpool key create`)")
    g.add_argument("--api-key", action=RefuseKeyOnArgv, help=argparse.SUPPRESS)
    g.add_argument("--max-sessions", type=int, default=None,
                   help="at most this many generations at once (default: as many as the lent memory holds KV for)")
    g.add_argument("--max-queue", type=int, default=512,
                   help="requests that may wait for memory; more get 429 (default: 512, as Ollama)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duskpool",
        description="Pool idle machines into one private LLM inference service. "
                    "Runs GGUF models (what Ollama and LM Studio store) and Hugging Face or MLX model folders, "
                    "split by layers across machines.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run", help="answer one prompt with a model in this process",
        description="Answer PROMPT with the model's chat template applied, streaming the answer to stdout. "
                    "Diagnostics go to stderr.")
    run.add_argument("prompt", help="the user message; '-' reads it from stdin")
    _add_prompt_flags(run)
    _add_model_flags(run)
    _add_compute_flags(run)
    _add_generation_flags(run)
    run.set_defaults(handler=serving.cmd_run)

    swarm = commands.add_parser(
        "swarm", help="start N local node processes and a gateway; answer a prompt or serve",
        description="Start N `duskpool node` processes on 127.0.0.1, split the model across them, and print "
                    "the placement. With PROMPT, stream the answer and exit; without, keep the pool up until "
                    "Ctrl-C.")
    swarm.add_argument("prompt", nargs="?", default=None, help="the user message; '-' reads it from stdin")
    swarm.add_argument("--nodes", "-n", type=int, default=3, help="node processes to start (default: 3)")
    _add_prompt_flags(swarm)
    _add_state_dir_flag(swarm)  # where API keys from `duskpool key create` are
    swarm.add_argument("--insecure", action="store_true",
                       help="plaintext links between the local nodes (debugging only; by default the swarm makes "
                            "a throwaway pool and uses mutual TLS like any pool)")
    _add_model_flags(swarm)
    _add_route_flags(swarm)
    _add_compute_flags(swarm)
    _add_generation_flags(swarm)
    _add_serve_flags(swarm)
    swarm.set_defaults(handler=serving.cmd_swarm)

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
    _add_compute_flags(serve)
    _add_serve_flags(serve)
    serve.set_defaults(handler=serving.cmd_serve)

    gateway = commands.add_parser(
        "gateway", help="drive a model over nodes on the network",
        description="Plan the model over the given nodes, stream them their layers, then answer PROMPT "
                    "(or hold the pool until Ctrl-C). The prompt and answer never leave this machine.")
    gateway.add_argument("prompt", nargs="?", default=None, help="the user message; '-' reads it from stdin")
    gateway.add_argument("--node", action="append", default=[], metavar="HOST:PORT",
                         help="a node to use (repeatable); without any, nodes are found by mDNS on the LAN")
    _add_prompt_flags(gateway)
    gateway.add_argument("--join-port", type=int, default=DEFAULT_JOIN_PORT,
                         help=f"port where nodes join with a token (default: {DEFAULT_JOIN_PORT})")
    _add_security_flags(gateway)
    _add_model_flags(gateway)
    _add_route_flags(gateway)
    _add_compute_flags(gateway)
    _add_generation_flags(gateway)
    gateway.set_defaults(handler=serving.cmd_gateway)

    node = commands.add_parser(
        "node", help="lend this machine to a pool: serve spans of layers to a gateway",
        description="Serve spans of model layers over gRPC. The node needs no model file: the gateway streams "
                    "it the weights of its span, which are cached by content under --cache-dir.")
    node.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    node.add_argument("--port", type=int, default=DEFAULT_NODE_PORT,
                      help=f"port to listen on; 0 picks a free one (default: {DEFAULT_NODE_PORT})")
    node.add_argument("--cache-dir", default=None, help="where received weights are kept "
                      "(default: node/ in the cache directory: ~/.cache/duskpool, on macOS ~/Library/Caches/duskpool)")
    node.add_argument("--models", action="append", default=[], metavar="DIR",
                      help="model files this machine already has (GGUF files and model folders under DIR, "
                           "repeatable): a span's tensors found there, byte for byte, are read from disk, not streamed")
    node.add_argument("--memory-limit", default=None, metavar="SIZE",
                      help="most memory to lend, e.g. 8G or 512M (default: what is free)")
    node.add_argument("--no-announce", action="store_true", help="do not announce this node by mDNS")
    node.add_argument("--join", default=None, metavar="TOKEN@HOST:PORT",
                      help="join the pool of the gateway at HOST:PORT with a token from its `duskpool token`")
    node.add_argument("--identity", default=None, metavar="DIR",
                      help="this node's certificate and key "
                           "(default: $DUSKPOOL_HOME/node, else node/ in the state directory)")
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
    _add_compute_flags(node)
    node.add_argument("--exit-with", type=int, default=None, metavar="PID",
                      help=argparse.SUPPRESS)  # the swarm's pid: its nodes end with it (cluster.swarm.exit_with)
    node.set_defaults(handler=serving.cmd_node)

    init = commands.add_parser(
        "init", help="create this gateway's pool: its certificate authority and member list",
        description="Create the pool's certificate authority and state (SQLite) in --state-dir. Nodes join "
                    "with tokens from `duskpool token`; every link in the pool is then mutual TLS.")
    _add_state_dir_flag(init)
    init.set_defaults(handler=pool.cmd_init)

    token = commands.add_parser(
        "token", help="print a single-use join token for one node",
        description="Print a short-lived, single-use token. On the machine to add: "
                    "duskpool node --join TOKEN@THIS_HOST:7472")
    token.add_argument("--ttl", default="10m", help="how long the token is valid, e.g. 10m, 1h (default: 10m)")
    _add_state_dir_flag(token)
    token.set_defaults(handler=pool.cmd_token)

    nodes = commands.add_parser("nodes", help="list the pool's members, or revoke one",
                                description="List the members of this gateway's pool; `nodes revoke ID` ends one: "
                                            "its connections are refused from then on.")
    nodes.add_argument("action", nargs="?", choices=["list", "revoke"], default="list")
    nodes.add_argument("member", nargs="?", type=int, default=None, metavar="ID", help="the member to revoke")
    _add_state_dir_flag(nodes)
    nodes.set_defaults(handler=pool.cmd_nodes)

    service = commands.add_parser(
        "service", help="install or remove the node as a background service (launchd on macOS, systemd on Linux)",
        description="install: write and load a launchd agent (macOS) or systemd user unit (Linux) that runs "
                    "`duskpool node` with the flags given after --, e.g. "
                    "`duskpool service install -- --lend idle --require-ac`. uninstall: stop and remove it.")
    service.add_argument("action", choices=["install", "uninstall"])
    service.add_argument("--dry-run", action="store_true", help="write the file, run nothing")
    service.set_defaults(handler=pool.cmd_service)

    key = commands.add_parser("key", help="make an API key for serving beyond this machine",
                              description="`duskpool key create` prints a new key for the HTTP API (shown once; "
                                          "only its hash is kept in the pool's state). Clients send it as "
                                          "'Authorization: Bearer KEY'.")
    key.add_argument("action", choices=["create"])
    _add_state_dir_flag(key)
    key.set_defaults(handler=pool.cmd_key)

    models = commands.add_parser(
        "models", help="list the models already on this machine",
        description="List the GGUF models of Ollama (~/.ollama/models), LM Studio (~/.lmstudio/models, "
                    "~/.cache/lm-studio/models), the Hugging Face cache and the bundled default, and the model "
                    "folders (safetensors: Hugging Face's or MLX's) of LM Studio and the Hugging Face cache. --model "
                    "accepts the names in the first column.")
    models.set_defaults(handler=pool.cmd_models)

    plan = commands.add_parser(
        "plan", help="show how a model would be split over nodes, and why",
        description="Ask each node for its memory and speed, then print the placement the gateway would use.")
    plan.add_argument("--node", action="append", default=[], metavar="HOST:PORT", help="a node (repeatable)")
    _add_security_flags(plan)
    _add_model_flags(plan)
    _add_route_flags(plan)
    plan.set_defaults(handler=pool.cmd_plan)

    audit = commands.add_parser(
        "audit", help="measure how much of a prompt a node could recover, at each privacy prefix",
        description="Push held-out prompts (a PIN and passwords among them) through the model as the gateway "
                    "would, and hand the hidden states each node would receive to attackers that know the "
                    "public model: nearest neighbour, a learned inverter, SipIt's search. Prints the share of "
                    "prompt tokens each recovers for privacy prefixes 0..K, and of answer tokens for privacy "
                    "suffixes 0..S. docs/privacy.md says what it covers and what it does not.")
    audit.add_argument("--model", "-m", default=None,
                       help="a GGUF file, a model folder, or a name `duskpool models` lists "
                            "(default: the bundled SmolLM2-135M-Instruct)")
    audit.add_argument("--max-prefix", type=int, default=None, metavar="K",
                       help="audit privacy prefixes 0..K (default: 4)")
    audit.add_argument("--max-suffix", type=int, default=None, metavar="S",
                       help="audit privacy suffixes 0..S (default: 2)")
    audit.add_argument("--json", action="store_true",
                       help="print one JSON object: rows of {depth, attacker, recovery}, suffix_rows, notes")
    audit.add_argument("--plot", default=None, metavar="PATH",
                       help="also draw the results as a PNG (needs matplotlib: pip install 'duskpool[audit]')")
    audit.set_defaults(handler=pool.cmd_audit)

    simulate = commands.add_parser(
        "simulate", help="run the pool's own planner, admission, routing, drain and recovery on a simulated office",
        description="A discrete-event simulation of an office's Macs and Linux boxes over a working day: owners at "
                    "their desks 9-18 with breaks and meetings, laptops that leave, batteries, LAN and Wi-Fi, crashes; "
                    "requests arrive as a Poisson process that follows the day. The placement, the route, admission, "
                    "lending and recovery are decided by the same code the gateway and nodes run. Prints what it "
                    "served (tokens/s, latencies, requests completed, re-plans, weights moved, utilisation); progress "
                    "on stderr.")
    simulate.add_argument("--nodes", type=int, default=50, help="machines in the office (default: 50)")
    simulate.add_argument("--hours", type=float, default=1.0, help="simulated hours (default: 1)")
    simulate.add_argument("--start-hour", type=float, default=0.0, metavar="H",
                          help="the clock when the simulation starts, 0-24 (default: 0, midnight)")
    simulate.add_argument("--model-shape", default="70b-q4", metavar="SHAPE",
                          help="the model's shape: 8b-q4, 32b-q4, 70b-q4 or 405b-q4 (default: 70b-q4)")
    simulate.add_argument("--requests-per-hour", type=float, default=None, metavar="N",
                          help="requests per hour at the day's peak (default: one per machine)")
    simulate.add_argument("--max-tokens", type=int, default=1024, metavar="N",
                          help="what each request asks for, which admission reserves KV for (default: 1024; 0: "
                               "nothing, as many chat clients send, so each reserves the whole context)")
    simulate.add_argument("--replicas", type=int, default=0, metavar="R",
                          help="as for the gateway: R more copies of each span where memory allows (default: 0)")
    simulate.add_argument("--seed", type=int, default=0, help="the same seed gives the same run (default: 0)")
    simulate.add_argument("--json", action="store_true",
                          help="print one JSON object (tokens_per_s, ttft_p50_s, token_latency_p99_s, "
                               "completed_fraction, ...)")
    simulate.add_argument("--plot", default=None, metavar="PATH",
                          help="also draw the run over simulated time as a PNG (needs matplotlib: "
                               "pip install 'duskpool[simulate]')")
    simulate.set_defaults(handler=pool.cmd_simulate)
    return parser
