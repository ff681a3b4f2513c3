"""Properties every backend result must have (cpu backend unless said otherwise)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import kcengine
from kmeans_data import blobs


def brute_labels(x, c):
    d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    return d2, d2.argmin(1)


@pytest.mark.parametrize("algorithm", ["lloyd", "hamerly", "yinyang", "topm", "gram"])
def test_inertia_never_rises_between_iterations(algorithm):
    x = blobs(300, 12, 9, seed=4, spread=2.0)
    init = x[:9].copy()
    prev = np.inf
    for m in range(1, 15):
        r = kcengine.kmeans(x, 9, init=init, max_iter=m, tol=0.0, algorithm=algorithm)
        assert float(r.inertia) <= prev * (1 + 1e-12)
        prev = float(r.inertia)


@pytest.mark.parametrize("algorithm", ["auto", "lloyd", "hamerly", "yinyang", "topm", "gram", "lloyd1d"])
def test_every_label_is_the_nearest_centroid(algorithm):
    d = 1 if algorithm == "lloyd1d" else 7
    x = blobs(257, d, 10, seed=8, spread=1.5)
    r = kcengine.kmeans(x, 10, seed=3, algorithm=algorithm)
    d2, lab = brute_labels(x, r.centroids)
    own = d2[np.arange(len(x)), r.labels]
    np.testing.assert_allclose(own, d2.min(1), rtol=1e-9, atol=1e-12)
    assert r.inertia == pytest.approx(own.sum(), rel=1e-9)


@pytest.mark.parametrize("weighted", [False, True])
def test_lloyd1d_two_point_clusters_are_bit_equal_to_lloyds(weighted):
    """lloyd1d takes a cluster's sums from prefix sums, except for small clusters, which it sums as Lloyd
    does: a two-point cluster's center is then bit-equal to Lloyd's (w * x summed in double, in either
    order), so its members' distances, equal in exact arithmetic, tie alike in the empty-cluster repair.
    (From prefix sums over points out to +-500 the centers came out an ulp or more apart.)"""
    rng = np.random.default_rng(3)
    mid = np.linspace(-500.0, 500.0, 101) + rng.uniform(-2, 2, size=101)
    half = rng.uniform(0.1, 1.0, size=101)
    x = np.concatenate([mid - half, mid + half])[:, None]
    perm = rng.permutation(len(x))
    x = x[perm]
    w = rng.uniform(0.5, 2.0, size=len(x)) if weighted else None
    a = kcengine.kmeans(x, 101, init=mid[:, None], sample_weight=w, max_iter=1, algorithm="lloyd1d")
    b = kcengine.kmeans(x, 101, init=mid[:, None], sample_weight=w, max_iter=1, algorithm="lloyd")
    assert (np.bincount(a.labels, minlength=101) == 2).all()
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    ww = np.ones(len(x)) if w is None else w
    expect = np.bincount(a.labels, ww * x[:, 0]) / np.bincount(a.labels, ww)
    np.testing.assert_allclose(a.centroids[:, 0], expect, rtol=0, atol=1e-12)


def test_ragged_batch_equals_each_problem_alone():
    rng = np.random.default_rng(0)
    probs = [blobs(int(rng.integers(20, 200)), int(d), 5, seed=i) for i, d in enumerate([1, 2, 9, 64, 300, 3])]
    ks = [3, 4, 8, 5, 2, 7]
    batch = kcengine.kmeans(probs, ks, seed=42)
    for i, (x, k) in enumerate(zip(probs, ks)):
        alone = kcengine.kmeans(x, k, seed=42)
        np.testing.assert_array_equal(batch.labels[i], alone.labels)
        np.testing.assert_array_equal(batch.centroids[i], alone.centroids)
        assert batch.inertia[i] == alone.inertia


def test_dense_batch_shapes_and_equality_with_alone():
    x = np.stack([blobs(50, 4, 3, seed=s) for s in range(6)]).astype(np.float32)
    r = kcengine.kmeans(x, 3, seed=1)
    assert r.centroids.shape == (6, 3, 4) and r.centroids.dtype == np.float32
    assert r.labels.shape == (6, 50) and r.inertia.shape == (6,)
    for b in range(6):
        alone = kcengine.kmeans(x[b], 3, seed=1)
        np.testing.assert_array_equal(r.labels[b], alone.labels)
    assert len(r) == 6 and float(r[2].inertia) == float(r.inertia[2])
    problems = list(r)  # iterating a batch gives its problems, as indexing does
    assert len(problems) == 6 and all(np.array_equal(p.labels, r.labels[b]) for b, p in enumerate(problems))
    assert [float(p.inertia) for p in problems] == [float(v) for v in r.inertia]


def test_ragged_result_iterates_over_problems_and_a_single_one_does_not():
    xs = [blobs(30, 3, 2, seed=0).astype(np.float32), blobs(40, 5, 3, seed=1).astype(np.float32)]
    r = kcengine.kmeans(xs, [2, 3], seed=0)
    got = [p.centroids.shape for p in r]
    assert got == [(2, 3), (3, 5)]
    one = kcengine.kmeans(xs[0], 2, seed=0)
    with pytest.raises(TypeError, match="single-problem"):
        list(one)
    with pytest.raises(IndexError, match="single problem"):
        one[0]


def test_sweep_equals_separate_calls():
    x = blobs(64, 576, 12, seed=2)
    ks = list(range(2, 65, 7))
    sweep = kcengine.kmeans_sweep(x, ks, seed=5)
    for k, r in zip(ks, sweep):
        alone = kcengine.kmeans(x, k, seed=5)
        np.testing.assert_array_equal(r.labels, alone.labels)
        np.testing.assert_allclose(r.centroids, alone.centroids)
        assert r.centroids.shape == (k, 576)


@pytest.mark.parametrize("d", [1, 5, 9, 100])
@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_k_equals_n(d, init):
    """k == N distinct points: "auto" returns each point as its own centroid (bit for bit) without
    iterating; the full solver (seeding + Lloyd, chosen by name) reaches the same set of centroids."""
    x = blobs(17, d, 17, seed=1).astype(np.float32)
    r = kcengine.kmeans(x, 17, seed=0, init=init)
    assert r.algorithm == "distinct" and int(r.n_iter) == 0 and bool(r.converged)
    assert float(r.inertia) == 0.0
    np.testing.assert_array_equal(r.centroids[r.labels], x)
    full = kcengine.kmeans(x, 17, seed=0, init=init, algorithm="lloyd1d" if d == 1 else "lloyd")
    assert full.algorithm != "distinct" and float(full.inertia) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_array_equal(np.unique(full.centroids, axis=0), np.unique(r.centroids, axis=0))


def test_k_equals_n_float64_weighted_n_init():
    x = blobs(23, 6, 23, seed=3)
    w = np.random.default_rng(0).uniform(0.5, 3.0, size=23)
    r = kcengine.kmeans(x, 23, seed=1, sample_weight=w, n_init=3)
    assert r.algorithm == "distinct" and r.centroids.dtype == np.float64
    assert np.array_equal(r.centroids, x) and r.labels.tolist() == list(range(23))
    assert float(r.inertia) == 0.0


@pytest.mark.parametrize("algorithm,d", [("lloyd", 5), ("hamerly", 5), ("yinyang", 20), ("topm", 9), ("gram", 100),
                                         ("lloyd1d", 1)])
def test_k_equals_n_full_solvers(algorithm, d):
    """The solvers themselves at k == N (what "auto" no longer runs there): every point a centroid."""
    x = blobs(24, d, 24, seed=5)
    r = kcengine.kmeans(x, 24, seed=0, algorithm=algorithm)
    assert r.algorithm == algorithm and float(r.inertia) == pytest.approx(0.0, abs=1e-9)
    assert len(np.unique(r.labels)) == 24
    np.testing.assert_allclose(r.centroids[r.labels], x, rtol=0, atol=1e-12)


def test_k_equals_n_falls_back_to_the_solver():
    """Only distinct points of positive weight, an unseeded init and algorithm="auto" take the shortcut."""
    x = blobs(12, 4, 12, seed=2)
    dup = np.vstack([x[:11], x[:1]])
    assert kcengine.kmeans(dup, 12, seed=0).algorithm != "distinct"
    signed_zero = np.zeros((2, 3))
    signed_zero[1, 0] = -0.0  # equal values: the same point
    assert kcengine.kmeans(signed_zero, 2, seed=0).algorithm != "distinct"
    w = np.ones(12)
    w[3] = 0.0
    assert kcengine.kmeans(x, 12, seed=0, sample_weight=w).algorithm != "distinct"
    assert kcengine.kmeans(x, 12, init=x[::-1].copy()).algorithm != "distinct"
    assert kcengine.kmeans(x, 12, seed=0, algorithm="hamerly").algorithm == "hamerly"
    batch = kcengine.kmeans([x, x], [12, 5], seed=0)  # one dataset, two problems: per problem
    assert batch.algorithm[0] == "distinct" and batch.algorithm[1] != "distinct"
    assert kcengine.kmeans(x, 5, seed=0).labels.tolist() == batch.labels[1].tolist()
    y = blobs(40, 4, 3, seed=6)  # a dataset of its own beside one only the shortcut uses
    batch = kcengine.kmeans([x, y], [12, 3], seed=0)
    assert batch.algorithm[0] == "distinct"
    assert kcengine.kmeans(y, 3, seed=0).labels.tolist() == batch.labels[1].tolist()


@pytest.mark.parametrize("d", [1, 3, 64])
def test_fewer_distinct_points_than_k(d):
    base = np.random.default_rng(0).normal(size=(4, d))
    x = np.repeat(base, 10, axis=0)
    r = kcengine.kmeans(x, 6, seed=0)
    assert np.all(np.isfinite(r.centroids)) and float(r.inertia) == pytest.approx(0.0, abs=1e-9)
    # every distinct point is a centroid
    for p in base:
        assert np.min(((r.centroids - p) ** 2).sum(1)) < 1e-18


@pytest.mark.parametrize("d", [1, 3, 64])
def test_k_distinct_centroids_when_data_has_k_distinct_points(d):
    base = np.random.default_rng(1).normal(size=(6, d))
    x = np.repeat(base, [1, 5, 9, 2, 7, 3], axis=0)
    for algorithm in ("auto", "lloyd"):
        r = kcengine.kmeans(x, 6, seed=2, algorithm=algorithm)
        assert len(np.unique(r.centroids.round(12), axis=0)) == 6
        assert float(r.inertia) == pytest.approx(0.0, abs=1e-9)


def test_d_4608_filters():
    x = blobs(96, 4608, 10, seed=3).astype(np.float32)
    r = kcengine.kmeans(x, 10, seed=0)
    assert r.algorithm == "gram"
    d2, lab = brute_labels(x.astype(np.float64), r.centroids.astype(np.float64))
    own = d2[np.arange(len(x)), r.labels]
    np.testing.assert_allclose(own, d2.min(1), rtol=1e-4)


def test_b1_and_b5000():
    rng = np.random.default_rng(0)
    one = kcengine.kmeans(rng.normal(size=(1, 30, 3)), 4, seed=0)
    assert one.centroids.shape == (1, 4, 3)
    x = rng.normal(size=(5000, 24, 1)).astype(np.float32)
    r = kcengine.kmeans(x, 5, seed=0)
    assert r.centroids.shape == (5000, 5, 1) and r.inertia.shape == (5000,)
    for b in (0, 1234, 4999):
        alone = kcengine.kmeans(x[b], 5, seed=0)
        np.testing.assert_array_equal(r.labels[b], alone.labels)


@pytest.mark.parametrize("algorithm", ["lloyd", "hamerly", "topm", "gram", "lloyd1d"])
def test_integer_weights_equal_repetition(algorithm):
    d = 1 if algorithm == "lloyd1d" else 6
    x = blobs(40, d, 4, seed=6)
    reps = np.random.default_rng(1).integers(1, 4, size=40)
    init = x[[0, 5, 10, 15]].copy()
    a = kcengine.kmeans(x, 4, init=init, sample_weight=reps.astype(np.float64), algorithm=algorithm)
    b = kcengine.kmeans(np.repeat(x, reps, axis=0), 4, init=init, algorithm=algorithm)
    np.testing.assert_allclose(a.centroids, b.centroids, rtol=1e-10)
    assert a.inertia == pytest.approx(b.inertia, rel=1e-10)
    np.testing.assert_array_equal(np.repeat(a.labels, reps), b.labels)


def test_seed_reproducible_and_n_init_takes_best():
    x = blobs(200, 5, 12, seed=9, spread=1.0)
    a = kcengine.kmeans(x, 8, seed=7)
    b = kcengine.kmeans(x, 8, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    for seed in (np.array(7), torch.tensor(7)):  # a 0-d integer array is the int it holds (as k's)
        np.testing.assert_array_equal(kcengine.kmeans(x, 8, seed=seed).labels, a.labels)
    best = kcengine.kmeans(x, 8, seed=7, n_init=5)
    assert float(best.inertia) <= float(a.inertia)


def test_random_init_and_dtype_preserved():
    x = blobs(100, 3, 5, seed=1).astype(np.float32)
    r = kcengine.kmeans(x, 5, init="random", seed=0)
    assert r.centroids.dtype == np.float32 and r.labels.dtype == np.int64
    assert r.inertia.dtype == np.float64


def _excluded_by_random_init(w, seeds):
    """With k = N - 1, which point each seed's init="random" leaves out.  The points sit at -1 (a sentinel
    of huge weight, always drawn) and 4^i, so the first E-step puts a left-out point with its left
    neighbour: after one M-step every centroid but theirs is a point, and the two points missing from
    the centroids name it (the right one of the pair; a zero-weight one is the only point missing)."""
    n = len(w)
    x = np.zeros((n + 1, 2))
    x[0, 0] = -1.0
    x[1:, 0] = 4.0 ** np.arange(n)
    weights = np.concatenate([[1e9], np.asarray(w, dtype=np.float64)])
    out = []
    for seed in seeds:
        r = kcengine.kmeans(x, n, init="random", seed=seed, sample_weight=weights, max_iter=1)
        missing = [i for i in range(n + 1) if not (np.asarray(r.centroids) == x[i]).all(1).any()]
        if len(missing) == 1:  # a left-out point of zero weight does not move its neighbour's centroid
            out.append(missing[0] - 1)
            continue
        assert len(missing) == 2 and missing[1] == missing[0] + 1
        out.append(missing[1] - 1)
    return np.bincount(out, minlength=n)


def test_random_init_draws_by_weight_without_replacement():
    # P(point j is drawn last) when the points are drawn one by one, each in proportion to its weight
    # among those not drawn yet: summed over the orders that end with j.
    import itertools

    w = np.array([1.0, 2.0, 3.0, 6.0])
    expect = np.zeros(len(w))
    for order in itertools.permutations(range(len(w))):
        p, left = 1.0, w.sum()
        for j in order:
            p *= w[j] / left
            left -= w[j]
        expect[order[-1]] += p
    runs = 3000
    got = _excluded_by_random_init(w, range(runs)) / runs
    np.testing.assert_allclose(got, expect, atol=5 * np.sqrt(expect * (1 - expect) / runs).max())
    # zero weight: never drawn while points of positive weight are left
    assert _excluded_by_random_init([1.0, 0.0, 2.0, 1.0], range(50)).tolist() == [0, 50, 0, 0]


def test_callers_arrays_are_not_modified():
    x = blobs(80, 4, 4, seed=2)
    w = np.ones(80)
    init = x[:4].copy()
    xs, ws, inits = x.copy(), w.copy(), init.copy()
    kcengine.kmeans(x, 4, init=init, sample_weight=w)
    kcengine.kmeans(x, 4, init=init, sample_weight=w, backend="torch")
    np.testing.assert_array_equal(x, xs)
    np.testing.assert_array_equal(w, ws)
    np.testing.assert_array_equal(init, inits)


_READ_ONLY_SCRIPT = """
import numpy as np, kcengine
rng = np.random.default_rng(0)
x, w = rng.normal(size=(60, 3)).astype(np.float32), rng.uniform(0.5, 2.0, 60)
def frozen(a):
    a = np.array(a)
    a.setflags(write=False)
    return a
# (read-only arguments, the same as writable copies)
cases = [((frozen(x), 4, dict(sample_weight=frozen(w), init=frozen(x[:4]))),
          (x.copy(), 4, dict(sample_weight=w.copy(), init=x[:4].copy()))),
         ((np.broadcast_to(x, (2, 60, 3)), 4, {}), (np.stack([x, x]), 4, {})),
         (([frozen(x), frozen(x[:30])], [4, 3], {}), ([x.copy(), x[:30].copy()], [4, 3], {}))]
for backend in ("cpu", "torch"):
    for (a, k, kw), (ref_a, ref_k, ref_kw) in cases:
        got = kcengine.kmeans(a, k, seed=0, backend=backend, **kw)
        ref = kcengine.kmeans(ref_a, ref_k, seed=0, backend=backend, **ref_kw)
        np.testing.assert_array_equal(np.asarray(got.inertia), np.asarray(ref.inertia))
print("ok")
"""


def test_read_only_numpy_inputs_run_quietly_and_as_writable_ones_do():
    """A read-only array (np.load's memory map, a broadcast view) runs on every backend without torch's
    "not writable" warning, with the results of a writable copy.  In a fresh interpreter with warnings as
    errors: torch shows that warning once a process, so another test may already have spent it here."""
    out = subprocess.run([sys.executable, "-W", "error", "-c", _READ_ONLY_SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_torch_tensors_in_torch_tensors_out():
    torch = pytest.importorskip("torch")
    x = torch.tensor(blobs(60, 3, 4, seed=0), dtype=torch.float32)
    r = kcengine.kmeans(x, 4, seed=0)
    assert isinstance(r.centroids, torch.Tensor) and r.centroids.dtype == torch.float32
    assert isinstance(r.labels, torch.Tensor) and r.labels.dtype == torch.int64
    ragged = kcengine.kmeans([x[:30], x[30:]], 3, seed=0)
    assert isinstance(ragged.centroids, list) and isinstance(ragged.centroids[0], torch.Tensor)


@pytest.mark.parametrize("algorithm,d", [("lloyd", 5), ("hamerly", 5), ("yinyang", 20), ("topm", 9), ("gram", 100),
                                         ("lloyd1d", 1)])
def test_k_equals_n_from_the_points_stops_at_once_with_tol_0(algorithm, d):
    """Started on the points themselves with tol=0, no center moves: every solver stops after its first
    iteration, as scikit-learn does.  (The Gram solver read its shift from the Gram expansion, a few ulps
    above 0 at a standstill, and ran a second iteration.)"""
    from sklearn.cluster import KMeans

    x = blobs(24, d, 24, seed=5)
    r = kcengine.kmeans(x, 24, init=x, tol=0.0, algorithm=algorithm)
    ref = KMeans(24, init=x, n_init=1, tol=0.0).fit(x)
    assert r.algorithm == algorithm and int(r.n_iter) == ref.n_iter_ == 1 and bool(r.converged)
    np.testing.assert_array_equal(r.labels, np.arange(24))
    np.testing.assert_array_equal(r.centroids, x)
