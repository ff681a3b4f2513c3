"""Every Triton kernel compiled for sm_80 and sm_90 on this GPU-less machine (Triton's front end and
bundled ptxas), with the argument types its launcher really passes: compiled-mode errors (which the
interpreter tests cannot see) fail in CI.  The launches are recorded by running the launchers
on CPU tensors with :class:`triton_compile.LaunchRecorder` in place of the kernel table."""
import importlib.util
import warnings

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _kmeans_launches(monkeypatch):
    from triton_compile import LaunchRecorder

    from kcengine.kmeans import api
    from kcengine.kmeans.backends import triton_kernels as tk
    from kcengine.kmeans.backends.cuda import _centroid_norms, pack

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rec = LaunchRecorder(tk._kernels())
    monkeypatch.setitem(tk._KERNELS, False, rec)
    rng = np.random.default_rng(0)
    for dtype in (torch.float32, torch.float64):
        xs = [torch.tensor(rng.normal(size=s)).to(dtype) for s in [(37, 5), (19, 18), (40, 33)]]
        probs, _ = api._build(xs, [3, 17, 20], init="k-means++", n_init=1, max_iter=100, tol=1e-4,
                              sample_weight=None, seed=0, algorithm="auto")
        P = pack(api._convert(probs, "torch"), [0, 1, 2])
        C = torch.tensor(rng.normal(size=P.n_cvals)).to(dtype)
        lab = torch.zeros(P.n_entries, dtype=torch.int32)
        for kern in (tk.TritonKernels(), tk.TritonKernels(tf32=True)) if dtype == torch.float32 else (tk.TritonKernels(),):
            kern.assign(P, C, _centroid_norms(P, C), torch.ones(3, dtype=torch.bool), lab)
        K = tk.TritonKernels()
        key = P.dev["goff"][P.dev["e_job"]] + lab.long()
        counts = torch.bincount(key, minlength=P.n_clusters)
        K.segment_sum(P, torch.argsort(key, stable=True), torch.cumsum(counts, 0) - counts, counts,
                      torch.ones(P.n_clusters, dtype=torch.bool), torch.zeros(P.n_cvals, dtype=torch.float64),
                      torch.zeros(P.n_clusters, dtype=torch.float64))
        nmax = int(P.n.max())
        K.kpp_pass(P, torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, nmax, dtype=torch.float64),
                   torch.ones(3, dtype=torch.bool), torch.zeros(4, 3, nmax, dtype=torch.float64))
        K.sqdist(P, C, lab)
    return rec.launches


def _conv_launches(monkeypatch):
    from triton_compile import LaunchRecorder

    from kcengine.conv import triton_kernels as ck

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton, k_gather, k_sum = ck._kernels()  # the compiled-mode kernels
    rec = LaunchRecorder({"gather": k_gather, "gather_sum": k_sum})
    # the launchers accept CPU tensors only under the interpreter: let them run there, recording
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(ck._KERNELS, True, (triton, rec["gather"], rec["gather_sum"]))
    for dtype in (torch.float32, torch.float16, torch.float64):  # float64 accumulates in fp64
        u = torch.randn(2, 3, 5, 7).to(dtype)
        idx = torch.tensor([2, 0, 1, 1], dtype=torch.int32)
        vec = torch.randn(4).to(dtype)
        res = torch.randn(2, 4, 5, 7).to(dtype)
        ck.gather_epilogue(u, idx)
        ck.gather_epilogue(u, idx, vec, vec, res, relu=True)
        pair = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.int32)
        ck.gather_sum(u, pair)
        ck.gather_sum(u, pair, vec, vec, res, relu=True)
    return rec.launches


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("module", ["kmeans", "conv"])
def test_every_triton_kernel_compiles(monkeypatch, module, capability):
    from triton_compile import compile_launch

    launches = (_kmeans_launches if module == "kmeans" else _conv_launches)(monkeypatch)
    names = {name for name, *_ in launches}
    assert names == ({"assign", "segment_sum", "kpp_pass", "sqdist"} if module == "kmeans" else {"gather", "gather_sum"})
    failures = []
    for name, fn, args, constexprs in launches:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # triton 3.9's FP-fusion default notice
                compiled = compile_launch(fn, args, constexprs, capability)
            assert compiled.asm.get("cubin"), f"{name}: no cubin"
        except Exception as exc:  # collect every failing variant, not just the first
            failures.append(f"{name} {constexprs}: {type(exc).__name__}: {str(exc)[:800]}")
    assert not failures, "\n\n".join(failures)
