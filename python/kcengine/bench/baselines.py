"""Dense baselines as strong as stock PyTorch makes them on the CPU, for the inference benchmarks.

A clustered layer runs its codebook conv with a weight reordered once into oneDNN's layout
(:class:`kcengine.conv.backends.PackedCodebook`), and a fused model folds BatchNorm, the residual add
and ReLU into its gather.  Compared with an eager dense model, part of the measured lead would come
from those two tricks, which a dense model can use as well.  These baselines give the dense side the
same advantages, so a ratio against them is what clustering itself buys:

* :class:`PackedDenseConv` - one dense conv through the same stored-reorder path as the clustered
  layers (``F.conv2d`` reorders its weight on every call: about half of a small batch-1 conv).
* :func:`frozen_dense` - a whole dense model as TorchScript, frozen and optimized for inference
  (BatchNorm folded into the conv weights, weights prepacked for oneDNN, ReLU fused).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

__all__ = ["PackedDenseConv", "frozen_dense"]


class PackedDenseConv:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` with the weight reordered for oneDNN once
    (on the first call, again if the weight or the input shape changes); plain ``F.conv2d`` where that path
    does not apply (groups > 1, string padding, not float32 channels-last, autograd, no oneDNN)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                 groups: int = 1):
        from ..conv.backends import PackedCodebook
        from ..conv.functional import _pair

        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else _pair(padding, "padding")
        self.groups = groups
        self._packed = PackedCodebook() if groups == 1 and not isinstance(self.padding, str) else None

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d) -> "PackedDenseConv":
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self._packed is not None:
            y = self._packed.conv(x, self.weight, self.stride, self.padding, self.dilation)
        if y is None:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def frozen_dense(model: torch.nn.Module, example: torch.Tensor):
    """``model`` (left unchanged) as ``torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(
    model.eval())))``, run twice on ``example`` so its optimization passes are done before timing.

    Returns ``(callable, None)``, the callable running under ``torch.no_grad()``, or ``(None, reason)`` where
    this torch cannot script or freeze the model (TorchScript is deprecated and may go)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            with torch.no_grad():
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model.eval())))
                frozen(example)
                frozen(example)
    except Exception as exc:  # noqa: BLE001 - any failure means "no such baseline here", said in the table
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def run(x):
        with torch.no_grad():
            return frozen(x)

    return run, None
