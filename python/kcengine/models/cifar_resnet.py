"""ResNets for CIFAR (He et al. 2016, section 4.2): 6n+2 layers, option-A shortcuts.

Three stages of ``n`` basic blocks with 16, 32 and 64 channels on 32x32, 16x16 and 8x8 maps.
Where a block changes the shape, the shortcut is parameter-free ("option A"): the input is
subsampled (``x[:, :, ::2, ::2]``) and zero-padded by ``planes // 4`` channels on each side.

Parameter and buffer names match the public checkpoints of this architecture once their
``module.`` (DataParallel) prefix is stripped: ``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv{1,2}``,
``layer{1,2,3}.{i}.bn{1,2}`` and ``linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "BasicBlock", "OptionAShortcut", "CIFAR_DEPTHS", "cifar_resnet"]

CIFAR_DEPTHS = (20, 32, 44, 56, 110)


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by ``stride`` and zero-pad ``pad`` channels on each side."""

    def __init__(self, stride: int, pad: int):
        super().__init__()
        self.stride = int(stride)
        self.pad = int(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if planes - in_planes != 2 * (planes // 4):
                raise ValueError(f"option-A shortcut pads planes//4 channels each side: in_planes={in_planes} "
                                 f"cannot reach planes={planes}")
            self.shortcut: nn.Module = OptionAShortcut(stride, planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32x32 inputs; ``depth = 6n + 2``.

    Input ``[B, 3, 32, 32]`` (normalized RGB), output logits ``[B, num_classes]``.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got depth={depth!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got num_classes={num_classes!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """A freshly initialized CIFAR ResNet of the given depth (no weights loaded)."""
    return CifarResNet(depth, num_classes)
