"""Benchmark of centroid-indexed convolution against dense convolution (CPU; the same table on CUDA).

Two parts, one process, same inputs, alternating order (dense, clustered, dense, ...; best time of each):

* **layers**: every distinct conv shape of torchvision resnet18 at 224x224 (stem 7x7, 3x3, 1x1 downsample),
  batch 1 and 32, granularity filter and kernel, K in {C_out/8, C_out/4, C_out/2}; the dense side is
  the clustered layer's own dense weight (``to_dense()``) through the same stored-reorder oneDNN path as the
  clustered layer's conv (:class:`.baselines.PackedDenseConv`), with eager ``F.conv2d`` timed beside it.  The default-init weights are
  clustered by a random balanced assignment with cluster-mean centroids (timing does not depend on how the
  clusters were found).  FLOPs per variant: dense ``2*N*HW*C_out*C_in*kh*kw``; filter
  ``2*N*HW*K*C_in*kh*kw`` (the gather is a copy); kernel ``2*N*HW*C_in*M*kh*kw + N*HW*C_out*C_in`` (the M
  codebook responses of each input channel, M = most codebook kernels one input channel uses, then the
  gather-sum adds).
* **end to end**: resnet18 (eval) with every conv clustered (filter, K = C_out/4) and conv+BN(+add)+ReLU fused
  (:func:`kcengine.nn.fuse_for_inference`) vs the dense model, in NCHW and channels-last memory formats, and
  vs the dense model frozen for inference by TorchScript (:func:`.baselines.frozen_dense`); and the same model
  with every conv at kernel granularity (K = C_out/8 and C_out/4) against its dense weights, channels-last
  (when the run includes kernel granularity).

Run: ``python -m kcengine.bench.conv --out bench/results`` (writes indexed_conv.md and .csv).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .baselines import PackedDenseConv, frozen_dense
from .common import (command_line, git_commit, keep_freed_memory_mapped, machine_info, markdown_table, now_utc,
                     rel_diff, time_against, time_alternating, write_csv)

__all__ = ["resnet18_conv_shapes", "run_layer_bench", "run_e2e_bench", "run_e2e_kernel_bench", "run_checkpoint_sizes",
           "run_conv_bench", "main"]


def resnet18_conv_shapes(size: int = 224) -> list[dict]:
    """Distinct (C_in, C_out, k, stride, padding, H_in) of torchvision resnet18's convs at ``size``x``size``."""
    import torchvision

    model = torchvision.models.resnet18().eval()
    seen: dict[tuple, dict] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(mod, inp, out, name=name):
                key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0],
                       inp[0].shape[2])
                seen.setdefault(key, {"layer": name, "c_in": key[0], "c_out": key[1], "k": key[2], "stride": key[3],
                                      "padding": key[4], "h_in": key[5], "count": 0})["count"] += 1
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return list(seen.values())


def _random_clustering(weight: torch.Tensor, k: int, granularity: str, seed: int) -> SimpleNamespace:
    """A balanced random assignment of filters (or kernels) to ``k`` clusters; centroids = cluster means."""
    c_out, c_in, kh, kw = weight.shape
    pts = weight.detach().reshape(c_out, -1) if granularity == "filter" else weight.detach().reshape(-1, kh * kw)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(pts.shape[0], generator=g) % k
    sums = torch.zeros(k, pts.shape[1], dtype=pts.dtype).index_add_(0, labels, pts)
    cent = sums / torch.bincount(labels, minlength=k).clamp_min(1)[:, None].to(pts.dtype)
    return SimpleNamespace(centroids=cent, labels=labels)


def _flops(shape: dict, n: int, ho: int, wo: int, granularity: str | None, k: int, m: int = 0) -> float:
    px = n * ho * wo
    kk = shape["k"] * shape["k"]
    if granularity is None:
        return 2.0 * px * shape["c_out"] * shape["c_in"] * kk
    if granularity == "filter":
        return 2.0 * px * k * shape["c_in"] * kk
    return 2.0 * px * shape["c_in"] * m * kk + px * shape["c_out"] * shape["c_in"]


# Best-of repeats per (batch, granularity) of the layer table and per batch of the end-to-end rows (one
# warm-up each).  Batch-32 kernel rows take 4 like the filter rows: with 2, one burst of another job on
# this shared machine decided the row (the 7x7 stem read 0.99x in one run, 1.3x in the next ones).
LAYER_REPEAT = {(1, "filter"): 10, (1, "kernel"): 5, (32, "filter"): 4, (32, "kernel"): 4}
E2E_REPEAT = {1: 20, 32: 3}


def _repeat_count(table: dict | None, defaults: dict, key) -> int:
    """Best-of count for ``key``: from ``table`` (``defaults`` when None), 2 where it has no entry."""
    return (table or defaults).get(key, 2)


def run_layer_bench(batches=(1, 32), divisors=(8, 4, 2), granularities=("filter", "kernel"), size: int = 224,
                    repeat: dict | None = None, backend: str = "cpu", memory_format=torch.channels_last,
                    log=print) -> list[dict]:
    """One row per (batch, shape, granularity, K): dense and clustered seconds, speedup, FLOP ratio, error."""
    from ..conv import ClusteredConv2d
    from ..conv.backends import kernel_plan, unique_maps

    rows = []
    shapes = resnet18_conv_shapes(size)
    for n in batches:
        for si, shape in enumerate(shapes):
            conv = nn.Conv2d(shape["c_in"], shape["c_out"], shape["k"], shape["stride"], shape["padding"], bias=False)
            torch.manual_seed(si)
            x = torch.randn(n, shape["c_in"], shape["h_in"], shape["h_in"])
            x_fmt = x.to(memory_format=memory_format) if memory_format is not None else x
            for gran in granularities:
                for d in divisors:
                    k = max(1, shape["c_out"] // d)
                    layer = ClusteredConv2d.from_conv(conv, _random_clustering(conv.weight, k, gran, si), gran,
                                                      backend=backend).eval()
                    w = layer.to_dense().detach().contiguous()
                    xin = xd = x_fmt
                    with torch.inference_mode():
                        # dense: the same oneDNN path with a stored weight reorder as the clustered layer's
                        # conv (see bench.baselines); eager F.conv2d, which reorders every call, beside it
                        dense = PackedDenseConv(w, None, conv.stride, conv.padding, conv.dilation)
                        eager = lambda: F.conv2d(xd, w, None, conv.stride, conv.padding)  # noqa: E731
                        clustered = lambda: layer(xin)  # noqa: E731
                        fns = [lambda: dense(xd), clustered, eager]
                        if gran == "filter":  # the K-filter conv alone, as the layer runs it (no gather)
                            fns.append(lambda: unique_maps(xin, layer.codebook, layer.index, "filter", conv.stride,
                                                           conv.padding, conv.dilation,
                                                           packed=layer._prepared().packed))
                        tu = float("nan")
                        try:
                            td, tc, te, *rest = time_alternating(fns, _repeat_count(repeat, LAYER_REPEAT, (n, gran)))
                            tu = rest[0] if rest else tu
                            yd, yc = dense(xd), clustered()
                            err = rel_diff(yc, yd, eps=1e-30)
                        except Exception as exc:  # a failing variant records NaN, never aborts the run
                            log(f"  failed: {type(exc).__name__}: {exc}")
                            td = tc = te = err = float("nan")
                            yd = F.conv2d(x[:1], w, None, conv.stride, conv.padding)
                    ho, wo = yd.shape[2:]
                    m = kernel_plan(layer.index, k).m if gran == "kernel" else 0
                    fd = _flops(shape, n, ho, wo, None, k)
                    fc = _flops(shape, n, ho, wo, gran, k, m)
                    row = {"batch": n, "layer": shape["layer"], "c_in": shape["c_in"], "c_out": shape["c_out"],
                           "k": shape["k"], "stride": shape["stride"], "h_in": shape["h_in"], "granularity": gran,
                           "K": k, "K_frac": f"C_out/{d}", "dense_ms": td * 1e3, "clustered_ms": tc * 1e3,
                           "speedup": td / tc, "dense_eager_ms": te * 1e3, "speedup_vs_eager": te / tc,
                           "unique_conv_ms": tu * 1e3, "unique_conv_speedup": td / tu,
                           "flop_ratio": fc / fd, "dense_gflops": fd / 1e9,
                           "clustered_gflops": fc / 1e9, "dense_gflop_s": fd / td / 1e9,
                           "clustered_gflop_s": fc / tc / 1e9, "max_rel_err": err}
                    rows.append(row)
                    log(f"  b={n} {shape['c_in']}->{shape['c_out']} k{shape['k']} s{shape['stride']} "
                        f"h{shape['h_in']} {gran} K={k}: dense {td*1e3:.2f} ms, clustered {tc*1e3:.2f} ms, "
                        f"x{td/tc:.2f} (FLOPs x{fd/fc:.2f})")
    return rows


def _clustered_resnet18(divisor: int = 4, granularity: str = "filter"):
    import torchvision

    from ..conv import ClusteredConv2d

    torch.manual_seed(0)
    dense = torchvision.models.resnet18().eval()
    g = torch.Generator().manual_seed(0)
    for bn in (m for m in dense.modules() if isinstance(m, nn.BatchNorm2d)):
        # non-trivial statistics, so the fused affine (not an identity) is what the error column checks
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    clustered = torchvision.models.resnet18().eval()
    clustered.load_state_dict(dense.state_dict())
    for i, (name, conv) in enumerate([(n, c) for n, c in clustered.named_modules() if isinstance(c, nn.Conv2d)]):
        k = max(1, conv.out_channels // divisor)
        layer = ClusteredConv2d.from_conv(conv, _random_clustering(conv.weight, k, granularity, i), granularity)
        parent, _, leaf = name.rpartition(".")
        setattr(clustered.get_submodule(parent) if parent else clustered, leaf, layer)
    # the dense model runs the same (clustered) weights, as ordinary Conv2d layers
    for name, m in clustered.named_modules():
        if isinstance(m, ClusteredConv2d):
            dense.get_submodule(name).weight.data.copy_(m.to_dense().detach())
    return dense.eval(), clustered.eval()


def run_e2e_bench(batches=(32, 1), size: int = 224, repeat: dict | None = None, log=print) -> list[dict]:
    """resnet18 inference: dense vs every conv clustered (filter, K = C_out/4) with BN/add/ReLU fused."""
    from ..conv import fuse_for_inference

    dense, clustered = _clustered_resnet18(4)
    fused = fuse_for_inference(clustered)
    conv_flops = {}

    def count(model, x):
        total = [0.0]

        def hook(mod, inp, out):
            from ..conv import ClusteredConv2d

            px = out.shape[0] * out.shape[2] * out.shape[3]
            kh, kw = mod.kernel_size
            c_in = mod.in_channels
            n_f = mod.num_clusters if isinstance(mod, ClusteredConv2d) else mod.out_channels
            total[0] += 2.0 * px * n_f * c_in * kh * kw

        hs = [m.register_forward_hook(hook) for m in model.modules()
              if isinstance(m, nn.Conv2d) or type(m).__name__ == "ClusteredConv2d"]
        with torch.inference_mode():
            model(x)
        for h in hs:
            h.remove()
        return total[0]

    rows = []
    # The stronger dense baseline, built once: the dense model frozen for inference (BN folded, weights
    # prepacked, ReLU fused), channels-last, timed against the fused clustered model in channels-last.
    frozen, frozen_why = frozen_dense(dense.to(memory_format=torch.channels_last),
                                      torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last))
    for n in batches:
        torch.manual_seed(n)
        x = torch.randn(n, 3, size, size)
        conv_flops[n] = (count(dense, x[:1]) * n, count(fused, x[:1]) * n)
        res = {}
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xf = x.contiguous(memory_format=fmt)
            d = dense.to(memory_format=fmt)
            f = fused.to(memory_format=fmt)
            td, tf, err = time_against(lambda: d(xf), lambda: f(xf), _repeat_count(repeat, E2E_REPEAT, n))
            res[fmt_name] = (td, tf)
            rows.append({"batch": n, "memory_format": fmt_name, "dense_ms": td * 1e3, "clustered_fused_ms": tf * 1e3,
                         "speedup": td / tf, "conv_gflops_dense": conv_flops[n][0] / 1e9,
                         "conv_gflops_clustered": conv_flops[n][1] / 1e9, "max_rel_err": err})
            log(f"  e2e b={n} {fmt_name}: dense {td*1e3:.1f} ms, clustered+fused {tf*1e3:.1f} ms, x{td/tf:.2f}")
        best_d = min(res.items(), key=lambda kv: kv[1][0])
        best_f = min(res.items(), key=lambda kv: kv[1][1])
        rows.append({"batch": n, "memory_format": f"best: dense {best_d[0]}, clustered {best_f[0]}",
                     "dense_ms": best_d[1][0] * 1e3, "clustered_fused_ms": best_f[1][1] * 1e3,
                     "speedup": best_d[1][0] / best_f[1][1], "conv_gflops_dense": conv_flops[n][0] / 1e9,
                     "conv_gflops_clustered": conv_flops[n][1] / 1e9, "max_rel_err": float("nan")})
        xf = x.contiguous(memory_format=torch.channels_last)
        f = fused.to(memory_format=torch.channels_last)
        tj = tf = err = float("nan")
        if frozen is not None:
            tj, tf, err = time_against(lambda: frozen(xf), lambda: f(xf), _repeat_count(repeat, E2E_REPEAT, n))
        else:
            log(f"  e2e b={n}: no frozen dense baseline ({frozen_why})")
        rows.append({"batch": n, "memory_format": FROZEN_ROW, "dense_ms": tj * 1e3, "clustered_fused_ms": tf * 1e3,
                     "speedup": tj / tf, "conv_gflops_dense": conv_flops[n][0] / 1e9,
                     "conv_gflops_clustered": conv_flops[n][1] / 1e9, "max_rel_err": err})
        log(f"  e2e b={n} frozen dense: {tj*1e3:.1f} ms, clustered+fused {tf*1e3:.1f} ms, x{tj/tf:.2f}")
    return rows


FROZEN_ROW = "vs dense frozen (TorchScript), channels_last"


def run_e2e_kernel_bench(batches=(32, 1), divisors=(8, 4), size: int = 224, repeat: dict | None = None,
                         log=print) -> list[dict]:
    """resnet18 inference with every conv clustered at kernel granularity (K = C_out / d kernels per layer)
    and BN/add/ReLU fused, against the same weights dense, both channels-last (the native kernel pass runs
    channels-last)."""
    from ..conv import fuse_for_inference

    rows = []
    for d in divisors:
        dense, clustered = _clustered_resnet18(d, "kernel")
        fused = fuse_for_inference(clustered).to(memory_format=torch.channels_last)
        dense = dense.to(memory_format=torch.channels_last)
        for n in batches:
            torch.manual_seed(n)
            x = torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)
            td, tf, err = time_against(lambda: dense(x), lambda: fused(x), _repeat_count(repeat, E2E_REPEAT, n))
            rows.append({"batch": n, "K": f"C_out/{d}", "dense_ms": td * 1e3, "clustered_fused_ms": tf * 1e3,
                         "speedup": td / tf, "max_rel_err": err})
            log(f"  e2e kernel K=C_out/{d} b={n}: dense {td*1e3:.1f} ms, clustered+fused {tf*1e3:.1f} ms, "
                f"x{td/tf:.2f}")
    return rows


def run_checkpoint_sizes(divisors=(8, 4, 2), granularities=("filter", "kernel"), log=print) -> list[dict]:
    """On-disk bytes of resnet18's compact checkpoint vs its dense checkpoint, per granularity and K."""
    from ..conv.serialize import checkpoint_sizes

    rows = []
    for gran in granularities:
        for d in divisors:
            _, clustered = _clustered_resnet18(d, gran)
            sz = checkpoint_sizes(clustered)
            rows.append({"granularity": gran, "K": f"C_out/{d}", "compressed_MB": sz["compressed_bytes"] / 1e6,
                         "dense_MB": sz["dense_bytes"] / 1e6, "ratio": sz["ratio"]})
            log(f"  checkpoint {gran} K=C_out/{d}: {sz['compressed_bytes']/1e6:.2f} MB vs dense "
                f"{sz['dense_bytes']/1e6:.2f} MB (x{sz['ratio']:.2f})")
    return rows


def _geomean(vals):
    vals = [v for v in vals if v == v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def run_conv_bench(out_dir=None, batches=(1, 32), divisors=(8, 4, 2), granularities=("filter", "kernel"),
                   e2e: bool = True, size: int = 224, log=print, layer_repeat: dict | None = None,
                   e2e_repeat: dict | None = None, threads: int = 0, name: str = "indexed_conv",
                   command: str | None = None, steady_malloc: bool = True) -> dict:
    """Run both parts; write ``<name>.md``/``.csv`` (and ``<name>_e2e.csv``) under ``out_dir``.

    ``threads``: OpenMP/torch threads for both sides (0: leave the current setting).  ``command``: how the
    run was started, for the report (default: this function's call).  ``steady_malloc``: first set this
    process's malloc to keep freed memory mapped (:func:`~kcengine.bench.common.keep_freed_memory_mapped`;
    it stays so after the run), so that no time depends on page faults from the process's history.
    """
    t0 = time.perf_counter()
    allocator = keep_freed_memory_mapped() if steady_malloc else None
    prev_threads = torch.get_num_threads()
    if threads:
        # torch and kcengine._core share one OpenMP runtime: this sets both sides' thread count
        torch.set_num_threads(threads)
    try:
        return _run(out_dir, batches, divisors, granularities, e2e, size, log, layer_repeat, e2e_repeat, t0, name,
                    allocator, command or f"kcengine.bench.conv.run_conv_bench(batches={tuple(batches)}, divisors={tuple(divisors)}, "
                    f"granularities={tuple(granularities)}, e2e={e2e}, size={size}, threads={threads}, name={name!r}, "
                    f"steady_malloc={steady_malloc})")
    finally:
        torch.set_num_threads(prev_threads)


def _run(out_dir, batches, divisors, granularities, e2e, size, log, layer_repeat, e2e_repeat, t0, name, allocator,
         command):
    info = machine_info()
    info["allocator"] = allocator or "the C library's malloc as the process left it (page faults on fresh pages count)"
    info["torch_threads"] = torch.get_num_threads()
    info["load_avg"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    ckpt_rows = run_checkpoint_sizes(log=log)
    repeats = _repeats_used(batches, granularities, e2e, layer_repeat, e2e_repeat)  # what the report states
    layer_rows = run_layer_bench(batches, divisors, granularities, size, repeat=repeats["layers"], log=log)
    e2e_rows = (run_e2e_bench(tuple(sorted(batches, reverse=True)), size, repeat=repeats["e2e"], log=log)
                if e2e else [])
    e2e_kernel_rows = (run_e2e_kernel_bench(tuple(sorted(batches, reverse=True)), size=size, repeat=repeats["e2e"],
                                            log=log) if e2e and "kernel" in granularities else [])
    summary = []
    for n in batches:
        for gran in granularities:
            for d in divisors:
                sel = [r for r in layer_rows if r["batch"] == n and r["granularity"] == gran
                       and r["K_frac"] == f"C_out/{d}"]
                sel3 = [r for r in sel if r["k"] == 3]
                summary.append({"batch": n, "granularity": gran, "K": f"C_out/{d}",
                                "geomean_speedup_3x3": _geomean([r["speedup"] for r in sel3]),
                                "geomean_speedup_all": _geomean([r["speedup"] for r in sel]),
                                "geomean_speedup_3x3_vs_eager": _geomean([r["speedup_vs_eager"] for r in sel3]),
                                "geomean_unique_conv_speedup_3x3": _geomean([r["unique_conv_speedup"] for r in sel3]),
                                "geomean_flop_reduction_3x3": _geomean([1 / r["flop_ratio"] for r in sel3])})
    result = {"info": info, "commit": git_commit(), "date": now_utc(), "layers": layer_rows, "e2e": e2e_rows,
              "e2e_kernel": e2e_kernel_rows, "checkpoint": ckpt_rows, "command": command,
              "repeats": repeats,
              "summary": summary, "seconds": time.perf_counter() - t0}
    if out_dir is not None:
        out = Path(out_dir)
        write_csv(out / f"{name}.csv", layer_rows)
        write_csv(out / f"{name}_e2e.csv", e2e_rows)
        if e2e_kernel_rows:
            write_csv(out / f"{name}_e2e_kernel.csv", e2e_kernel_rows)
        (out / f"{name}.md").write_text(_markdown(result))
    return result


def _targets(r: dict) -> list[dict]:
    rows = []
    for srow in r["summary"]:
        if srow["batch"] == 32 and srow["granularity"] == "filter" and srow["K"] == "C_out/4":
            v = srow["geomean_speedup_3x3"]
            rows.append({"target": "filter, K = C_out/4, batch 32, geomean over 3x3 shapes", "goal": ">= 3.5x",
                         "measured": v, "met": "yes" if v >= 3.5 else "no"})
            u = srow["geomean_unique_conv_speedup_3x3"]
            rows.append({"target": "(its ceiling: the K-filter conv alone, no gather, same run)", "goal": "",
                         "measured": u, "met": ""})
    for e in r["e2e"]:
        if str(e["memory_format"]).startswith("best"):
            rows.append({"target": f"end-to-end resnet18, batch {e['batch']} ({e['memory_format']})", "goal": ">= 2.5x",
                         "measured": e["speedup"], "met": "yes" if e["speedup"] >= 2.5 else "no"})
        elif e["memory_format"] == FROZEN_ROW:
            rows.append({"target": f"(the same, batch {e['batch']}, against the dense model frozen for inference: "
                         "BN folded, weights prepacked, ReLU fused)", "goal": ">= 2.5x", "measured": e["speedup"],
                         "met": "yes" if e["speedup"] >= 2.5 else "no"})
    kern = [x for x in r["layers"] if x["granularity"] == "kernel" and x["flop_ratio"] < 0.5]
    if kern:
        fast = sum(x["speedup"] > 1 for x in kern)
        rows.append({"target": "kernel granularity faster than dense where FLOPs < dense/2", "goal": "all rows",
                     "measured": f"{fast}/{len(kern)} rows", "met": "yes" if fast == len(kern) else "no"})
    return rows


def _repeats_used(batches, granularities, e2e, layer_repeat, e2e_repeat) -> dict:
    """The best-of counts of a run, resolved once (2 where a given dict has no entry) and handed to
    run_layer_bench / run_e2e_bench, so the report states exactly what they used; the end-to-end part
    only when it runs."""
    return {"layers": {(n, g): _repeat_count(layer_repeat, LAYER_REPEAT, (n, g)) for n in batches
                       for g in granularities},
            "e2e": {n: _repeat_count(e2e_repeat, E2E_REPEAT, n) for n in batches} if e2e else {}}


def _repeat_text(repeats: dict) -> str:
    """'layers 10 (filter) / 5 (kernel) at batch 1, ...; end to end 20 at batch 1, ...' from a run's repeats."""
    layer, e2e = repeats["layers"], repeats["e2e"]
    parts = []
    for n in sorted({b for b, _ in layer}):
        parts.append(" / ".join(f"{layer[(n, g)]} ({g})" for g in sorted(g for b, g in layer if b == n))
                     + f" at batch {n}")
    text = "layers " + ", ".join(parts)
    if e2e:
        text += "; end to end " + ", ".join(f"{e2e[n]} at batch {n}" for n in sorted(e2e))
    return text


def _markdown(r: dict) -> str:
    info = r["info"]
    lines = ["# Centroid-indexed convolution vs dense convolution", "",
             f"- machine: {info.get('cpu')} ({info.get('cores')} cores; torch threads {info.get('torch_threads')}, "
             f"kcengine threads {info.get('threads')}; {info.get('cpu_features', '')}); load average at start "
             f"{info.get('load_avg')} (shared machine)",
             f"- torch {info.get('torch')}, python {info.get('python')}, {info.get('os')}"
             + (f", GPU {info['gpu']}" if "gpu" in info else ""),
             f"- commit {r['commit']}, date {r['date']}, benchmark wall time {r['seconds']:.0f} s",
             f"- recorded by `{r['command']}`; every ratio is computed inside this "
             "run, dense and clustered timed alternately on the same input (best of the repeats: "
             f"{_repeat_text(r['repeats'])}; one warm-up each). The machine is shared with other jobs: expect noise.",
             f"- allocator: {info.get('allocator', 'not recorded')}; kcengine's native outputs of 1 MiB and more "
             "come from its own buffer cache either way (`kcengine.conv.output_cache_info`).",
             "- dense (per layer) = the dense weight `layer.to_dense()` through the same oneDNN path with a "
             "stored weight reorder as the clustered layer's own conv (`kcengine.bench.baselines.PackedDenseConv`); "
             "`dense_eager_ms` / `speedup_vs_eager` = plain `F.conv2d`, which reorders the weight on every call "
             "(a large share of a batch-1 conv). Channels-last input on both sides. Clustered = "
             "`ClusteredConv2d` on the `cpu` backend (filter: oneDNN conv with the K unique filters + one native "
             "gather pass; kernel: one native pass per output pixel tile computing each input channel's M codebook "
             "responses in registers and scattering them into the C_out accumulators, no depthwise maps in memory; "
             "for 1x1 kernels, and 3x3 ones with M above 3/4 C_out, from 32,768 output values, the dense weight's "
             "conv and the native epilogue instead: `kcengine.conv.backends.direct_kernel_pays`).",
             "- FLOP ratio = clustered FLOPs / dense FLOPs (filter: K/C_out; kernel: M/C_out + 1/(2 kh kw)).",
             "- unique conv (filter rows): the layer's K-filter conv alone (oneDNN, as the layer runs it), timed in "
             "the same alternation; dense / unique conv is the most the filter path can reach with oneDNN doing "
             "its conv, whatever the gather costs.",
             "", "## Targets of the issue (values from this run)", "",
             markdown_table(_targets(r)),
             "", "## Summary (geometric means over resnet18's distinct conv shapes)", "",
             markdown_table(r["summary"]),
             "", "## End to end: resnet18 inference, every conv clustered (filter, K = C_out/4), "
             "conv+BN(+residual)+ReLU fused", "",
             "Same weights on both sides (the dense model holds the clustered layers' dense weights), eval mode. "
             "`best` compares each model in its own fastest memory format. The issue's targets are against the "
             "eager dense model; the `vs dense frozen` rows compare with the dense model as "
             "`torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model)))` (BatchNorm folded "
             "into the convs, weights prepacked for oneDNN, ReLU fused), the strongest stock-PyTorch CPU "
             "inference without a compiler, so that ratio is what clustering itself buys.", "",
             markdown_table(r["e2e"]) if r["e2e"] else "(not run)\n",
             "", "## End to end: resnet18 inference, every conv clustered at kernel granularity, "
             "conv+BN(+residual)+ReLU fused", "",
             "Not a target of the issue. K = C_out/d kernels per layer (random clustering, as in the per-layer "
             "rows), the native kernel pass for every 3x3 or larger conv, the dense weight's conv for the 1x1 "
             "downsamples (as the per-layer rows say); dense = the same weights as "
             "eager Conv2d layers; both channels-last.", "",
             markdown_table(r["e2e_kernel"]) if r.get("e2e_kernel") else "(not run)\n",
             "", "## Checkpoint size: resnet18 with every conv clustered", "",
             "`save_compressed` (codebooks float32, indexes uint8) against `torch.save` of the dense state_dict "
             "(same model, clustered layers written as dense Conv2d weights; BatchNorm and fc are stored alike in "
             "both).", "",
             markdown_table(r.get("checkpoint") or []),
             "", "## Per layer", "",
             markdown_table(r["layers"], ["batch", "layer", "c_in", "c_out", "k", "stride", "h_in", "granularity",
                                          "K", "dense_ms", "clustered_ms", "speedup", "dense_eager_ms",
                                          "speedup_vs_eager", "unique_conv_ms",
                                          "unique_conv_speedup", "flop_ratio",
                                          "dense_gflop_s", "clustered_gflop_s", "max_rel_err"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results", help="directory for indexed_conv.md/.csv")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--granularity", default="filter,kernel")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=0, help="threads for both sides (0: torch's default)")
    p.add_argument("--name", default="indexed_conv", help="result file stem")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave malloc as it is (page faults on fresh memory then count, on both sides)")
    argv, command = command_line("kcengine.bench.conv", argv)
    a = p.parse_args(argv)
    r = run_conv_bench(a.out, tuple(int(b) for b in a.batches.split(",")),
                       granularities=tuple(a.granularity.split(",")), e2e=not a.no_e2e, size=a.size,
                       threads=a.threads, name=a.name, command=command, steady_malloc=not a.system_malloc)
    print(markdown_table(r["summary"]))
    if r["e2e"]:
        print(markdown_table(r["e2e"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
