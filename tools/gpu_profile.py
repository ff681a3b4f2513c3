"""Where a GPU k-means call spends its time: wall clock, CUDA kernel time (torch.profiler) and the
host's Python (cProfile), per workload and backend.  Diagnostic for GPU sessions (tools/gpu-session.sh).

    python tools/gpu_profile.py --model resnet18 [--methods cuda,triton] [--max-problems N]
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

import kcengine
from kcengine.bench.kmeans import WORKLOADS, build_workloads, load_weights
from kcengine.bench.kmeans_gpu import gpu_inputs, large_workload


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet18")
    p.add_argument("--methods", default="cuda,triton")
    p.add_argument("--max-problems", type=int, default=None)
    p.add_argument("--top", type=int, default=14)
    a = p.parse_args()
    layers, _ = load_weights(a.model)
    wls = build_workloads(layers, list(WORKLOADS), a.max_problems, 1) + [large_workload(layers)]
    from torch.profiler import ProfilerActivity, profile

    for wl in wls:
        xs = gpu_inputs(wl)
        n = [x.shape[0] for x in wl.xs]
        print(f"\n##### {wl.name}: {len(xs)} problems, N {min(n)}..{max(n)}, "
              f"D {min(x.shape[1] for x in wl.xs)}..{max(x.shape[1] for x in wl.xs)}, k {min(wl.ks)}..{max(wl.ks)}")
        for m in a.methods.split(","):
            try:
                kcengine.kmeans(xs, wl.ks, seed=0, backend=m)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = kcengine.kmeans(xs, wl.ks, seed=0, backend=m)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    kcengine.kmeans(xs, wl.ks, seed=0, backend=m)
                    torch.cuda.synchronize()
                kern = {}
                for ev in prof.key_averages():
                    dt = getattr(ev, "device_time_total", 0) or 0
                    if dt:
                        kern[ev.key] = (dt * 1e-6, ev.count)
                tot = sum(v[0] for v in kern.values())
                print(f"[{m}] wall {wall*1e3:.1f} ms; GPU kernels {tot*1e3:.1f} ms in "
                      f"{sum(v[1] for v in kern.values())} launches; n_iter max {int(res.n_iter.max()) if hasattr(res.n_iter, 'max') else max(int(i) for i in res.n_iter)}")
                for k, (dt, c) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:6]:
                    print(f"    {dt*1e3:9.2f} ms  x{c:<6d} {k[:90]}")
                pr = cProfile.Profile()
                pr.enable()
                kcengine.kmeans(xs, wl.ks, seed=0, backend=m)
                torch.cuda.synchronize()
                pr.disable()
                s = io.StringIO()
                pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(a.top)
                print("\n".join(l for l in s.getvalue().splitlines() if l.strip())[-3000:])
            except Exception as exc:
                print(f"[{m}] FAILED {type(exc).__name__}: {str(exc)[:400]}")


if __name__ == "__main__":
    main()
