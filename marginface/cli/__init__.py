"""The `marginface` command: parses arguments, calls the library, prints. No logic of its own.

One module per command group, each with ``register(subparsers)`` (its parser) and the functions that
run its commands: `train` (train), `eval` (eval, identify, embed), `data` (data ...), `export`
(export, bench), `deploy` (verify, gallery ...), `viz` (viz). `options` holds what several share.

Every subcommand has --help; --json prints exactly one JSON object on stdout; bad input prints one
line `error: ...` on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import sys

from marginface.cli import data, deploy, export, train, viz
from marginface.cli import eval as evaluate
from marginface.cli.options import Parser, print_json
from marginface.errors import UserError

# the names older code imports from here
_Parser = Parser
_print_json = print_json


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="marginface", description="Train, evaluate and ship margin-softmax face recognition models.")
    sub = p.add_subparsers(dest="command", parser_class=Parser, required=True)
    for group in (train, evaluate, data, export, deploy, viz):
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


__all__ = ["build_parser", "main"]
