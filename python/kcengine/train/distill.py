"""Knowledge distillation from the unclustered model: KL between temperature-softened logits plus CE."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


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
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got temperature={temperature!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got alpha={alpha!r}")
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
