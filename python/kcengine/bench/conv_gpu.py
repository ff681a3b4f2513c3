"""Indexed convolution on a CUDA GPU: ``ClusteredConv2d`` (the ``triton`` backend: cuDNN conv with the K
unique filters or the depthwise codebook maps, then one fused Triton gather / gather-sum pass with
the BN affine, residual and ReLU) against dense cuDNN ``F.conv2d`` with the same (clustered) weights.

The layer table covers every distinct conv shape of torchvision resnet18 (224x224 input) at
K in {C_out/8, C_out/4, C_out/2}, batch 1 and 32, both granularities, as the CPU table
(:mod:`kcengine.bench.conv`); the end-to-end table runs resnet18 with every conv clustered
(filter, K = C_out/4, BN/residual/ReLU fused) against the dense model, in NCHW and channels-last.

Times: median of CUDA-event-timed calls after warm-up calls (which compile the Triton kernels), the
dense and clustered calls alternating.  Float32 with torch's default cuDNN settings (TF32 allowed
in convolutions: ``torch.backends.cudnn.allow_tf32``), the same for both sides; the report says
which setting ran.

Usage: ``python -m kcengine.bench.conv_gpu`` (writes bench/results/indexed_conv_gpu.md/.csv).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import command_line, git_commit, machine_info, markdown_table, now_utc, rel_diff, repo_root, write_csv
from .conv import _clustered_resnet18, _flops, _geomean, _random_clustering, resnet18_conv_shapes


def cuda_times(fns, repeat: int, warmup: int = 3) -> list[float]:
    """Median seconds of each of ``fns`` (CUDA events around each call; calls alternate)."""
    for _ in range(warmup):
        for f in fns:
            f()
    torch.cuda.synchronize()
    samples = [[] for _ in fns]
    for _ in range(repeat):
        for j, f in enumerate(fns):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            b.synchronize()
            samples[j].append(a.elapsed_time(b) * 1e-3)
    return [statistics.median(s) for s in samples]


def run_layer_bench_gpu(batches=(1, 32), divisors=(8, 4, 2), granularities=("filter", "kernel"), size: int = 224,
                        repeat: int = 20, log=print) -> list[dict]:
    from ..conv import ClusteredConv2d
    from ..conv.backends import kernel_plan

    dev = torch.device("cuda")
    rows = []
    for n in batches:
        for si, shape in enumerate(resnet18_conv_shapes(size)):
            torch.manual_seed(si)  # the layer's weights and the input: the same every run
            conv = nn.Conv2d(shape["c_in"], shape["c_out"], shape["k"], shape["stride"], shape["padding"], bias=False)
            x = torch.randn(n, shape["c_in"], shape["h_in"], shape["h_in"], device=dev)
            for gran in granularities:
                for d in divisors:
                    k = max(1, shape["c_out"] // d)
                    layer = ClusteredConv2d.from_conv(conv, _random_clustering(conv.weight, k, gran, si), gran,
                                                      backend="triton").eval().to(dev)
                    w = layer.to_dense().detach().contiguous()
                    with torch.inference_mode():
                        td, tc = cuda_times([lambda: F.conv2d(x, w, None, conv.stride, conv.padding),
                                             lambda: layer(x)], repeat)
                        yd = F.conv2d(x, w, None, conv.stride, conv.padding)
                        err = rel_diff(layer(x), yd, eps=1e-30)
                    ho, wo = yd.shape[2:]
                    m = kernel_plan(layer.index, k).m if gran == "kernel" else 0
                    fd, fc = _flops(shape, n, ho, wo, None, k), _flops(shape, n, ho, wo, gran, k, m)
                    rows.append({"batch": n, "layer": shape["layer"], "c_in": shape["c_in"], "c_out": shape["c_out"],
                                 "k": shape["k"], "stride": shape["stride"], "h_in": shape["h_in"],
                                 "granularity": gran, "K": k, "K_frac": f"C_out/{d}", "dense_ms": td * 1e3,
                                 "clustered_ms": tc * 1e3, "speedup": td / tc, "flop_ratio": fc / fd,
                                 "dense_tflop_s": fd / td / 1e12, "clustered_tflop_s": fc / tc / 1e12,
                                 "max_rel_err": err})
                    log(f"  b={n} {shape['layer']} {gran} K={k}: dense {td*1e3:.3f} ms, clustered "
                        f"{tc*1e3:.3f} ms, x{td/tc:.2f} (FLOPs x{fd/fc:.2f}) err {err:.1e}")
                    del layer
    return rows


def run_e2e_gpu(batches=(32, 1), size: int = 224, repeat: int = 30, log=print) -> list[dict]:
    from ..conv import fuse_for_inference

    dev = torch.device("cuda")
    dense, clustered = _clustered_resnet18(4)
    fused = fuse_for_inference(clustered)
    dense, fused = dense.to(dev), fused.to(dev)
    rows = []
    for n in batches:
        torch.manual_seed(n)
        x = torch.randn(n, 3, size, size, device=dev)
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xf = x.contiguous(memory_format=fmt)
            d, f = dense.to(memory_format=fmt), fused.to(memory_format=fmt)
            with torch.inference_mode():
                td, tf = cuda_times([lambda: d(xf), lambda: f(xf)], repeat)
                err = rel_diff(f(xf), d(xf))
            rows.append({"batch": n, "memory_format": fmt_name, "dense_ms": td * 1e3,
                         "clustered_fused_ms": tf * 1e3, "speedup": td / tf, "max_rel_err": err})
            log(f"  e2e b={n} {fmt_name}: dense {td*1e3:.2f} ms, clustered+fused {tf*1e3:.2f} ms, x{td/tf:.2f}")
    return rows


def _report(layers, e2e, args, seconds) -> str:
    info = machine_info()
    lines = ["# Indexed convolution on GPU: ClusteredConv2d (triton backend) vs dense cuDNN\n",
             f"- date: {now_utc()}", f"- commit: {git_commit()}",
             f"- GPU: {torch.cuda.get_device_name()}; host {info.get('cpu')} ({info.get('cores')} cores); "
             f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}",
             f"- float32; cuDNN TF32 allowed: {torch.backends.cudnn.allow_tf32} (both sides alike); "
             f"median of {args.repeat} (layers) / {max(args.repeat, 30)} (end to end) CUDA-event-timed calls after "
             "warm-up, dense and clustered alternating",
             f"- recorded by: `{args.command}` ({seconds:.0f} s)",
             ""]
    if layers:
        lines.append("## Summary (geometric mean of dense / clustered time over resnet18's shapes)\n")
        summ = []
        for n in sorted({r["batch"] for r in layers}):
            for gran in sorted({r["granularity"] for r in layers}):
                for frac in sorted({r["K_frac"] for r in layers}, key=lambda s: int(s.split("/")[1])):
                    sel = [r for r in layers if r["batch"] == n and r["granularity"] == gran and r["K_frac"] == frac]
                    sel3 = [r for r in sel if r["k"] == 3]
                    if sel:
                        summ.append({"batch": n, "granularity": gran, "K": frac,
                                     "geomean speedup (all shapes)": _geomean([r["speedup"] for r in sel]),
                                     "geomean speedup (3x3)": _geomean([r["speedup"] for r in sel3]),
                                     "geomean FLOP ratio": _geomean([r["flop_ratio"] for r in sel]),
                                     "faster than dense": f"{sum(r['speedup'] > 1 for r in sel)}/{len(sel)}"})
        lines += [markdown_table(summ), "", "## Per layer\n", markdown_table(layers), ""]
    if e2e:
        lines += ["## End to end: resnet18, every conv clustered (filter, K = C_out/4), BN/residual/ReLU fused\n",
                  markdown_table(e2e), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv, command = command_line("kcengine.bench.conv_gpu", argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,32")
    p.add_argument("--divisors", default="8,4,2")
    p.add_argument("--granularity", default="filter,kernel")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=None, help="folder for the .md/.csv (default bench/results)")
    p.add_argument("--name", default="indexed_conv_gpu")
    args = p.parse_args(argv)
    args.command = command
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 2
    t0 = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    layers = run_layer_bench_gpu(batches, [int(d) for d in args.divisors.split(",")], args.granularity.split(","),
                                 repeat=args.repeat)
    e2e = [] if args.no_e2e else run_e2e_gpu(sorted(batches, reverse=True), repeat=max(args.repeat, 30))
    out = Path(args.out) if args.out else (repo_root() or Path.cwd()) / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{args.name}.md"
    md.write_text(_report(layers, e2e, args, time.perf_counter() - t0))
    write_csv(out / f"{args.name}.csv", layers)
    if e2e:
        write_csv(out / f"{args.name}_e2e.csv", e2e)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
