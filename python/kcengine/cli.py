"""Command line: ``python -m kcengine <command>``."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("kcengine: commands are being built", file=sys.stderr)
    return 2
