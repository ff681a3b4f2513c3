"""Every Triton k-means kernel under TRITON_INTERPRET=1 on CPU tensors, against the torch kernel
set (``cuda.TorchKernels``), and the whole triton backend against the cpu backend.

The checks run in one subprocess started with ``TRITON_INTERPRET=1`` in its environment, so
triton sees the variable when it is first imported (the standard-library helpers ``tl.sum`` /
``tl.argmin`` are then interpreter functions too); each test below asserts one check's outcome.
Shapes are small and odd: tiles end mid-way, k crosses the 16-wide ``tl.dot`` block, D = 1.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

_SCRIPT = textwrap.dedent(
    r"""
    import json, traceback
    import numpy as np, torch
    from kcengine.kmeans import api
    from kcengine.kmeans.backends import cpu as cpu_backend, triton as triton_backend
    from kcengine.kmeans.backends.cuda import TorchKernels, pack, _centroid_norms
    from kcengine.kmeans.backends.triton_kernels import TritonKernels
    from kmeans_checks import assert_seeded_quality

    rng = np.random.default_rng(7)
    results = {}

    def check(name):
        def deco(fn):
            try:
                fn()
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            return fn
        return deco

    def problems(shapes, ks, dtype, weighted=False, init="k-means++", n_init=1, seed=0):
        xs = [torch.tensor(rng.normal(size=s)).to(dtype) for s in shapes]
        sw = [torch.tensor(rng.uniform(0.1, 2.0, size=s[0])).to(dtype) for s in shapes] if weighted else None
        probs, _ = api._build(xs, ks, init=init, n_init=n_init, max_iter=100, tol=1e-4, sample_weight=sw,
                              seed=seed, algorithm="auto")
        return probs

    SHAPES = [(37, 5), (19, 18), (5, 1), (40, 33)]
    KS = [3, 17, 2, 20]

    def packed(dtype, weighted=False):
        probs = api._convert(problems(SHAPES, KS, dtype, weighted), "torch")
        P = pack(probs, list(range(len(SHAPES))))
        C = torch.tensor(rng.normal(size=P.n_cvals)).to(dtype)
        return P, C

    for dtype in (torch.float32, torch.float64):
        tag = str(dtype).replace("torch.", "")

        @check(f"assign_{tag}")
        def _():
            P, C = packed(dtype)
            cn = _centroid_norms(P, C)
            mask = torch.tensor([True, True, False, True])
            ref = torch.full((P.n_entries,), -7, dtype=torch.int32)
            got = ref.clone()
            TorchKernels().assign(P, C, cn, mask, ref)
            TritonKernels().assign(P, C, cn, mask, got)
            assert torch.equal(got, ref), (got, ref)
            l0, n = int(P.loff_h[2]), int(P.n[2])
            assert (got[l0:l0 + n] == -7).all(), "a masked-off job's labels were written"

        @check(f"segment_sum_{tag}")
        def _():
            P, _C = packed(dtype, weighted=True)
            lab = torch.cat([torch.randint(0, int(k), (int(n),)) for n, k in zip(P.n, P.k)])
            lab[int(P.loff_h[0]):int(P.loff_h[0]) + int(P.n[0])] = 0  # job 0: clusters 1, 2 empty
            key = P.dev["goff"][P.dev["e_job"]] + lab
            order = torch.argsort(key, stable=True)
            counts = torch.bincount(key, minlength=P.n_clusters)
            start = torch.cumsum(counts, 0) - counts
            gmask = torch.ones(P.n_clusters, dtype=torch.bool)
            gmask[P.dev["g_job"] == 3] = False
            out = []
            for K in (TorchKernels(), TritonKernels()):
                sums = torch.full((P.n_cvals,), -1.0, dtype=torch.float64)
                wsum = torch.full((P.n_clusters,), -1.0, dtype=torch.float64)
                K.segment_sum(P, order, start, counts, gmask, sums, wsum)
                out.append((sums, wsum))
            torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-12, atol=1e-12)
            assert (out[1][1][P.dev["g_job"] == 3] == -1).all(), "a masked-off cluster was written"
            assert float(out[1][1][1]) == 0.0 and float(out[1][1][2]) == 0.0

        @check(f"kpp_pass_{tag}")
        def _():
            P, _C = packed(dtype)
            J, nmax, T = P.n_jobs, int(P.n.max()), 3
            cand = torch.stack([torch.randint(0, int(n), (T,)) for n in P.n])
            closest = torch.tensor(rng.uniform(0, 30, size=(J, nmax)))
            live = torch.tensor([True, False, True, True])
            outs = []
            for K in (TorchKernels(), TritonKernels()):
                out = torch.full((T, J, nmax), -1.0, dtype=torch.float64)
                K.kpp_pass(P, cand, closest, live, out)
                outs.append(out)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
            assert (outs[1][:, 1] == -1).all(), "a job that is not live was written"

        @check(f"sqdist_{tag}")
        def _():
            P, C = packed(dtype, weighted=True)
            lab = torch.cat([torch.randint(0, int(k), (int(n),)) for n, k in zip(P.n, P.k)]).to(torch.int32)
            ref = TorchKernels().sqdist(P, C, lab)
            got = TritonKernels().sqdist(P, C, lab)
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)

    def compare(probs):
        got = triton_backend.solve(api._convert(probs, "triton"))
        ref = cpu_backend.solve(api._convert(probs, "cpu"))
        if probs.init != "given":  # seeded: same stream, different D^2 sums -> quality, not identity
            assert_seeded_quality(got, ref, probs)
            return
        for p in range(probs.n_problems):
            assert np.array_equal(got.labels[p].numpy(), ref.labels[p]), f"labels of problem {p}"
            np.testing.assert_allclose(got.centroids[p].numpy(), ref.centroids[p], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.inertia.numpy(), ref.inertia, rtol=1e-6)
        np.testing.assert_array_equal(got.n_iter.numpy(), ref.n_iter)
        np.testing.assert_array_equal(got.converged.numpy(), ref.converged)

    @check("backend_ragged_kmeanspp_float32")
    def _():
        compare(problems([(50, 3), (37, 18), (23, 1), (20, 7)], [4, 3, 6, 20], torch.float32, seed=3))

    @check("backend_weighted_random_ninit_float64")
    def _():
        compare(problems([(45, 5), (31, 2)], [6, 4], torch.float64, weighted=True, init="random", n_init=2, seed=5))

    @check("backend_sweep_shared_dataset")
    def _():
        x = torch.tensor(rng.normal(size=(41, 4))).float()
        probs, _ = api._build(x, None, init="k-means++", n_init=1, max_iter=100, tol=1e-4, sample_weight=None,
                              seed=11, algorithm="auto", sweep_ks=[2, 5, 9])
        compare(probs)

    @check("backend_given_init_with_empty_clusters")
    def _():
        x = torch.tensor(rng.normal(size=(30, 3))).float()
        init = torch.cat([x[:3], torch.full((2, 3), 50.0)])  # two far centroids: empty at the first step
        probs, _ = api._build(x, None, init=init, n_init=1, max_iter=100, tol=0.0, sample_weight=None, seed=0,
                              algorithm="auto")
        compare(probs)

    @check("backend_given_init_offset_float64")
    def _():  # farther from the origin than its spread: clustered centered, as the cpu core does
        x = 1e4 + torch.tensor(rng.integers(-3, 4, size=(40, 5))).double() * float(np.spacing(1e4))
        init = x[:4].clone()
        probs, _ = api._build([x, x[:25] - 1e4], None, init=[init, init[:3] - 1e4], n_init=1, max_iter=100,
                              tol=1e-4, sample_weight=None, seed=0, algorithm="auto")
        got = triton_backend.solve(api._convert(probs, "triton"))
        ref = cpu_backend.solve(api._convert(probs, "cpu"))
        for p in range(2):
            assert np.array_equal(got.labels[p].numpy(), ref.labels[p]), f"labels of problem {p}"
            np.testing.assert_allclose(got.centroids[p].numpy(), ref.centroids[p], rtol=0, atol=float(np.spacing(1e4)))
        np.testing.assert_array_equal(got.n_iter.numpy(), ref.n_iter)
        assert bool(got.converged.all())

    @check("backend_launches_in_the_datas_device_scope")
    def _():  # Triton launches on the current device: the backend makes the data's current (cuda:1 failed)
        import contextlib
        seen = []
        real = triton_backend.device_scope
        triton_backend.device_scope = lambda dev: seen.append(dev) or contextlib.nullcontext()
        try:
            probs, _ = api._build(torch.zeros(6, 2), 2, init="k-means++", n_init=1, max_iter=5, tol=1e-4,
                                  sample_weight=None, seed=0, algorithm="auto")
            triton_backend.solve(api._convert(probs, "triton"))
        finally:
            triton_backend.device_scope = real
        assert seen == [torch.device("cpu")], seen

    print("RESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interpreted():
    support = str(Path(__file__).resolve().parents[1] / "_support")  # kmeans_checks for the script
    pythonpath = os.pathsep.join(p for p in (support, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", KCENGINE_BACKEND="", PYTHONPATH=pythonpath)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULTS")), None)
    assert line is not None, f"interpreter run failed (rc={out.returncode}):\n{out.stderr[-4000:]}"
    return json.loads(line[len("RESULTS"):])


KERNEL_CHECKS = [f"{k}_{t}" for k in ("assign", "segment_sum", "kpp_pass", "sqdist") for t in ("float32", "float64")]
BACKEND_CHECKS = ["backend_ragged_kmeanspp_float32", "backend_weighted_random_ninit_float64",
                  "backend_sweep_shared_dataset", "backend_given_init_with_empty_clusters",
                  "backend_given_init_offset_float64", "backend_launches_in_the_datas_device_scope"]


@pytest.mark.parametrize("name", KERNEL_CHECKS)
def test_triton_kernel_interpreted(interpreted, name):
    assert interpreted.get(name) == "ok", interpreted.get(name, "check did not run")


@pytest.mark.parametrize("name", BACKEND_CHECKS)
def test_triton_backend_interpreted_matches_cpu(interpreted, name):
    assert interpreted.get(name) == "ok", interpreted.get(name, "check did not run")


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import torch

    from kcengine.kmeans import api
    from kcengine.kmeans.backends import triton as triton_backend

    probs, _ = api._build(torch.zeros(4, 2), 2, init="k-means++", n_init=1, max_iter=10, tol=1e-4,
                          sample_weight=None, seed=0, algorithm="auto")
    with pytest.raises(RuntimeError, match="triton backend takes CUDA tensors"):
        triton_backend.solve(api._convert(probs, "triton"))
