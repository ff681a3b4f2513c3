"""The torch reference against the cpu backend: same start → same answer."""
import numpy as np
import pytest

import kcengine
from kmeans_data import blobs

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("n,d,k", [(120, 1, 4), (200, 9, 12), (64, 300, 8), (50, 3, 50)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_equals_cpu_on_same_init(n, d, k, dtype):
    x = blobs(n, d, centers=k, seed=d + k).astype(dtype)
    init = x[np.random.default_rng(0).choice(n, k, replace=False)].copy()
    a = kcengine.kmeans(x, k, init=init, backend="cpu")
    b = kcengine.kmeans(x, k, init=init, backend="torch")
    np.testing.assert_array_equal(a.labels, b.labels)
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    assert float(a.inertia) == pytest.approx(float(b.inertia), rel=rtol, abs=1e-9)
    assert int(a.n_iter) == int(b.n_iter) and bool(a.converged) == bool(b.converged)
    np.testing.assert_allclose(a.centroids, b.centroids, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_torch_equals_cpu_when_the_repair_meets_zero_weights(seed):
    """Weights with zeros and k above the points of positive weight: clusters of weight 0 appear every
    iteration, and both backends repair them by the same rule (a point is taken only from a cluster that
    keeps another member of positive weight)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(13, 8))
    w = rng.uniform(0.05, 2.0, size=13) * (rng.uniform(size=13) > 0.3)
    w[0] = max(w[0], 0.5)
    init = x[rng.choice(13, 10, replace=False)].copy()
    a = kcengine.kmeans(x, 10, init=init, sample_weight=w, backend="cpu", algorithm="topm")
    b = kcengine.kmeans(x, 10, init=init, sample_weight=w, backend="torch")
    np.testing.assert_array_equal(a.labels, b.labels)
    assert int(a.n_iter) == int(b.n_iter)
    np.testing.assert_allclose(a.centroids, b.centroids, rtol=1e-10, atol=1e-10)

def test_torch_ragged_batch_and_weights():
    probs = [blobs(40, 2, 3, seed=1), blobs(70, 5, 4, seed=2), blobs(40, 2, 3, seed=3)]
    ws = [np.random.default_rng(i).uniform(0.5, 2, size=len(p)) for i, p in enumerate(probs)]
    inits = [p[:3].copy() for p in probs]
    a = kcengine.kmeans(probs, init=inits, sample_weight=ws, backend="cpu")
    b = kcengine.kmeans(probs, init=inits, sample_weight=ws, backend="torch")
    for i in range(3):
        np.testing.assert_array_equal(a.labels[i], b.labels[i])
        assert float(a.inertia[i]) == pytest.approx(float(b.inertia[i]), rel=1e-10)


def test_torch_kmeanspp_quality_and_seed():
    x = blobs(300, 4, 10, seed=0, spread=1.0)
    r1 = kcengine.kmeans(x, 10, seed=3, backend="torch")
    r2 = kcengine.kmeans(x, 10, seed=3, backend="torch")
    np.testing.assert_array_equal(r1.labels, r2.labels)
    ours = np.mean([float(kcengine.kmeans(x, 10, seed=s, backend="torch").inertia) for s in range(10)])
    cpu = np.mean([float(kcengine.kmeans(x, 10, seed=s, backend="cpu").inertia) for s in range(10)])
    assert ours <= 1.05 * cpu


def test_torch_empty_cluster_repair_matches_cpu():
    # Start with two centroids far away from the data: both clusters empty at the first step.
    x = blobs(60, 2, 4, seed=5)
    init = np.vstack([x[:2], np.full((2, 2), 1e3)])
    a = kcengine.kmeans(x, 4, init=init, backend="cpu")
    b = kcengine.kmeans(x, 4, init=init, backend="torch")
    np.testing.assert_array_equal(a.labels, b.labels)
    assert float(a.inertia) == pytest.approx(float(b.inertia), rel=1e-10)
    assert len(np.unique(a.labels)) == 4


@pytest.mark.parametrize("algorithm", ["lloyd1d", "lloyd", "hamerly", "yinyang", "topm", "gram"])
def test_repair_tie_goes_to_the_lower_index_not_the_smaller_value(algorithm):
    """Point 0 (at 1) and point 1 (at -1) are equally far from their cluster's center 0, and cluster 2
    starts empty: the tie goes to point 0, the lower index, in every backend -- lloyd1d, which works on
    the sorted values (point 1 first), once gave it to point 1."""
    x = np.array([[1.0], [-1.0], [5.0], [5.25]])
    init = np.array([[0.0], [5.125], [100.0]])
    a = kcengine.kmeans(x, 3, init=init, backend="cpu", algorithm=algorithm)
    b = kcengine.kmeans(x, 3, init=init, backend="torch")
    assert b.labels.tolist() == [2, 0, 1, 1]
    assert a.labels.tolist() == [2, 0, 1, 1] and a.algorithm == algorithm


def test_identical_centers_give_the_points_to_the_lower_index():
    """Random starts drawn among duplicated points can place two centers on one point. The dot form's matrix
    product rounded the two columns differently, copies split between them, nothing emptied, and a run ended
    with two identical centroids (15 of 300 runs; the cpu backend repairs the empty one)."""
    rng = np.random.default_rng(2)
    nd = int(rng.integers(2, 40))
    n = nd + int(rng.integers(0, 40))
    u = rng.normal(size=(nd, 9))
    x = u[np.r_[np.arange(nd), rng.integers(0, nd, n - nd)]]
    assert len(np.unique(x, axis=0)) == 33
    res = kcengine.kmeans(torch.from_numpy(x), 33, init="random", seed=2, backend="torch")
    assert len(np.unique(res.centroids.numpy(), axis=0)) == 33
    init = np.repeat(x[:3], 2, axis=0)  # given: three points, each twice
    res = kcengine.kmeans(torch.from_numpy(x), init=torch.from_numpy(init), backend="torch")
    ref = kcengine.kmeans(x, init=init, backend="cpu")
    np.testing.assert_array_equal(res.labels.numpy(), ref.labels)
    assert len(np.unique(ref.centroids, axis=0)) == 6


def test_repeated_centers_are_found_exactly():
    """Equal rows were found through a weighted sum of each row: on gridded data rows of equal sum but other
    coordinates ((1, 0, 1) between two (0, 2, 0)) hid the repeat, which then kept its share of the points."""
    from kcengine.kmeans.backends.torch_ref import _repeats

    rng = np.random.default_rng(0)
    for t in range(50):
        k, d = int(rng.integers(2, 12)), int(rng.integers(1, 5))
        c = rng.integers(-2, 3, size=(4, k, d)).astype(np.float64)  # a small grid: many equal sums, some equal rows
        c[c == 0] = rng.choice([0.0, -0.0], size=int((c == 0).sum()))  # -0 equals +0
        c[t % 4] = rng.normal(size=(k, d))  # one problem of distinct rows among them (its sums differ)
        c = c.astype(np.float32 if t % 2 else np.float64)
        want = np.array([[any((c[b, j] == c[b, i]).all() for i in range(j)) for j in range(k)] for b in range(4)])
        got = _repeats(torch.from_numpy(c))
        np.testing.assert_array_equal(np.zeros_like(want) if got is None else got.numpy(), want)
    c = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]])
    assert _repeats(c).tolist() == [[False, False, True]]


def test_weights_spanning_more_than_float32_on_float32_data():
    """The torch reference cast the weights to the data's dtype: beside weights of 1e50 (scaled into float32's
    range by the API), weights of 1 and 3 read 0, their cluster was "empty" and repaired.  It weighs in float64
    now, as the cpu core does: Lloyd's fixed point from this start, on both backends."""
    x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]], np.float32)
    w = np.array([1e50, 1e50, 1e50, 1.0, 3.0])
    init = np.array([[0.0], [10.0]], np.float32)
    for backend in ("cpu", "torch"):
        r = kcengine.kmeans(torch.from_numpy(x), init=torch.from_numpy(init), sample_weight=w, backend=backend)
        assert r.labels.tolist() == [0, 0, 0, 1, 1], backend
        np.testing.assert_array_equal(r.centroids.numpy().ravel(), [1.0, 10.75])


def test_lazily_negated_tensors_are_read_on_the_cpu_backend():
    """``z.conj().imag`` is a view with torch's negative bit set; numpy() refused it (torch's RuntimeError on the cpu
    backend, a warning and the torch fallback under auto).  Such x, init and weights are read as their values."""
    z = torch.complex(torch.zeros(40, 3, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64,
                                                                         generator=torch.Generator().manual_seed(0)))
    x = z.conj().imag
    assert x.is_neg()
    wz = torch.complex(torch.zeros(40, dtype=torch.float64), -torch.linspace(0.5, 2.0, 40, dtype=torch.float64))
    init, w = x[:4], wz.conj().imag  # positive weights, negative bit set
    plain = x.clone()
    assert w.is_neg() and init.is_neg() and not plain.is_neg() and bool((w > 0).all())
    got = kcengine.kmeans(x, init=init, sample_weight=w, backend="cpu")
    ref = kcengine.kmeans(plain, init=plain[:4].clone(), sample_weight=w.clone(), backend="cpu")
    assert torch.equal(got.labels, ref.labels) and torch.equal(got.centroids, ref.centroids)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_centered_data_gives_back_the_points_a_cluster_shares(dtype):
    """Data clustered centered (farther from the origin than its spread): a cluster of one repeated point came
    back as the point plus the round trip's rounding ([-1.2e-8, -1.2e-8] for [0, 0] in float32), its inertia
    reported 0.  As the cpu core (and scikit-learn, which does not center): the point itself."""
    x = np.array([[0, 0], [0, 0], [1, 1], [1, 1], [2, 2]], dtype)
    for backend in ("torch", "cpu"):
        r = kcengine.kmeans(x, init=x[[0, 2, 4]], backend=backend)
        np.testing.assert_array_equal(r.centroids, x[[0, 2, 4]])
        assert r.inertia == ((x - r.centroids[r.labels]) ** 2).sum() == 0
    far = np.array([[-235978.015625], [-235977.0]], dtype)  # k = N: each centroid is its point
    r = kcengine.kmeans(far, init=far, backend="torch")
    np.testing.assert_array_equal(r.centroids, far)
