"""Command line: ``python -m kcengine <command> ...``.

Each command lives in ``kcengine/commands/<name>.py`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``.  Errors a user can make are raised as
:class:`UserError` and printed as one line with a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("bench", "env", "prune", "eval", "sweep", "finetune")


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit code 2."""


def _available_commands():
    mods = {}
    for name in COMMANDS:
        try:
            mods[name] = importlib.import_module(f"kcengine.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kcengine.commands.{name}":
                raise
    return mods


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="python -m kcengine",
                                     description="Compress CNNs by clustering their weights.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mods = _available_commands()
    for name, mod in mods.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
    return parser, mods


def main(argv=None) -> int:
    parser, mods = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(mods[args.command].run(args) or 0)
    except UserError as exc:
        print(f"kcengine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kcengine: interrupted", file=sys.stderr)
        return 130
