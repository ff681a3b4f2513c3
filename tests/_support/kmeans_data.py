"""Problem generators shared by the k-means tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def blobs(n, d, centers, seed=0, spread=0.3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    c = rng.normal(scale=3.0, size=(centers, d))
    lab = rng.integers(0, centers, size=n)
    return (c[lab] + rng.normal(scale=spread, size=(n, d))).astype(dtype)


def shared_checkpoint(name="resnet20-12fca82f.th") -> Path:
    root = Path(__file__).resolve().parents[2]
    p = root.parent / "shared" / "data" / "checkpoints" / name
    if not p.exists():
        pytest.skip(f"real weights not found at ../shared/data/checkpoints/{name} (shared data folder absent)")
    return p


def real_conv_weights(name="resnet20-12fca82f.th"):
    """{layer name: float32 [C_out, C_in, kh, kw]} of a real CIFAR ResNet checkpoint."""
    import torch

    sd = torch.load(shared_checkpoint(name), map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {k.removeprefix("module."): v.numpy() for k, v in sd.items() if v.ndim == 4}
