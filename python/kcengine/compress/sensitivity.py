"""Sensitivity sweep: each layer clustered alone, for each k, accuracy against unique parameters.

For every selected layer, one :func:`kcengine.kmeans_sweep` gives the clustering at every
candidate k; for each k the layer's weight in a working copy of the model is set to the
clustered weight (the dense ``centroids[index]``, numerically what a ClusteredConv2d computes) and
the model is evaluated on in-memory images in large batches.  The metric is
``F = accuracy / (unique/total)`` with ``unique/total`` the layer's unique-weight ratio, the seeds' metric;
its local maxima over k are flagged (``F_local_max``).  F grows like ``1/ratio``, so its maxima sit at or near
the smallest k unless accuracy has collapsed there: read them together with the accuracy column (a maximum
at 47% accuracy is a point of compression, not of quality).

Speed: for :class:`~kcengine.models.CifarResNet` the activations entering the residual block
that holds the layer are computed once per layer and only the rest of the network is re-run per
k; other models run whole.  A k whose clustered weight equals the original exactly (k = N with
distinct points) reuses the baseline accuracy without evaluating.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._checks import check_bool, check_int, scalar_value
from .apply import (_kmeans_kwargs, candidate_ks, check_clusterable, check_granularity_and_options, conv_layers,
                    require_dense_convs, sweep_layer)
from ..conv.module import replace_module
from .layers import LayerProblem
from .plan import _check_ratio, select_layers

__all__ = ["SensitivityResult", "sensitivity_sweep", "local_maxima", "DEFAULT_SWEEP_RATIOS"]

DEFAULT_SWEEP_RATIOS = tuple(i / 16 for i in range(1, 17))


def local_maxima(values) -> list[int]:
    """Indices i where values[i] is above its left neighbour and above the first different value to its right
    (ends count against their single neighbour): a plateau that is a peak reports its first point, one on the
    way up (``[1, 2, 2, 3]``) none."""
    v = list(values)
    out = []
    for i, x in enumerate(v):
        left = v[i - 1] if i > 0 else -np.inf
        if not x > left:
            continue
        j = i + 1
        while j < len(v) and v[j] == x:
            j += 1
        if j == len(v) or v[j] < x:
            out.append(i)
    return out


@dataclass
class SensitivityResult:
    baseline_accuracy: float
    granularity: str
    rows: list = field(default_factory=list)  # one dict per (layer, k)
    seconds: float = 0.0
    seconds_kmeans: float = 0.0
    n_evaluations: int = 0

    def layers(self) -> list[str]:
        seen = []
        for r in self.rows:
            if r["layer"] not in seen:
                seen.append(r["layer"])
        return seen

    def layer_rows(self, name: str) -> list[dict]:
        return [r for r in self.rows if r["layer"] == name]

    def maxima(self) -> dict:
        """{layer: [rows at local maxima of F]}"""
        return {n: [r for r in self.layer_rows(n) if r["F_local_max"]] for n in self.layers()}

    def plot(self, path, title: str = "") -> Path:
        """One panel per layer: accuracy and F against k/N, local maxima of F marked."""
        from .._plot import figure, save

        names = self.layers()
        cols = 4
        rows = (len(names) + cols - 1) // cols
        fig = figure((4 * cols, 2.8 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, name in zip(axes.flat, names):
            lr = self.layer_rows(name)
            x = [r["k_ratio"] for r in lr]
            ax.plot(x, [100 * r["accuracy"] for r in lr], "o-", ms=3, color="tab:blue", label="accuracy %")
            ax.axhline(100 * self.baseline_accuracy, color="gray", lw=0.8, ls="--")
            ax.set_ylim(0, 100)
            ax.set_title(f"{name} (N={lr[0]['n_points']})", fontsize=9)
            ax.set_xlabel("k / N", fontsize=8)
            ax2 = ax.twinx()
            ax2.plot(x, [r["F"] for r in lr], "s-", ms=2, color="tab:orange", lw=0.8, label="F")
            mx = [r for r in lr if r["F_local_max"]]
            ax2.plot([r["k_ratio"] for r in mx], [r["F"] for r in mx], "r*", ms=8)
            ax2.set_yscale("log")
            ax.tick_params(labelsize=7)
            ax2.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(title or f"Sensitivity per layer ({self.granularity}): accuracy (blue, %), "
                              f"F = acc/(unique/total) (orange, log), local maxima of F (red *)", fontsize=10)
        return save(fig, path, dpi=90)


class _Runner:
    """Evaluates the model with one conv's weight replaced, re-running only what follows it."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.model = copy.deepcopy(model).eval()
        self.images, self.labels, self.bs = images, labels, batch_size
        from ..models.cifar_resnet import CifarResNet

        self.stages = None
        if type(self.model) is CifarResNet:
            m = self.model
            blocks = [(f"layer{i}.{j}.", b) for i in (1, 2, 3) for j, b in enumerate(getattr(m, f"layer{i}"))]
            stem = ("", lambda x: F.relu(m.bn1(m.conv1(x))))
            head = ("<head>", lambda x: m.linear(F.adaptive_avg_pool2d(x, 1).flatten(1)))
            self.stages = [stem] + blocks + [head]
        self._cache = (0, images)  # (stage index, activations entering it)

    def _stage_of(self, name: str) -> int:
        for i, (prefix, _) in enumerate(self.stages[1:-1], start=1):
            if name.startswith(prefix):
                return i
        return 0

    @torch.inference_mode()
    def _advance_to(self, s: int) -> torch.Tensor:
        i, act = self._cache
        if i > s:
            i, act = 0, self.images
        while i < s:
            fn = self.stages[i][1]
            act = torch.cat([fn(act[j:j + self.bs]) for j in range(0, act.shape[0], self.bs)])
            i += 1
        self._cache = (i, act)
        return act

    @torch.inference_mode()
    def accuracy(self, name: str, weight: torch.Tensor | None) -> float:
        conv = self.model.get_submodule(name)
        old = conv.weight.data
        twin = None
        if weight is not None and parametrize.is_parametrized(conv):
            # a parametrized weight (weight_norm, ...) is recomputed from its originals at every forward, so a
            # replaced .data would not be seen (session 55: the sweep scored the dense layer): a plain conv of
            # the clustered weight stands in for the layer, as the one compress builds does
            twin = _plain_twin(conv, weight)
            replace_module(self.model, name, twin)
        elif weight is not None:
            conv.weight.data = weight.to(old.dtype)
        try:
            if self.stages is None:
                correct = sum(int((self.model(self.images[j:j + self.bs]).argmax(1) == self.labels[j:j + self.bs])
                                  .sum()) for j in range(0, self.images.shape[0], self.bs))
            else:
                s = self._stage_of(name)
                act = self._advance_to(s)
                correct = 0
                for j in range(0, act.shape[0], self.bs):
                    a = act[j:j + self.bs]
                    for _, fn in self.stages[s:]:
                        a = fn(a)
                    correct += int((a.argmax(1) == self.labels[j:j + self.bs]).sum())
        finally:
            if twin is not None:
                replace_module(self.model, name, conv)
            else:
                conv.weight.data = old
        return correct / int(self.labels.shape[0])


def _plain_twin(conv: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` of ``conv``'s geometry computing with ``weight`` and ``conv``'s (current) bias."""
    twin = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
    twin.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    if conv.bias is not None:
        twin.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
    return twin


def _check_sweep_arguments(model, images, labels, granularity, ratios, batch_size, progress, options):
    """``ratios`` as a tuple of floats (or None), after a ValueError naming the argument for anything the sweep
    would fail on deep inside, or would take and quietly misread (an unknown option, a ratio outside (0, 1],
    labels past the model's outputs), before the minutes of clustering: as compress and evaluate check theirs."""
    from ..evaluate.metrics import check_data, check_model, probe_labels

    check_model(model)
    check_granularity_and_options(granularity, options, sensitivity_sweep)
    check_int(batch_size, "batch_size", 1)
    check_bool(progress, "progress")
    if ratios is not None:
        if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
            raise ValueError(f"ratios must be a sequence of k/N values in (0, 1] or None, got ratios={ratios!r}")
        # read once (a generator), 0-d arrays and tensors as the numbers they hold
        ratios = tuple(scalar_value(r) for r in ratios)
        if not ratios:
            raise ValueError("ratios is empty: give at least one k/N value in (0, 1], or None for every k")
        ratios = tuple(_check_ratio(r, "each of ratios") for r in ratios)
    check_data((images, labels), "(images, labels)")
    lazy = next((n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)), None)
    if lazy is not None:  # the probe below would initialize the caller's lazy module with random weights
        raise ValueError(f"model has a lazy module whose weights are not initialized yet ({lazy!r}): run the model "
                         f"on one batch first")
    # the labels against the model's outputs, on two images (a model may squeeze a batch of one); no_grad, not
    # inference_mode: nothing the caller's model keeps may become an inference tensor
    probe_labels(model, images, labels)
    return ratios


def sensitivity_sweep(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, granularity: str = "filter",
                      layers=None, ratios=DEFAULT_SWEEP_RATIOS, batch_size: int = 500, progress: bool = False,
                      **options) -> SensitivityResult:
    """Cluster each selected layer alone at each k and measure accuracy (see the module docstring).

    Args:
        model: any model with ``nn.Conv2d`` layers (not modified).
        images, labels: the evaluation set, in memory (normalized float ``[N, C, H, W]``, int64 ``[N]``).
        granularity: "filter", "kernel" or "element".
        layers: layer selection as in :func:`kcengine.compress`.
        ratios: k/N values to try (k = round(N r), deduplicated); None: every k in 1..N (N <= 64).
        options: k-means options (seed, backend, max_iter, n_init, tol, algorithm).
    """
    t_start = time.perf_counter()
    ratios = _check_sweep_arguments(model, images, labels, granularity, ratios, batch_size, progress, options)
    convs = conv_layers(model)
    require_dense_convs(model, convs)
    by_name = dict(convs)
    selected = select_layers([n for n, _ in convs], layers, model)
    for n in selected:  # a layer compress would refuse is not measured either (session 55: the sweep took it)
        check_clusterable(n, by_name[n])
    total_model = sum(m.weight.numel() for _, m in convs)
    kw = _kmeans_kwargs(options, granularity)
    runner = _Runner(model, images, labels, batch_size)
    base = runner.accuracy(selected[0], None)
    out = SensitivityResult(base, granularity)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(selected), desc="sweep", unit="layer", leave=False)
    t_km = 0.0
    for name in selected:
        p = LayerProblem(name, by_name[name], granularity)
        ks = candidate_ks(p.N, ratios)
        t0 = time.perf_counter()
        fits = sweep_layer(p, ks, kw)
        t_km += time.perf_counter() - t0
        layer_rows = []
        for k, (cents, labs, inertia) in zip(ks, fits):
            w = p.reconstruct(cents, labs)
            if torch.equal(w, p.weight):
                acc = base
            else:
                acc = runner.accuracy(name, w)
                out.n_evaluations += 1
            unique = p.unique_weights(cents, labs)
            ratio = unique / p.dense_weights
            layer_rows.append({
                "layer": name, "n_points": p.N, "k": int(k), "k_ratio": k / p.N, "accuracy": acc,
                "unique_weights": unique, "dense_weights": p.dense_weights, "unique_ratio": ratio,
                "model_unique_ratio": (total_model - p.dense_weights + unique) / total_model,
                "F": acc / ratio, "inertia": inertia})
        mx = set(local_maxima([r["F"] for r in layer_rows]))
        for i, r in enumerate(layer_rows):
            r["F_local_max"] = i in mx
        out.rows += layer_rows
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out.seconds = time.perf_counter() - t_start
    out.seconds_kmeans = t_km
    return out
