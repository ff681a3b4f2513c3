"""Input validation of kcengine.kmeans / kmeans_sweep and the backend registry."""
import re

import numpy as np
import torch
import pytest

import kcengine
from kcengine import _core

X = np.random.default_rng(0).normal(size=(20, 3))


@pytest.mark.parametrize("x,k,kw,match", [
    (np.array([[0.0, np.nan], [1.0, 2.0]]), 1, {}, "x holds NaN or Inf"),
    ([X, np.full((5, 3), np.inf)], 2, {}, "problem 1 holds NaN or Inf"),
    (X, 0, {}, r"k must be >= 1, got k=0"),
    (X, 21, {}, r"n_samples=20 should be >= k=21"),
    ([X, X[:4]], [2, 5], {}, r"n_samples=4 should be >= k=5 for problem 1"),
    (np.zeros((0, 3)), 1, {}, r"x is empty \(shape \(0, 3\)\)"),
    ([X, np.zeros((4, 0))], 1, {}, r"problem 1 is empty"),
    (X[0], 1, {}, r"x must have shape \[N, D\], \[B, N, D\]"),
    (np.zeros((2, 3, 4, 5)), 1, {}, r"got shape \(2, 3, 4, 5\)"),
    ([X, X], [2, 3, 4], {}, r"k has 3 entries but x holds 2 problems"),
    (X, [2, 3], {}, r"k must be an int for a single problem"),
    (X.astype(np.int64), 2, {}, r"x must be float32 or float64, got dtype int64"),
    (X.astype(np.float16), 2, {}, r"x must be float32 or float64, got dtype float16"),
    (None, 2, {}, r"x must be float32 or float64, got dtype object \(NoneType None\)"),
    ("abc", 2, {}, r"x must be float32 or float64, got dtype <U3 \(str 'abc'\)"),
    (X, 2, {"init": [[0.0, 0.0], [1.0, 1.0, 1.0]]}, r"init must be one of \('k-means\+\+', 'random'\) or a \[k, 3\] "
     r"array of initial centroids, got list \[\[0.0, 0.0\], \[1.0, 1.0, 1.0\]\]"),  # was numpy's own message
    (X, 2, {"init": [[0.0, 0.0, "a"], [1.0, 1.0, 1.0]]}, r"init must be one of .* or a \[k, 3\] array of initial "
     r"centroids, got list"),  # was "init for a batch of 1 problems"
    (X, 2, {"sample_weight": np.ones(19)}, r"sample_weight must have shape \[20\], got shape \(19,\)"),
    (X, 2, {"sample_weight": -np.ones(20)}, r"sample_weight must be >= 0, got a minimum of -1.0"),
    (X, 2, {"sample_weight": np.zeros(20)}, r"sample_weight sums to 0"),
    ([X, X[:5]], 2, {"sample_weight": [np.ones(20), np.ones(4)]}, r"sample_weight of problem 1 must have shape \[5\]"),
    (X, 2, {"init": "kmeans++"}, r"init must be one of"),
    (X, 2, {"init": X[:3]}, r"init has 3 centroids but k=2"),
    (X, 2, {"init": X[:2, :2]}, r"init must have shape \[k, 3\]"),
    (X, 2, {"init": X[:2] > 0}, r"^init must hold real numbers \(a float or integer dtype\), got dtype bool$"),
    (X, 2, {"init": (X[:2] > 0).tolist()}, r"^init must be one of .* or a \[k, 3\] array of initial centroids"),
    ([X, X], 2, {"init": [X[:2], X[:2].astype(np.complex64)]},
     r"^init of problem 1 must hold real numbers \(a float or integer dtype\), got dtype complex64$"),
    (X, 2, {"init": X[:2], "n_init": 3}, r"n_init=3 with given initial centroids"),
    (X, 2, {"init": None}, r"init must be one of \('k-means\+\+', 'random'\) or an array of initial centroids, "
     r"got None"),  # was: init must have shape [k, 3], got shape ()
    (X, 2, {"init": 3}, r"init must be one of .* got 3$"),
    (X, 2, {"init": lambda a, k, rs: a[:k]}, r"got the callable '<lambda>' \(scikit-learn's init\(X, k, "
     r"random_state\) form is not taken"),
    (X, 2, {"init": [[0.0, 1.0], [2.0, 3.0]]}, r"init must have shape \[k, 3\], got shape \(2, 2\)"),
    (X, 2, {"n_init": 0}, r"n_init must be an int in \[1, 2147483647\], got n_init=0"),
    (X, 2, {"max_iter": 0}, r"max_iter must be an int in \[1, 2147483647\], got max_iter=0"),
    (X, 2, {"max_iter": 2**40}, r"max_iter must be an int in \[1, 2147483647\], got max_iter=1099511627776"),  # was pybind11's TypeError
    (X, 2, {"n_init": 2**31}, r"n_init must be an int in \[1, 2147483647\], got n_init=2147483648"),
    (X, 2, {"tol": -1.0}, r"tol must be a finite number >= 0.0, got tol=-1.0"),
    (X, 2, {"tol": torch.tensor([1e-4])}, r"tol must be a finite number >= 0.0, got tol=tensor\(\[1.0000e-04\]\)"),
    (X, 2, {"tol": np.array(-1.0)}, r"tol must be a finite number >= 0.0, got tol=array\(-1.\)"),
    (X, None, {"init": X[:0]}, r"^init holds no centroids \(shape \(0, 3\)\): give at least one row$"),  # was: k=0
    ([X, X], None, {"init": [X[:2], X[:0]]}, r"^init of problem 1 holds no centroids"),
    (X, 2, {"seed": -3}, r"seed must be an int in \[0, 9223372036854775807\], got seed=-3"),
    (X, 2, {"seed": 2**64}, r"seed must be an int in \[0, 9223372036854775807\], got seed=18446744073709551616"),
    (X, 2, {"seed": 1.5}, r"seed must be an int in \[0, 9223372036854775807\], got seed=1.5"),
    (X, 2, {"algorithm": "elkan"}, r"algorithm must be one of"),
    (X, 2, {"algorithm": "exact1d"}, r"needs 1-D points \(D == 1\); problem 0 has D=3"),
    # its table's bound, as checked (the message said k*N <= 5e8, which k = 20001, N = 25000 passes)
    (np.arange(32768.0)[:, None], 16384, {"algorithm": "exact1d"},
     r"algorithm='exact1d' needs k\*\(N\+1\) <= 2\*\*29 \(its split table\); problem 0 has k=16384, N=32768"),
    # the optimum needs no start: a given one was ignored without a word
    (X[:, :1], None, {"algorithm": "exact1d", "init": X[:2, :1]}, r"algorithm='exact1d' finds the optimal clustering "
     r"from no start: given init centroids would be ignored"),
    (X, 2, {"backend": "gpu"}, r"backend='gpu' is not one of"),
    ([], 2, {}, r"x is an empty list"),
    ([[0.0, 1.0], [1.0, 2.0], [5.0, 5.0]], 2, {}, r"x\[0\] must have shape \[N, D\], got shape \(2,\); a list of "
     r"points is read as a ragged batch of problems: for one dataset pass np.asarray\(x\)"),
    ([1.0, 2.0, 3.0], 2, {}, r"x\[0\] must have shape \[N, D\], got shape \(\); a list of points is read as a "
     r"ragged batch of problems: for one dataset pass np.asarray\(x\).reshape\(-1, 1\)"),
    (X, 2.5, {}, r"k must be an int, got k=2.5"),
    ([X, torch.tensor(X)], 2, {}, r"x mixes numpy arrays and torch tensors; pass one kind"),
    ([X, X.astype(np.float32)], 2, {}, r"x mixes dtypes \['float32', 'float64'\]; pass one dtype"),
    (np.zeros((0, 5, 3)), 1, {}, r"x has shape \[0, N, D\]: a batch needs at least one problem"),
    (X, None, {}, r"k is required unless init gives the initial centroids"),
    (X, 2, {"sample_weight": [1.0, [2.0]] + [1.0] * 18}, r"sample_weight could not be read as an array"),
    (X, 2, {"sample_weight": np.array(["a"] * 20)},
     r"sample_weight must be a real number per point \(float or integer\), got dtype <U1"),
    (X, 2, {"sample_weight": np.r_[np.ones(19), np.nan]}, r"^sample_weight holds NaN or Inf values"),
    ([X, X], 2, {"sample_weight": [np.ones(20)]}, r"sample_weight has 1 entries but x holds 2 problems"),
    (np.stack([X, X]), 2, {"sample_weight": np.ones((3, 20))},
     r"sample_weight has shape \(3, 20\), expected \[2, 20\]"),
    ([X, X[:5]], 2, {"sample_weight": np.ones(20)},
     r"sample_weight for a ragged batch must be a list with one \[N_i\] array per problem"),
    ([X, X], 2, {"sample_weight": [np.ones(20), np.r_[np.ones(19), np.inf]]},
     r"sample_weight of problem 1 holds NaN or Inf values"),
    ([X, X], 2, {"init": [X[:2]]}, r"init for a batch of 2 problems must be a list of 2 \[k_i, D_i\] arrays"),
    (np.stack([X, X]), 2, {"init": np.zeros((3, 2, 3))}, r"init must have shape \[2, k, 3\], got shape \(3, 2, 3\)"),
    (X, 2, {"init": np.r_[X[:1], [[np.nan, 0.0, 0.0]]]}, r"^init holds NaN or Inf values"),
    ([X, X], 2, {"init": [X[:2], np.r_[X[:1], [[np.inf, 0.0, 0.0]]]]},
     r"init of problem 1 holds NaN or Inf values"),
])
def test_bad_input_raises_value_error(x, k, kw, match):
    with pytest.raises(ValueError, match=match):
        kcengine.kmeans(x, k, **kw)


@pytest.mark.parametrize("wrap", [np.array, torch.tensor])
def test_zero_dim_k_is_one_int(wrap):
    """A 0-d array or tensor k is read as the int it holds, as numpy's integer scalars are (a 0-d tensor
    raised TypeError: 'int' object is not iterable); a 0-d float is refused by name."""
    x = X.astype(np.float32)
    a = kcengine.kmeans(x, wrap(3), seed=0)
    b = kcengine.kmeans(x, 3, seed=0)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.centroids.shape == (3, 3)
    batch = kcengine.kmeans(np.stack([x, x]), wrap(4), seed=0)
    assert batch.centroids.shape == (2, 4, 3)
    with pytest.raises(ValueError, match=r"k must be an int, got k=2.5"):
        kcengine.kmeans(x, wrap(2.5))
    # tol too (it was refused: "tol must be a finite number >= 0, got tensor(0.5000)"); 0.5 stops early here
    a, b = (kcengine.kmeans(x, 3, seed=0, tol=tol, init=x[[0, 1, 2]]) for tol in (wrap(0.5), 0.5))
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.n_iter == b.n_iter < kcengine.kmeans(x, 3, seed=0, tol=0.0, init=x[[0, 1, 2]]).n_iter


def test_init_as_nested_lists_is_one_problems_centroids():
    """A single problem's init written as nested lists of numbers is read as the [k, D] array it spells (it was
    taken for a batch of k problems and refused); for a batch, a list stays one entry per problem."""
    a = kcengine.kmeans(X.astype(np.float32), 2, init=X[:2].tolist())
    b = kcengine.kmeans(X.astype(np.float32), 2, init=X[:2].astype(np.float32))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.centroids.dtype == np.float32
    with pytest.raises(ValueError, match=r"init of problem 0 must have shape \[k, 3\], got shape \(3,\)"):
        kcengine.kmeans([X, X], 2, init=X[:2].tolist())


@pytest.mark.parametrize("as_init", [
    lambda c: c.astype(np.int64), lambda c: c.astype(np.uint8), lambda c: c.astype(np.float16),
    lambda c: torch.tensor(c).to(torch.int32), lambda c: torch.tensor(c).to(torch.bfloat16)])
def test_init_of_integer_or_half_dtype_is_read_as_its_values(as_init):
    """Integer (and half) centroids are the values they hold, as a list of integer rows is read: they were
    refused as "must be float32 or float64", the list not.  They are solved in the data's dtype."""
    x = np.abs(np.random.default_rng(3).normal(size=(60, 3)).round() * 2)  # small integers >= 0: exact in every dtype
    want = kcengine.kmeans(x.astype(np.float32), init=x[[0, 20, 40]].tolist())
    got = kcengine.kmeans(x.astype(np.float32), init=as_init(x[[0, 20, 40]]))
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.centroids, want.centroids)
    assert got.centroids.dtype == np.float32


def test_meta_tensor_is_refused_by_name():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="x is a tensor on the meta device"):
        kcengine.kmeans(torch.empty(20, 3, device="meta"), 2)
    with pytest.raises(ValueError, match=r"x\[1\] is a tensor on the meta device"):
        kcengine.kmeans([torch.zeros(20, 3), torch.empty(20, 3, device="meta")], 2)


def test_sparse_tensors_are_refused_by_name():
    """A sparse x or sample_weight is named with its layout (torch's own error was a page of dispatch keys)."""
    torch = pytest.importorskip("torch")
    dense = torch.tensor(X, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x is a sparse_coo tensor; pass a dense one"):
        kcengine.kmeans(dense.to_sparse(), 2)
    with pytest.raises(ValueError, match=r"x\[1\] is a sparse_coo tensor"):
        kcengine.kmeans([dense, dense.to_sparse()], 2)
    with pytest.raises(ValueError, match=r"sample_weight is a sparse_coo tensor"):
        kcengine.kmeans(dense, 2, sample_weight=torch.ones(len(X)).to_sparse())


def test_scalar_sample_weight_shows_its_value():
    with pytest.raises(ValueError, match=r"sample_weight must have shape \[20\], got shape \(\) \('abc'\)"):
        kcengine.kmeans(X, 2, sample_weight="abc")


def test_masked_arrays_are_refused_and_every_real_weight_dtype_is_taken():
    """A masked array's mask was dropped (a masked outlier got its own centroid); int8/uint8/bfloat16 weights were
    refused as "must be numeric"."""
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="x is a numpy masked array"):
        kcengine.kmeans(np.ma.masked_array(X, mask=np.zeros_like(X, dtype=bool)), 2)
    w = np.arange(20) % 3 + 1
    ref = kcengine.kmeans(X, 3, sample_weight=w.astype(np.float64), seed=0)
    for ww in (w.astype(np.int8), w.astype(np.uint8), w.astype(np.uint16), torch.tensor(w, dtype=torch.bfloat16)):
        got = kcengine.kmeans(X, 3, sample_weight=ww, seed=0)
        np.testing.assert_array_equal(got.labels, ref.labels)
        assert got.inertia == ref.inertia
    with pytest.raises(ValueError, match="sample_weight must be a real number per point .* got dtype complex64"):
        kcengine.kmeans(X, 3, sample_weight=w.astype(np.complex64))


def test_sweep_bad_input():
    with pytest.raises(ValueError, match="ks is empty"):
        kcengine.kmeans_sweep(X, [])
    with pytest.raises(ValueError, match=r"n_samples=20 should be >= ks\[1\]=30"):
        kcengine.kmeans_sweep(X, [2, 30])
    with pytest.raises(ValueError, match="takes one \\[N, D\\] dataset"):
        kcengine.kmeans_sweep([X, X], [2])
    with pytest.raises(ValueError, match=r"ks\[1\] must be >= 1, got ks\[1\]=0$"):  # said "k ... for problem 1"
        kcengine.kmeans_sweep(X, [2, 0])
    with pytest.raises(ValueError, match=r"ks\[1\] must be an int, got ks\[1\]=2.5"):
        kcengine.kmeans_sweep(X, [2, 2.5])
    with pytest.raises(ValueError, match=r"kmeans_sweep takes init='k-means\+\+' or 'random'; given centroids fix k"):
        kcengine.kmeans_sweep(X, [2], init=X[:2])
    for ks in (5, None, "23", np.array([[2, 3]])):  # were TypeErrors ('int' object is not iterable), or chars
        with pytest.raises(ValueError, match=r"ks must be a sequence of ints \(e.g. range\(2, 17\)\), got"):
            kcengine.kmeans_sweep(X, ks)


@pytest.mark.parametrize("dtype, scale", [(np.float64, 1e160), (np.float32, 1e20)])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_values_whose_squared_distances_overflow_are_refused(dtype, scale, kind):
    """Data of 1e155 (float64) or 1e20 (float32) made every distance inf: all backends then returned an inf
    inertia and labels from ties (as scikit-learn does, silently).  The error names the problem and the bound,
    sqrt(finfo.max / (16 D)); data just inside the bound still clusters to a finite inertia."""
    rng = np.random.default_rng(0)
    ok = rng.normal(size=(30, 5)).astype(dtype)
    big = (ok * scale).astype(dtype)
    conv = (lambda a: torch.from_numpy(a)) if kind == "torch" else (lambda a: a)
    bound = float(np.sqrt(np.finfo(dtype).max / (16 * 5)))
    limit = re.escape(f"{bound:.3g}")
    with pytest.raises(ValueError, match=rf"problem 1 holds values up to .* D=5-dimensional points would overflow "
                                         rf"{np.dtype(dtype).name} \(\|values\| must stay below {limit}"):
        kcengine.kmeans([conv(ok), conv(big)], 3, seed=0)
    with pytest.raises(ValueError, match=r"^x holds values up to"):
        kcengine.kmeans(conv(big), 3, seed=0)
    with pytest.raises(ValueError, match=r"^init holds values up to"):
        kcengine.kmeans(conv(ok), 3, init=conv(big[:3].copy()), seed=0)
    # a float64 init for float32 data is solved in float32: its bound (it was checked against float64's, and
    # 1e20 centroids then ran with overflowed distances: labels not the nearest, "converged")
    wide = big[:3].astype(np.float64) if dtype == np.float32 else big[:3].copy()
    with pytest.raises(ValueError, match=rf"^init holds values up to .* would overflow {np.dtype(dtype).name} "):
        kcengine.kmeans(conv(ok), 3, init=conv(wide), seed=0)
    inside = (ok / np.abs(ok).max() * bound * 0.99).astype(dtype)
    r = kcengine.kmeans(conv(inside), 3, seed=0)
    assert np.isfinite(float(r.inertia)) and len(np.unique(np.asarray(r.labels))) == 3


def test_native_checks_repeat_the_api_messages():
    """The native entry point keeps its own checks: nothing Python can pass crashes it."""
    f = _core.kmeans_batch_f64
    idx, k = np.array([0]), np.array([2])
    with pytest.raises(ValueError, match="problem 0 holds NaN or Inf"):
        f([np.array([[np.nan], [1.0]])], None, idx, k, "k-means++", None, 1, 10, 1e-4, 0, "auto")
    with pytest.raises(ValueError, match=r"n_samples=1 should be >= k=2"):
        f([np.ones((1, 2))], None, idx, k, "k-means++", None, 1, 10, 1e-4, 0, "auto")
    with pytest.raises(ValueError, match="out of range"):
        f([np.ones((4, 2))], None, np.array([3]), k, "k-means++", None, 1, 10, 1e-4, 0, "auto")
    with pytest.raises(ValueError, match="must be a float64 numpy array"):
        f([np.ones((4, 2), dtype=np.float32)], None, idx, k, "k-means++", None, 1, 10, 1e-4, 0, "auto")
    with pytest.raises(ValueError, match="must be C-contiguous"):
        f([np.ones((4, 4))[:, ::2]], None, idx, k, "k-means++", None, 1, 10, 1e-4, 0, "auto")
    with pytest.raises(ValueError, match=r"init of problem 0 must have shape \[2, 2\]"):
        f([np.ones((4, 2))], None, idx, k, "given", [np.ones((3, 2))], 1, 10, 1e-4, 0, "auto")
    with pytest.raises(ValueError, match="sample_weight of problem 0 must be finite and >= 0"):
        f([np.ones((4, 2))], [np.array([1.0, -1, 1, 1])], idx, k, "k-means++", None, 1, 10, 1e-4, 0, "auto")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        f([np.ones((4, 2))], None, idx, k, "k-means++", None, 1, 10, 1e-4, 0, "fast")


def test_explicit_backend_that_cannot_run_raises():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the cuda backend may be able to run")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on data on device 'cpu' .*cannot run here at all: "
                                           "no CUDA device"):
        kcengine.kmeans(X, 2, backend="cuda")


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("KCENGINE_BACKEND", "torch")
    assert kcengine.kmeans(X, 2, seed=0).backend == "torch"
    monkeypatch.setenv("KCENGINE_BACKEND", "cpu")
    assert kcengine.kmeans(X, 2, seed=0).backend == "cpu"
    monkeypatch.delenv("KCENGINE_BACKEND")
    assert kcengine.kmeans(X, 2, seed=0).backend == "cpu"
    monkeypatch.setenv("KCENGINE_BACKEND", "cpuu")  # a typo in the variable: the error names the variable
    with pytest.raises(ValueError, match=r"KCENGINE_BACKEND \(environment\)='cpuu' is not one of"):
        kcengine.kmeans(X, 2)
    with pytest.raises(ValueError, match=r"^backend='cpuu' is not one of"):  # an explicit argument is named as such
        kcengine.kmeans(X, 2, backend="cpuu")


def test_init_inferred_k_and_batch_init():
    r = kcengine.kmeans(X, init=X[:4].copy())
    assert r.centroids.shape == (4, 3)
    xb = np.stack([X, X * 2])
    rb = kcengine.kmeans(xb, init=xb[:, :3].copy())
    assert rb.centroids.shape == (2, 3, 3)


def test_non_native_byte_order_is_read_as_its_dtype():
    """float64 stored big-endian (np.dtype('>f8'), as from some files) was refused with 'must be float32 or
    float64, got dtype >f8'; it is float64: same result as native data, the caller's arrays untouched."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 4))
    w = rng.uniform(0.5, 2.0, size=60)
    xb, wb, cb = x.astype(">f8"), w.astype(">f8"), x[:3].astype(">f4")
    keep = (xb.copy(), wb.copy())
    a = kcengine.kmeans(x, 3, seed=1, sample_weight=w)
    b = kcengine.kmeans(xb, 3, seed=1, sample_weight=wb)
    assert b.centroids.dtype == np.float64 and b.centroids.dtype.isnative
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert np.array_equal(xb, keep[0]) and xb.dtype == np.dtype(">f8") and np.array_equal(wb, keep[1])
    c32 = kcengine.kmeans(x.astype(np.float32).astype(">f4"), 3, init=cb, n_init=1)
    assert c32.centroids.dtype == np.float32


def test_finiteness_check_of_views_scans_their_base_soundly():

    """The finiteness / overflow check scans numpy views of one base as that base (thousands of per-column
    problems cost one scan).  A bad value in a view is still named by problem; a bad value only in the part of
    the base no problem reads is no error; views of a different dtype or misaligned ones are scanned as given."""
    from kcengine.kmeans.api import _max_abs_all

    rng = np.random.default_rng(0)
    base = rng.normal(size=(12, 40)).astype(np.float32)
    before = base.copy()
    cols = [base[j][:, None] for j in range(10)]  # rows 10 and 11 of the base belong to no problem
    assert all(c.base is base for c in cols)
    bad_outside = base.copy()
    bad_outside[11, 3] = np.nan
    r = kcengine.kmeans([bad_outside[j][:, None] for j in range(10)], 3, seed=0)
    ref = kcengine.kmeans(cols, 3, seed=0)
    for a, b in zip(r.labels, ref.labels):
        np.testing.assert_array_equal(a, b)
    bad_inside = base.copy()
    bad_inside[7, 5] = np.inf
    with pytest.raises(ValueError, match="problem 7 holds NaN or Inf"):
        kcengine.kmeans([bad_inside[j][:, None] for j in range(10)], 3, seed=0)
    huge = base.copy()
    huge[4, 0] = 1e20
    with pytest.raises(ValueError, match="problem 4 holds values up to 1e\\+20"):
        kcengine.kmeans([huge[j][:, None] for j in range(10)], 3, seed=0)
    # A float32 view straddling two float32 items of its base: a NaN formed across them is found.
    raw = np.zeros(64, np.float32)
    raw.view(np.uint8)[6:10] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    shifted = raw.view(np.uint8)[2:2 + 4 * 16].view(np.float32)
    assert shifted.base is raw and not shifted.flags.aligned and np.isnan(shifted).any()
    parts = [raw[:16].reshape(8, 2), shifted.reshape(8, 2)]
    assert np.isnan(_max_abs_all(parts))  # the shared check itself (the native core re-checks its input)
    with pytest.raises(ValueError, match="problem 1 holds NaN or Inf"):
        kcengine.kmeans(parts, 2, seed=0)
    # The caller's arrays are read only.
    np.testing.assert_array_equal(base, before)


@pytest.mark.parametrize("case", range(6))
def test_batch_fast_paths_match_plain_copies(case):
    """The batch-wide input paths (one signature for plain numpy ragged batches, k checked as one array,
    repeated arrays shared, views of one base scanned as the base) against the same batch passed as fresh
    contiguous copies, one per problem, and k as numpy integers: the same results, bit for bit, and the
    same error naming the same problem when one entry is bad."""
    rng = np.random.default_rng(case)
    base = rng.normal(size=(rng.integers(3, 9), rng.integers(20, 60))).astype([np.float32, np.float64][case % 2])
    parts, ks = [], []
    for j in range(base.shape[0]):
        kind = rng.integers(3)
        if kind == 0:
            parts.append(base[j][:, None])                      # a column view of the base
        elif kind == 1:
            even = base.shape[1] // 2 * 2
            parts.append(base[j][:even].reshape(-1, 2)[: rng.integers(3, 10)])  # a view, D = 2
        else:
            parts.append(parts[-1] if parts else base[0][:, None])  # the same object again
        ks.append(int(rng.integers(1, 4)))
    copies = [np.array(a, copy=True) for a in parts]
    before = base.copy()
    got = kcengine.kmeans(parts, ks, seed=case)
    ref = kcengine.kmeans(copies, np.asarray(ks, dtype=np.int32), seed=case)
    for a, b in zip(got.labels, ref.labels):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(got.centroids, ref.centroids):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.inertia, ref.inertia)
    np.testing.assert_array_equal(base, before)
    bad = list(ks)
    j = int(rng.integers(len(bad)))
    bad[j] = parts[j].shape[0] + 1
    for x in (parts, copies):
        with pytest.raises(ValueError, match=rf"n_samples={parts[j].shape[0]} should be >= k={bad[j]} "
                                             rf"for problem {j}$"):
            kcengine.kmeans(x, bad, seed=case)


def test_far_first_orders_the_repair_farthest_first_with_near_ties_by_index():
    """The empty-cluster repair's order (the torch and cuda backends' copy of the cpu core's): farthest first;
    distances an ulp apart, as the two members of a two-point cluster come out of centers computed two ways,
    tie and go by index, so every backend picks the same point."""
    from kcengine.kmeans.api import far_first

    two_up = float(np.nextafter(2.0, 3.0))
    d2 = [1.0, two_up, 2.0, 0.5, 2.0, 3.0]
    assert far_first(d2, range(6)) == [5, 1, 2, 4, 0, 3]
    assert far_first(d2, [4, 2, 1]) == [1, 2, 4]  # the candidates as given, any order
    assert far_first(d2, [0, 3]) == [0, 3]
    assert far_first(d2, []) == []
    assert far_first([1.0, 1.0 + 1e-9], [0, 1]) == [1, 0]  # a real difference still counts


def test_torch_sample_weight_equals_numpy_and_is_checked():
    """Weights as torch tensors (the batch's checks run on them in torch) give the numpy weights' result,
    and their bad values are refused with the same messages."""
    x = X.astype(np.float32)
    w = np.random.default_rng(1).uniform(0.5, 2.0, size=20).astype(np.float32)
    a = kcengine.kmeans(x, 3, sample_weight=w, seed=0)
    b = kcengine.kmeans(torch.from_numpy(x), 3, sample_weight=torch.from_numpy(w), seed=0)
    np.testing.assert_array_equal(a.labels, b.labels.numpy())
    np.testing.assert_array_equal(a.centroids, b.centroids.numpy())
    ragged = kcengine.kmeans([torch.from_numpy(x), torch.from_numpy(x[:9])], [3, 2],
                             sample_weight=[torch.from_numpy(w), torch.from_numpy(w[:9])], seed=0)
    np.testing.assert_array_equal(ragged.labels[0].numpy(), a.labels)
    with pytest.raises(ValueError, match=r"sample_weight of problem 1 must be >= 0, got a minimum of -1.0"):
        kcengine.kmeans([torch.from_numpy(x)] * 2, 3,
                        sample_weight=[torch.from_numpy(w), torch.ones(20).index_fill(0, torch.tensor([4]), -1.0)])
    with pytest.raises(ValueError, match=r"sample_weight sums to 0"):
        kcengine.kmeans(torch.from_numpy(x), 3, sample_weight=torch.zeros(20))
    wg = torch.from_numpy(w).requires_grad_()  # weights that require grad are read like any others
    for xx in (x, torch.from_numpy(x)):
        got = kcengine.kmeans(xx, 3, sample_weight=wg, seed=0)
        np.testing.assert_array_equal(np.asarray(got.labels), a.labels)
        assert kcengine.kmeans_sweep(xx, [3], sample_weight=wg, seed=0)[0].inertia == pytest.approx(float(a.inertia))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("scale", [2.0 ** 1020, 2.0 ** 130, 2.0 ** -170, 2.0 ** -1074])
def test_weights_scaled_alike_give_the_same_clustering(backend, scale):
    """Multiplying every weight by one constant changes nothing but the inertia, however far the weights are
    from 1: about 1e307 (their sum overflowed float64 and the centroids came back NaN, 'converged'), 5e-324
    (the products with the data were denormal: wrong centroids), 1e39 and 7e-52 (out of float32's range, where
    the torch reference holds float32 data's weights).  Powers of two keep the scaled weights exact."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    w = rng.integers(1, 5, size=40).astype(np.float64)
    ws = w * scale
    kept = ws.copy()
    ref = kcengine.kmeans(x, 4, sample_weight=w, seed=0, backend=backend)
    got = kcengine.kmeans(x, 4, sample_weight=ws, seed=0, backend=backend)
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_allclose(got.centroids, ref.centroids, rtol=1e-6, atol=1e-6)
    expected = float(ref.inertia) * scale
    if np.isfinite(expected):
        assert float(got.inertia) == pytest.approx(expected, rel=1e-6)
    else:
        assert float(got.inertia) == np.inf  # the caller's weighted sum itself overflows float64
    sweep = kcengine.kmeans_sweep(x, [2, 4], sample_weight=ws, seed=0, backend=backend)
    sweep_ref = kcengine.kmeans_sweep(x, [2, 4], sample_weight=w, seed=0, backend=backend)
    for a, b in zip(sweep, sweep_ref):
        np.testing.assert_array_equal(a.labels, b.labels)
        want = float(b.inertia) * scale
        assert float(a.inertia) == (pytest.approx(want, rel=1e-6) if np.isfinite(want) else np.inf)
    np.testing.assert_array_equal(ws, kept)  # the caller's weights are left as they were


def test_one_problems_init_as_rows():
    """A single problem's start written as rows (nested lists, or a list of 1-D arrays) is the [k, D] table those
    rows make; a list holding one [k, D] array stays the one-problem batch form."""
    rows = [X[0].copy(), X[5].copy()]
    ref = kcengine.kmeans(X, 2, init=np.stack(rows), n_init=1)
    for init in (rows, [r.tolist() for r in rows], [np.stack(rows)], [[r.tolist() for r in rows]],
                 ([r.tolist() for r in rows],), [torch.from_numpy(r).requires_grad_() for r in rows]):
        got = kcengine.kmeans(X, 2, init=init, n_init=1)
        np.testing.assert_array_equal(got.labels, ref.labels)
        np.testing.assert_array_equal(got.centroids, ref.centroids)
    with pytest.raises(ValueError, match=r"init must be one of .* or a \[k, 3\] array of initial centroids"):
        kcengine.kmeans(X, 2, init=[["0", "0", "0"], ["1", "1", "1"]])  # strings are not centroids


def test_repeated_weights_keep_their_problems_on_one_dataset():
    """A ragged batch passing the same array and the same weights twice solves one dataset (its Gram matrix or
    sort made once), also when the weights are a tensor that requires grad or are scaled (far from 1)."""
    from kcengine.kmeans import api

    x, y = X, X[:9]
    for w in (torch.ones(20, dtype=torch.float64, requires_grad=True), np.full(20, 2.0 ** 1000)):
        probs, _ = api._build([x, x, y], [2, 3, 2], init="k-means++", n_init=1, max_iter=300, tol=1e-4,
                              sample_weight=[w, w, np.ones(9)], seed=0, algorithm="auto")
        assert len(probs.datasets) == 2 and probs.data_index.tolist() == [0, 0, 1]
        got = kcengine.kmeans([x, x, y], [2, 3, 2], sample_weight=[w, w, np.ones(9)], seed=0)
        alone = kcengine.kmeans(x, 3, sample_weight=w, seed=0)
        np.testing.assert_array_equal(got.labels[1], alone.labels)


@pytest.mark.parametrize("algorithm, d, k", [("auto", 2, 20), ("topm", 2, 20), ("auto", 17, 20), ("yinyang", 17, 20),
                                             ("hamerly", 3, 4), ("lloyd", 3, 4), ("gram", 17, 5)])
def test_huge_float64_data_clusters_as_at_its_own_scale(algorithm, d, k):
    """Float64 data past float32's range (the top-m and Yinyang solvers keep their bounds in float32): at 1e40
    top-m examined padding points past the end of its arrays (a segfault or a corrupted heap) and Yinyang's bounds
    read +inf, so labels were not the nearest.  A power of two scales exactly: the same labels, the centroids and
    the inertia scaled."""
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(300, d))
    x0[:100] += 3.0
    for e in (140, 400):
        x = np.ldexp(x0, e)
        ref = kcengine.kmeans(x0, k, seed=0, algorithm=algorithm)
        got = kcengine.kmeans(x, k, seed=0, algorithm=algorithm)
        assert got.algorithm == ref.algorithm
        np.testing.assert_array_equal(got.labels, ref.labels)
        np.testing.assert_array_equal(got.centroids, np.ldexp(ref.centroids, e))
        assert got.inertia == np.ldexp(ref.inertia, 2 * e) and got.n_iter == ref.n_iter
        given = kcengine.kmeans(x, init=np.ldexp(x0[:k], e), algorithm=algorithm)
        np.testing.assert_array_equal(given.labels, kcengine.kmeans(x0, init=x0[:k], algorithm=algorithm).labels)
    small = rng.uniform(-1, 1, size=(30, 2)) * 1e40  # n not a multiple of 16: the padding lanes
    res = kcengine.kmeans(small, 20, seed=0, algorithm="topm" if d == 2 else algorithm)
    d2 = ((small[:, None] / 1e40 - np.asarray(res.centroids)[None] / 1e40) ** 2).sum(2)
    assert (d2[np.arange(30), res.labels] <= d2.min(1) * (1 + 1e-12)).all()


@pytest.mark.parametrize("dtype, e", [(np.float32, -90), (np.float32, -140), (np.float64, -700), (np.float64, -1060)])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_data_of_tiny_scale_clusters_as_at_its_own_scale(dtype, e, backend):
    """Three separated clusters times 2**-90 in float32 (about 1e-27: squared distances underflow) all came back
    label 0, converged; 2**-140 is subnormal.  k-means is scale-equivariant and a power of two scales exactly: the
    labels are those of the unscaled data, the centroids and inertia scale by 2**e and 2**(2e)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    base = np.concatenate([rng.normal(size=(30, 3)) * 0.1 + m for m in (-4.0, 0.0, 4.0)])
    base = np.round(base * 64) / 64  # few mantissa bits: exact at any scale, subnormal float32 included
    x = np.ldexp(base, e).astype(dtype)
    x0 = base.astype(dtype)
    assert np.array_equal(np.ldexp(x.astype(np.float64), -e), x0.astype(np.float64))  # the scaling is exact
    conv = (lambda a: torch.from_numpy(a)) if backend == "torch" else (lambda a: a)
    ref = kcengine.kmeans(conv(x0), 3, seed=0, backend=backend)
    got = kcengine.kmeans(conv(x), 3, seed=0, backend=backend)
    np.testing.assert_array_equal(np.asarray(got.labels), np.asarray(ref.labels))
    assert len(np.unique(np.asarray(got.labels))) == 3
    ulp = 2.0 ** ((-149 if dtype == np.float32 else -1074) - e)  # the subnormal spacing, in the unscaled units
    np.testing.assert_allclose(np.ldexp(np.asarray(got.centroids, dtype=np.float64), -e),
                               np.asarray(ref.centroids, dtype=np.float64), rtol=1e-6, atol=ulp)
    assert float(got.inertia) == pytest.approx(np.ldexp(float(ref.inertia), 2 * e), rel=1e-6)
    assert int(got.n_iter) == int(ref.n_iter)
    given = kcengine.kmeans(conv(x), 3, init=conv(np.ldexp(x0[[0, 30, 60]].astype(np.float64), e).astype(dtype)),
                            backend=backend)
    np.testing.assert_array_equal(np.asarray(given.labels), np.repeat([0, 1, 2], 30))
