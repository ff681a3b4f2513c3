"""Loss and accuracy curves of a finetune run as a PNG (matplotlib, without pyplot: see kcengine._plot)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_history"]


def plot_history(history: list[dict], path, title: str = "") -> Path:
    """Two panels over the epochs of ``history`` (rows of :class:`~kcengine.train.FinetuneResult`):
    training loss, and train / eval top-1 accuracy; phase boundaries (progressive stages) dashed."""
    from .._plot import figure, save

    x = list(range(1, len(history) + 1))
    fig = figure((10, 3.6))
    a1, a2 = fig.subplots(1, 2)
    a1.plot(x, [h["loss"] for h in history], marker="o", ms=3)
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss")
    a2.plot(x, [100 * h["train_top1"] for h in history], marker="o", ms=3, label="train (augmented)")
    ev = [(i, 100 * h["eval_top1"]) for i, h in zip(x, history) if h.get("eval_top1") is not None]
    if ev:
        a2.plot([e[0] for e in ev], [e[1] for e in ev], marker="s", ms=3, label="eval")
    a2.set_xlabel("epoch")
    a2.set_ylabel("top-1 (%)")
    a2.legend(loc="lower right")
    for i in range(1, len(history)):
        if history[i].get("phase") != history[i - 1].get("phase"):
            for a in (a1, a2):
                a.axvline(i + 0.5, color="grey", ls="--", lw=0.8)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save(fig, path, dpi=110)
