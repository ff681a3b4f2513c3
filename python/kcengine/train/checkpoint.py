"""Checkpoints of a finetune run: one file per run, rewritten atomically after every epoch.

A checkpoint holds the model's state (codebooks, indices, BN, ...), the *layout* (which convs are
clustered and with which k and granularity, so a dense model can be rebuilt into the right shape
before loading), the optimizer and LR-scheduler states, the phase and epoch reached, and the history.
Every epoch re-seeds its randomness from (seed, phase, epoch), so a resumed run repeats exactly
what the uninterrupted run would have done: only the epoch in progress is lost.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..conv.module import ClusteredConv2d, replace_module
from ..conv.serialize import conv_geometry, layer_config, layer_from_config

__all__ = ["clustered_layout", "apply_layout", "save_checkpoint", "load_checkpoint", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "finetune_last.pt"


def clustered_layout(model: nn.Module) -> dict[str, dict]:
    """``{name: config}`` of every ClusteredConv2d in ``model``, the configs of compact checkpoints
    (:func:`kcengine.conv.serialize.layer_config`: k, granularity, bias, epilogue buffers, the cosine option)."""
    return {n: layer_config(m) for n, m in model.named_modules() if isinstance(m, ClusteredConv2d)}


def apply_layout(model: nn.Module, layout: dict[str, dict]) -> nn.Module:
    """Replace (IN PLACE) each ``nn.Conv2d`` named in ``layout`` by an empty ClusteredConv2d of its config, so
    that a checkpoint's state dict loads; layers already clustered must match in k and granularity.  Returns
    the model (the new layer itself where the model is the conv)."""
    mods = dict(model.named_modules())
    for name, cfg in layout.items():
        m = mods.get(name)
        if "num_clusters" not in cfg and isinstance(m, nn.Conv2d):  # a layout written before the full configs
            cosine = bool(cfg.get("cosine", False))  # only layouts of 2c5abe2 .. 5151126 carry it
            cfg = {**conv_geometry(m), "num_clusters": cfg["k"], "bias": m.bias is not None and not cosine,
                   "granularity": cfg["granularity"], "fused_bn": cosine, "cosine": cosine}
        k = cfg.get("num_clusters", cfg.get("k"))
        if isinstance(m, ClusteredConv2d):
            if m.num_clusters != k or m.granularity != cfg["granularity"]:
                raise ValueError(f"checkpoint layer {name!r} has k={k} ({cfg['granularity']}), "
                                 f"the model has k={m.num_clusters} ({m.granularity})")
            if cfg.get("cosine", False):
                m._kc_cosine = True
            continue
        if not isinstance(m, nn.Conv2d):
            raise ValueError(f"checkpoint names layer {name!r}, which is not a conv of this model")
        new = layer_from_config(cfg, dtype=m.weight.dtype, device=m.weight.device)
        model = replace_module(model, name, new)
    return model


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + rename): a crash mid-write keeps the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path) -> dict | None:
    """The checkpoint at ``path``, or None when there is none; ValueError naming the file when it cannot be read
    as one (a folder, a truncated or foreign file)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, where finetune keeps its checkpoint file; move it away")
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated zip, an empty file, another pickle
        raise ValueError(f"{path} could not be read as a finetune checkpoint ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); delete it or pass resume=False") from None
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise ValueError(f"{path} is not a finetune checkpoint; delete it or pass resume=False")
    return state
