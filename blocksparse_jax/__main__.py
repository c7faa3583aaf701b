"""The command line: ``python -m blocksparse_jax <command>``.

A thin dispatcher: each command lives in its own module, which adds its
options to a sub-parser (``add_arguments``) and runs with the parsed options
(``run``), returning the exit code.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (with a pointer to ``--help``) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from blocksparse_jax import demo

    parser = _Parser(
        prog="python -m blocksparse_jax",
        description="Block-sparse dot products and the hierarchical softmax for JAX.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    sub = commands.add_parser(
        "demo",
        help=demo.SUMMARY,
        description=demo.DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(sub)
    sub.set_defaults(run=demo.run, command_parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Usage errors are one line on stderr and exit code 2, as argparse's are.
    """
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the command's parser, which names the command
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
