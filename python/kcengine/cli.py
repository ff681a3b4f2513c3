"""Command line: ``python -m kcengine <command> ...``.

Each command lives in ``kcengine/commands/<name>.py`` and exposes ``HELP`` (one line), ``add_arguments(parser)``,
``run(args) -> int`` and, when it has ``--out``, ``OUT_FILES`` (the names it writes there).  Errors a user can make
are raised as :class:`UserError` and printed as one line with a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path

COMMANDS = ("bench", "env", "prune", "eval", "sweep", "finetune")


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit code 2."""


def flag_words(msg: str, flags: dict[str, str]) -> str:
    """A library error's message with its Python spellings as the flags a command-line user types.

    ``flags`` maps a keyword to its flag (``{"eval_batch_size": "--batch-size"}``), or a phrase (anything but an
    identifier) to its replacement (``{"resume=False": "--no-resume"}``).  A message that opens with a
    keyword opens with its flag ("eval_batch_size must be an int >= 1, got eval_batch_size=0" -> "--batch-size
    must be an int >= 1, got 0"); elsewhere ``keyword=value`` reads ``--flag value``, and a bare ``keyword=``
    (as in "pass plan=") reads ``--flag``."""
    for spelled, flag in flags.items():
        if not spelled.isidentifier():
            msg = re.sub(rf"(?<![\w.-]){re.escape(spelled)}(?!\w)", flag, msg)
    m = re.match(r"([a-z_]+)(\[\d+\])? ", msg)
    if m and m.group(1) in flags:
        name = m.group(1)
        msg = flags[name] + re.sub(rf"got {name}(\[\d+\])?=", "got ", msg[len(name):])
    for name, flag in flags.items():
        if name.isidentifier():
            msg = re.sub(rf"(?<![\w.-]){re.escape(name)}=(?=[)\s;,.]|$)", flag, msg)
            msg = re.sub(rf"(?<![\w.-]){re.escape(name)}=", flag + " ", msg)
    return msg


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


_DASH_VALUE = re.compile(r"^-[\d.]")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog=_prog(),
                                     description="Compress CNNs by clustering their weights.")
    from . import __version__

    parser.add_argument("-V", "--version", action="version", version=f"kcengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mods = _available_commands()
    parser.commands = {}  # each command's own parser: main reports a mistyped option with that one's usage
    for name, mod in mods.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        # A word after an option is its value unless it looks like an option: argparse lets only plain negative
        # numbers (-3, -0.5) through, so `--eps -1/255` or `--eps -1e-3` got "expected one argument" instead of
        # the option's own range message.  No option here starts with a dash and a digit or a dot.
        p._negative_number_matcher = _DASH_VALUE
        parser.commands[name] = p
    return parser, mods


def _unrecognized(argv: list, extra: list, command_parser) -> str:
    """argparse's "unrecognized arguments" message, with the likely meant option for a misspelled one (--ration:
    --ratio) and, for a stray value, the option whose one value it follows (--plan sensitivity 0.5)."""
    import difflib

    options = [o for a in command_parser._actions for o in a.option_strings if o.startswith("--")]
    notes = []
    for word in extra:
        if word.startswith("--"):
            near = difflib.get_close_matches(word.split("=")[0][2:], [o[2:] for o in options], n=1, cutoff=0.7)
            if near:
                notes.append(f"{word}: did you mean --{near[0]}?")
        elif word in argv:
            i = argv.index(word)
            if i >= 2 and argv[i - 2].startswith("--") and not argv[i - 1].startswith("-"):
                notes.append(f"{word}: {argv[i - 2]} takes one value, {argv[i - 1]!r}; write what follows it as "
                             f"one word (e.g. {argv[i - 1]}={word})")
    return f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(notes)})" if notes else "")


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


def _check_out_files(out, command: str, names) -> None:
    """A folder standing where the command will write one of its files (``names``, the module's ``OUT_FILES``)
    is a one-line error before any work, not a traceback after it."""
    for name in names:
        if (Path(out) / name).is_dir():
            raise UserError(f"--out {out}: {Path(out) / name} is a folder, where {command} writes its file {name}; "
                            f"move it away or choose another --out")


class _GonePipeStdout:
    """stdout that stops writing once the reader at the other end of a pipe has gone (``kcengine eval | head
    -3``): the command still finishes and writes its files, where a BrokenPipeError used to end it with a
    traceback (eval before writing eval.json).  The descriptor is pointed at /dev/null then, so the
    interpreter's own flush at exit has nowhere to fail."""

    def __init__(self, stream):
        self.stream, self.gone = stream, False

    def _guard(self, call, *a):
        if self.gone:
            return None
        try:
            return call(*a)
        except BrokenPipeError:
            self.gone = True
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)
            except (OSError, ValueError, AttributeError):  # a stream without a descriptor (a test's capture)
                pass
            return None

    def write(self, text):
        self._guard(self.stream.write, text)
        return len(text)

    def flush(self):
        self._guard(self.stream.flush)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv=None) -> int:
    stdout = sys.stdout
    sys.stdout = _GonePipeStdout(stdout)
    try:
        return _main(argv)
    finally:
        if isinstance(sys.stdout, _GonePipeStdout):
            sys.stdout.flush()
        sys.stdout = stdout


def _main(argv=None) -> int:
    parser, mods = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named with the command's usage (argparse gives the top level's, which names no option)
        command_parser = parser.commands.get(args.command)
        if command_parser is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        command_parser.error(_unrecognized(argv, extra, command_parser))
    if not args.command:
        parser.print_help()
        return 2
    made, rc = None, 1  # rc stays 1 when the command raises
    try:
        made = _make_out(args.out) if getattr(args, "out", None) else None
        if getattr(args, "out", None):
            _check_out_files(args.out, args.command, getattr(mods[args.command], "OUT_FILES", ()))
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
