"""The `duskpool` command."""

import argparse
import os
import sys
import time

EXIT_BAD_INPUT = 2


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duskpool",
        description="Pool idle machines into one private LLM inference service. "
                    "Runs GGUF models (what Ollama and LM Studio store) on CPU.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run", help="answer one prompt with a model in this process",
        description="Answer PROMPT with the model's chat template applied, streaming the answer to stdout. "
                    "Diagnostics go to stderr.")
    run.add_argument("prompt", help="the user message; '-' reads it from stdin")
    run.add_argument("--model", "-m", default=None,
                     help="path to a GGUF model file (default: the bundled SmolLM2-135M-Instruct)")
    run.add_argument("--system", default=None, help="a system message to put before the prompt")
    run.add_argument("--threads", type=int, default=None,
                     help="compute threads (default: the number of CPU cores, at most 8)")
    run.add_argument("--context", type=int, default=None,
                     help="context length of the session in tokens (default: 4096 or the model's, if less)")
    _add_generation_flags(run)
    run.set_defaults(handler=cmd_run)
    return parser


def _generation_params(args: argparse.Namespace):
    from duskpool.engine.generate import GenerationParams
    from duskpool.engine.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed)
    return GenerationParams(max_tokens=args.max_tokens, stop=args.stop, sampling=sampling)


def cmd_run(args: argparse.Namespace) -> int:
    from duskpool.engine.generate import GenerationStats
    from duskpool.engine.runner import LocalEngine, set_threads
    from duskpool.weights.catalog import resolve_model

    params = _generation_params(args)  # bad flags fail before the model loads
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    set_threads(args.threads or min(os.cpu_count() or 1, 8))
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    path = resolve_model(args.model)
    print(f"duskpool: loading {path}", file=sys.stderr)
    started = time.perf_counter()
    engine = LocalEngine.load(path, args.context)
    print(f"duskpool: loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": prompt}]
    stats = GenerationStats()
    for piece in engine.chat(messages, params, stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    rate = stats.generated_tokens / stats.decode_seconds if stats.decode_seconds else 0.0
    print(f"duskpool: {stats.prompt_tokens} prompt tokens in {stats.prefill_seconds:.2f} s, "
          f"{stats.generated_tokens} generated at {rate:.1f} tok/s ({stats.finish_reason})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    from duskpool.weights.gguf import ModelFileError

    try:
        return args.handler(args)
    except (ModelFileError, ValueError) as e:  # bad input: one clear line, no traceback
        print(f"duskpool: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\nduskpool: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
