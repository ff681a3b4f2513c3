"""Figures for the PNG files kcengine writes, made without pyplot.

A ``matplotlib.figure.Figure`` saves itself through the Agg canvas its format picks, so nothing here
switches the process's matplotlib backend (``matplotlib.use("Agg")`` did: a notebook's inline plots went
blank after a finetune wrote its curves) and no figure stays registered with pyplot.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["figure", "save"]


def figure(figsize):
    """A new standalone ``Figure`` of ``figsize`` inches; draw with ``fig.subplots(...)``, write with
    ``fig.savefig(path)``."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save(fig, path, dpi: int) -> Path:
    """Lay ``fig`` out tightly and write it to ``path`` (its folder made if missing; ``.png`` added to a name
    without a suffix, as matplotlib writes it); returns the path written.  ValueError for a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path={str(path)!r} is a folder; give the PNG file's path")
    if not path.suffix:
        path = path.with_suffix(".png")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
