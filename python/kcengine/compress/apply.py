"""``compress``: cluster the conv layers of any model with a plan and return a new model + report."""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from .._checks import check_bool, check_float, check_int
from ..kmeans import kmeans, kmeans_sweep
from ..conv.module import check_plain_conv, replace_module
from .layers import GRANULARITIES, LayerProblem, clustered_sizes, effective_weight
from .plan import (ByChannels, Elbow, FixedRatio, OutputSensitivity, PerLayer, k_from_value, parse_plan, ratio_to_k,
                   select_layers)
from .report import CompressionReport, LayerReport

__all__ = ["compress", "conv_layers", "require_dense_convs", "candidate_ks", "elbow_index", "sweep_layer", "replace_module"]

_KMEANS_OPTIONS = ("seed", "backend", "max_iter", "n_init", "tol", "algorithm")


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """``(name, module)`` of every ``nn.Conv2d`` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def require_dense_convs(model: nn.Module, convs) -> None:
    """ValueError when ``model`` has no dense conv left because it is already clustered (the plain
    "no nn.Conv2d" error of :func:`select_layers` would not say why)."""
    if convs:
        return
    from .layers import conv_weight_counts

    n = conv_weight_counts(model)["clustered"]
    if n:
        raise ValueError(f"the model is already clustered ({n} clustered conv layers, no nn.Conv2d left): "
                         f"compress and sweep start from the dense model (its checkpoint, not a compact file)")


def candidate_ks(n: int, ratios=None, max_points: int = 64) -> list[int]:
    """ks to sweep for a layer of ``n`` points: from ``ratios``, else all of 1..n when n <= max_points,
    else ``max_points`` ks spread geometrically over [1, n] (n always included)."""
    if ratios is not None:
        return sorted({ratio_to_k(n, r) for r in ratios})
    if n <= max_points:
        return list(range(1, n + 1))
    ks = np.unique(np.round(np.geomspace(1, n, max_points)).astype(int))
    return sorted(set(int(k) for k in ks) | {n})


def elbow_index(ks, inertias) -> int:
    """Index of the elbow of a decreasing curve: farthest below the chord, both axes scaled to [0, 1]."""
    ks = np.asarray(ks, dtype=np.float64)
    y = np.asarray(inertias, dtype=np.float64)
    if ks.size < 3:
        return int(ks.size - 1)
    x = (ks - ks[0]) / max(ks[-1] - ks[0], 1e-300)
    span = y[0] - y[-1]
    if span <= 0:
        return 0
    yn = (y - y[-1]) / span  # 1 at the first point, 0 at the last
    chord = 1.0 - x
    return int(np.argmax(chord - yn))


def check_granularity_and_options(granularity, options: dict, caller) -> None:
    """ValueError unless ``granularity`` is one of :data:`GRANULARITIES` and every key of ``options`` (the
    ``**options`` of ``caller``: compress or the sensitivity sweep, which take the same ones) a k-means option.
    The message names the likely meant argument and lists ``caller``'s own keyword arguments beside the
    k-means options (``compress(model, ratios=0.5)`` is a typo of ``ratio``, not of a k-means option)."""
    import difflib
    import inspect

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got granularity={granularity!r}")
    unknown = sorted(set(options) - set(_KMEANS_OPTIONS))
    if unknown:
        own = [p.name for p in inspect.signature(caller).parameters.values()
               if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)]
        near = difflib.get_close_matches(unknown[0], own + list(_KMEANS_OPTIONS), n=1)
        hint = f" (did you mean {near[0]}=?)" if near else ""
        raise ValueError(f"unknown option(s) {unknown}{hint}; {caller.__name__} takes {', '.join(own)} and the "
                         f"k-means options {', '.join(_KMEANS_OPTIONS)}")


def _kmeans_kwargs(options: dict, granularity: str) -> dict:
    """The k-means options, checked before any clustering (and before the first progress line); the seed is
    resolved once (an int; a Generator or None draws one), so every k-means call of the compress gets that int
    and the report records it."""
    from .._registry import backend_status, check_backend_name
    from ..kmeans.api import _resolve_seed, check_solver_options

    kw = {k: options[k] for k in _KMEANS_OPTIONS if k in options}
    kw["seed"] = _resolve_seed(kw.get("seed", 0))
    if granularity == "element":
        kw.setdefault("algorithm", "exact1d")
    if kw.get("backend") not in (None, "auto"):  # None is "auto", as kmeans takes it
        check_backend_name(kw["backend"])
        reason = backend_status(kw["backend"])
        if reason:  # as kmeans would say it, but before any work
            raise RuntimeError(f"backend={kw['backend']!r} is not available: {reason}")
    n_init, max_iter = check_solver_options(kw.get("n_init", 1), kw.get("max_iter", 300), kw.get("algorithm", "auto"))
    kw.update({k: v for k, v in (("n_init", n_init), ("max_iter", max_iter)) if k in kw})
    if "tol" in kw:
        kw["tol"] = check_float(kw["tol"], "tol", 0.0)
    return kw


def sweep_layer(prob: LayerProblem, ks: list[int], kw: dict) -> list[tuple[list, list, float]]:
    """[(centroids per problem, labels per problem, inertia)] of ``prob`` for every k in ``ks``.

    Filter/kernel: one ``kmeans_sweep`` over the layer's points.  Element: one ragged ``kmeans``
    call over every (coordinate, k) pair.
    """
    pts = prob.points()
    if prob.granularity != "element":
        res = kmeans_sweep(pts[0], ks, **kw)
        return [([r.centroids], [r.labels], float(r.inertia)) for r in res]
    xs = [p for _ in ks for p in pts]
    kk = [k for k in ks for _ in pts]
    r = kmeans(xs, kk, **kw)
    out = []
    D = len(pts)
    inert = np.asarray(r.inertia, dtype=np.float64)
    for i in range(len(ks)):
        sl = slice(i * D, (i + 1) * D)
        out.append((list(r.centroids[sl]), list(r.labels[sl]), float(inert[sl].sum())))
    return out


def _choose_ks(strategy, probs: list[LayerProblem], kw: dict):
    """{name: k} and, for sweep-based strategies, {name: (cents, labels, inertia)} at the chosen k."""
    ks, reuse, notes = {}, {}, {}
    if isinstance(strategy, Elbow):  # before any sweep: ratios that round to fewer than 3 ks have no elbow
        for p in probs:
            cand = candidate_ks(p.N, strategy.ratios)
            if len(cand) < 3 and p.N >= 3:  # (a layer of 1 or 2 points has no elbow at any ratios: k = N)
                raise ValueError(f"elbow plan: layer {p.name!r} ({p.N} points) gets only the ks {cand} from "
                                 f"ratios {list(strategy.ratios)}; an elbow needs at least 3 distinct ks (widen "
                                 f"the range or leave the layer out with layers=)")
    for p in probs:
        if isinstance(strategy, FixedRatio):
            ks[p.name] = k_from_value(strategy.ratio, p.N, f"layer {p.name}")
        elif isinstance(strategy, PerLayer):
            ks[p.name] = k_from_value(strategy.value_for(p.name), p.N, f"layer {p.name}")
        elif isinstance(strategy, ByChannels):
            ks[p.name] = k_from_value(strategy.mapping[p.shape[0]], p.N, f"layer {p.name} (C_out={p.shape[0]})")
        else:
            if isinstance(strategy, Elbow):
                cand = candidate_ks(p.N, strategy.ratios)
            else:
                cand = candidate_ks(p.N)
            sweep = sweep_layer(p, cand, kw)
            inert = [s[2] for s in sweep]
            if isinstance(strategy, Elbow):
                i = elbow_index(cand, inert)
                notes[p.name] = f"elbow at k={cand[i]} over {len(cand)} ks"
            else:
                limit = strategy.limit
                if strategy.relative:  # of the sweep's own k = 1 inertia (candidate_ks always holds k = 1): the
                    # total sum of squares computed apart could fall an ulp below it, and 1.0 then picked k = 2
                    limit *= inert[cand.index(1)]
                ok = [j for j, v in enumerate(inert) if v <= limit]
                i = ok[0] if ok else len(cand) - 1
                notes[p.name] = f"limit {limit:.4g}: k={cand[i]} of {len(cand)} candidates"
            ks[p.name] = cand[i]
            reuse[p.name] = sweep[i]
    return ks, reuse, notes


def check_clusterable(name: str, conv: nn.Conv2d) -> None:
    """ValueError, naming layer ``name``, for a conv whose weights cannot be clustered: a subclass with its own
    forward, lazy or meta weights, NaN or Inf, no output channels."""
    try:
        check_plain_conv(conv)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}; leave the layer out with layers=") from None
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"layer {name!r} is a lazy conv whose weights are not initialized yet: run the model on "
                         f"one batch first")
    if conv.weight.is_meta:
        raise ValueError(f"layer {name!r} has its weights on the meta device: they have a shape but no values to "
                         f"cluster (load or materialize them first, e.g. model.to_empty() then a checkpoint)")
    if conv.weight.numel() == 0:
        raise ValueError(f"layer {name!r} has no weights to cluster (weight shape {tuple(conv.weight.shape)}); "
                         f"leave the layer out with layers=")
    if not bool(torch.isfinite(conv.weight).all()):
        raise ValueError(f"layer {name!r} has NaN or Inf weights: k-means needs finite data")


def _filter_by_strategy(strategy, probs: list[LayerProblem], model_channels=None, model=None) -> tuple[
        list[LayerProblem], list[str]]:
    """The layers the plan clusters and those it leaves dense.  ``model_channels``: every conv's C_out in the
    model, against which a channels plan's counts are checked (a count of a layer outside ``layers=`` is fine;
    one no conv has is a typo).  ``model``: for the error naming a layer's second path."""
    if isinstance(strategy, PerLayer):
        strategy.check_names([p.name for p in probs], model)
        keep = [p for p in probs if strategy.value_for(p.name) is not None]
    elif isinstance(strategy, ByChannels):
        keep = [p for p in probs if p.shape[0] in strategy.mapping]
        have = sorted({p.shape[0] for p in probs})
        if not keep:
            raise ValueError(f"channels plan {dict(strategy.mapping)} matches no selected layer; "
                             f"their C_out are {have}")
        every = sorted(set(model_channels)) if model_channels is not None else have
        unused = [c for c in strategy.mapping if c not in every]
        if unused:
            raise ValueError(f"channels plan names C_out={unused[0]}, which no conv layer of the model has; "
                             f"their C_out are {every}")
    else:
        keep = probs
    kept = {p.name for p in keep}
    return keep, [p.name for p in probs if p.name not in kept]


def compress(model: nn.Module, plan=None, *, ratio=None, granularity: str = "filter", layers=None,
             threshold: float | None = None, cosine: bool = False, eval_data=None, eval_batch_size: int = 500,
             conv_backend: str = "auto", progress=None, **options):
    """Cluster the conv weights of ``model`` and return ``(new_model, report)``.

    Works on any ``nn.Module`` holding ``nn.Conv2d`` layers, with any padding (``"same"`` with an even kernel
    too) and ``padding_mode``; a subclass of ``nn.Conv2d`` with its own forward is
    refused by name (clustering it would drop what that forward does: leave it out with ``layers=``).
    ``model`` is not modified: the result is a deep copy whose selected convs are replaced (see
    :mod:`kcengine.compress.layers` for the module each granularity/option gives).  All selected layers
    are clustered in ONE batched :func:`kcengine.kmeans` call (ragged: each layer its own N, D and k); the
    inertia and elbow plans sweep k per layer with :func:`kcengine.kmeans_sweep` and reuse the chosen fit.

    Args:
        model: the model to compress (left unchanged).
        plan: a k-selection strategy, dict or string (:mod:`kcengine.compress.plan`), or a float: the ratio.
        ratio: short form of ``plan=FixedRatio(ratio)``: ``k = round(N * ratio)`` (halves up, at least 1).
        granularity: ``"filter"``, ``"kernel"`` or ``"element"``.
        layers: which convs: None (all), ``"first"``, a regex (full match) or a list of names.
        threshold: filters/kernels farther than this from their centroid keep their own weights.
        cosine: cluster unit-norm filters and keep each filter's norm (filter granularity).  The norms and a
            conv's bias become the layer's ``scale`` / ``shift`` buffers, which finetune does not train.
        eval_data: optional ``(images, labels)`` / Dataset / DataLoader: accuracy before and after
            goes into the report.
        eval_batch_size: the batch size of that evaluation.
        conv_backend: backend of the ClusteredConv2d layers (``"auto"``, None meaning the same, ``"cpu"``,
            ``"torch"`` or ``"triton"``); per-element layers compute a dense conv and take none.
        progress: None, or a callable given one line of text before each step that can take long (the
            per-layer k sweeps of the inertia and elbow plans, the clustering, the accuracy evaluation),
            after every argument was checked; ``kcengine prune`` prints them to stderr.
        **options: k-means options ``seed`` (default 0), ``backend``, ``max_iter``, ``n_init``,
            ``tol``, ``algorithm`` (default ``"exact1d"`` for element).

    Returns:
        ``(new_model, CompressionReport)``.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    check_granularity_and_options(granularity, options, compress)
    eval_batch_size = check_int(eval_batch_size, "eval_batch_size", 1)
    if eval_data is not None:  # here, not after the clustering (session 55: labels and dtypes were found after)
        from ..evaluate.metrics import _is_pair, check_data, probe_labels

        check_data(eval_data, "eval_data")
        if _is_pair(eval_data):  # (a loader's batches are read by the evaluation only)
            try:
                probe_labels(model, *eval_data)
            except ValueError as exc:
                raise ValueError(f"eval_data: {exc}") from None
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be None or a callable taking one line of text, got {progress!r}")
    say = progress or (lambda msg: None)
    cosine = check_bool(cosine, "cosine")
    threshold = check_float(threshold, "threshold", optional=True)
    if threshold is not None:
        if granularity == "element":
            raise ValueError("threshold applies to granularity 'filter' or 'kernel', not 'element'")
    from .._registry import check_backend_name

    conv_backend = "auto" if conv_backend is None else conv_backend
    check_backend_name(conv_backend, "conv_backend", op="conv")
    strategy = parse_plan(plan, ratio)
    if isinstance(strategy, OutputSensitivity):
        raise ValueError(f"plan {plan!r} splits the unique filters by the network's outputs on data, which compress "
                         f"(weights only) does not see: kcengine.finetune(model, loader, plan={plan!r}) measures it "
                         f"on its training images, or kcengine.train.sensitivity_plan(model, calib_images, "
                         f"eval_images, {strategy.ratio:g}) makes the per-layer plan to pass here")
    convs = conv_layers(model)
    require_dense_convs(model, convs)
    by_name = dict(convs)
    selected = select_layers([n for n, _ in convs], layers, model)
    for n in selected:  # before any clustering, and naming the layer
        check_clusterable(n, by_name[n])
    probs = [LayerProblem(n, by_name[n], granularity, cosine) for n in selected]  # cosine checked above
    probs, skipped = _filter_by_strategy(strategy, probs, [m.out_channels for _, m in convs], model)
    kw = _kmeans_kwargs(options, granularity)

    t0 = time.perf_counter()
    if probs and not isinstance(strategy, (FixedRatio, PerLayer, ByChannels)):
        say(f"choosing k for {len(probs)} layer(s), {strategy.describe()}: a k-means sweep per layer")
    ks, reuse, notes = _choose_ks(strategy, probs, kw)
    todo = [p for p in probs if p.name not in reuse]
    fits = dict(reuse)
    if todo:
        xs, kk, owner = [], [], []
        for p in todo:
            for x in p.points():
                xs.append(x)
                kk.append(ks[p.name])
                owner.append(p.name)
        # one batched call per dtype: float64 layers cluster in float64, the others in float32 (session 55: a
        # model mixing them failed with "x mixes dtypes")
        groups: dict = {}
        for i, x in enumerate(xs):
            groups.setdefault(np.dtype(x.dtype), []).append(i)
        say(f"clustering {len(todo)} layer(s) at {granularity} granularity: {len(xs)} k-means problem(s), "
            f"{sum(int(x.shape[0]) for x in xs)} points, {sum(kk)} centers in all, "
            f"{'one batched call' if len(groups) == 1 else f'{len(groups)} batched calls (one per dtype)'}")
        cents, labs, inert = [None] * len(xs), [None] * len(xs), np.zeros(len(xs))
        for members in groups.values():
            r = kmeans([xs[i] for i in members], [kk[i] for i in members], **kw)
            for j, i in enumerate(members):
                cents[i], labs[i] = r.centroids[j], r.labels[j]
            inert[members] = np.asarray(r.inertia, dtype=np.float64).reshape(-1)
        for p in todo:
            idx = [i for i, o in enumerate(owner) if o == p.name]
            fits[p.name] = ([cents[i] for i in idx], [labs[i] for i in idx], float(inert[idx].sum()))
    t_cluster = time.perf_counter() - t0

    # layers that arrived clustered (a model compressed in steps) count in the totals at their stored size
    before = {n: list(sz) for n, m in model.named_modules() if (sz := clustered_sizes(m)) is not None}
    new_model = copy.deepcopy(model)
    layer_reports = []
    for p in probs:
        cents, labels, inertia = fits[p.name]
        mod = p.build(cents, labels, threshold, backend=conv_backend)
        new_model = replace_module(new_model, p.name, mod)  # the layer itself where the model is the conv
        # the change against the caller's own weights, in float64 (a float32 copy hid a float64 layer's rounding)
        delta = effective_weight(mod).to("cpu", torch.float64) - p.conv.weight.detach().to("cpu", torch.float64)
        _, _, n_kept = p.codebook_and_index(cents, labels, threshold) if p.granularity != "element" else (0, 0, 0)
        unique = p.unique_weights(cents, labels, threshold)
        layer_reports.append(LayerReport(
            name=p.name, shape=list(p.shape), granularity=granularity, n_points=p.N, k=int(ks[p.name]),
            dense_weights=p.dense_weights, unique_weights=unique, compression_ratio=p.dense_weights / unique,
            inertia=inertia, kept=int(n_kept), l0=int((delta != 0).sum()), l1=float(delta.abs().sum()),
            l2=float(delta.norm()), linf=float(delta.abs().max()), note=notes.get(p.name, "")))

    report = CompressionReport(
        plan=strategy.describe(), granularity=granularity, threshold=threshold, cosine=bool(cosine),
        layers=layer_reports, skipped=list(skipped) + [n for n, _ in convs if n not in selected],
        total_conv_weights=int(sum(m.weight.numel() for _, m in convs)) + sum(w for w, _ in before.values()),
        already_clustered=before, seconds_clustering=t_cluster,
        kmeans_options={k: v for k, v in kw.items()})
    if eval_data is not None:
        from ..evaluate import evaluate

        say("evaluating the accuracy of the model before and after")
        report.accuracy_before = evaluate(model, eval_data, batch_size=eval_batch_size).top1
        report.accuracy_after = evaluate(new_model, eval_data, batch_size=eval_batch_size).top1
    report.seconds_total = time.perf_counter() - t_start
    return new_model, report
