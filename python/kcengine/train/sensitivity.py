"""Per-layer k from the damage each layer does to the network's output once refit, and a budgeted allocation.

:func:`kcengine.compress.sensitivity_sweep` scores each (layer, k) by accuracy with the plain k-means
weights.  For choosing k under a budget before recovery that signal is weak: accuracy on a few hundred
images moves in coarse steps, and a layer clustered by weight distance looks far worse than it will be
once the output-aware refit (:mod:`kcengine.train.calibrate`, finetune's first step) has re-chosen its
centroids.  :func:`output_sensitivity` measures instead, for each layer clustered alone and refit, the
KL divergence of the network's softmax from the dense model's on held-out training images -- a smooth
quantity that adds up approximately over layers.  :func:`allocate_ks` then picks one k per layer with a
given total number of unique filters, minimizing the summed divergence (Lagrangian relaxation over the
measured curves, made monotone and interpolated between the measured k, then filled to the exact budget
by the best marginal gains).

resnet20 on the CIFAR sample at the k = C_out/2 budget: see bench/results/recovery_resnet20.md.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["output_sensitivity", "allocate_ks", "DEFAULT_OUTPUT_SWEEP_RATIOS"]

DEFAULT_OUTPUT_SWEEP_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def output_sensitivity(model: nn.Module, calib_images: torch.Tensor, eval_images: torch.Tensor, *, layers=None,
                       ratios=DEFAULT_OUTPUT_SWEEP_RATIOS, seed: int = 0, batch_size: int = 512,
                       progress: bool = False) -> list[dict]:
    """Cluster each conv of ``model`` alone (filter granularity) at ``k = round(C_out * r)`` for each ratio,
    refit it to the dense outputs on ``calib_images`` and measure ``KL(dense || clustered)`` of the softmax
    on ``eval_images`` (batch mean).  ``model`` is not modified.

    Returns one dict per (layer, k): ``layer``, ``out_channels``, ``k``, ``kl``, ``agreement`` (fraction of
    eval images whose top-1 class matches the dense model's), ``seconds``.
    """
    from ..compress import compress
    from ..compress.apply import candidate_ks, conv_layers
    from ..compress.plan import select_layers
    from .calibrate import calibrate_outputs

    for name, t in (("calib_images", calib_images), ("eval_images", eval_images)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] < 1:
            raise ValueError(f"{name} must be a non-empty [N, C, H, W] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    ratios = tuple(ratios)
    if not ratios or any(not (isinstance(r, (int, float)) and 0 < r <= 1) for r in ratios):
        raise ValueError(f"ratios must be numbers in (0, 1], got ratios={ratios!r}")
    was_training = model.training
    model.eval()
    try:
        convs = [(n, m) for n, m in conv_layers(model) if m.groups == 1]
        selected = select_layers([n for n, _ in convs], layers)
        by_name = dict(convs)

        def logits(m):
            with torch.no_grad():
                return torch.cat([m(eval_images[i:i + batch_size]) for i in range(0, eval_images.shape[0],
                                                                                  batch_size)])

        t_log = F.log_softmax(logits(model), 1)
        t_top = t_log.argmax(1)
        rows = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(selected), desc="output sensitivity", unit="layer", leave=False)
        for name in selected:
            c = by_name[name].out_channels
            for k in (k for k in candidate_ks(c, ratios) if k < c):
                t0 = time.perf_counter()
                cm, _ = compress(model, {"layers": {name: k}}, layers=[name], seed=seed)
                cm.eval()
                calibrate_outputs(cm, model, calib_images, layers=[name], seed=seed)
                s_log = F.log_softmax(logits(cm), 1)
                kl = float(F.kl_div(s_log, t_log, log_target=True, reduction="batchmean"))
                rows.append({"layer": name, "out_channels": c, "k": k, "kl": kl,
                             "agreement": float((s_log.argmax(1) == t_top).float().mean()),
                             "seconds": time.perf_counter() - t0})
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        model.train(was_training)
    return rows


def allocate_ks(rows: list[dict], budget: int, *, min_ratio: float = 0.25) -> dict[str, int]:
    """One k per layer of ``rows`` (from :func:`output_sensitivity`) with ``sum(k) == budget`` (or every layer
    at full width when the budget allows it) minimizing the summed KL.

    Each layer's curve is the measured KL at its k, 0 at ``k = out_channels``, linearly interpolated between,
    made non-increasing in k (more clusters are never worse), and forbidden below ``min_ratio * out_channels``
    (a floor: a layer cut to a couple of filters measures cheap alone but leaves finetuning nothing to work
    with).  The allocation minimizes ``sum KL + lam * sum k`` for the ``lam`` that meets the budget, then
    adds filters one at a time where they lower the curve most."""
    if not rows:
        raise ValueError("rows is empty: run output_sensitivity first")
    if not (isinstance(min_ratio, (int, float)) and 0 <= min_ratio <= 1):
        raise ValueError(f"min_ratio must be in [0, 1], got min_ratio={min_ratio!r}")
    by_layer: dict[str, list] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
    curves: dict[str, np.ndarray] = {}
    floor_total = 0
    for name, rs in by_layer.items():
        rs = sorted(rs, key=lambda r: r["k"])
        c = int(rs[0]["out_channels"])
        ks = [int(r["k"]) for r in rs] + [c]
        kl = [float(r["kl"]) for r in rs] + [0.0]
        curve = np.interp(np.arange(1, c + 1), ks, kl)
        curve = np.minimum.accumulate(curve)
        lo = max(1, int(np.ceil(min_ratio * c)))
        curve[: lo - 1] = np.inf
        curves[name] = curve
        floor_total += lo
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < floor_total:
        raise ValueError(f"budget must be an int >= {floor_total} (every layer at its floor of min_ratio="
                         f"{min_ratio:g}), got budget={budget!r}")

    def pick(lam):
        return {n: int(np.argmin(c + lam * np.arange(1, len(c) + 1))) + 1 for n, c in curves.items()}

    lo_lam, hi_lam = 0.0, 1.0
    while sum(pick(hi_lam).values()) > budget:
        hi_lam *= 2
    for _ in range(60):
        mid = 0.5 * (lo_lam + hi_lam)
        if sum(pick(mid).values()) > budget:
            lo_lam = mid
        else:
            hi_lam = mid
    ks = pick(hi_lam)
    while sum(ks.values()) < budget:
        grow = [n for n in ks if ks[n] < len(curves[n])]
        if not grow:
            break
        best = max(grow, key=lambda n: curves[n][ks[n] - 1] - curves[n][ks[n]])
        ks[best] += 1
    return ks
