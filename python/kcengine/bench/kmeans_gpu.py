"""GPU clustering benchmark: the four workloads of :mod:`kcengine.bench.kmeans` plus ``e_large``
(all 3x3 kernels of the model as one problem, k = 4096), comparing the ``cuda`` and ``triton``
backends, the torch reference on the GPU and scikit-learn (CPU), in one process on the same inputs.

Per method: seconds (best of ``repeat`` after one warm-up call that compiles the kernels; CUDA
synchronized), speed-up and inertia against scikit-learn (the same geometric mean as the CPU
benchmark).  Per kernel (from ``torch.profiler`` kernel times) the modeled bytes and FLOPs are
divided by the time and by the device's ceilings, measured in the same run: bandwidth by a 1 GiB
device-to-device copy, FP32 FLOP/s by a large fp32 matmul with TF32 off.  The byte/FLOP model
(documented in :func:`kernel_model`) counts what each kernel must move/compute at least, so the
fractions are lower bounds on efficiency.

Usage: ``python -m kcengine.bench.kmeans_gpu --model resnet18`` (writes bench/results/kmeans_gpu.md/.csv).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from .common import command_line, git_commit, machine_info, markdown_table, now_utc, repo_root, write_csv
from .kmeans import (WORKLOADS, Workload, _geo_ratio, _inertia, build_workloads, load_weights, parse_caps,
                     run_sklearn, time_methods)

GPU_METHODS = ("cuda", "triton", "torch", "sklearn")
LARGE_K = 4096


def large_workload(layers) -> Workload:
    """All 3x3 kernels of every layer as one [N, 9] problem with k = 4096."""
    x = np.concatenate([w.reshape(-1, 9) for _, w in layers if w.shape[2:] == (3, 3)])
    return Workload("e_large", [np.ascontiguousarray(x, dtype=np.float32)], [min(LARGE_K, len(x))],
                    note=f"all 3x3 kernels as one problem, k={min(LARGE_K, len(x))}", total_problems=1)


def device_ceilings() -> dict:
    """Measured on the current device: copy bandwidth (bytes/s, read + write) and fp32 FLOP/s."""
    import torch

    dev = torch.device("cuda")
    a = torch.empty(2**28, dtype=torch.float32, device=dev)  # 1 GiB
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    bw = 2 * a.numel() * 4 / best
    del a, b
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        m = torch.randn(8192, 8192, device=dev)
        m @ m
        torch.cuda.synchronize()
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            m @ m
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        flops = 2 * 8192**3 / best
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return {"bandwidth": bw, "fp32_flops": flops, "name": torch.cuda.get_device_name(dev)}


def kernel_model(kind: str, n: np.ndarray, d: np.ndarray, k: np.ndarray, it: np.ndarray,
                 itemsize: int = 4) -> tuple[float, float]:
    """(bytes, FLOPs) a kernel family must at least move / compute over a whole solve.

    ``n, d, k, it``: per problem points, features, clusters and Lloyd iterations run.
    * fused: points and weights read once, centroids and labels written once; per iteration
      2 N k D (distances) + 2 N D (sums).
    * assign: per iteration (+1 final E-step) points read once (N D), labels written (4 N);
      2 N k D FLOPs.
    * segment_sum: per iteration points and weights read once, sort order read (8 N); 2 N D.
    * kpp_pass: per center and trial points read once, min/out written (8 N each way); 3 N D.
    """
    n, d, k, it = (np.asarray(a, dtype=np.float64) for a in (n, d, k, it))
    trials = 2 + np.floor(np.log(np.maximum(k, 1)))
    if kind == "fused":
        return (float(((n * d + n) * itemsize + k * d * itemsize + 8 * n).sum()),
                float((it * (2 * n * k * d + 2 * n * d)).sum()))
    if kind == "assign":
        return float(((it + 1) * (n * d * itemsize + 4 * n)).sum()), float(((it + 1) * 2 * n * k * d).sum())
    if kind == "segment_sum":
        return float((it * (n * d * itemsize + n * itemsize + 8 * n)).sum()), float((it * 2 * n * d).sum())
    if kind == "kpp_pass":
        return float((k * trials * (n * d * itemsize + 16 * n)).sum()), float((k * trials * 3 * n * d).sum())
    raise ValueError(kind)


_FAMILIES = (("fused", "kmeans_fused"), ("assign", "assign"), ("segment_sum", "segment_sum"), ("kpp_pass", "kpp_pass"))


def _family(kernel_name: str) -> str | None:
    for fam, needle in _FAMILIES:
        if needle in kernel_name:
            return fam
    return None


def gpu_inputs(wl: Workload) -> list:
    """The workload's problems as CUDA tensors (uploaded once, outside every timing: the GPU
    backends cluster tensors that already live on the device)."""
    import torch

    cache = {}
    for x in wl.xs:
        if id(x) not in cache:
            cache[id(x)] = torch.from_numpy(x).to("cuda")
    return [cache[id(x)] for x in wl.xs]


def run_gpu_method(wl: Workload, method: str, seed: int = 0, xs=None):
    """One method's result on ``wl``: scikit-learn's centroids (numpy), or the GPU backend's
    ``KMeansResult`` on the device (``xs``: the inputs from :func:`gpu_inputs`)."""
    import torch

    import kcengine

    if method == "sklearn":
        return run_sklearn(wl, seed)
    res = kcengine.kmeans(xs if xs is not None else gpu_inputs(wl), wl.ks, seed=seed, backend=method)
    torch.cuda.synchronize()
    return res


def _host(out):
    """(centroids as numpy, n_iter as numpy or None) of a method's output."""
    if isinstance(out, list):
        return out, None
    return [c.cpu().numpy() for c in out.centroids], out.n_iter.cpu().numpy()


def profile_kernels(wl: Workload, method: str, ceilings: dict, n_iter, seed: int = 0, xs=None) -> list[dict]:
    """Kernel times of one call (torch.profiler) with modeled bytes/FLOPs and ceiling fractions
    (``xs``: the inputs from :func:`gpu_inputs`, uploaded when not given)."""
    from torch.profiler import ProfilerActivity, profile

    xs = xs if xs is not None else gpu_inputs(wl)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_gpu_method(wl, method, seed, xs)
    times: dict[str, float] = {}
    for ev in prof.key_averages():
        fam = _family(ev.key)
        dt = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if fam:
            times[fam] = times.get(fam, 0.0) + dt * 1e-6
    n = np.array([x.shape[0] for x in wl.xs])
    d = np.array([x.shape[1] for x in wl.xs])
    k = np.array(wl.ks)
    it = np.asarray(n_iter) if n_iter is not None else np.ones(len(k))
    rows = []
    for fam, sec in sorted(times.items()):
        nbytes, flops = kernel_model(fam, n, d, k, it)
        rows.append({"workload": wl.name, "method": method, "kernel": fam, "seconds": sec,
                     "GB/s": nbytes / sec / 1e9 if sec else float("nan"),
                     "% bandwidth": 100 * nbytes / sec / ceilings["bandwidth"] if sec else float("nan"),
                     "GFLOP/s": flops / sec / 1e9 if sec else float("nan"),
                     "% fp32 FLOP/s": 100 * flops / sec / ceilings["fp32_flops"] if sec else float("nan")})
    return rows


SLOW_ON_LARGE = ("sklearn",)  # e_large (one 1.2M-point problem at k = 4096): minutes on the CPU


def run_gpu_workload(wl: Workload, methods, *, repeat: int = 1, seed: int = 0, ceilings=None, progress=None,
                     skip_on_large=SLOW_ON_LARGE):
    """Time every method (warm-up call first, alternating order), compare inertia, profile kernels.
    The methods in ``skip_on_large`` are left out of ``e_large``; their rows say so."""
    import torch

    skipped = {}
    if wl.name == "e_large":
        skipped = {m: "not run on e_large (minutes there; python -m kcengine.bench.kmeans_gpu --workloads "
                      "e_large --sklearn-large runs scikit-learn too)" for m in methods if m in skip_on_large}
        methods = [m for m in methods if m not in skipped]

    errors = {}
    xs = gpu_inputs(wl)
    for m in methods:  # warm-up: NVRTC / Triton compilation is not timed
        if m == "sklearn":
            continue
        try:
            run_gpu_method(wl, m, seed, xs)
        except Exception as exc:  # a failing method records NaN rather than aborting
            errors[m] = f"{type(exc).__name__}: {exc}"[:200]
    fns = {m: (lambda m=m: run_gpu_method(wl, m, seed, xs)) for m in methods}
    times, outs, errors = time_methods(wl.name, fns, methods, repeat=repeat, progress=progress,
                                       sync=torch.cuda.synchronize, errors=errors)
    host = {m: _host(o) for m, o in outs.items()}
    cents = {m: h[0] for m, h in host.items()}
    iters = {m: h[1] for m, h in host.items()}
    inert = {m: [_inertia(x, c) for x, c in zip(wl.xs, cs)] for m, cs in cents.items()}
    rows = []
    for m in methods:
        row = {"workload": wl.name, "method": m, "problems": wl.n_problems,
               "seconds": times[m] if m in cents else float("nan"), "x vs sklearn": float("nan"),
               "x vs torch": float("nan"), "inertia / sklearn": float("nan"), "note": errors.get(m, "")}
        if m in cents and "sklearn" in cents:
            row["x vs sklearn"] = times["sklearn"] / times[m]
            row["inertia / sklearn"] = _geo_ratio(inert[m], inert["sklearn"])
        if m in cents and "torch" in cents:
            row["x vs torch"] = times["torch"] / times[m]
        rows.append(row)
    for m, why in skipped.items():
        rows.append({"workload": wl.name, "method": m, "problems": wl.n_problems, "seconds": float("nan"),
                     "x vs sklearn": float("nan"), "x vs torch": float("nan"), "inertia / sklearn": float("nan"),
                     "note": why})
    kernels = []
    if ceilings:
        for m in ("cuda", "triton"):
            if m in cents:
                try:
                    kernels += profile_kernels(wl, m, ceilings, iters[m], seed, xs)
                except Exception as exc:
                    kernels.append({"workload": wl.name, "method": m, "kernel": f"profiler failed: {exc}"[:120]})
    return rows, kernels


def write_gpu_report(source: str, workloads, rows, kernels, ceilings, out_dir: Path, name: str = "kmeans_gpu",
                     command: str = "") -> Path:
    info = machine_info()
    lines = ["# Batched k-means on GPU: cuda and triton backends vs the torch reference and scikit-learn\n",
             f"- date: {now_utc()}", f"- commit: {git_commit()}",
             f"- GPU: {ceilings.get('name')}; measured ceilings: copy bandwidth "
             f"{ceilings['bandwidth'] / 1e9:.0f} GB/s, "
             f"fp32 matmul {ceilings['fp32_flops'] / 1e12:.1f} TFLOP/s (TF32 off)",
             f"- host: {info.get('cpu')} ({info.get('cores')} cores); torch {info['torch']}",
             *([f"- recorded by: `{command}`"] if command else []),
             "- seconds: best of the repeats after a warm-up call on the whole workload (kernel compilation untimed); inputs already on the GPU, results left there; scikit-learn on the host CPU (k-means++, n_init=1)",
             f"\n## {source}\n"]
    for w in workloads:
        lines.append(f"- {w.name}: {w.n_problems} problems" + (f" ({w.note})" if w.note else ""))
    lines += ["", markdown_table(rows), "\n### Kernels (modeled bytes/FLOPs over profiled kernel time)\n",
              markdown_table(kernels) if kernels else "(no kernel profile)"]
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    write_csv(out_dir / f"{name}.csv", rows)
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--workloads", default=",".join(WORKLOADS + ("e_large",)))
    p.add_argument("--methods", default=",".join(GPU_METHODS))
    p.add_argument("--max-problems", default=None,
                   help="cap per workload: N, or name=N,...; 'all' for none (default for models other than "
                        "resnet20: the CPU benchmark's caps, so scikit-learn runs the same problems in minutes)")
    p.add_argument("--sklearn-large", action="store_true", help="also time scikit-learn on e_large (slow)")
    p.add_argument("--no-kernel-profile", action="store_true", help="skip the per-kernel profile (one call less)")
    p.add_argument("--sweep-step", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for kmeans_gpu.md/.csv (default bench/results)")
    p.add_argument("--name", default="kmeans_gpu")
    argv, command = command_line("kcengine.bench.kmeans_gpu", argv)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (bench/results/kmeans_gpu.md is left as it is)")
        return 2
    layers, source = load_weights(args.model)
    names = args.workloads.split(",")
    wls = build_workloads(layers, [w for w in names if w != "e_large"], parse_caps(args.max_problems, [args.model]),
                          args.sweep_step)
    if "e_large" in names:
        wls.append(large_workload(layers))
    ceilings = device_ceilings()
    rows, kernels = [], []
    for wl in wls:
        r, kr = run_gpu_workload(wl, args.methods.split(","), repeat=args.repeat,
                                 ceilings=None if args.no_kernel_profile else ceilings,
                                 progress=lambda w, m: print(f"  {w}: {m} done", flush=True),
                                 skip_on_large=() if args.sklearn_large else SLOW_ON_LARGE)
        rows += r
        kernels += kr
    print(markdown_table(rows))
    out = Path(args.out) if args.out else (repo_root() or Path.cwd()) / "bench" / "results"
    print("wrote", write_gpu_report(source, wls, rows, kernels, ceilings, out, args.name, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
