"""The cpu backend against scikit-learn: same start → same labels and inertia; k-means++ quality."""
import numpy as np
import pytest
from sklearn.cluster import KMeans

import kcengine
from kmeans_checks import offset_points
from kmeans_data import blobs, real_conv_weights

ALGOS = ["lloyd", "hamerly", "yinyang", "topm", "gram", "auto"]


def sk_fit(x, init, **kw):
    km = KMeans(n_clusters=init.shape[0], init=init, n_init=1, max_iter=kw.get("max_iter", 300),
                tol=kw.get("tol", 1e-4), algorithm="lloyd")
    return km.fit(x, sample_weight=kw.get("sample_weight"))


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("n,d,k", [(300, 2, 7), (200, 9, 16), (64, 576, 12), (97, 33, 5), (600, 9, 64)])
def test_same_init_matches_sklearn(algorithm, n, d, k):
    x = blobs(n, d, centers=k + 2, seed=n + d)
    init = x[np.random.default_rng(1).choice(n, k, replace=False)].copy()
    ref = sk_fit(x, init)
    res = kcengine.kmeans(x, k, init=init, backend="cpu", algorithm=algorithm)
    np.testing.assert_array_equal(res.labels, ref.labels_)
    assert res.inertia == pytest.approx(ref.inertia_, rel=1e-6)
    np.testing.assert_allclose(res.centroids, ref.cluster_centers_, rtol=1e-6, atol=1e-9)
    assert int(res.n_iter) == ref.n_iter_


def test_same_init_1d_matches_sklearn():
    x = np.random.default_rng(3).normal(size=(500, 1))
    init = x[:6].copy()
    ref = sk_fit(x, init)
    for algorithm in ("lloyd1d", "lloyd", "hamerly"):
        res = kcengine.kmeans(x, 6, init=init, algorithm=algorithm)
        np.testing.assert_array_equal(res.labels, ref.labels_)
        assert res.inertia == pytest.approx(ref.inertia_, rel=1e-6)
        assert int(res.n_iter) == ref.n_iter_


def test_weighted_same_init_matches_sklearn():
    x = blobs(150, 4, 6, seed=5)
    w = np.random.default_rng(2).uniform(0.1, 3.0, size=150)
    init = x[:6].copy()
    ref = sk_fit(x, init, sample_weight=w)
    for algorithm in ("hamerly", "yinyang", "topm", "gram", "lloyd"):
        res = kcengine.kmeans(x, 6, init=init, sample_weight=w, algorithm=algorithm)
        np.testing.assert_array_equal(res.labels, ref.labels_)
        assert res.inertia == pytest.approx(ref.inertia_, rel=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("offset", [1.0, 1e4])
@pytest.mark.parametrize("k", [3, 10])
def test_data_far_from_the_origin_matches_sklearn(backend, offset, k):
    """scikit-learn centers the data before clustering; so do kcengine's backends when the data sits farther from
    the origin than its spread, where distances and centroids taken around the origin lose the digits that tell
    the points apart.  Same start -> same labels, inertia and iterations (float64)."""
    x = offset_points(np.float64, offset)
    init = x[np.random.default_rng(1).choice(x.shape[0], k, replace=False)].copy()
    ref = sk_fit(x, init)
    algos = ALGOS if backend == "cpu" else ["auto"]
    for algorithm in algos:
        res = kcengine.kmeans(x, init=init, backend=backend, algorithm=algorithm)
        np.testing.assert_array_equal(res.labels, ref.labels_, err_msg=algorithm)
        assert res.inertia == pytest.approx(ref.inertia_, rel=1e-6), algorithm
        assert int(res.n_iter) == ref.n_iter_, algorithm
        # the points span +-3 ulps of the offset: one ulp apart is as close as two roundings of a mean get
        np.testing.assert_allclose(res.centroids - offset, ref.cluster_centers_ - offset, rtol=0,
                                   atol=np.spacing(offset), err_msg=algorithm)


@pytest.mark.parametrize("offset", [1.0, 100.0, 1e4])
def test_float32_data_a_few_ulps_apart_converges(offset):
    """Around 1e4 float32 centroids are a few ulps of each other; taken around the origin, Lloyd and Hamerly ran
    all 300 iterations without converging.  Centered, every solver converges (the 1-D ones on one coordinate),
    each centroid the mean of its members to the half ulp of rounding it."""
    x = offset_points(np.float32, offset)
    half_ulp = 0.5 * float(np.spacing(np.float32(offset)))
    for algorithm in ALGOS + ["lloyd1d", "exact1d"]:
        xa = x[:, :1].copy() if algorithm in ("lloyd1d", "exact1d") else x
        for k in (3, 10):
            res = kcengine.kmeans(xa, k, seed=0, algorithm=algorithm)
            assert bool(res.converged) and int(res.n_iter) < 100, (algorithm, k, int(res.n_iter))
            lab, c = np.asarray(res.labels), np.asarray(res.centroids, dtype=np.float64)
            for j in np.unique(lab):
                mean = xa[lab == j].astype(np.float64).mean(0)
                np.testing.assert_allclose(c[j], mean, rtol=0, atol=1.01 * half_ulp, err_msg=algorithm)


@pytest.mark.parametrize("algorithm", ["auto", "exact1d", "lloyd1d", "lloyd", "hamerly"])
def test_centered_data_keeps_single_points_exact(algorithm):
    """Centering must not cost the exactness of points that are clusters of their own: at k == N on data far
    from the origin (1-D, as compress's element granularity clusters each coordinate with exact1d) every point
    comes back as a centroid bit for bit, also the ones near the origin that a round trip through the centered
    copy rounds."""
    x = np.array([0.1, 0.3] + [6.0 + 0.01 * i for i in range(20)], dtype=np.float32)[:, None]
    k = x.shape[0]
    x = np.concatenate([x, x[:1]])  # one point twice: auto takes a solver, not the distinct shortcut
    assert float(x.mean()) ** 2 > float(x.var())  # the data is centered
    res = kcengine.kmeans(x, k, seed=0, algorithm=algorithm)
    assert res.algorithm != "distinct"
    np.testing.assert_array_equal(np.sort(np.asarray(res.centroids)[:, 0]), np.unique(x[:, 0]))
    assert float(res.inertia) == 0.0


@pytest.mark.parametrize("algorithm", ["lloyd", "hamerly", "lloyd1d"])
def test_centered_data_stopped_early_matches_sklearn(algorithm):
    """Stopped by max_iter, the final E-step moves a point: the centroids stay the means of the members before
    it (as scikit-learn returns them), even where the new members share a value."""
    x = np.array([[100.0], [101.0], [102.0], [110.0]])
    init = np.array([[100.0], [103.0]])
    ref = KMeans(2, init=init, n_init=1, max_iter=1).fit(x)
    res = kcengine.kmeans(x, init=init, max_iter=1, algorithm=algorithm)
    np.testing.assert_array_equal(res.labels, ref.labels_)
    np.testing.assert_allclose(res.centroids, ref.cluster_centers_, rtol=1e-15)
    assert float(res.inertia) == pytest.approx(ref.inertia_, rel=1e-12)


def test_sweep_on_centered_data_equals_separate_calls():
    """One centered dataset shared by a sweep's problems, the last at k == N (the distinct shortcut, which reads
    the caller's points while the others read the centered copy)."""
    x = offset_points(np.float32, 100.0, n=40, d=3, seed=2)
    x = np.unique(x, axis=0)
    ks = [2, 7, x.shape[0]]
    sweep = kcengine.kmeans_sweep(x, ks, seed=0)
    for k, r in zip(ks, sweep):
        alone = kcengine.kmeans(x, k, seed=0)
        np.testing.assert_array_equal(r.centroids, alone.centroids)
        np.testing.assert_array_equal(r.labels, alone.labels)
    assert sweep[-1].algorithm == "distinct"
    np.testing.assert_array_equal(sweep[-1].centroids, x)


@pytest.mark.parametrize("granularity", ["filter", "kernel", "element"])
def test_real_weights_same_init_match_sklearn(granularity):
    weights = real_conv_weights()
    w = weights["layer2.1.conv1.weight"].astype(np.float64)  # [32, 32, 3, 3]
    if granularity == "filter":
        x, k = w.reshape(32, -1), 12
    elif granularity == "kernel":
        x, k = w.reshape(-1, 9), 40
    else:
        x, k = w.reshape(32, -1)[:, 7:8].copy(), 5
    init = x[np.random.default_rng(0).choice(x.shape[0], k, replace=False)].copy()
    ref = sk_fit(x, init)
    res = kcengine.kmeans(x, k, init=init)
    np.testing.assert_array_equal(res.labels, ref.labels_)
    assert res.inertia == pytest.approx(ref.inertia_, rel=1e-6)


def test_kmeanspp_quality_over_20_seeds():
    """Mean inertia over seeds 0..19 within 1% of scikit-learn's (its k-means++ and Lloyd).

    One 20-seed mean varies by ~0.5% on multi-modal data, so the 1% bound is applied to the
    pooled ratio over four workload shapes (filters, kernels, 1-D, mid-D); each single shape
    must stay within 3%.
    """
    ratios = []
    for n, d, k in [(400, 9, 32), (256, 576, 16), (256, 1, 10), (300, 64, 20)]:
        x = blobs(n, d, centers=2 * k, seed=11, spread=1.0)
        ours = [float(kcengine.kmeans(x, k, seed=s).inertia) for s in range(20)]
        theirs = [KMeans(k, n_init=1, random_state=s).fit(x).inertia_ for s in range(20)]
        ratios.append(np.mean(ours) / np.mean(theirs))
    assert max(ratios) <= 1.03, ratios
    assert np.mean(ratios) <= 1.01, ratios


def test_kmeanspp_1d_with_many_centers_matches_sklearn_quality():
    """1-D problems with N k above 2**22 seed through the sorted-order k-means++ (a Fenwick tree of the
    potentials, each candidate costing only the run of points it improves; the scan per step took minutes
    for kernel granularity of 1x1 convs, k = N/2).  Same procedure, so the same quality: mean inertia
    within 1% of scikit-learn's over seeds, after seeding alone (max_iter=1) and converged; reproducible."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=15000), rng.normal(5.0, 0.3, size=5000)]).reshape(-1, 1)
    k = 256  # N k = 5.1e6
    for max_iter in (1, 300):
        ours = [float(kcengine.kmeans(x, k, seed=s, algorithm="lloyd1d", max_iter=max_iter).inertia)
                for s in range(8)]
        theirs = [KMeans(k, n_init=1, random_state=s, max_iter=max_iter).fit(x).inertia_ for s in range(8)]
        assert np.mean(ours) <= 1.01 * np.mean(theirs), (max_iter, np.mean(ours) / np.mean(theirs))
    a, b = (kcengine.kmeans(x, k, seed=3, algorithm="lloyd1d") for _ in range(2))
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.centroids, kcengine.kmeans(x, k, seed=4, algorithm="lloyd1d").centroids)


@pytest.mark.parametrize("weighted", [False, True])
def test_kmeanspp_1d_with_many_centers_edge_cases(weighted):
    """k = N of distinct values: every value its own center; fewer distinct values than k: each of them
    a center, inertia 0; integer weights act as repetitions (same mean inertia over seeds within 2%)."""
    rng = np.random.default_rng(1)
    y = rng.normal(size=(4096, 1))  # N k = 16.8e6
    w = rng.integers(1, 4, size=4096).astype(float) if weighted else None
    r = kcengine.kmeans(y, 4096, seed=0, algorithm="lloyd1d", sample_weight=w)
    assert len(np.unique(r.centroids)) == 4096 and float(r.inertia) <= 1e-20
    z = np.repeat(np.arange(100.0), 50).reshape(-1, 1)
    r = kcengine.kmeans(z, 2000, seed=0, algorithm="lloyd1d", sample_weight=np.ones(5000) if weighted else None)
    assert len(np.unique(r.centroids)) == 100 and float(r.inertia) == 0.0
    if weighted:
        vals = np.round(rng.normal(size=40000) * 1000) / 1000
        u, counts = np.unique(vals, return_counts=True)
        k = 1000
        assert len(u) * k > 2**22 and counts.max() > 1  # both problems take the sorted-order seeding
        a = np.mean([float(kcengine.kmeans(u[:, None], k, sample_weight=counts.astype(float), seed=s,
                                           algorithm="lloyd1d").inertia) for s in range(8)])
        b = np.mean([float(kcengine.kmeans(vals[:, None], k, seed=s, algorithm="lloyd1d").inertia)
                     for s in range(8)])
        assert abs(a / b - 1) <= 0.02, a / b


def test_kmeanspp_quality_on_real_kernels():
    w = real_conv_weights()["layer3.1.conv2.weight"]  # [64, 64, 3, 3] float32
    x = w.reshape(-1, 9)
    ours = [float(kcengine.kmeans(x, 64, seed=s).inertia) for s in range(20)]
    theirs = [KMeans(64, n_init=1, random_state=s).fit(x).inertia_ for s in range(20)]
    assert np.mean(ours) <= 1.01 * np.mean(theirs)


def test_exact1d_labels_nearest_when_k_exceeds_distinct_values():
    # Found by the fuzzer: 3 distinct values, k = 4 -> one value's run is split in two intervals whose
    # means round an ulp apart in the wrong order; every label must still be a nearest centroid.
    v = [1.66372399, -0.65179115, -0.17471729, -0.17471729, -0.65179115, -0.17471729, -0.17471729, 1.66372399,
         -0.17471729]
    x = np.array(v)[:, None]
    for k in (4, 5, 6):
        r = kcengine.kmeans(x, k, algorithm="exact1d")
        c = np.asarray(r.centroids)[:, 0]
        d2 = (x - c[None, :]) ** 2
        assert np.all(d2[np.arange(len(v)), np.asarray(r.labels)] <= d2.min(1) + 1e-15), k
        assert float(r.inertia) == pytest.approx(0.0, abs=1e-15)
        assert np.all(np.diff(c) >= 0)


def test_exact1d_is_optimal_and_never_worse_than_lloyd():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n, k = int(rng.integers(3, 9)), int(rng.integers(1, 4))
        k = min(k, n)
        x = rng.normal(size=(n, 1)).round(1)
        res = kcengine.kmeans(x, k, algorithm="exact1d")
        # Brute force over every split of the sorted values into k intervals.
        v = np.sort(x[:, 0])
        from itertools import combinations

        best = np.inf
        for cuts in combinations(range(1, n), k - 1):
            parts = np.split(v, cuts)
            best = min(best, sum(((p - p.mean()) ** 2).sum() for p in parts))
        assert res.inertia == pytest.approx(best, abs=1e-9)
        lloyd = kcengine.kmeans(x, k, seed=trial)
        assert float(res.inertia) <= float(lloyd.inertia) + 1e-9
        assert bool(res.converged) and int(res.n_iter) == 0


def _plain_dp_1d(v, w, k):
    """The optimal k-clustering cost of 1-D values by the plain O(k n^2) dynamic program over sorted values."""
    o = np.argsort(v, kind="stable")
    v, w = v[o], (np.ones_like(v) if w is None else w[o])
    n = len(v)
    P0, P1, P2 = (np.concatenate([[0.0], np.cumsum(a)]) for a in (w, w * v, w * v * v))
    a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    W = P0[b] - P0[a]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(W > 0, (P2[b] - P2[a]) - (P1[b] - P1[a]) ** 2 / np.where(W > 0, W, 1.0), 0.0)
    cost = np.where(b > a, np.maximum(cost, 0.0), np.inf)  # cost[j, i]: the interval [j, i)
    best = cost[0].copy()
    for _ in range(2, k + 1):
        best = (best[:, None] + cost).min(axis=0)
    return best[n]


@pytest.mark.parametrize("weighted", [False, True])
def test_exact1d_with_many_clusters_is_optimal(weighted):
    """Where 2 k log2(n) > n (k = n/2 for the element plans) the exact 1-D table takes Knuth's bounds, and a
    table for one k fills only the prefixes that k needs; below, divide and conquer.  Both reach the optimum
    of the plain O(k n^2) program, weighted or not, on values with many ties, and with fewer distinct values
    than k (inertia 0)."""
    rng = np.random.default_rng(3)
    for n, k in [(60, 30), (61, 20), (40, 12), (100, 50), (64, 63), (300, 4)]:
        v = np.round(rng.normal(size=n) * 4) / 4
        w = rng.uniform(0.5, 2.0, size=n) if weighted else None
        r = kcengine.kmeans(v[:, None], k, algorithm="exact1d", sample_weight=w)
        ref = _plain_dp_1d(v, w, k)
        assert float(r.inertia) == pytest.approx(ref, rel=1e-9, abs=1e-12), (n, k)
        c = np.asarray(r.centroids)[:, 0]
        lab = np.asarray(r.labels)
        assert np.all(np.diff(c) >= 0)
        d2 = (v[:, None] - c[None, :]) ** 2
        assert np.all(d2[np.arange(n), lab] <= d2.min(1) + 1e-12)  # every label a nearest centroid
    u = np.arange(25.0)
    r = kcengine.kmeans(np.repeat(u, 3)[:, None], 40, algorithm="exact1d")
    assert float(r.inertia) == 0.0 and len(np.unique(np.asarray(r.centroids))) == 25


def _exact_dp_1d(v, w, k):
    """The optimal k-clustering cost of 1-D values in exact rational arithmetic (no rounding at all)."""
    from fractions import Fraction

    o = np.argsort(v, kind="stable")
    v = [Fraction(float(a)) for a in v[o]]
    w = [Fraction(1)] * len(v) if w is None else [Fraction(float(a)) for a in w[o]]
    n = len(v)

    def cost(a, b):
        W = sum(w[a:b])
        if W == 0:
            return Fraction(0)
        m = sum(wi * vi for wi, vi in zip(w[a:b], v[a:b])) / W
        return sum(wi * (vi - m) ** 2 for wi, vi in zip(w[a:b], v[a:b]))

    best = {i: cost(0, i) for i in range(1, n + 1)}  # best[i]: the first i values in m clusters, m = 1, 2, ...
    for m in range(2, k + 1):
        best = {i: min(best[j] + cost(j, i) for j in range(m - 1, i)) for i in range(m, n + 1)}
    return float(best[n])


@pytest.mark.parametrize("weighted", [False, True])
def test_exact1d_is_optimal_for_narrow_clusters_far_apart(weighted):
    """Interval costs from prefix sums about the data's mean cancel away clusters much narrower than the data's
    range: values near +-1e6 in clusters 1e-3 wide chose the wrong intervals (inertia 2.9e-6 against the
    optimum's 1e-6, and labels that did not match the centroids).  Such data is solved in double-double: the
    optimum of an exact rational program, the centroids the means of their clusters, on every path (one
    problem, a batch, the sweep's shared table)."""
    rng = np.random.default_rng(7)
    for scale in (1e4, 1e6, 1e7, 1e9):
        for trial in range(3):
            sizes = rng.integers(1, 4, size=4)
            v = np.concatenate([c * scale + rng.uniform(0, 4e-3 * scale / 1e6, size=s).round(4 + trial) * (1 + c)
                                for c, s in zip((-1, 0, 1, 2), sizes)])
            w = rng.uniform(0.5, 2.0, size=v.size) if weighted else None
            k = int(sizes.sum()) // 2 + 1
            want = _exact_dp_1d(v, w, k)
            for r in (kcengine.kmeans(v[:, None], k, algorithm="exact1d", sample_weight=w),
                      kcengine.kmeans([v[:, None], v[:, None]], [k, k], algorithm="exact1d",
                                      sample_weight=None if w is None else [w, w])[1],
                      kcengine.kmeans_sweep(v[:, None], [2, k, k + 1], algorithm="exact1d", sample_weight=w)[1]):
                lab, c = np.asarray(r.labels), np.asarray(r.centroids)[:, 0]
                ww = np.ones_like(v) if w is None else w
                got = sum((ww[lab == j] * (v[lab == j] - c[j]) ** 2).sum() for j in range(k))
                assert got == pytest.approx(want, rel=1e-6), (scale, trial)
                for j in np.unique(lab):  # each centroid its cluster's (weighted) mean
                    m = (ww[lab == j] * v[lab == j]).sum() / ww[lab == j].sum()
                    assert abs(c[j] - m) <= 1e-12 * scale, (scale, trial, j)


@pytest.mark.parametrize("n,d,k,dtype", [(20000, 9, 256, np.float64),  # 3x3 kernels: the d = 9 build, threaded
                                         (3000, 5, 40, np.float64),  # the generic-d build
                                         (500, 9, 2, np.float64),  # no more centers than listed competitors
                                         (20000, 9, 128, np.float32),  # n > 8192: M = 4 listed
                                         (4096, 9, 256, np.float32),  # resnet20's shape: M = 2 listed
                                         # float32 d = 9: the first E-step scans 16 points per vector;
                                         # partial last groups, k below / at / just over the M + 2 list
                                         # (M = 2 up to 8192 points, M = 4 above)
                                         (1003, 9, 3, np.float32), (1011, 9, 4, np.float32),
                                         (1029, 9, 5, np.float32), (37, 9, 6, np.float32),
                                         (1050, 9, 7, np.float32), (1001, 9, 2, np.float32),
                                         (9005, 9, 3, np.float32), (9007, 9, 4, np.float32),
                                         (9001, 9, 6, np.float32), (9003, 9, 7, np.float32),
                                         # a scan's segments of 64 centers: partial (k = 37, 100), and
                                         # float data of another D
                                         (3001, 9, 37, np.float32), (10007, 9, 100, np.float32),
                                         (3000, 5, 45, np.float32)])
def test_topm_equals_plain_lloyd(n, d, k, dtype):
    """The top-m bound solver skips distance work but must walk Lloyd's exact trajectory: same
    labels, centroids, inertia and iteration count as plain Lloyd from the same start (labels
    are decided in double precision on every path, so this holds for float32 data too)."""
    x = np.random.default_rng(n + d).uniform(-1, 1, size=(n, d)).astype(dtype)
    init = x[np.random.default_rng(k).choice(n, k, replace=False)].copy()
    ref = kcengine.kmeans(x, k, init=init, algorithm="lloyd")
    res = kcengine.kmeans(x, k, init=init, algorithm="topm")
    np.testing.assert_array_equal(res.labels, ref.labels)
    # centroid sums are updated incrementally (moved points only): equal up to summation order
    np.testing.assert_allclose(res.centroids, ref.centroids, rtol=1e-5 if dtype == np.float32 else 1e-10, atol=1e-7)
    assert int(res.n_iter) == int(ref.n_iter) and bool(res.converged) == bool(ref.converged)
    assert float(res.inertia) == pytest.approx(float(ref.inertia), rel=1e-9)


def test_topm_repairs_empty_clusters_like_lloyd():
    x = np.random.default_rng(4).normal(size=(400, 9))
    x[300:] = x[0]  # duplicates: repair must not move two centers onto one point
    init = np.concatenate([x[:5], np.full((3, 9), 40.0)])  # three far centers: empty at once
    ref = kcengine.kmeans(x, 8, init=init, algorithm="lloyd")
    res = kcengine.kmeans(x, 8, init=init, algorithm="topm")
    np.testing.assert_array_equal(res.labels, ref.labels)
    np.testing.assert_allclose(res.centroids, ref.centroids, rtol=1e-12)
    assert len(np.unique(res.centroids, axis=0)) == 8


@pytest.mark.parametrize("case", ["blobs", "offset", "relocate", "duplicates", "large"])
def test_topm_movers_keep_lloyd_trajectory(case):
    """Float 9-D top-m checks the centers that moved most ("movers") against every point's bounds instead
    of eroding all bounds by their drift (always in the first M-step, where the first E-step scanned every
    point).  The trajectory must stay plain Lloyd's: k-means++ seeding (the transposed copy the seeding
    made) and given centers (the solver's own copy); blobs whose late iterations move a few centers;
    data far from the origin (the centered copy); centers relocated into empty clusters (the largest
    drifts); duplicated points (ties); more than 8192 points (4 listed competitors)."""
    rng = np.random.default_rng(7)
    n, k, init, seed = 4096, 256, "k-means++", 3
    if case in ("blobs", "offset", "large"):
        n = 16000 if case == "large" else n  # large: 4 listed, and the threaded passes (n * 9 >= 2**17)
        centers = rng.normal(size=(300, 9))
        x = centers[rng.integers(0, 300, n)] + 0.3 * rng.normal(size=(n, 9))
        if case == "offset":
            x += 50.0
    elif case == "relocate":
        x = rng.normal(size=(n, 9))
        init = np.concatenate([x[:k - 40], np.full((40, 9), 30.0) + rng.normal(size=(40, 9))])
    else:
        x = rng.normal(size=(n, 9))
        x[n // 2:] = x[:n - n // 2]
    x = x.astype(np.float32)
    if not isinstance(init, str):
        init = init.astype(np.float32)
    ref = kcengine.kmeans(x, k, init=init, seed=seed, algorithm="lloyd")
    res = kcengine.kmeans(x, k, init=init, seed=seed, algorithm="topm")
    assert int(ref.n_iter) > 3
    np.testing.assert_array_equal(res.labels, ref.labels)
    np.testing.assert_allclose(res.centroids, ref.centroids, rtol=1e-5, atol=1e-6)
    assert int(res.n_iter) == int(ref.n_iter) and bool(res.converged) == bool(ref.converged)
    assert float(res.inertia) == pytest.approx(float(ref.inertia), rel=1e-9)


@pytest.mark.parametrize("algorithm", ["yinyang", "topm"])
@pytest.mark.parametrize("seed", range(6))
def test_incremental_sums_empty_a_cluster_whose_weighted_members_left(algorithm, seed):
    """Yinyang and top-m move a changed point's weight between clusters' sums instead of summing from
    scratch; with weights such as 0.1 + 0.2 - 0.1 - 0.2 the remainder is not 0, so a cluster that lost its
    last member of positive weight must still be found empty and repaired as plain Lloyd repairs it (a
    remainder once left a center at remainder / remainder).  Many zero weights and k near the number of
    positive ones make such clusters common."""
    rng = np.random.default_rng(100 + seed)
    n, k = 300, 120
    x = rng.normal(size=(n, 9))
    w = rng.uniform(0.05, 2.0, size=n) * (rng.uniform(size=n) > 0.35)
    init = x[rng.choice(n, k, replace=False)].copy()  # some centers start on points of weight 0
    ref = kcengine.kmeans(x, k, init=init, sample_weight=w, algorithm="lloyd", max_iter=30)
    res = kcengine.kmeans(x, k, init=init, sample_weight=w, algorithm=algorithm, max_iter=30)
    np.testing.assert_array_equal(res.labels, ref.labels)
    np.testing.assert_allclose(res.centroids, ref.centroids, rtol=1e-9, atol=1e-9)
    assert int(res.n_iter) == int(ref.n_iter)


@pytest.mark.parametrize("weighted", [False, True])
def test_exact1d_sweep_shares_one_table_and_equals_separate_calls(weighted):
    """The exact 1-D problems of one dataset in a batch (a k sweep: the element plans' elbow) share one DP
    table built for their largest k; each k's result is bit-equal to solving it alone, in a sweep and in a
    ragged batch that mixes shared and unshared datasets."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 1))
    w = rng.uniform(0, 2, size=700) * (rng.uniform(size=700) > 0.2) if weighted else None
    ks = [2, 5, 37, 350, 700, 120]
    for k, r in zip(ks, kcengine.kmeans_sweep(x, ks, algorithm="exact1d", sample_weight=w)):
        s = kcengine.kmeans(x, k, algorithm="exact1d", sample_weight=w)
        np.testing.assert_array_equal(r.centroids, s.centroids)
        np.testing.assert_array_equal(r.labels, s.labels)
        assert float(r.inertia) == float(s.inertia)
    xs, kk = [x, x, x[:300], x, x[:300]], [10, 600, 50, 3, 299]
    rb = kcengine.kmeans(xs, kk, algorithm="exact1d")
    for a, k, c, lab in zip(xs, kk, rb.centroids, rb.labels):
        s = kcengine.kmeans(a, k, algorithm="exact1d")
        np.testing.assert_array_equal(c, s.centroids)
        np.testing.assert_array_equal(lab, s.labels)


_R1_X = np.array([-1.6913281872334445, 0.20154465827823959, 0.445006220157222, 2.3306239180705983,
                  0.49303177984609003, -1.6913281872334445, 0.445006220157222, 0.20154465827823959,
                  -1.6913281872334445, 0.20154465827823959, 2.3306239180705983])[:, None]
_R1_INIT = np.array([0.2502809900023185, 2.0576846435867404, -2.0592816211548626, 1.7482237828028373,
                     0.10882488378505834])[:, None]


def test_the_repair_never_stacks_a_center_on_copies_of_its_point():
    """A point whose copies made up a whole cluster was taken for an empty one: two centers on one spot, the copies
    went to the lower index, and a cluster came back empty (lloyd, hamerly, gram: 5 distinct values, k = 5,
    converged with an empty cluster) or Yinyang and top-m moved centers between copies until max_iter (2
    distinct values, k = 3).  Every solver and the torch reference now walk one path."""
    torch = pytest.importorskip("torch")
    a, b = 0.34341006663842183, 2.22103116330751
    cases = [(_R1_X, _R1_INIT),
             (np.array([a, b, a, a, b, b])[:, None], np.array([0.9528766042654139, 0.950829995183259,
                                                               0.007091239723746731])[:, None])]
    rng = np.random.default_rng(11)
    for _ in range(12):  # duplicated points, random starts
        nd, k = int(rng.integers(3, 8)), int(rng.integers(3, 7))
        u = rng.normal(size=(nd, 2))
        x = u[rng.integers(0, nd, size=int(rng.integers(k + 2, 30)))]
        cases.append((x, rng.normal(size=(k, 2)) * 3))
    for x, init in cases:
        k = init.shape[0]
        runs = {alg: kcengine.kmeans(x, init=init, algorithm=alg) for alg in
                ("lloyd", "hamerly", "gram", "yinyang", "topm") + (("lloyd1d",) if x.shape[1] == 1 else ())}
        runs["torch"] = kcengine.kmeans(torch.from_numpy(x), init=torch.from_numpy(init), backend="torch")
        ref = runs["lloyd"]
        for alg, r in runs.items():
            np.testing.assert_array_equal(np.asarray(r.labels), ref.labels, err_msg=alg)
            assert int(r.n_iter) == int(ref.n_iter) and bool(r.converged), alg
        if len(np.unique(x, axis=0)) >= k:  # k distinct points: k distinct centroids, none empty
            assert len(np.unique(ref.centroids, axis=0)) == k and len(np.unique(ref.labels)) == k
