"""Figures for the PNG files kcengine writes, made without pyplot.

A ``matplotlib.figure.Figure`` saves itself through the Agg canvas its format picks, so nothing here
switches the process's matplotlib backend (``matplotlib.use("Agg")`` did: a notebook's inline plots went
blank after a finetune wrote its curves) and no figure stays registered with pyplot.
"""
from __future__ import annotations

__all__ = ["figure"]


def figure(figsize):
    """A new standalone ``Figure`` of ``figsize`` inches; draw with ``fig.subplots(...)``, write with
    ``fig.savefig(path)``."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)
