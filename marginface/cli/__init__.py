"""The `marginface` command: parses arguments, calls the library, prints. No logic of its own.

One module per command group, each with ``register(subparsers)`` (its parser) and the functions that
run its commands: `train` (train), `eval` (eval, identify, embed), `data` (data ...), `export`
(export, bench), `deploy` (verify, gallery ..., identify-folder, faces), `serve` (serve),
`viz` (viz). `options` holds what several share.

Every subcommand has --help; --json prints exactly one JSON object on stdout; bad input prints one
line `error: ...` on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from marginface import __version__
from marginface.cli import data, deploy, export, serve, train, viz
from marginface.cli import eval as evaluate
from marginface.cli.options import Parser, print_json
from marginface.errors import UserError

# the names older code imports from here
_Parser = Parser
_print_json = print_json


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="marginface", description="Train, evaluate and ship margin-softmax face recognition models.",
               epilog="`marginface COMMAND --help` describes each command; docs/quickstart.md walks through them.")
    p.add_argument("--version", action="version", version=f"marginface {__version__}",
                   help="print the version and exit")
    sub = p.add_command_group("command")
    for group in (train, evaluate, data, export, deploy, serve, viz):
        group.register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and says how to resume)
        print("interrupted", file=sys.stderr)
        if argv is None:  # the process is ours: leave now. A Ctrl-C in the middle of importing torch leaves
            _exit_now(130)  # native modules half set up, whose teardown at exit can die of the signal
        return 130


def _exit_now(code: int) -> None:
    """Flush what was printed and end the process without the interpreter's teardown (every file we
    write is written atomically, so nothing is left half done)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


__all__ = ["build_parser", "main"]
