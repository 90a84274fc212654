"""The `duskpool` command."""

import sys

from duskpool.cli.parser import build_parser

EXIT_BAD_INPUT = 2


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
