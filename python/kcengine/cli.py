"""Command line: ``python -m kcengine <command> ...``.

Each command lives in ``kcengine/commands/<name>.py`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``.  Errors a user can make are raised as
:class:`UserError` and printed as one line with a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

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


def _prog() -> str:
    """How the user called us, for usage lines and errors: ``kcengine`` (the console script) or
    ``python -m kcengine``."""
    return "kcengine" if Path(sys.argv[0] if sys.argv else "").name == "kcengine" else "python -m kcengine"


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog=_prog(),
                                     description="Compress CNNs by clustering their weights.")
    from . import __version__

    parser.add_argument("-V", "--version", action="version", version=f"kcengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mods = _available_commands()
    for name, mod in mods.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
    return parser, mods


def _make_out(out) -> Path | None:
    """Create the ``--out`` folder before any work, so that a path that cannot be one (an existing file, a
    place under a file, an unwritable one) is a one-line error now rather than a traceback after minutes of
    clustering.  Returns the outermost folder this call created (``main`` removes what it created again,
    if still empty, when the command fails), else None."""
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {out}: exists and is not a folder")
        if path.is_dir():
            return None
        top = path
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        path.mkdir(parents=True, exist_ok=True)  # exist_ok: torchrun's ranks all get here at once
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise UserError(f"--out {out}: cannot create the folder ({getattr(exc, 'strerror', None) or exc})") from None
    return top


def main(argv=None) -> int:
    parser, mods = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.command:
        parser.print_help()
        return 2
    made, rc = None, 1  # rc stays 1 when the command raises
    try:
        made = _make_out(args.out) if getattr(args, "out", None) else None
        rc = int(mods[args.command].run(args) or 0)
    except UserError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)  # as argparse's own errors
        rc = 2
    except KeyboardInterrupt:
        print("kcengine: interrupted", file=sys.stderr)
        rc = 130
    finally:
        if made is not None and rc != 0:  # a failed command leaves no empty --out folders behind
            for d in sorted((p for p in [made, *made.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
                if not any(d.iterdir()):
                    d.rmdir()
    return rc
