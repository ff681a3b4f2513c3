"""CIFAR training augmentation on batches of normalized tensors: random crop with padding + horizontal flip.

Works on the batch the DataLoader yields (``[B, C, H, W]`` float), so any in-memory dataset gets it without
a transform pipeline; randomness comes from an explicit ``torch.Generator`` (reproducible, resumable).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_int

__all__ = ["cifar_augment"]


def cifar_augment(x: torch.Tensor, generator: torch.Generator | None = None, *, padding: int = 4,
                  flip: bool = True) -> torch.Tensor:
    """Random ``H x W`` crop of each image zero-padded by ``padding`` pixels, then a random horizontal flip.

    Args:
        x: ``[B, C, H, W]`` float batch (normalized: the zero padding is the mean colour).
        generator: source of randomness (CPU generator); None uses torch's global one.
        padding: pixels added on each side before cropping (4 for CIFAR); 0 disables the crop.
        flip: flip each image left-right with probability 1/2.

    Returns a new ``[B, C, H, W]`` tensor; ``x`` is not modified.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a [B, C, H, W] batch, got shape {tuple(x.shape)}")
    padding = check_int(padding, "padding", 0)  # (numpy integers too: session 55)
    b, c, h, w = x.shape
    out = x
    if padding:
        xp = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device)[None, :])  # [B, H]
        cols = (ox[:, None] + torch.arange(w, device=x.device)[None, :])  # [B, W]
        out = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
        out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if flip:
        f = (torch.rand((b,), generator=generator) < 0.5).to(x.device)
        out = torch.where(f[:, None, None, None], out.flip(3), out)
    return out if out is not x else x.clone()
