"""Knowledge distillation from the unclustered model: KL between temperature-softened logits plus CE, and
matching of intermediate features (the outputs of the blocks that hold clustered layers)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import scalar_value

__all__ = ["distillation_loss", "feature_points", "FeatureTap", "feature_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
                      temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)`` (Hinton et al.).

    The ``T^2`` factor keeps the soft term's gradient scale independent of ``T``.  With
    ``teacher_logits=None`` (or ``alpha=0``) this is plain cross-entropy.

    Args:
        student_logits, teacher_logits: ``[B, classes]``.
        labels: ``[B]`` int64 class indices, or ``[B, classes]`` class probabilities (e.g. mixup's
            mixed one-hot labels: CE is then the same mix of the two labels' CE).
        temperature: ``T > 0``.
        alpha: weight of the distillation term in [0, 1].
    """
    # numpy scalars count as the numbers they hold, bools do not (session 55: np.float32 was refused, True taken)
    t, a = scalar_value(temperature), scalar_value(alpha)
    if isinstance(t, bool) or not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got temperature={temperature!r}")
    if isinstance(a, bool) or not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got alpha={alpha!r}")
    temperature, alpha = float(t), float(a)
    ce = F.cross_entropy(student_logits, labels)
    if teacher_logits is None or alpha == 0:
        return ce
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ in shape")
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1.0 - alpha) * ce


def feature_points(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs feature distillation matches: every module that directly holds a
    clustered (or dense) conv, other than the root -- in a ResNet, each residual block -- in forward-definition
    order.  A model whose convs all sit at the root gives no point."""
    from ..conv.module import ClusteredConv2d

    out = []
    for name, mod in model.named_modules():
        if name and any(isinstance(c, (nn.Conv2d, ClusteredConv2d)) for c in mod.children()):
            out.append(name)
    return out


class FeatureTap:
    """Forward hooks that keep the outputs of ``names`` in ``model`` (the latest forward pass's), in order.
    Use as a context manager; the hooks are removed on exit."""

    def __init__(self, model: nn.Module, names: list[str]):
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(f"feature points {missing} are not modules of the model")
        self.outputs: dict[str, torch.Tensor] = {}
        self._hooks = [mods[n].register_forward_hook(self._keep(n)) for n in names]
        self.names = list(names)

    def _keep(self, name):
        def hook(mod, inp, out):
            self.outputs[name] = out
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def take(self) -> list[torch.Tensor]:
        out = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return out


def feature_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """Mean over points of ``||s - t||^2 / ||t||^2`` (each point's squared error relative to the teacher's
    feature energy on the batch, so blocks of every width and scale count alike)."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"feature lists differ in length or are empty: {len(student_feats)} vs {len(teacher_feats)}")
    total = 0.0
    for s, t in zip(student_feats, teacher_feats):
        if s.shape != t.shape:
            raise ValueError(f"student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} differ in shape")
        t = t.detach()
        total = total + (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
    return total / len(student_feats)
