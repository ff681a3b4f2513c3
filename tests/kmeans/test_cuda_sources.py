"""The CUDA k-means sources and the cuda backend's host-side logic, without a GPU.

* every ``csrc/cuda/*.cu`` compiles with nvcc for sm_80 and sm_90 (``-cubin``, warnings as
  errors) and includes nothing NVRTC lacks;
* the random stream in ``kmeans_common.cuh`` (compiled for the host by nvcc) equals the Python
  copy, and the Python copy drives the packed driver to the cpu backend's exact results;
* launch-parameter logic: shared-memory sizing, routing, block sizes, tiles, launch buckets;
* the packed driver with the torch kernel set against the cpu backend (the CUDA and Triton
  kernel sets plug into the same driver).
"""
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kcengine.kmeans import api
from kcengine.kmeans.backends import cpu as cpu_backend
from kcengine.kmeans.backends import cuda as cb
from kmeans_checks import assert_seeded_quality, offset_points

SRC = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
CU_FILES = sorted(SRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def test_sources_present_and_found():
    names = {p.name for p in CU_FILES}
    assert {"kmeans_fused.cu", "kmeans_large.cu"} <= names
    assert cb.cuda_sources_dir().resolve() == SRC.resolve() or (cb.cuda_sources_dir() / "kmeans_fused.cu").is_file()


@pytest.mark.parametrize("path", CU_FILES + sorted(SRC.glob("*.cuh")), ids=lambda p: p.name)
def test_sources_are_nvrtc_friendly(path):
    text = path.read_text()
    includes = re.findall(r'#include\s+([<"][^>"]+[>"])', text)
    assert all(inc.startswith('"') for inc in includes), f"{path.name} includes host headers: {includes}"
    if path.suffix == ".cu":
        assert 'extern "C" __global__' in text


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_without_warnings(path, arch, tmp_path):
    out = subprocess.run([NVCC, "-std=c++17", "-cubin", f"-arch={arch}", "--Werror", "all-warnings",
                          "-Xptxas", "-Werror", "-I", str(SRC), "-o", str(tmp_path / "k.cubin"), str(path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 0


@needs_nvcc
def test_device_rng_matches_python_stream(tmp_path):
    prog = tmp_path / "rng.cu"
    prog.write_text(
        '#include <cstdio>\n#include "kmeans_common.cuh"\n'
        "int main() {\n"
        "  const unsigned long long seeds[3] = {0ull, 42ull, 9223372036854775807ull};\n"
        "  for (int s = 0; s < 3; ++s) for (unsigned long long st = 0; st < 3; ++st) {\n"
        "    kc::Rng r(seeds[s], st);\n"
        '    for (int i = 0; i < 5; ++i) std::printf("%.17g\\n", r.uniform());\n'
        "  }\n"
        '  const long long ks[11] = {1, 2, 3, 7, 8, 20, 21, 100000, 1202604, 1202605, 3269018};\n'
        '  for (int i = 0; i < 11; ++i) std::printf("%d\\n", kc::kpp_trials(ks[i]));\n'
        "}\n")
    exe = tmp_path / "rng"
    out = subprocess.run([NVCC, "-std=c++17", "-I", str(SRC), "-o", str(exe), str(prog)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    vals = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    want = np.concatenate([cb.rng_uniforms(s, st, 5) for s in (0, 42, 2**63 - 1) for st in range(3)])
    np.testing.assert_array_equal(np.array(vals[:45], dtype=np.float64), want)
    ks = (1, 2, 3, 7, 8, 20, 21, 100000, 1202604, 1202605, 3269018)
    assert [int(v) for v in vals[45:]] == [cb.kpp_trials(k) for k in ks]
    # scikit-learn's 2 + int(ln k), capped at 16 as the cpu core caps it (k = 3269018 > e^15 made 17)
    assert [cb.kpp_trials(k) for k in ks] == [min(16, 2 + int(math.log(k))) for k in ks]
    assert [cb.kpp_trials(k) for k in ks[-3:]] == [15, 16, 16]


def test_rng_uniforms_in_unit_interval_and_stream_dependent():
    a, b = cb.rng_uniforms(1, 0, 1000), cb.rng_uniforms(1, 1, 1000)
    assert ((a >= 0) & (a < 1)).all() and not np.array_equal(a, b)
    assert abs(a.mean() - 0.5) < 0.05
    assert cb.uniforms_needed(10, "k-means++") == 1 + 9 * cb.kpp_trials(10)
    assert cb.uniforms_needed(10, "random") == 10 and cb.uniforms_needed(10, "given") == 0


# ------------------------------------------------------------------- launch-parameter logic
H100_OPTIN = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 (227 KiB)
A100_OPTIN = 166912  # on sm_80 (163 KiB)


def test_fused_smem_bytes_counts_every_array():
    n, d, k, t = 100, 9, 16, 128
    doubles = k * d + k + n + t + cb.FUSED_SCRATCH_DOUBLES
    raw = 8 * doubles + 4 * (n * d + k * d + k) + 4 * (n + k + t)
    assert cb.fused_smem_bytes(n, d, k, 4, t) == (raw + 15) // 16 * 16
    assert cb.fused_smem_bytes(n, d, k, 8, t) > cb.fused_smem_bytes(n, d, k, 4, t)
    assert cb.fused_smem_bytes(n, d, k, 4, t) % 16 == 0


@pytest.mark.parametrize("n,d,k,itemsize,limit,fits", [
    (512, 9, 16, 4, A100_OPTIN, True),      # kernels of a 512-filter layer, one input channel
    (64, 27, 8, 4, 48 * 1024, True),        # first-layer filters
    (512, 4608, 16, 4, H100_OPTIN, False),  # 512 filters of 512x3x3: 9.4 MB of points
    (4096, 9, 256, 4, H100_OPTIN, False),   # fits in 227 KiB but 9.4M MACs per iteration: packed path
    (1000, 9, 16, 4, 1000, False),          # a device limit below the state
    (5000, 1, 2, 4, H100_OPTIN, False),     # N above the cpu core's one-chunk size
    (2000, 1, 8, 8, H100_OPTIN, True),      # a 1-D problem in float64
])
def test_fits_fused(n, d, k, itemsize, limit, fits):
    assert cb.fits_fused(n, d, k, itemsize, limit) is fits


def test_fits_fused_is_monotone():
    for n in (10, 100, 1000, 3000):
        sizes = [cb.fused_smem_bytes(n, 9, k, 4, cb.fused_threads(n, k, 9)) for k in (2, 4, 8, 16, 32)]
        assert sizes == sorted(sizes)
    small = cb.fits_fused(1000, 9, 16, 4, H100_OPTIN)
    assert small and not cb.fits_fused(1000, 9, 16, 4, 1000)


@pytest.mark.parametrize("n,k,d,want", [(1, 1, 1, 64), (64, 2, 3, 64), (65, 2, 1, 128), (100, 50, 3, 256),
                                        (5000, 4, 4, 256)])
def test_fused_threads(n, k, d, want):
    t = cb.fused_threads(n, k, d)
    assert t == want and t & (t - 1) == 0 and 64 <= t <= 256


def test_fused_buckets_group_by_threads_and_size():
    smem = [1500, 2000, 70000, 3000, 2048]
    threads = [64, 64, 256, 64, 128]
    buckets = cb.fused_buckets(smem, threads)
    jobs = sorted(j for _, _, js in buckets for j in js)
    assert jobs == list(range(5))
    for t, sm, js in buckets:
        assert all(threads[j] == t for j in js) and sm == max(smem[j] for j in js)
        sizes = [smem[j] for j in js]
        assert max(sizes) <= 2 * max(1024, min(sizes))  # a launch never mixes sizes beyond a factor 2
    assert any(js == [0, 1] for _, _, js in buckets)


@pytest.mark.parametrize("block", [16, 128])
def test_assign_tiles_cover_each_row_once(block):
    n = np.array([1, 128, 129, 300, 7])
    tj, tr = cb.assign_tiles(n, block)
    assert len(tj) == sum((v + block - 1) // block for v in n)
    for j, v in enumerate(n):
        rows = np.concatenate([np.arange(r, min(r + block, v)) for r in tr[tj == j]])
        np.testing.assert_array_equal(rows, np.arange(v))
    assert (np.diff(tj) >= 0).all()


def test_route_respects_limit_and_forced_path():
    xs = [torch.zeros(50, 3), torch.zeros(3000, 64)]
    probs, _ = api._build(xs, [4, 8], init="k-means++", n_init=1, max_iter=10, tol=1e-4, sample_weight=None,
                          seed=0, algorithm="auto")
    assert cb.route(probs, 4, H100_OPTIN) == ([0], [1])
    assert cb.route(probs, 4, H100_OPTIN, "packed") == ([], [0, 1])
    assert cb.route(probs, 4, 100) == ([], [0, 1])


def test_cuda_backend_refuses_cpu_tensors():
    probs, _ = api._build(torch.zeros(4, 2), 2, init="k-means++", n_init=1, max_iter=10, tol=1e-4,
                          sample_weight=None, seed=0, algorithm="auto")
    with pytest.raises(RuntimeError, match="cuda backend takes CUDA tensors"):
        cb.solve(api._convert(probs, "cuda"))


# ------------------------------------------------------------- packed driver vs cpu backend
def _compare(probs, *, exact=True):
    out: list = []
    pt = api._convert(probs, "torch")
    cb.solve_packed(pt, list(range(pt.n_problems)), cb.TorchKernels(), out)
    got = cb.collect(pt, out)
    ref = cpu_backend.solve(api._convert(probs, "cpu"))
    if probs.init != "given":
        assert_seeded_quality(got, ref, probs)
        return got, ref
    for p in range(probs.n_problems):
        assert np.array_equal(got.labels[p].numpy(), ref.labels[p]), f"labels of problem {p}"
        np.testing.assert_allclose(got.centroids[p].numpy(), ref.centroids[p], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.inertia.numpy(), ref.inertia, rtol=1e-6 if exact else 1e-4)
    np.testing.assert_array_equal(got.n_iter.numpy(), ref.n_iter)
    np.testing.assert_array_equal(got.converged.numpy(), ref.converged)
    return got, ref


@pytest.mark.parametrize("init,n_init,weighted,dtype", [("k-means++", 1, False, np.float32),
                                                         ("k-means++", 3, True, np.float64),
                                                         ("random", 2, True, np.float32)])
def test_packed_driver_matches_cpu_backend(init, n_init, weighted, dtype):
    rng = np.random.default_rng(3)
    shapes, ks = [(60, 3), (37, 5), (80, 1), (20, 7), (9, 2)], [4, 3, 6, 20, 9]
    xs = [rng.normal(size=s).astype(dtype) for s in shapes]
    sw = [rng.uniform(0, 2, size=s[0]) for s in shapes] if weighted else None
    if weighted:
        sw[0][:10] = 0.0
    probs, _ = api._build(xs, ks, init=init, n_init=n_init, max_iter=300, tol=1e-4, sample_weight=sw, seed=17,
                          algorithm="auto")
    _compare(probs)


def _solve_packed_torch(probs):
    out: list = []
    pt = api._convert(probs, "torch")
    cb.solve_packed(pt, list(range(pt.n_problems)), cb.TorchKernels(), out)
    return cb.collect(pt, out)


def test_packed_driver_centers_data_far_from_the_origin():
    """The cuda and triton backends' driver clusters a dataset farther from the origin than its spread
    centered, as the cpu core does: float64 offset data from the same starts (around 1e4 and, with another D,
    around 1) gives the cpu backend's labels, iterations and inertia, centroids within an ulp of the offset;
    a dataset near the origin in the same batch is not shifted; the caller's arrays are not modified."""
    rng = np.random.default_rng(4)
    xs = [offset_points(np.float64, 1e4, 120, 9, 0), rng.normal(size=(90, 9)),
          offset_points(np.float64, 1.0, 70, 3, 1)]
    ks = [6, 5, 4]
    init = [x[np.random.default_rng(i).choice(x.shape[0], k, replace=False)].copy() for i, (x, k) in
            enumerate(zip(xs, ks))]
    before = [x.copy() for x in xs], [c.copy() for c in init]
    probs, _ = api._build(xs, None, init=init, n_init=1, max_iter=300, tol=1e-4, sample_weight=None, seed=0,
                          algorithm="auto")
    got = _solve_packed_torch(probs)
    ref = cpu_backend.solve(api._convert(probs, "cpu"))
    for p, x in enumerate(xs):
        assert np.array_equal(got.labels[p].numpy(), ref.labels[p]), f"labels of problem {p}"
        c, r = got.centroids[p].numpy(), ref.centroids[p]
        np.testing.assert_allclose(c - 1e4 * (p == 0), r - 1e4 * (p == 0), rtol=0, atol=np.spacing(x.max()))
        assert int(got.n_iter[p]) == int(ref.n_iter[p]) and bool(got.converged[p])
    np.testing.assert_allclose(got.inertia.numpy(), ref.inertia, rtol=1e-6)
    pt = api._convert(probs, "torch")
    P = cb.pack(pt, [0, 1, 2])
    assert torch.equal(P.X[120 * 9:120 * 9 + 90 * 9], pt.datasets[1].reshape(-1))  # near the origin: as given
    assert not bool(P.shift[9:18].any()) and bool(P.shift[:9].all()) and bool(P.shift[18:].all())
    c1 = torch.tensor([[-0.0, 1.5] + [0.25] * 7] * 5, dtype=torch.float64).reshape(-1)  # job 1: k = 5, d = 9
    back = P.uncentered(c1, np.array([1]))
    assert torch.equal(back, c1) and bool(torch.signbit(back[0]))  # not shifted: bit for bit, -0.0 kept
    assert all(np.array_equal(a, b) for a, b in zip(xs, before[0]))
    assert all(np.array_equal(a, b) for a, b in zip(init, before[1]))


@pytest.mark.parametrize("offset", [100.0, 1e4])
def test_packed_driver_converges_on_float32_points_a_few_ulps_apart(offset):
    """Around the origin, the driver's fp32 dot-form distances cannot tell such points apart (their squared
    norms agree to ~1e-7 relative while the points differ by ~1e-7 absolute) and Lloyd ran all 300 iterations
    without converging.  Centered, it converges, each centroid the mean of its members to the half ulp."""
    x = offset_points(np.float32, offset, 200, 9, 0)
    half_ulp = 0.5 * float(np.spacing(np.float32(offset)))
    probs, _ = api._build([x, x], [3, 10], init="k-means++", n_init=1, max_iter=300, tol=1e-4, sample_weight=None,
                          seed=0, algorithm="auto")
    got = _solve_packed_torch(probs)
    for p in range(2):
        assert bool(got.converged[p]) and int(got.n_iter[p]) < 100, (p, int(got.n_iter[p]))
        lab, c = got.labels[p].numpy(), got.centroids[p].numpy().astype(np.float64)
        assert len(np.unique(lab)) == c.shape[0]
        for j in np.unique(lab):
            np.testing.assert_allclose(c[j], x[lab == j].astype(np.float64).mean(0), rtol=0, atol=1.01 * half_ulp)


def test_packed_driver_results_gathered_over_two_chunks():
    """A batch solved in two calls into one ``out`` (as the fused and packed paths do), with n_init = 3:
    every problem's best run lands at its index, equal to the one-call result, and its labels do not
    keep the other runs' labels alive."""
    rng = np.random.default_rng(8)
    shapes, ks = [(40, 3), (25, 2), (60, 1), (33, 4), (50, 2), (18, 5)], [3, 4, 5, 2, 6, 3]
    xs = [rng.normal(size=s) for s in shapes]
    probs, _ = api._build(xs, ks, init="k-means++", n_init=3, max_iter=100, tol=1e-4, sample_weight=None, seed=5,
                          algorithm="auto")
    pt = api._convert(probs, "torch")
    one: list = []
    cb.solve_packed(pt, list(range(6)), cb.TorchKernels(), one)
    two: list = []
    cb.solve_packed(pt, [1, 3, 4], cb.TorchKernels(), two)
    cb.solve_packed(pt, [5, 0, 2], cb.TorchKernels(), two)
    a, b = cb.collect(pt, one), cb.collect(pt, two)
    for p in range(6):
        assert torch.equal(a.centroids[p], b.centroids[p]) and torch.equal(a.labels[p], b.labels[p])
        chunk = [1, 3, 4] if p in (1, 3, 4) else [5, 0, 2]  # its storage: the best runs of its chunk only
        assert b.labels[p].untyped_storage().nbytes() == 8 * sum(shapes[q][0] for q in chunk)
        assert tuple(b.centroids[p].shape) == (ks[p], shapes[p][1])
    for f in ("inertia", "n_iter", "converged"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    np.testing.assert_allclose(a.inertia.numpy(), cpu_backend.solve(api._convert(probs, "cpu")).inertia,
                               rtol=0.1)  # seeded: same streams, near-equal quality


def test_packed_driver_max_iter_and_sweep():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    probs, _ = api._build(x, None, init="k-means++", n_init=1, max_iter=2, tol=0.0, sample_weight=None, seed=1,
                          algorithm="auto", sweep_ks=[3, 8, 30])
    got, _ = _compare(probs)
    assert got.n_iter.tolist() == [2, 2, 2] and not bool(got.converged.any())


def test_packed_driver_given_start_with_empty_clusters():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    x[30:] = x[0]  # duplicates: relocation must not pick the same coordinates twice
    init = np.concatenate([x[:3], np.full((3, 3), 100.0, dtype=np.float32)])
    probs, _ = api._build(x, None, init=init, n_init=1, max_iter=50, tol=0.0, sample_weight=None, seed=0,
                          algorithm="auto")
    _compare(probs)


def test_packed_driver_never_reads_uninitialised_buffers(monkeypatch):
    """Every torch.empty / empty_like the driver allocates comes back filled with NaN (ints: -7): the
    result must equal the run on ordinary allocations.  Regression: the k-means++ potential once summed
    the unwritten padding rows of an empty buffer, so garbage (NaN * weight 0) could change the seeds."""
    rng = np.random.default_rng(3)
    shapes, ks = [(50, 3), (37, 18), (23, 1), (20, 7)], [4, 3, 6, 20]
    xs = [rng.normal(size=s).astype(np.float32) for s in shapes]
    probs, _ = api._build(xs, ks, init="k-means++", n_init=2, max_iter=100, tol=1e-4, sample_weight=None, seed=3,
                          algorithm="auto")

    def solve():
        out: list = []
        pt = api._convert(probs, "torch")
        cb.solve_packed(pt, list(range(pt.n_problems)), cb.TorchKernels(), out)
        return cb.collect(pt, out)

    clean = solve()
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
    poisoned = solve()
    monkeypatch.undo()
    for p in range(probs.n_problems):
        assert torch.equal(torch.as_tensor(poisoned.labels[p]), torch.as_tensor(clean.labels[p])), f"problem {p}"
    np.testing.assert_array_equal(np.asarray(poisoned.inertia), np.asarray(clean.inertia))


def test_kernel_args_pass_addresses_and_keep_temporaries():
    """CupyKernels' arguments: each tensor as its address (uint64 by value), bool tensors as a uint8
    copy and non-contiguous ones as a contiguous copy, both kept alive for the launch; scalars as given."""
    a = torch.arange(6, dtype=torch.float32)
    m = torch.tensor([True, False, True])
    t = torch.arange(12, dtype=torch.int64).view(3, 4).t()  # not contiguous
    vals, keep = cb._kernel_args((a, m, t, np.int64(7)))
    assert vals[0] == np.uint64(a.data_ptr()) and isinstance(vals[0], np.uint64)
    assert keep[1].dtype == torch.uint8 and vals[1] == np.uint64(keep[1].data_ptr()) and keep[1].tolist() == [1, 0, 1]
    assert keep[2].is_contiguous() and torch.equal(keep[2], t) and vals[2] == np.uint64(keep[2].data_ptr())
    assert vals[3] == 7 and len(keep) == 3


def test_repair_key_clears_the_same_bits_in_every_twin():
    """The empty-cluster repair's distance key has three copies: the cpu core's ``round_low_bits``, the CUDA
    kernel's ``kc_round_low_bits`` and Python's ``far_first`` (the torch and cuda backends).  A mask that
    drifted in one would order near-ties unlike the others; the CUDA one cannot be run here, so each
    source's mask literal is read and compared with ``api.REPAIR_KEY_LOW_BITS``."""
    want = (1 << api.REPAIR_KEY_LOW_BITS) - 1
    cpu = (SRC.parent / "cpu" / "kmeans" / "common.h").read_text()
    cuda = (SRC / "kmeans_fused.cu").read_text()
    got_cpu = re.search(r"double round_low_bits\(double x\) \{.*?&= ~uint64_t\((0x[0-9A-Fa-f]+)\)", cpu, re.S)
    got_cuda = re.search(r"double kc_round_low_bits\(double x\) \{.*?& ~(0x[0-9A-Fa-f]+)ll\)", cuda, re.S)
    assert got_cpu and got_cuda, "the key's mask is no longer spelled as this test reads it"
    assert int(got_cpu.group(1), 16) == want
    assert int(got_cuda.group(1), 16) == want


@pytest.mark.parametrize("dtype, e", [(np.float32, -90), (np.float64, -700)])
def test_packed_driver_scales_data_of_tiny_spread_as_the_cpu_backend(dtype, e):
    """Three separated clusters at 2**-90 in float32 (squared distances underflow) came back as one cluster from
    the cuda and triton backends' packed driver; it scales such data by a power of two as the cpu core does (a
    batch mixing scaled and unscaled datasets, given starts, centroids and inertia scaled back)."""
    rng = np.random.default_rng(0)
    base = np.concatenate([rng.normal(size=(30, 3)) * 0.1 + m for m in (-4.0, 0.0, 4.0)])
    base = np.round(base * 64) / 64
    xs = [np.ldexp(base, e).astype(dtype), base.astype(dtype), np.ldexp(base[:40, :2], e).astype(dtype)]
    inits = [x[[0, 30, 60]] if x.shape[0] == 90 else x[[0, 20, 35]] for x in xs]
    probs, _ = api._build(xs, None, init=inits, n_init=1, max_iter=100, tol=1e-4, sample_weight=None, seed=0,
                          algorithm="auto")
    got, ref = _compare(probs)
    for p in (0, 2):
        assert len(np.unique(got.labels[p].numpy())) == 3


def test_packed_seeding_splits_a_batch_whose_padding_would_be_large():
    """The packed seeding pads every job to the batch's largest N (trials x jobs x Nmax float64): one problem of
    1.2M points beside 99 of 5,000 asked for about 25 GB.  Past the limit the batch is grouped by N, each group's
    padding at most doubling its points; the results equal the one-batch solve's, problem by problem."""
    rng = np.random.default_rng(11)
    xs = [rng.normal(size=(1200, 2))] + [rng.normal(size=(5, 2)) for _ in range(99)]
    probs, _ = api._build(xs, 2, init="k-means++", n_init=1, max_iter=50, tol=1e-4, sample_weight=None, seed=3,
                          algorithm="auto")
    problems = list(range(100))
    assert cb.seeding_groups(probs, problems) == [problems]  # well under the default limit: one batch
    groups = cb.seeding_groups(probs, problems, limit=10**6)
    assert groups == [[0, 1], list(range(2, 100))]
    given, _ = api._build(xs, None, init=[x[:2] for x in xs], n_init=1, max_iter=50, tol=1e-4, sample_weight=None,
                          seed=3, algorithm="auto")
    assert cb.seeding_groups(given, problems, limit=0) == [problems]  # given starts: nothing to seed

    # mixed sizes, two runs each, random and k-means++ starts: split or not, the same results
    xs = [rng.normal(size=(n, 3)) for n in (90, 7, 40, 7, 12, 60, 5)]
    for init in ("k-means++", "random"):
        probs, _ = api._build(xs, [3, 2, 4, 3, 2, 5, 2], init=init, n_init=2, max_iter=100, tol=1e-4,
                              sample_weight=None, seed=9, algorithm="auto")
        pt = api._convert(probs, "torch")
        assert cb.seeding_groups(pt, list(range(7)), limit=0) == [[0, 5, 2, 4], [1, 3, 6]]
        one, split = [], []
        cb.solve_packed(pt, list(range(7)), cb.TorchKernels(), one)
        cb.solve_packed(pt, list(range(7)), cb.TorchKernels(), split, seeding_limit=0)
        a, b = cb.collect(pt, one), cb.collect(pt, split)
        for p in range(7):
            assert torch.equal(a.centroids[p], b.centroids[p]) and torch.equal(a.labels[p], b.labels[p]), (init, p)
        for f in ("inertia", "n_iter", "converged"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (init, f)


def test_gpu_backends_refuse_weights_past_float32s_range():
    """The cuda and triton kernels weigh in the data's dtype: for float32 data, 1 beside 1e50 (or 1e-46 beside 1)
    read 0 and gave inertia 0 and labels unlike the cpu backend's.  Such weights are refused with
    NotImplementedError, so that backend='auto' moves on to the torch backend, which weighs in float64."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    for spread in ({0: 1e50}, {1: 1e-46}):
        w = np.ones(40)
        for i, v in spread.items():
            w[i] = v
        probs, _ = api._build([x, x[:30]], None, init=[x[:3], x[:2]], n_init=1, max_iter=50, tol=1e-4,
                              sample_weight=[np.ones(40), w[:30]], seed=0, algorithm="auto")
        for backend in ("cuda", "triton"):
            with pytest.raises(NotImplementedError, match=rf"sample_weight of problem 1 spans more than float32's "
                                                          rf"range .* the {backend} backend weighs in the data's"):
                api._convert(probs, backend)
        assert api._convert(probs, "torch").weights[1].dtype == torch.float64
        w64, _ = api._build([x.astype(np.float64)], None, init=[x[:3]], n_init=1, max_iter=50, tol=1e-4,
                            sample_weight=[w], seed=0, algorithm="auto")
        assert api._convert(w64, "cuda").weights[0].dtype == torch.float64  # float64 data: weighed in float64
    w = np.full(40, 1e-30)  # small but within range once scaled: taken
    w[0] = 1.0
    probs, _ = api._build(x, None, init=x[:3], n_init=1, max_iter=50, tol=1e-4, sample_weight=w, seed=0,
                          algorithm="auto")
    got = api._convert(probs, "triton").weights[0]
    assert got.dtype == torch.float32 and bool((got > 0).all())


def test_packed_random_starts_equal_the_cpus_when_only_zero_weight_points_are_left():
    """With fewer points of positive weight than k, init='random' draws the rest among the zero-weight points as
    the cpu core does (a partial Fisher-Yates shuffle in index order); the packed path took the r-th untaken
    point instead and parted from the cpu's start at the second such draw (4 of 6 seeds).  One Lloyd step from
    each start: the same labels and centroids."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 2))
    w = np.zeros(30)
    w[[3, 17]] = [1.0, 2.5]
    for seed in range(8):
        probs, _ = api._build([x, x[:9]], [7, 5], init="random", n_init=1, max_iter=1, tol=0.0,
                              sample_weight=[w, w[:9]], seed=seed, algorithm="lloyd")
        got = _solve_packed_torch(probs)
        ref = cpu_backend.solve(api._convert(probs, "cpu"))
        for p in range(2):
            np.testing.assert_array_equal(got.centroids[p].numpy(), ref.centroids[p], err_msg=f"seed {seed}, {p}")
            np.testing.assert_array_equal(got.labels[p].numpy(), ref.labels[p], err_msg=f"seed {seed}, {p}")
