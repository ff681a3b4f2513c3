"""Per-layer k from the damage each layer does to the network's output once refit, and a budgeted allocation.

:func:`kcengine.compress.sensitivity_sweep` scores each (layer, k) by accuracy with the plain k-means
weights.  For choosing k under a budget before recovery that signal is weak: accuracy on a few hundred
images moves in coarse steps, and a layer clustered by weight distance looks far worse than it will be
once the output-aware refit (:mod:`kcengine.train.calibrate`, finetune's first step) has re-chosen its
centroids.  :func:`output_sensitivity` measures instead, for each layer clustered alone and refit, the
KL divergence of the network's softmax from the dense model's on held-out training images -- a smooth
quantity that adds up approximately over layers.  :func:`allocate_ks` then picks one k per layer with a
given total number of unique filters, minimizing the summed divergence over the measured curves (made
monotone and interpolated between the measured k) exactly, by dynamic programming over the layers.

resnet20 on the CIFAR sample at the k = C_out/2 budget: see bench/results/recovery_resnet20.md.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import time
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, scalar_value

__all__ = ["output_sensitivity", "allocate_ks", "sensitivity_plan", "DEFAULT_OUTPUT_SWEEP_RATIOS"]

DEFAULT_OUTPUT_SWEEP_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def output_sensitivity(model: nn.Module, calib_images: torch.Tensor, eval_images: torch.Tensor, *, layers=None,
                       ratios=DEFAULT_OUTPUT_SWEEP_RATIOS, seed: int = 0, batch_size: int = 512,
                       progress: bool = False) -> list[dict]:
    """Cluster each conv of ``model`` alone (filter granularity) at ``k = round(C_out * r)`` for each ratio,
    refit it to the dense outputs on ``calib_images`` and measure ``KL(dense || clustered)`` of the softmax
    on ``eval_images`` (batch mean).  ``model`` is not modified.

    Returns one dict per (layer, k): ``layer``, ``out_channels``, ``k``, ``kl``, ``agreement`` (fraction of
    eval images whose top-1 class matches the dense model's), ``seconds`` (a layer's first k also carries the
    work shared by its ks: the layer's input moments and the outputs of the modules before it, which the
    clustered copies reuse instead of recomputing; same values as refitting each copy with
    :func:`~kcengine.train.calibrate.calibrate_outputs` and running it whole).
    """
    from ..compress import compress
    from ..compress.apply import candidate_ks, conv_layers, require_dense_convs
    from ..compress.plan import select_layers
    from ..conv import ClusteredConv2d
    from .._modes import eval_mode
    from .calibrate import _layer_input, _moments, _refit_layer, calibrate_outputs, following_batchnorm

    for name, t in (("calib_images", calib_images), ("eval_images", eval_images)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] < 1:
            raise ValueError(f"{name} must be a non-empty [N, C, H, W] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not bool(torch.isfinite(t).all()):  # every KL would be NaN, and a plan made of them
            raise ValueError(f"{name} holds NaN or Inf values")
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise ValueError(f"ratios must be a sequence of numbers in (0, 1], got ratios={ratios!r}")
    ratios = tuple(scalar_value(r) for r in ratios)  # numpy values as the numbers they hold
    if not ratios or any(isinstance(r, bool) or not (isinstance(r, (int, float)) and 0 < r <= 1) for r in ratios):
        raise ValueError(f"ratios must be numbers in (0, 1], got ratios={ratios!r}")
    batch_size = check_int(batch_size, "batch_size", 1)
    seed = check_int(seed, "seed", 0, 2**63 - 1)
    with eval_mode(model):  # every submodule's mode comes back as it was
        require_dense_convs(model, conv_layers(model))
        convs = [(n, m) for n, m in conv_layers(model) if m.groups == 1]
        selected = select_layers([n for n, _ in convs], layers, model)
        by_name = dict(convs)

        starts = range(0, eval_images.shape[0], batch_size)

        def logits(m, prefix=None):
            out = []
            with torch.no_grad():
                for b, i in enumerate(starts):
                    with prefix.serving(m, b) if prefix is not None else contextlib.nullcontext():
                        out.append(m(eval_images[i:i + batch_size]))
            return torch.cat(out)

        t_log = F.log_softmax(logits(model), 1)
        t_top = t_log.argmax(1)
        rows = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(selected), desc="output sensitivity", unit="layer", leave=False)
        opt = {p.name: p.default for p in inspect.signature(calibrate_outputs).parameters.values()}
        # the BN after each conv, by name: a clustered copy has the dense model's modules and names
        module_name = {m: n for n, m in model.named_modules()}
        bn_name = {n: module_name[b] for n, b in following_batchnorm(model, calib_images[:2]).items()}
        for name in selected:
            conv = by_name[name]
            c = conv.out_channels
            # What calibrate_outputs would compute for every k, once per layer: the layer's input (the same
            # for the clustered copy, whose earlier layers are dense) and its patch moments.  And the
            # outputs of the modules that run before the layer, served to each copy's forward.
            mom = prefix = None
            first = True
            for k in (k for k in candidate_ks(c, ratios) if k < c):
                t0 = time.perf_counter()
                cm, _ = compress(model, {"layers": {name: k}}, layers=[name], seed=seed)
                cm.eval()
                layer = cm.get_submodule(name)
                if isinstance(layer, ClusteredConv2d) and layer.granularity == "filter" and layer.groups == 1:
                    if mom is None:
                        x = _layer_input(model, conv, calib_images, opt["batch_size"])
                        mom = _moments(conv, x, x, opt["max_patches"], seed)
                    bn = cm.get_submodule(bn_name[name]) if name in bn_name else None
                    _refit_layer(layer, conv, bn, mom, opt["iterations"], opt["ridge"])
                else:
                    calibrate_outputs(cm, model, calib_images, layers=[name], seed=seed)
                if first:
                    prefix = _Prefix.record(model, name, eval_images, starts, batch_size)
                    first = False
                s_log = F.log_softmax(logits(cm, prefix), 1)
                kl = float(F.kl_div(s_log, t_log, log_target=True, reduction="batchmean"))
                rows.append({"layer": name, "out_channels": c, "k": k, "kl": kl,
                             "agreement": float((s_log.argmax(1) == t_top).float().mean()),
                             "seconds": time.perf_counter() - t0})
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    return rows


class _Prefix:
    """The outputs of the modules that finish before layer ``name`` starts, in a forward of the dense model,
    per eval batch: a clustered copy (only ``name`` differs) gets them instead of recomputing them.

    Candidates are the direct children of ``name``'s ancestors (the model's stem and earlier stages, the
    earlier blocks of its stage, the earlier layers of its block).  One is kept only if a forward calls it
    exactly once, it has finished when ``name`` starts, and it returns a tensor; a module called again
    later (a shared ReLU) runs as usual.  Outputs are cloned when stored and when served (an in-place op
    after the module, in the recording forward or in a copy's, must not change what is stored).
    :meth:`record` returns None when nothing qualifies or the outputs would take more than ``max_bytes``."""

    def __init__(self, outputs: dict):
        self.outputs = outputs  # module name -> [output of batch b]

    @classmethod
    def record(cls, model: nn.Module, name: str, images: torch.Tensor, starts, batch_size: int,
               max_bytes: int = 1 << 30):
        from .calibrate import _Stop

        target = model.get_submodule(name)
        parts = name.split(".")
        cands = {}
        for depth in range(len(parts)):
            parent_name = ".".join(parts[:depth])
            parent = model.get_submodule(parent_name)
            for child_name, child in parent.named_children():
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if full != ".".join(parts[:depth + 1]):
                    cands[full] = child
        # Which candidates qualify: one forward on two images, counting the calls and noting the modules
        # that returned a tensor before the target started.
        calls, before, started = {}, [], []

        def count(n):
            def hook(mod, inp, out):
                calls[n] = calls.get(n, 0) + 1
                if not started and isinstance(out, torch.Tensor):
                    before.append(n)
            return hook

        with _hooks([(m, count(n)) for n, m in cands.items()], target, lambda mod, inp: started.append(1)):
            with torch.no_grad():
                model(images[:2])
        keep = [n for n in before if calls[n] == 1]
        if not keep:
            return None
        # Their outputs on every eval batch, each forward stopped where the target starts.
        outputs = {n: [] for n in keep}
        stored = [0]  # bytes

        def store(n):
            def hook(mod, inp, out):
                outputs[n].append(out.detach().clone())
                stored[0] += out.numel() * out.element_size()
            return hook

        def stop(mod, inp):
            raise _Stop

        with _hooks([(cands[n], store(n)) for n in keep], target, stop), torch.no_grad():
            for i in starts:
                try:
                    model(images[i:i + batch_size])
                except _Stop:
                    pass
                if stored[0] > max_bytes:
                    return None
        if any(len(v) != len(starts) for v in outputs.values()):
            return None  # a module skipped in some batch: do not guess
        return cls(outputs)

    @contextlib.contextmanager
    def serving(self, model: nn.Module, batch: int):
        """Within the block, the recorded modules of ``model`` (a copy with the same names) return their
        stored output for eval batch ``batch`` instead of running."""
        mods = [(model.get_submodule(n), v[batch]) for n, v in self.outputs.items()]
        saved = [mod.__dict__.get("forward") for mod, _ in mods]  # an instance-level forward, if any
        for mod, out in mods:
            mod.forward = lambda *a, _out=out, **k: _out.clone()
        try:
            yield
        finally:
            for (mod, _), old in zip(mods, saved):
                if old is None:
                    del mod.forward
                else:
                    mod.forward = old


@contextlib.contextmanager
def _hooks(post: list, target: nn.Module, pre):
    """Forward hooks ``post`` [(module, hook)] and a forward pre-hook ``pre`` on ``target``, removed on exit."""
    handles = [m.register_forward_hook(h) for m, h in post] + [target.register_forward_pre_hook(pre)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def sensitivity_plan(model: nn.Module, calib_images: torch.Tensor, eval_images: torch.Tensor, ratio: float = 0.5, *,
                     layers=None, ratios=DEFAULT_OUTPUT_SWEEP_RATIOS, min_ratio: float = 0.25, seed: int = 0,
                     progress: bool = False) -> dict:
    """A per-layer plan, ``{"layers": {name: k}}`` for :func:`kcengine.compress`, with as many unique filters in
    all as ``ratio`` gives uniformly (``sum round(C_out * ratio)`` over the layers swept), split by output
    sensitivity: :func:`output_sensitivity` on ``calib_images`` / ``eval_images`` (``layers``, ``ratios``,
    ``seed``, ``progress``), then :func:`allocate_ks` with each layer's floor at ``min_ratio`` of its filters, or
    ``ratio / 2`` where that is lower (so that the floors fit the budget).  ``model`` is not modified.

    This is what ``plan={"sensitivity": ratio}`` does in :func:`kcengine.finetune`, on images of its training
    set.  resnet20 on the CIFAR sample, recovered with finetune's defaults: bench/results/recovery_resnet20.md
    (the mixed plan).  Layers the sweep leaves out (grouped convs, or ``layers``) are not in the plan and stay
    dense."""
    from ..compress.plan import ratio_to_k

    ratio, min_ratio = scalar_value(ratio), scalar_value(min_ratio)  # numpy values as the numbers they hold
    ratio = float(ratio) if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else ratio
    if not isinstance(ratio, float) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1], got ratio={ratio!r}")
    if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must be a number in [0, 1], got min_ratio={min_ratio!r}")  # before the sweep
    rows = output_sensitivity(model, calib_images, eval_images, layers=layers, ratios=ratios, seed=seed,
                              progress=progress)
    if not rows:
        raise ValueError(f"no layer to split the filters of ratio {ratio:g} between: the sweep's candidate ks "
                         f"(ratios={tuple(ratios)!r}) are all the layers' full width")
    width = {r["layer"]: int(r["out_channels"]) for r in rows}
    budget = sum(ratio_to_k(c, ratio) for c in width.values())
    return {"layers": allocate_ks(rows, budget, min_ratio=min(min_ratio, ratio / 2))}


def allocate_ks(rows: list[dict], budget: int, *, min_ratio: float = 0.25) -> dict[str, int]:
    """One k per layer of ``rows`` (from :func:`output_sensitivity`) with ``sum(k) == budget`` (or every layer
    at full width when the budget allows it) that minimizes the summed KL over the layers' curves.

    Each layer's curve is the measured KL at its k, 0 at ``k = out_channels``, linearly interpolated between,
    made non-increasing in k (more clusters are never worse), and forbidden below ``min_ratio * out_channels``
    (a floor: a layer cut to a couple of filters measures cheap alone but leaves finetuning nothing to work
    with).  The minimum is exact whatever the curves' shape: a dynamic program with one state per layer and
    number of filters spent, where a split by marginal gains can miss it on a curve that is not convex (a
    measured KL that falls faster after a slow stretch).  On a tie a layer takes the smaller k."""
    if not rows:
        raise ValueError("rows is empty: run output_sensitivity first")
    if not (isinstance(min_ratio, (int, float)) and 0 <= min_ratio <= 1):
        raise ValueError(f"min_ratio must be in [0, 1], got min_ratio={min_ratio!r}")
    by_layer: dict[str, list] = {}
    for r in rows:
        if not isinstance(r, dict) or not {"layer", "out_channels", "k"} <= set(r):
            raise ValueError(f"rows must be dicts with 'layer', 'out_channels', 'k' and 'kl' (as output_sensitivity "
                             f"returns), got {r!r}")
        kl = r.get("kl")
        if isinstance(kl, bool) or not isinstance(kl, numbers.Real) or not math.isfinite(float(kl)):
            raise ValueError(f"rows must hold a finite 'kl' in every row, got {r!r}")
        c, k = r["out_channels"], r["k"]
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (c, k)) or not 1 <= k < c:
            raise ValueError(f"rows must hold integers 1 <= k < out_channels (full width is the curve's end, KL 0), "
                             f"got {r!r}")
        rs = by_layer.setdefault(r["layer"], [])
        if rs and int(rs[0]["out_channels"]) != int(c):
            raise ValueError(f"rows of layer {r['layer']!r} disagree on out_channels: {rs[0]['out_channels']} and "
                             f"{c}")
        if any(int(q["k"]) == int(k) for q in rs):
            raise ValueError(f"rows hold layer {r['layer']!r} at k={k} twice")
        rs.append(r)
    curves: dict[str, np.ndarray] = {}
    floor_total = 0
    for name, rs in by_layer.items():
        rs = sorted(rs, key=lambda r: int(r["k"]))
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
    total = min(int(budget), sum(len(c) for c in curves.values()))  # past every layer's width: all full
    # best[b]: the least summed KL of the layers so far with b filters among them; took[l][b]: layer l's k there
    best = np.full(total + 1, np.inf)
    best[0] = 0.0
    took = []
    for curve in curves.values():
        nxt = np.full(total + 1, np.inf)
        arg = np.zeros(total + 1, dtype=np.int64)
        for k in range(1, min(len(curve), total) + 1):
            if curve[k - 1] == np.inf:
                continue
            cand = best[: total + 1 - k] + curve[k - 1]
            won = cand < nxt[k:]
            nxt[k:][won] = cand[won]
            arg[k:][won] = k
        best = nxt
        took.append(arg)
    out, b = {}, total
    for name, arg in zip(reversed(list(curves)), reversed(took)):
        out[name] = int(arg[b])
        b -= out[name]
    return {name: out[name] for name in curves}
