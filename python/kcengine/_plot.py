"""Figures for the PNG files kcengine writes, made without pyplot.

A ``matplotlib.figure.Figure`` saves itself through the Agg canvas its format picks, so nothing here
switches the process's matplotlib backend (``matplotlib.use("Agg")`` did: a notebook's inline plots went
blank after a finetune wrote its curves) and no figure stays registered with pyplot.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["figure", "save"]


def figure(figsize):
    """A new standalone ``Figure`` of ``figsize`` inches; draw with ``fig.subplots(...)``, write with
    ``fig.savefig(path)``."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def check_path(path, name: str = "path") -> Path:
    """``path`` as the file :func:`save` will write (``.png`` added to a bare name), checked before any work:
    ValueError naming ``name`` for a folder, a parent that is a file, or a format matplotlib does not write."""
    from matplotlib.backend_bases import FigureCanvasBase

    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{name} must be a file path, got {type(path).__name__} {path!r:.60}")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{name}={str(path)!r} is a folder; give the PNG file's path")
    if not p.suffix:
        p = p.with_suffix(".png")
    fmt = p.suffix[1:].lower()
    if fmt not in FigureCanvasBase.get_supported_filetypes():
        raise ValueError(f"{name}={str(path)!r}: matplotlib does not write {p.suffix!r} files; use .png (or one of "
                         f"{', '.join(sorted(FigureCanvasBase.get_supported_filetypes()))})")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name}={str(path)!r}: {str(parent)!r} is a file, not a folder")
            break
    return p


def save(fig, path, dpi: int) -> Path:
    """Lay ``fig`` out tightly and write it to ``path`` (its folder made if missing; ``.png`` added to a name
    without a suffix, as matplotlib writes it); returns the path written.  ValueError as :func:`check_path`."""
    path = check_path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
