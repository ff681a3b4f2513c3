"""The cuda and triton k-means backends on a CUDA device against the cpu backend.

``cuda`` runs twice: with its automatic routing (small problems in the fused one-block kernel)
and with ``KCENGINE_CUDA_PATH=packed`` (every problem through the packed path's kernels).
Given the same initial centroids on well-separated data, labels must equal the cpu backend's and
inertia agree within 1e-4 relative; from k-means++ starts (the same random streams as the cpu
backend) results must be as good as the cpu backend's and self-consistent.
"""
import math

import numpy as np
import pytest
import torch

import kcengine
from kcengine import _registry
from kmeans_data import blobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"),
]


@pytest.fixture(params=["cuda", "cuda-packed", "triton"])
def backend(request, monkeypatch):
    name = request.param.split("-")[0]
    reason = _registry.backend_status(name)
    if reason:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    monkeypatch.setenv("KCENGINE_CUDA_PATH", "packed" if request.param == "cuda-packed" else "auto")
    return name


def _gpu(xs, dtype=torch.float32):
    return [torch.as_tensor(x, dtype=dtype, device="cuda") for x in xs]


def _consistent(res_c, x, label):
    """Labels are the nearest centroids of the returned centroids (the final E-step ran)."""
    x64, c64 = x.double(), res_c.double()
    d2 = torch.cdist(x64, c64) ** 2
    own = d2.gather(1, label.view(-1, 1)).squeeze(1)
    assert bool((own <= d2.min(1).values * (1 + 1e-5) + 1e-9).all())


def _geo_ratio(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = b > 1e-12
    return float(np.exp(np.mean(np.log(np.maximum(a[keep], 1e-300) / b[keep])))) if keep.any() else 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_given_start_labels_equal_cpu(backend, dtype):
    shapes = [(300, 2, 5), (40, 9, 4), (700, 1, 6), (120, 27, 8), (64, 200, 3), (3000, 9, 32)]
    xs = [blobs(n, d, c, seed=i, spread=0.05) for i, (n, d, c) in enumerate(shapes)]
    rng = np.random.default_rng(0)
    init = [x[rng.choice(len(x), c, replace=False)] for x, (_, _, c) in zip(xs, shapes)]
    ref = kcengine.kmeans([x.astype(np.float64 if dtype == torch.float64 else np.float32) for x in xs],
                          init=[c.astype(np.float64 if dtype == torch.float64 else np.float32) for c in init],
                          backend="cpu", algorithm="lloyd")
    got = kcengine.kmeans(_gpu(xs, dtype), init=_gpu(init, dtype), backend=backend)
    assert got.backend == backend
    for p in range(len(xs)):
        assert got.labels[p].device.type == "cuda"
        np.testing.assert_array_equal(got.labels[p].cpu().numpy(), ref.labels[p])
    np.testing.assert_allclose(got.inertia.cpu().numpy(), ref.inertia, rtol=1e-4)
    np.testing.assert_array_equal(got.n_iter.cpu().numpy(), ref.n_iter)


def _conv_like(c_out, c_in, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c_out, c_in, 3, 3, generator=g) / math.sqrt(c_in * 9)).numpy()


def _workload(kind):
    layers = [_conv_like(16, 3, 0), _conv_like(64, 16, 1), _conv_like(128, 64, 2)]
    if kind == "filters":
        xs = [w.reshape(w.shape[0], -1) for w in layers]
        return xs, [max(1, round(0.9 * len(x))) for x in xs]
    if kind == "kernels":
        xs = [np.ascontiguousarray(w.reshape(-1, 9)) for w in layers]
        return xs, [min(256, len(x)) for x in xs]
    if kind == "element":
        xs = [np.ascontiguousarray(w.reshape(w.shape[0], -1).T[j][:, None]) for w in layers[:2]
              for j in range(min(40, w[0].size))]  # per weight position: 27 in the 3-channel layer
        return xs, [min(10, len(x)) for x in xs]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["filters", "kernels", "element"])
def test_workload_kinds_match_cpu_quality(backend, kind):
    xs, ks = _workload(kind)
    ref = kcengine.kmeans(xs, ks, seed=3, backend="cpu", algorithm="lloyd")
    got = kcengine.kmeans(_gpu(xs), ks, seed=3, backend=backend)
    ratio = _geo_ratio(got.inertia.cpu().numpy(), ref.inertia)
    assert 0.97 < ratio < 1.03, ratio
    for p in range(0, len(xs), max(1, len(xs) // 8)):
        _consistent(got.centroids[p], _gpu([xs[p]])[0], got.labels[p])
        assert int(got.labels[p].max()) < ks[p]


def test_sweep_matches_cpu_quality(backend):
    x = blobs(500, 6, 12, seed=9)
    ks = list(range(2, 21))
    ref = kcengine.kmeans_sweep(x.astype(np.float32), ks, seed=1, backend="cpu", algorithm="lloyd")
    got = kcengine.kmeans_sweep(_gpu([x])[0], ks, seed=1, backend=backend)
    ratio = _geo_ratio([float(r.inertia) for r in got], [float(r.inertia) for r in ref])
    assert 0.97 < ratio < 1.03, ratio
    inert = [float(r.inertia) for r in got]
    assert inert[-1] < inert[0]


def test_ragged_weighted_ninit_float64(backend):
    rng = np.random.default_rng(2)
    shapes = [(50, 3), (513, 7), (2, 1), (90, 33), (4097, 2)]
    xs = [rng.normal(size=s) for s in shapes]
    ks = [5, 17, 2, 11, 64]
    sw = [rng.uniform(0, 3, size=s[0]) for s in shapes]
    ref = kcengine.kmeans(xs, ks, sample_weight=sw, n_init=3, seed=4, backend="cpu", algorithm="lloyd")
    got = kcengine.kmeans(_gpu(xs, torch.float64), ks, sample_weight=_gpu(sw, torch.float64), n_init=3, seed=4,
                          backend=backend)
    assert got.centroids[0].dtype == torch.float64
    ratio = _geo_ratio(got.inertia.cpu().numpy(), ref.inertia)
    assert 0.97 < ratio < 1.03, ratio


def test_five_thousand_problems(backend):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5000, 64, 9)).astype(np.float32)
    ref = kcengine.kmeans(x, 8, seed=0, backend="cpu", algorithm="lloyd")
    got = kcengine.kmeans(torch.as_tensor(x, device="cuda"), 8, seed=0, backend=backend)
    assert tuple(got.centroids.shape) == (5000, 8, 9) and tuple(got.labels.shape) == (5000, 64)
    ratio = _geo_ratio(got.inertia.cpu().numpy(), ref.inertia)
    assert 0.98 < ratio < 1.02, ratio
    assert bool(got.converged.all())


def test_deterministic_with_seed(backend):
    xs, ks = _workload("kernels")
    a = kcengine.kmeans(_gpu(xs), ks, seed=11, backend=backend)
    b = kcengine.kmeans(_gpu(xs), ks, seed=11, backend=backend)
    for p in range(len(xs)):
        assert torch.equal(a.centroids[p], b.centroids[p])
        assert torch.equal(a.labels[p], b.labels[p])
    assert torch.equal(a.inertia, b.inertia)


def test_problem_alone_equals_problem_in_batch(backend):
    xs, ks = _workload("filters")
    batch = kcengine.kmeans(_gpu(xs), ks, seed=2, backend=backend)
    alone = kcengine.kmeans(_gpu([xs[1]])[0], ks[1], seed=2, backend=backend)
    torch.testing.assert_close(alone.inertia, batch.inertia[1], rtol=1e-6, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_data_on_a_device_that_is_not_current(backend):
    """Data on cuda:1 while cuda:0 is current: CuPy's stream check refused it and Triton launched on cuda:0.
    The result equals the same problem solved on cuda:0, and the current device is left as it was."""
    x = blobs(300, 5, 6, seed=3, dtype=np.float32)
    init = x[:6]
    want = kcengine.kmeans(torch.as_tensor(x, device="cuda:0"), None, init=torch.as_tensor(init, device="cuda:0"),
                           backend=backend)
    assert torch.cuda.current_device() == 0
    got = kcengine.kmeans(torch.as_tensor(x, device="cuda:1"), None, init=torch.as_tensor(init, device="cuda:1"),
                          backend=backend)
    assert torch.cuda.current_device() == 0 and got.labels.device == torch.device("cuda:1")
    assert torch.equal(got.labels.cpu(), want.labels.cpu())
