"""Tiny models and data for the recovery tests (fast on 2 CPU cores)."""
import pytest
import torch
from torch import nn

from kcengine.data.datasets import TensorImages, make_loader


class TinyNet(nn.Module):
    """conv-BN-ReLU x2 + linear on 8x8 images: small enough for tests, shaped like the CIFAR ResNets."""

    def __init__(self, bn: bool = True, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(12) if bn else nn.Identity()
        self.linear = nn.Linear(12, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.linear(x.mean((2, 3)))


def tiny_data(n=48, classes=4, seed=0):
    """Images whose class shifts one colour channel's mean: learnable, so training visibly changes things."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn((n, 3, 8, 8), generator=g)
    x[:, 0] += (y.float() - classes / 2)[:, None, None]
    return TensorImages(x, y, tuple(str(i) for i in range(classes)))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    ds = tiny_data()
    return model, ds, make_loader(ds, 16, shuffle=True, seed=0)


@pytest.fixture
def kit():
    """The helpers above for tests that build their own models and data (importlib mode: no sibling imports)."""
    from types import SimpleNamespace

    return SimpleNamespace(TinyNet=TinyNet, tiny_data=tiny_data)
