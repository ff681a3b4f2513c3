"""The ``cuda`` backend: CUDA C++ kernels (``csrc/cuda``) compiled at run time by CuPy (NVRTC).

Two paths, chosen per problem by :func:`fits_fused` from N, D, k, the dtype and the device's
shared-memory limit:

* **fused** (``kmeans_fused.cu``): one thread block runs one (problem, run) entirely in shared
  memory: seeding (greedy k-means++ / random / given), every Lloyd iteration (assign, accumulate,
  update, convergence test, empty-cluster repair), the final E-step and the inertia.  Thousands of
  problems go in one launch, with no host synchronization at all.
* **packed** (``kmeans_large.cu``): every other problem, in one packed ragged batch driven from the
  host (:class:`PackedLloyd`): tiled assignment (distance + argmin fused, no N x k matrix),
  segmented accumulation of the update over points sorted by cluster (deterministic: a fixed
  summation order), per-problem convergence masks so finished problems cost nothing, and a
  batched greedy k-means++ (sequential in k, batched across problems and trials).

The packed driver is written against a small kernel interface (``assign``, ``segment_sum``,
``kpp_pass``, ``sqdist``) so the ``triton`` backend reuses it with its Triton kernels, and
:class:`TorchKernels` (plain torch, any device) checks the driver on the CPU.

Semantics are those of the cpu backend (``csrc/cpu/kmeans/solver.cpp``): distances in the dot
form ``||c||^2 - 2 x.c`` in the data's dtype, first index of the minimum, sums in float64, empty
clusters take the farthest points (positive weight, positive distance, a cluster that keeps
weight, no duplicate coordinates), strict convergence when no label changes, ``tol`` relative to
the mean per-feature variance, a final E-step unless convergence was strict, the best of
``n_init`` runs by inertia, a dataset farther from the origin than its spread clustered centered
(:func:`pack` shifts it, :func:`store_best` shifts the centroids back; the cpu core's rule that a
coordinate all of a cluster's members share comes back exactly is not applied).  Random streams are
the cpu backend's (xoshiro256** seeded by splitmix64 from ``(seed, run)``), so a problem gets the
same start in a batch as alone.

Nothing here imports cupy at module level: the launch-parameter logic is plain Python and
unit-tested without a GPU (tests/kmeans/test_cuda_sources.py).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..._checks import device_scope
from ..api import (TINY_VARIANCE, CopyClusters, Problems, RawResult, far_first, far_shift, kpp_trials, tiny_exponents,
                   times_pow2)

__all__ = [
    "solve", "fused_smem_bytes", "fits_fused", "fused_threads", "fused_buckets", "assign_tiles",
    "rng_uniforms", "PackedLloyd", "TorchKernels", "cuda_sources_dir",
]

# ============================================================================ random streams
_M64 = (1 << 64) - 1


def _splitmix(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return state, z ^ (z >> 31)


def rng_uniforms(seed: int, stream: int, count: int) -> np.ndarray:
    """The first ``count`` uniforms in [0, 1) of the cpu backend's stream ``(seed, stream)``
    (xoshiro256** seeded by splitmix64; ``csrc/cpu/kmeans/common.h`` ``Rng``)."""
    x = (seed ^ ((0x6A09E667F3BCC909 * (stream + 1)) & _M64)) & _M64
    s = [0, 0, 0, 0]
    for i in range(4):
        x, s[i] = _splitmix(x)
    s0, s1, s2, s3 = s
    out = np.empty(count, dtype=np.float64)
    for i in range(count):
        v = (s1 * 5) & _M64
        r = ((((v << 7) | (v >> 57)) & _M64) * 9) & _M64
        t = (s1 << 17) & _M64
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = ((s3 << 45) | (s3 >> 19)) & _M64
        out[i] = (r >> 11) * 2.0 ** -53
    return out


def uniforms_needed(k: int, init: str) -> int:
    """Uniforms one run draws: 1 + (k - 1) * trials for k-means++, k for random, 0 for given."""
    if init == "k-means++":
        return 1 + (k - 1) * kpp_trials(k)
    return k if init == "random" else 0


# ===================================================================== launch-parameter logic
FUSED_SCRATCH_DOUBLES = 8  # block-wide scalars (shift, potential, chosen point, flags) as doubles


def fused_threads(n, k, d):
    """Threads per block of the fused kernel: enough for the larger of the point loop (N) and the
    accumulation loop (k * (D + 1) work items), a power of two between 64 and 256.  Ints, or numpy
    arrays of them (one entry per job)."""
    work = np.maximum(n, np.asarray(k) * (np.asarray(d) + 1))
    t = np.full(np.shape(work), 64, dtype=np.int64)
    for _ in range(2):
        t = np.where((t < 256) & (t < work), t * 2, t)
    return int(t) if t.ndim == 0 else t


def fused_smem_bytes(n: int, d: int, k: int, itemsize: int, threads: int) -> int:
    """Dynamic shared memory of the fused kernel for one problem, laid out exactly as
    ``kmeans_fused.cu`` ``FusedLayout`` does: float64 arrays first (sums [k*D], wsum [k],
    aux [N], reduction [threads], scratch), then the data type's arrays (X [N*D], C [k*D],
    ||c||^2 [k]), then int32 arrays (labels [N], picked [k], reduction indices [threads]),
    rounded up to 16 bytes."""
    doubles = k * d + k + n + threads + FUSED_SCRATCH_DOUBLES
    items = n * d + k * d + k
    ints = n + k + threads
    total = 8 * doubles + itemsize * items + 4 * ints
    return (total + 15) // 16 * 16


FUSED_MAX_N = 4096  # the cpu core sums clusters in one chunk up to here: the fused sums add in its order
FUSED_MAX_WORK = 1 << 22  # n * k * d multiply-adds per iteration for one block of <= 256 threads


def fits_fused(n, d, k, itemsize: int, smem_limit: int):
    """Whether a problem runs in the fused kernel: its whole state fits the device's opt-in
    shared memory per block (``smem_limit`` bytes), N <= ``FUSED_MAX_N`` and one iteration is
    at most ``FUSED_MAX_WORK`` multiply-adds (more is better spread over the whole device by the
    packed path).  Ints (-> bool), or numpy arrays of them (-> bool array)."""
    n, d, k = (np.asarray(a, dtype=np.int64) for a in (n, d, k))
    ok = (n <= FUSED_MAX_N) & (n * k * d <= FUSED_MAX_WORK)
    ok &= fused_smem_bytes(n, d, k, itemsize, fused_threads(n, k, d)) <= smem_limit
    return bool(ok) if ok.ndim == 0 else ok


def fused_buckets(smem: list[int], threads: list[int]) -> list[tuple[int, int, list[int]]]:
    """Group fused jobs into launches: jobs of one launch share the block size and a dynamic
    shared-memory size (the largest of the group); sizes are bucketed by powers of two so a big
    job does not lower the occupancy of thousands of small ones.  Returns
    ``[(threads, smem_bytes, job indices)]``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for j, (s, t) in enumerate(zip(smem, threads)):
        bucket = 1 << max(10, (int(s) - 1).bit_length())
        groups.setdefault((t, bucket), []).append(j)
    out = []
    for (t, _), jobs in sorted(groups.items()):
        out.append((t, max(int(smem[j]) for j in jobs), jobs))
    return out


def assign_tiles(n: np.ndarray, block_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiles of ``block_n`` points over a packed batch: ``(tile_job, tile_row0)``; each tile holds
    rows of one job only, so the assign kernels read one job's centroids per tile."""
    n = np.asarray(n, dtype=np.int64)
    counts = (n + block_n - 1) // block_n
    tile_job = np.repeat(np.arange(len(n), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    tile_row0 = (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)) * block_n
    return tile_job, tile_row0


def cuda_sources_dir() -> Path:
    """Folder of the ``.cu`` sources: ``kcengine/_cuda`` in an installed wheel, else the
    checkout's ``csrc/cuda`` (editable installs)."""
    pkg = Path(__file__).resolve().parents[2]  # .../kcengine
    installed = pkg / "_cuda"
    if (installed / "kmeans_fused.cu").is_file():
        return installed
    for parent in Path(__file__).resolve().parents:
        cand = parent / "csrc" / "cuda"
        if (cand / "kmeans_fused.cu").is_file():
            return cand
    raise RuntimeError(f"kcengine CUDA sources not found (looked in {installed} and the checkout's csrc/cuda)")


# ======================================================================= packed ragged batch
@dataclass
class Packed:
    """Jobs (problem, run) of one dtype packed for the kernels.  Host copies (numpy) of the
    shapes drive launches; device copies (int64 tensors) are read by the kernels.

    ``X`` is the flat concatenation of the datasets, each centered where it lies farther from the
    origin than its spread (``shift``; see :func:`_dataset_stats`), ``W`` their weights (ones when unweighted);
    a job's points are rows ``[0, n)`` of its dataset at element offset ``xoff`` / row offset
    ``roff``; its labels live at ``[loff, loff + n)`` of the entry arrays, its centroids at
    elements ``[coff, coff + k * d)`` of ``C``, its clusters at ids ``[goff, goff + k)``.
    """

    X: torch.Tensor
    W: torch.Tensor
    n: np.ndarray
    d: np.ndarray
    k: np.ndarray
    run: np.ndarray
    problem: np.ndarray
    xoff_h: np.ndarray
    roff_h: np.ndarray
    loff_h: np.ndarray
    coff_h: np.ndarray
    goff_h: np.ndarray
    dev: dict  # name -> device tensor (int64): xoff roff loff coff goff n d k, e_job, g_job, g_coff, g_d
    tol_abs: torch.Tensor
    shift: torch.Tensor  # float64: each dataset's shift (its mean, or zeros), concatenated
    soff_h: np.ndarray   # per job: where its dataset's shift starts in ``shift``
    scale_exp: torch.Tensor | None = None  # int64 per job: its data times 2**e (tiny spread; None: all 0)

    @property
    def n_jobs(self) -> int:
        return len(self.n)

    @property
    def n_entries(self) -> int:
        return int(self.n.sum())

    @property
    def n_clusters(self) -> int:
        return int(self.k.sum())

    @property
    def n_cvals(self) -> int:
        return int((self.k * self.d).sum())

    def _shift_of(self, jobs: np.ndarray) -> torch.Tensor:
        """The shift of every centroid coordinate of ``jobs`` (their ``[k, d]`` blocks concatenated)."""
        sizes = self.k[jobs] * self.d[jobs]
        local = _ranges(np.zeros(len(jobs), dtype=np.int64), sizes)
        idx = np.repeat(self.soff_h[jobs], sizes) + local % np.repeat(self.d[jobs], sizes)
        return self.shift[torch.as_tensor(idx, device=self.shift.device)]

    def _scaled(self, C: torch.Tensor, jobs: np.ndarray, sign: int) -> torch.Tensor:
        """``C`` of ``jobs`` times ``2**(sign * e)`` of each job's data scale (none in the usual case)."""
        if self.scale_exp is None:
            return C
        e = self.scale_exp.cpu().numpy()[jobs]
        per = torch.as_tensor(np.repeat(sign * e, self.k[jobs] * self.d[jobs]), device=C.device)
        return times_pow2(C, per)

    def _moved(self, C: torch.Tensor, jobs: np.ndarray, sign: float) -> torch.Tensor:
        if sign > 0:  # back to the caller's scale first, then the shift (in the caller's units)
            C = self._scaled(C, jobs, -1)
        if not bool(self.shift.any()):  # nothing shifted (the usual case): no index, no pass over C
            out = C.to(self.X.dtype)
        else:
            s = self._shift_of(jobs)
            out = torch.where(s != 0, (C.double() + sign * s).to(self.X.dtype), C.to(self.X.dtype))  # 0: as is
        return self._scaled(out, jobs, 1) if sign < 0 else out

    def centered(self, C: torch.Tensor, jobs: np.ndarray) -> torch.Tensor:
        """Centroids of ``jobs`` in the caller's coordinates moved into X's (given starts)."""
        return self._moved(C, jobs, -1.0)

    def uncentered(self, C: torch.Tensor, jobs: np.ndarray) -> torch.Tensor:
        """Centroids of ``jobs`` in X's coordinates moved back into the caller's (unshifted
        coordinates come back bit for bit, -0.0 included)."""
        return self._moved(C, jobs, 1.0)

    def given_starts(self, probs: Problems) -> torch.Tensor:
        """Every job's given initial centroids, concatenated, in X's coordinates."""
        C = torch.cat([probs.init_centers[int(p)].reshape(-1) for p in self.problem])
        return self.centered(C, np.arange(self.n_jobs))


def _dataset_stats(X: torch.Tensor, ds_n: np.ndarray, ds_d: np.ndarray,
                   tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the datasets packed in ``X`` (flat, row-major ``[n_s, d_s]`` blocks, in order): ``tol``
    times each one's mean per-feature variance (float64), ``X`` with every dataset farther from the
    origin than its spread (``|mean|^2 >`` the summed variances) centered, as the cpu core clusters
    it (a float32 offset would otherwise cost the fp32 dot-form distances their precision), and the
    shifts (the means of those datasets, zeros for the others; float64, concatenated), and each dataset's summed
    variances (float64).

    No host synchronization (one per dataset was the largest host cost of a batch of thousands of
    small problems on a GPU): consecutive datasets of one D form one ``[rows, D]`` block; per dataset
    and feature, segment sums along the rows give the mean, then the mean squared deviation from it:
    two passes in float64 in a fixed order (deterministic), like the cpu core's.  A dataset that is
    not shifted comes back bit for bit.  (The decision sums the variances in another order than the
    cpu core: a dataset whose |mean|^2 equals its summed variance to the last bits may be centered by
    one backend and not the other, which moves results by rounding only.)"""
    dev = X.device
    size = ds_n * ds_d
    start = np.cumsum(size) - size
    cuts = np.flatnonzero(np.diff(ds_d)) + 1
    tols, xs, shifts, vsums = [], [], [], []
    for b, e in zip(np.r_[0, cuts], np.r_[cuts, len(ds_d)]):
        d = int(ds_d[b])
        lens = torch.as_tensor(ds_n[b:e], device=dev)
        block = X[int(start[b]):int(start[b] + size[b:e].sum())].view(-1, d).double()
        rows = torch.as_tensor(ds_n[b:e], dtype=torch.float64, device=dev).unsqueeze(1)
        mean = torch.segment_reduce(block, "sum", lengths=lens, axis=0, unsafe=True) / rows
        cen = block - torch.repeat_interleave(mean, lens, dim=0, output_size=block.shape[0])
        var = torch.segment_reduce(cen * cen, "sum", lengths=lens, axis=0, unsafe=True) / rows
        tols.append(tol * var.mean(1))
        vsums.append(var.sum(1))
        far, shift = far_shift(mean, var)
        far_rows = torch.repeat_interleave(far, lens, output_size=block.shape[0]).unsqueeze(1)
        xs.append(torch.where(far_rows, cen, block, out=cen).to(X.dtype).reshape(-1))
        shifts.append(shift.reshape(-1))
    if len(tols) == 1:
        return tols[0], xs[0], shifts[0], vsums[0]
    return torch.cat(tols), torch.cat(xs), torch.cat(shifts), torch.cat(vsums)


def _tiny_scale(X: torch.Tensor, ds_n: np.ndarray, ds_d: np.ndarray, tol_abs: torch.Tensor, var_sum: torch.Tensor,
                tol: float):
    """The cpu core's rule for data of tiny spread (``Prepared::scale_exp``, :func:`kcengine.kmeans.api.tiny_scale`):
    each dataset of ``X`` (as :func:`_dataset_stats` returns it) whose summed variances ``var_sum`` lie below
    ``TINY_VARIANCE`` is multiplied by the power of two that brings its largest |value| into [0.5, 1), and its
    tolerance taken from the scaled data.  Returns ``(X, tol_abs, e)``, ``e`` int64 per dataset (None where every
    one is 0, the usual case, decided with one host synchronization: X and tol_abs as given)."""
    dtype_name = "float32" if X.dtype == torch.float32 else "float64"
    if not bool((var_sum < TINY_VARIANCE[dtype_name]).any()):  # the usual case: no pass over X
        return X, tol_abs, None
    size = torch.as_tensor(ds_n * ds_d, device=X.device)
    e = tiny_exponents(var_sum, torch.segment_reduce(X.abs().double(), "max", lengths=size, unsafe=True), dtype_name)
    if e is None:  # (identical points only: nothing to scale)
        return X, tol_abs, None
    X = times_pow2(X, torch.repeat_interleave(e, size))
    starts = np.cumsum(ds_n * ds_d) - ds_n * ds_d
    tol_abs = tol_abs.clone()
    for j in np.flatnonzero(e.cpu().numpy()):  # (rare) the variances again, of the scaled data
        block = X[int(starts[j]):int(starts[j] + ds_n[j] * ds_d[j])].view(-1, int(ds_d[j]))
        tol_abs[int(j)] = tol * _var_sum(block) / float(ds_d[j])
    return X, tol_abs, e


def _var_sum(block: torch.Tensor) -> torch.Tensor:
    """The summed per-feature variances of one ``[n, d]`` dataset, in float64."""
    b = block.double()
    return ((b - b.mean(0)) ** 2).mean(0).sum()


def pack(probs: Problems, problems: list[int]) -> Packed:
    """Pack the runs of ``problems`` (indices into ``probs``) into one :class:`Packed` batch."""
    ref = probs.datasets[0]
    dev = ref.device
    runs = 1 if probs.init == "given" else probs.n_init
    used = sorted({int(probs.data_index[p]) for p in problems})
    slot = {j: s for s, j in enumerate(used)}
    dsets = [probs.datasets[j] for j in used]
    X = dsets[0].reshape(-1) if len(dsets) == 1 else torch.cat([a.reshape(-1) for a in dsets])
    if probs.weights is None:
        W = torch.ones(sum(a.shape[0] for a in dsets), dtype=ref.dtype, device=dev)
    else:
        ws = [probs.weights[j] for j in used]
        W = ws[0] if len(ws) == 1 else torch.cat(ws)
    ds_n = np.array([a.shape[0] for a in dsets], dtype=np.int64)
    ds_d = np.array([a.shape[1] for a in dsets], dtype=np.int64)
    ds_xoff = np.cumsum(ds_n * ds_d) - ds_n * ds_d
    ds_roff = np.cumsum(ds_n) - ds_n
    ds_tol, X, shift, var_sum = _dataset_stats(X, ds_n, ds_d, probs.tol)
    X, ds_tol, ds_exp = _tiny_scale(X, ds_n, ds_d, ds_tol, var_sum, probs.tol)
    ds_soff = np.cumsum(ds_d) - ds_d
    jp = np.repeat(np.asarray(problems, dtype=np.int64), runs)
    jr = np.tile(np.arange(runs, dtype=np.int64), len(problems))
    js = np.array([slot[int(probs.data_index[p])] for p in jp], dtype=np.int64)
    n, d = ds_n[js], ds_d[js]
    k = np.asarray(probs.k, dtype=np.int64)[jp]
    loff = np.cumsum(n) - n
    coff = np.cumsum(k * d) - k * d
    goff = np.cumsum(k) - k
    g_job = np.repeat(np.arange(len(jp), dtype=np.int64), k)
    g_coff = coff[g_job] + (np.arange(int(k.sum()), dtype=np.int64) - goff[g_job]) * d[g_job]

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64, device=dev)

    devs = dict(xoff=t(ds_xoff[js]), roff=t(ds_roff[js]), loff=t(loff), coff=t(coff), goff=t(goff), n=t(n), d=t(d),
                k=t(k), e_job=t(np.repeat(np.arange(len(jp), dtype=np.int64), n)), g_job=t(g_job), g_coff=t(g_coff),
                g_d=t(d[g_job]))
    tol_abs = ds_tol[t(js)]
    return Packed(X=X.contiguous(), W=W.contiguous(), n=n, d=d, k=k, run=jr, problem=jp, xoff_h=ds_xoff[js],
                  roff_h=ds_roff[js], loff_h=loff, coff_h=coff, goff_h=goff, dev=devs, tol_abs=tol_abs,
                  shift=shift, soff_h=ds_soff[js], scale_exp=None if ds_exp is None else ds_exp[t(js)])


def _on(lengths, device) -> torch.Tensor:
    """``lengths`` as a tensor on ``device`` (already one: as is; numpy: one host-to-device copy, so
    loops pass device tensors)."""
    return lengths if isinstance(lengths, torch.Tensor) else torch.as_tensor(lengths, device=device)


def _expand(values: torch.Tensor, lengths, total: int) -> torch.Tensor:
    """Per-job ``values`` repeated ``lengths[j]`` times (device-side repeat_interleave)."""
    return torch.repeat_interleave(values, _on(lengths, values.device), output_size=total)


def _segment_sum(values: torch.Tensor, lengths) -> torch.Tensor:
    """Sums of consecutive segments (deterministic: no atomics)."""
    return torch.segment_reduce(values, "sum", lengths=_on(lengths, values.device), unsafe=True)


# ===================================================================== torch kernel set
class TorchKernels:
    """The packed driver's kernel interface in plain torch (any device): the reference the
    Triton and CUDA kernels are compared with, and the way the driver is checked on a CPU.

    * ``assign(P, C, cnorm, mask, lab)``: ``lab[e] = argmin_j cnorm[j] - 2 x_e . c_j`` (first
      minimum; dot in the data's dtype) for entries of jobs with ``mask[job]``; others untouched.
    * ``segment_sum(P, order, seg_start, counts, gmask, sums, wsum)``: for clusters ``g`` with
      ``gmask[g]``: ``sums[g_coff[g] + t] = sum w_e x_e[t]`` and ``wsum[g] = sum w_e`` over entries
      ``order[seg_start[g] : seg_start[g] + counts[g]]`` (float64, fixed order).
    * ``kpp_pass(P, cand, closest, live, out)``: ``out[t, j, i] = min(||x_i - x_cand[j, t]||^2,
      closest[j, i])`` (difference form accumulated in the data's dtype) for live jobs.
    * ``sqdist(P, C, lab)``: ``[M]`` float64 ``w_e * ||x_e - c_{lab_e}||^2`` (difference form).
    """

    name = "torch"

    def _rows(self, P: Packed, j: int) -> torch.Tensor:
        n, d = int(P.n[j]), int(P.d[j])
        x0 = int(P.xoff_h[j])
        return P.X[x0:x0 + n * d].view(n, d)

    def _cents(self, P: Packed, C: torch.Tensor, j: int) -> torch.Tensor:
        k, d = int(P.k[j]), int(P.d[j])
        c0 = int(P.coff_h[j])
        return C[c0:c0 + k * d].view(k, d)

    def assign(self, P, C, cnorm, mask, lab):
        mh = mask.cpu().numpy()
        for j in np.nonzero(mh)[0]:
            x, c = self._rows(P, j), self._cents(P, C, j)
            g0, l0 = int(P.goff_h[j]), int(P.loff_h[j])
            dist = cnorm[g0:g0 + c.shape[0]].unsqueeze(0) - 2 * (x @ c.T)
            lab[l0:l0 + x.shape[0]] = dist.argmin(1).to(lab.dtype)

    def segment_sum(self, P, order, seg_start, counts, gmask, sums, wsum):
        e_job = P.dev["e_job"]
        rows = torch.arange(P.n_entries, device=order.device) - P.dev["loff"][e_job]
        for g in torch.nonzero(gmask).flatten().tolist():
            s, c = int(seg_start[g]), int(counts[g])
            j = int(P.dev["g_job"][g])
            d = int(P.d[j])
            es = order[s:s + c]
            r = rows[es]
            x = self._rows(P, j)[r].double()
            w = P.W[int(P.roff_h[j]) + r].double()
            g0 = int(P.dev["g_coff"][g])
            sums[g0:g0 + d] = (w.unsqueeze(1) * x).sum(0)
            wsum[g] = w.sum()

    def kpp_pass(self, P, cand, closest, live, out):
        for j in torch.nonzero(live).flatten().tolist():
            x = self._rows(P, j)
            n = x.shape[0]
            for t in range(cand.shape[1]):
                xc = x[int(cand[j, t])]
                d2 = ((x - xc) ** 2).sum(1).double()
                out[t, j, :n] = torch.minimum(d2, closest[j, :n])

    def sqdist(self, P, C, lab):
        out = torch.empty(P.n_entries, dtype=torch.float64, device=C.device)
        for j in range(P.n_jobs):
            x, c = self._rows(P, j), self._cents(P, C, j)
            l0, n = int(P.loff_h[j]), x.shape[0]
            lj = lab[l0:l0 + n].long()
            w = P.W[int(P.roff_h[j]):int(P.roff_h[j]) + n].double()
            out[l0:l0 + n] = w * ((x.double() - c[lj].double()) ** 2).sum(1)
        return out


# ===================================================================== the packed driver
def _centroid_norms(P: Packed, C: torch.Tensor) -> torch.Tensor:
    """[G] squared norms of the centroids (float64 sums cast to the data dtype, as the cpu core)."""
    sq = C.double() ** 2
    return _segment_sum(sq, P.dev["g_d"]).to(C.dtype)


class PackedLloyd:
    """Seeding, Lloyd iterations and the final E-step for a :class:`Packed` batch, driven from the
    host: a few synchronizations per iteration (whether any job is still active, whether a cluster
    emptied, and torch's ``bincount``)."""

    def __init__(self, P: Packed, kernels, probs: Problems):
        self.P, self.K, self.probs = P, kernels, probs
        self.dev = P.X.device

    # ------------------------------------------------------------------ seeding
    def _uniforms(self) -> torch.Tensor:
        P, init = self.P, self.probs.init
        runs = int(P.run.max()) + 1
        need = max(uniforms_needed(int(k), init) for k in P.k)
        U = np.stack([rng_uniforms(self.probs.seed, r, need) for r in range(runs)])
        return torch.as_tensor(U, device=self.dev)

    def _padded(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """[M] entry values as a [J, Nmax] array (rows past n_j hold ``fill``)."""
        P = self.P
        nmax = int(P.n.max())
        out = torch.full((P.n_jobs, nmax), fill, dtype=values.dtype, device=self.dev)
        e = torch.arange(P.n_entries, device=self.dev)
        ej = P.dev["e_job"]
        out.view(-1)[ej * nmax + (e - P.dev["loff"][ej])] = values
        return out

    def _gather_points(self, chosen: torch.Tensor) -> torch.Tensor:
        """C (flat) from chosen rows ``chosen[j, c]`` of each job's data."""
        P = self.P
        g = torch.arange(P.n_clusters, device=self.dev)
        g_job = P.dev["g_job"]
        row = chosen[g_job, g - P.dev["goff"][g_job]]
        gd = P.dev["g_d"]
        start = _expand(P.dev["xoff"][g_job] + row * P.dev["d"][g_job], gd, P.n_cvals)
        gstart = _expand(P.dev["g_coff"], gd, P.n_cvals)
        return P.X[start + (torch.arange(P.n_cvals, device=self.dev) - gstart)].clone()

    def _search(self, cum: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """First index whose cumulative weight exceeds r, clamped to the job's last point."""
        idx = torch.searchsorted(cum, r.contiguous(), right=True)
        return torch.minimum(idx, (self.P.dev["n"] - 1).view(-1, *([1] * (idx.dim() - 1))))

    def seed_kmeanspp(self, U: torch.Tensor) -> torch.Tensor:
        """Greedy k-means++ for every job at once; returns chosen rows [J, kmax]."""
        P, dev = self.P, self.dev
        J, kmax = P.n_jobs, int(P.k.max())
        trials = np.array([kpp_trials(int(k)) for k in P.k], dtype=np.int64)
        tmax = int(trials.max())
        trials_d = torch.as_tensor(trials, device=dev)
        Ur = U[torch.as_tensor(P.run, device=dev)]  # [J, L]
        e_roff = P.dev["roff"][P.dev["e_job"]]
        rows = torch.arange(P.n_entries, device=dev) - P.dev["loff"][P.dev["e_job"]]
        w = self._padded(P.W[e_roff + rows].double(), 0.0)  # [J, Nmax]
        kd = P.dev["k"]
        chosen = torch.zeros(J, kmax, dtype=torch.int64, device=dev)
        cum = torch.cumsum(w, 1)
        first = self._search(cum, Ur[:, 0:1] * cum[:, -1:])  # [J, 1]
        chosen[:, 0] = first[:, 0]
        # zeros, not empty: kernels write rows < n_j of live jobs only, and the potential below sums
        # every row (padding times weight 0), so garbage there (NaN * 0) would poison the argmin
        out = torch.zeros(tmax, J, w.shape[1], dtype=torch.float64, device=dev)
        closest = torch.full_like(w, math.inf)
        live = torch.ones(J, dtype=torch.bool, device=dev)
        self.K.kpp_pass(P, first, closest, live, out[:1])
        closest = out[0].clone()
        ar = torch.arange(J, device=dev)
        tt = torch.arange(tmax, device=dev)
        for c in range(1, kmax):
            live = kd > c
            cum = torch.cumsum(w * closest, 1)
            pos = (1 + (c - 1) * trials_d).unsqueeze(1) + tt.unsqueeze(0)  # [J, tmax]
            pos = pos.clamp(max=Ur.shape[1] - 1)
            r = Ur.gather(1, pos) * cum[:, -1:]
            cand = self._search(cum, r)  # [J, tmax]
            self.K.kpp_pass(P, cand, closest, live, out)
            pot = (out * w.unsqueeze(0)).sum(2).T  # [J, tmax]
            pot = torch.where(tt.unsqueeze(0) < trials_d.unsqueeze(1), pot, torch.full_like(pot, math.inf))
            best = pot.argmin(1)
            newc = out[best, ar]
            closest = torch.where(live.unsqueeze(1), newc, closest)
            chosen[:, c] = torch.where(live, cand[ar, best], chosen[:, c])
        return chosen

    def seed_random(self, U: torch.Tensor) -> torch.Tensor:
        """k distinct points per job drawn by weight without replacement (the cpu backend's
        ``random_init``, batched across jobs)."""
        P, dev = self.P, self.dev
        J, kmax = P.n_jobs, int(P.k.max())
        Ur = U[torch.as_tensor(P.run, device=dev)]
        e_roff = P.dev["roff"][P.dev["e_job"]]
        rows = torch.arange(P.n_entries, device=dev) - P.dev["loff"][P.dev["e_job"]]
        w = self._padded(P.W[e_roff + rows].double(), 0.0)
        valid = self._padded(torch.ones(P.n_entries, dtype=torch.bool, device=dev), False)
        taken = torch.zeros_like(valid)
        chosen = torch.zeros(J, kmax, dtype=torch.int64, device=dev)
        ar = torch.arange(J, device=dev)
        idx = torch.arange(w.shape[1], device=dev).unsqueeze(0)
        # Once every point of positive weight is taken, the rest are drawn as the cpu core draws them: a partial
        # Fisher-Yates shuffle of the zero-weight points in index order (`left`, those first in each row), the
        # t-th draw swapping left[t] with left[t + r].  (Taking the r-th untaken point in index order parted
        # from the cpu's start at the second such draw.)
        zero = valid & (w <= 0)
        left = torch.sort((~zero).to(torch.int8), dim=1, stable=True).indices
        n_left = zero.sum(1)
        t_left = torch.zeros(J, dtype=torch.int64, device=dev)
        for c in range(kmax):
            live = P.dev["k"] > c
            u = Ur[:, c:c + 1]
            ww = torch.where(taken, torch.zeros_like(w), w)
            cum = torch.cumsum(ww, 1)
            tot = cum[:, -1:]
            pick = torch.searchsorted(cum, (u * tot).contiguous(), right=True)[:, 0]
            elig = (ww > 0)
            last_elig = torch.where(elig, idx, torch.full_like(idx, -1)).max(1).values
            pick = torch.where(pick >= P.dev["n"], last_elig, pick)
            zj = live & (tot[:, 0] <= 0)  # only zero-weight points left
            if bool(zj.any()):
                t = t_left[zj]
                span = n_left[zj] - t
                r = t + torch.minimum(span - 1, (u[zj, 0] * span.double()).long())
                rows = ar[zj]
                a, b = left[rows, t], left[rows, r]
                left[rows, r] = a
                left[rows, t] = b
                t_left[zj] += 1
                pick = torch.where(zj, left[ar, t_left.sub(1).clamp(min=0)], pick)
            pick = pick.clamp_(max=w.shape[1] - 1)
            pick = torch.where(live, pick, torch.zeros_like(pick))
            taken[ar[live], pick[live]] = True
            chosen[:, c] = pick
        return chosen

    def initial_centroids(self) -> torch.Tensor:
        P, probs = self.P, self.probs
        if probs.init == "given":
            return P.given_starts(probs)
        U = self._uniforms()
        chosen = self.seed_kmeanspp(U) if probs.init == "k-means++" else self.seed_random(U)
        return self._gather_points(chosen)

    # ------------------------------------------------------------------ Lloyd
    def _relocate(self, j: int, C_old: torch.Tensor, lab: torch.Tensor, sums: torch.Tensor, wsum: torch.Tensor,
                  empty: list[int]) -> None:
        """The cpu backend's empty-cluster repair for job ``j`` (rare: run on the host)."""
        P = self.P
        n, d, k = int(P.n[j]), int(P.d[j]), int(P.k[j])
        x0, r0, l0, c0, g0 = (int(a[j]) for a in (P.xoff_h, P.roff_h, P.loff_h, P.coff_h, P.goff_h))
        X = P.X[x0:x0 + n * d].view(n, d).cpu().numpy()
        w = P.W[r0:r0 + n].double().cpu().numpy()
        lb = lab[l0:l0 + n].long().cpu().numpy()
        C = C_old[c0:c0 + k * d].view(k, d).cpu().numpy()
        S = sums[c0:c0 + k * d].view(k, d).cpu().numpy().copy()
        ws = wsum[g0:g0 + k].cpu().numpy().copy()
        d2 = ((X.astype(np.float64) - C[lb].astype(np.float64)) ** 2).sum(1)
        cand = far_first(d2, np.nonzero((w > 0) & (d2 > 0))[0])
        members = np.bincount(lb[w > 0], minlength=k)  # a cluster keeps weight while it keeps such a member
        stacked = CopyClusters(X, w, lb, k)
        picked: list[int] = []
        pos = 0
        for e in empty:
            while pos < len(cand):
                i = cand[pos]
                pos += 1
                f = lb[i]
                if members[f] <= 1 or any(np.array_equal(X[q], X[i]) for q in picked) or stacked.blocks(i):
                    continue
                stacked.take(i, f)
                S[f] -= w[i] * X[i].astype(np.float64)
                ws[f] -= w[i]
                S[e] = w[i] * X[i].astype(np.float64)
                ws[e] = w[i]
                members[f] -= 1
                members[e] = 1
                picked.append(i)
                break
        sums[c0:c0 + k * d] = torch.as_tensor(S.reshape(-1), device=sums.device)
        wsum[g0:g0 + k] = torch.as_tensor(ws, device=wsum.device)

    def run(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C flat, labels [M] int32, inertia [J], n_iter [J], converged [J])."""
        P, K, dev = self.P, self.K, self.dev
        J, M, G = P.n_jobs, P.n_entries, P.n_clusters
        C = self.initial_centroids().contiguous()
        lab = torch.full((M,), -1, dtype=torch.int32, device=dev)
        lab_old = torch.empty_like(lab)
        active = torch.ones(J, dtype=torch.bool, device=dev)
        strict = torch.zeros(J, dtype=torch.bool, device=dev)
        n_iter = torch.zeros(J, dtype=torch.int32, device=dev)
        sums = torch.zeros(P.n_cvals, dtype=torch.float64, device=dev)
        wsum = torch.zeros(G, dtype=torch.float64, device=dev)
        e_job, g_job = P.dev["e_job"], P.dev["g_job"]
        kd = P.dev["k"] * P.dev["d"]  # device copies of the segment lengths: no host copy per iteration
        c_job = _expand(torch.arange(J, device=dev), kd, P.n_cvals)
        c_g = _expand(torch.arange(G, device=dev), P.dev["g_d"], P.n_cvals)
        key_base = P.dev["goff"][e_job]
        for _ in range(self.probs.max_iter):
            if not bool(active.any()):
                break
            lab_old.copy_(lab)
            K.assign(P, C, _centroid_norms(P, C), active, lab)
            changed = _segment_sum((lab != lab_old).to(torch.float64), P.dev["n"])
            key = key_base + lab.long()
            order = torch.argsort(key, stable=True)
            counts = torch.bincount(key, minlength=G)
            seg_start = torch.cumsum(counts, 0) - counts
            gmask = active[g_job]
            K.segment_sum(P, order, seg_start, counts, gmask, sums, wsum)
            empty_g = (wsum <= 0) & gmask
            empty_job = torch.zeros(J, dtype=torch.bool, device=dev)
            if bool(empty_g.any()):
                eg = torch.nonzero(empty_g).flatten().cpu().numpy()
                gj = g_job.cpu().numpy()
                for j in sorted(set(gj[eg].tolist())):
                    empty = [int(g - P.goff_h[j]) for g in eg if gj[g] == j]
                    self._relocate(j, C, lab, sums, wsum, empty)
                empty_job[torch.as_tensor(sorted(set(gj[eg].tolist())), device=dev)] = True
            has = wsum[c_g] > 0
            cnew = torch.where(has, (sums / torch.where(has, wsum[c_g], torch.ones_like(sums))).to(C.dtype), C)
            shift = _segment_sum((cnew.double() - C.double()) ** 2, kd)
            C = torch.where(active[c_job], cnew, C)
            unchanged = changed == 0
            done = unchanged | (shift <= P.tol_abs)
            strict = torch.where(active, unchanged & ~empty_job, strict)
            n_iter += active.to(torch.int32)
            active = active & ~done
        converged = ~active
        redo = ~strict
        if bool(redo.any()):
            K.assign(P, C, _centroid_norms(P, C), redo, lab)
        inertia = _segment_sum(K.sqdist(P, C, lab), P.dev["n"])
        return C, lab, inertia, n_iter, converged


SEEDING_BYTES = 1 << 30  # padded seeding arrays past this split a packed batch (see seeding_groups)


def seeding_groups(probs: Problems, problems: list[int], limit: int = SEEDING_BYTES) -> list[list[int]]:
    """``problems`` as the packed batches to solve.  The packed seeding works on ``[jobs, Nmax]`` arrays, and
    k-means++ on ``trials x jobs x Nmax`` float64 (and a temporary as large): every job padded to the batch's
    largest N.  One problem of 1.2M points beside 99 of 5,000 made about 25 GB.  When that estimate passes
    ``limit`` bytes, the problems are grouped by N, largest first, each group's padding at most doubling its
    own points; otherwise (and for given starts, which seed nothing) one batch, as before.  Each problem's
    result does not depend on its batch."""
    if probs.init == "given" or len(problems) < 2:
        return [list(problems)]
    ns = np.array([probs.datasets[int(probs.data_index[p])].shape[0] for p in problems], dtype=np.int64)
    ks = np.asarray(probs.k, dtype=np.int64)[np.asarray(problems, dtype=np.int64)]
    trials = max(kpp_trials(int(k)) for k in ks) if probs.init == "k-means++" else 1
    if 2 * 8 * (trials + 1) * probs.n_init * len(problems) * int(ns.max()) <= limit:
        return [list(problems)]
    groups: list[list[int]] = []
    nmax = total = 0
    for i in np.argsort(-ns, kind="stable"):
        n = int(ns[i])
        if not groups or (len(groups[-1]) + 1) * nmax > 2 * (total + n):
            groups.append([])
            nmax, total = n, 0
        groups[-1].append(problems[i])
        total += n
    return groups


def solve_packed(probs: Problems, problems: list[int], kernels, out: list, *, seeding_limit: int = SEEDING_BYTES
                 ) -> None:
    """Run ``problems`` through :class:`PackedLloyd` with ``kernels`` (in the batches of
    :func:`seeding_groups`); store per-problem results (best run by inertia, the first on ties) in ``out``."""
    if not problems:
        return
    for group in seeding_groups(probs, problems, seeding_limit):
        P = pack(probs, group)
        C, lab, inertia, n_iter, conv = PackedLloyd(P, kernels, probs).run()
        store_best(out, group, P, C, lab, inertia, n_iter, conv)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(starts[i], starts[i] + lengths[i])`` (int64)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    first = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - first, lengths) + np.arange(int(lengths.sum()))


def store_best(out: list, problems: list[int], P: Packed, C: torch.Tensor, lab: torch.Tensor, inertia: torch.Tensor,
               n_iter: torch.Tensor, conv: torch.Tensor) -> None:
    """Append to ``out`` the results of ``problems`` (jobs of ``P``, runs consecutive): for each, the
    run of lowest inertia (the first on ties).  One host synchronization and no per-problem device
    work: per-problem centroids and labels are views of the packed outputs (``torch.split``)."""
    runs = int(P.run.max()) + 1
    best = inertia.view(-1, runs).argmin(1)
    jb = torch.arange(len(problems), device=inertia.device) * runs + best
    jh = np.arange(len(problems)) * runs + best.cpu().numpy()
    shapes = list(zip(P.k[jh].tolist(), P.d[jh].tolist()))
    c_sizes, l_sizes = P.k[jh] * P.d[jh], P.n[jh]
    if runs > 1:  # keep the best runs only (views into every run's buffers would keep them all alive)
        C = C[torch.as_tensor(_ranges(P.coff_h[jh], c_sizes), device=C.device)]
        lab = lab[torch.as_tensor(_ranges(P.loff_h[jh], l_sizes), device=lab.device)]
    C = P.uncentered(C, jh)  # (a new tensor: the best runs' centroids only, as above)
    inert = inertia[jb].double()
    if P.scale_exp is not None:  # back to the caller's scale
        inert = times_pow2(inert, -2 * P.scale_exp[jb])
    cents = [c.view(k, d) for c, (k, d) in zip(torch.split(C, c_sizes.tolist()), shapes)]
    labels = list(torch.split(lab.long(), l_sizes.tolist()))
    out.append((np.asarray(problems, dtype=np.int64), cents, labels, inert, n_iter[jb].int(), conv[jb].bool()))


def collect(probs: Problems, out: list) -> RawResult:
    """One :class:`RawResult` in problem order from the chunks :func:`store_best` appended."""
    B = probs.n_problems
    dev = probs.datasets[0].device
    cents, labels = [None] * B, [None] * B
    inertia = torch.empty(B, dtype=torch.float64, device=dev)
    n_iter = torch.empty(B, dtype=torch.int32, device=dev)
    conv = torch.empty(B, dtype=torch.bool, device=dev)
    for idx, c, lab, i, n, v in out:
        for q, p in enumerate(idx.tolist()):
            cents[p], labels[p] = c[q], lab[q]
        where = torch.as_tensor(idx, device=dev)
        inertia[where], n_iter[where], conv[where] = i.to(dev), n.to(dev), v.to(dev)
    return RawResult(centroids=cents, labels=labels, inertia=inertia, n_iter=n_iter, converged=conv,
                     algorithm=["lloyd"] * B)


def check_supported(probs: Problems, backend: str) -> None:
    if probs.algorithm == "exact1d":
        raise NotImplementedError(f"algorithm='exact1d' is implemented by the cpu backend only, not {backend}")


# ======================================================================= CuPy launchers
_MODULES: dict = {}
ASSIGN_BLOCK = 128  # KC_BN in kmeans_large.cu
SEGMENT_FEATURES = 32  # KC_SD
SEGMENT_THREADS = 32 * 8  # KC_SD * KC_SL


def _cupy():
    try:
        import cupy
    except ImportError as exc:  # the registry checks this first; explicit calls get a clear message
        raise RuntimeError("the cuda backend needs cupy "
                           "(pip install 'kcengine[cuda12]' or 'kcengine[cuda13]')") from exc
    return cupy


def _module(device_index: int, name: str):
    """``csrc/cuda/<name>.cu`` compiled by NVRTC for one device, cached for the process."""
    key = (device_index, name)
    mod = _MODULES.get(key)
    if mod is None:
        cp = _cupy()
        src = cuda_sources_dir()
        with cp.cuda.Device(device_index):
            mod = cp.RawModule(code=(src / f"{name}.cu").read_text(), options=("--std=c++17", f"-I{src}"))
            mod.compile()
        _MODULES[key] = mod
    return mod


def _stream(device: torch.device):
    """torch's current stream on ``device`` as a CuPy stream (kernels queue behind torch's work)."""
    cp = _cupy()
    with warnings.catch_warnings():
        # CuPy 14 deprecates ExternalStream for Stream.from_external (the CUDA stream protocol); the
        # raw-pointer form works on every CuPy kcengine supports (12-14)
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device.index)


def _kernel_args(args) -> tuple[tuple, list]:
    """(kernel arguments, tensors to keep alive until the launch is queued).  Each tensor goes as its
    device address (8 bytes by value, as a ``T*`` parameter takes it): no DLPack round trip per
    argument per launch (that was most of the host time of the packed path's iterations).  Bool
    tensors go as uint8, non-contiguous ones as contiguous copies; the caller holds those temporaries
    until the launch is queued on torch's stream, after which freeing them is ordered behind it."""
    vals, keep = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.dtype == torch.bool:
                a = a.to(torch.uint8)
            a = a.contiguous()
            keep.append(a)
            vals.append(np.uint64(a.data_ptr()))
        else:
            vals.append(a)
    return tuple(vals), keep


def _arr(t: torch.Tensor):
    """Zero-copy CuPy view of a torch tensor (DLPack); bool tensors go as uint8."""
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return _cupy().from_dlpack(t.contiguous())


def smem_limit(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device`` in bytes."""
    cp = _cupy()
    return int(cp.cuda.Device(device.index).attributes["MaxSharedMemoryPerBlockOptin"])


class CupyKernels:
    """The packed driver's kernel interface (see :class:`TorchKernels`) with ``kmeans_large.cu``."""

    name = "cuda"

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.suffix = "f32" if dtype == torch.float32 else "f64"
        self.mod = _module(device.index, "kmeans_large")
        self._tiles: dict = {}
        self._fns: dict = {}
        self.stream = _stream(device)  # torch's current stream when the solve began (one per solve)

    def _fn(self, name):
        fn = self._fns.get(name)
        if fn is None:
            fn = self._fns[name] = self.mod.get_function(f"kc_{name}_{self.suffix}")
        return fn

    def _tile_table(self, P):
        key = id(P)
        if key not in self._tiles:
            tj, tr = assign_tiles(P.n, ASSIGN_BLOCK)
            self._tiles = {key: (torch.as_tensor(tj, device=self.device), torch.as_tensor(tr, device=self.device))}
        return self._tiles[key]

    def _launch(self, name, grid, block, args):
        fn = self._fn(name)
        vals, keep = _kernel_args(args)
        with self.stream:
            fn(grid, block, vals)
        del keep  # queued: the temporaries may go

    def assign(self, P, C, cnorm, mask, lab):
        tj, tr = self._tile_table(P)
        v = P.dev
        self._launch("assign", (int(tj.numel()),), (ASSIGN_BLOCK,),
                     (P.X, C, cnorm, lab, mask, tj, tr, v["xoff"], v["loff"], v["coff"], v["goff"], v["n"], v["d"],
                      v["k"]))

    def segment_sum(self, P, order, seg_start, counts, gmask, sums, wsum):
        v = P.dev
        nd = (int(P.d.max()) + SEGMENT_FEATURES - 1) // SEGMENT_FEATURES
        self._launch("segment_sum", (P.n_clusters, nd), (SEGMENT_THREADS,),
                     (P.X, P.W, order, seg_start, counts, gmask, v["g_job"], v["g_coff"], v["xoff"], v["roff"],
                      v["loff"], v["d"], sums, wsum))

    def kpp_pass(self, P, cand, closest, live, out):
        tj, tr = self._tile_table(P)
        v = P.dev
        self._launch("kpp_pass", (int(tj.numel()), int(out.shape[0])), (ASSIGN_BLOCK,),
                     (P.X, cand.contiguous(), closest.contiguous(), out, live, tj, tr, v["xoff"], v["n"], v["d"],
                      np.int64(cand.shape[1]), np.int64(closest.shape[1]), np.int64(P.n_jobs)))

    def sqdist(self, P, C, lab):
        tj, tr = self._tile_table(P)
        out = torch.empty(P.n_entries, dtype=torch.float64, device=self.device)
        v = P.dev
        self._launch("sqdist", (int(tj.numel()),), (ASSIGN_BLOCK,),
                     (P.X, P.W, C, lab, out, tj, tr, v["xoff"], v["roff"], v["loff"], v["coff"], v["n"], v["d"]))
        return out


_INIT_CODE = {"given": 0, "k-means++": 1, "random": 2}


def _solve_fused(probs: Problems, problems: list[int], out: list) -> None:
    """One block per (problem, run) in ``kmeans_fused.cu``; launches grouped by :func:`fused_buckets`."""
    P = pack(probs, problems)
    dev = P.X.device
    suffix = "f32" if P.X.dtype == torch.float32 else "f64"
    fn = _module(dev.index, "kmeans_fused").get_function(f"kc_kmeans_fused_{suffix}")
    itemsize = P.X.element_size()
    v = P.dev
    meta = torch.stack([v["xoff"], v["roff"], v["loff"], v["coff"], v["n"], v["d"], v["k"],
                        torch.as_tensor(P.run, device=dev)], 1).contiguous()
    if probs.init == "given":
        init_c = P.given_starts(probs)
    else:
        init_c = torch.zeros(1, dtype=P.X.dtype, device=dev)
    C = torch.empty(P.n_cvals, dtype=P.X.dtype, device=dev)
    lab = torch.empty(P.n_entries, dtype=torch.int64, device=dev)
    inertia = torch.empty(P.n_jobs, dtype=torch.float64, device=dev)
    n_iter = torch.empty(P.n_jobs, dtype=torch.int32, device=dev)
    conv = torch.empty(P.n_jobs, dtype=torch.uint8, device=dev)
    threads = fused_threads(P.n, P.k, P.d).tolist()
    smem = fused_smem_bytes(P.n, P.d, P.k, itemsize, np.asarray(threads)).tolist()
    args_tail = (np.int32(_INIT_CODE[probs.init]), np.int32(probs.max_iter), np.uint64(probs.seed), _arr(C),
                 _arr(lab), _arr(inertia), _arr(n_iter), _arr(conv))
    with _stream(dev):
        for nt, sm, jobs in fused_buckets(smem, threads):
            fn.max_dynamic_shared_size_bytes = sm
            jt = torch.as_tensor(np.asarray(jobs, dtype=np.int64), device=dev)
            fn((len(jobs),), (nt,), (_arr(P.X), _arr(P.W), _arr(meta), _arr(P.tol_abs), _arr(init_c), _arr(jt))
               + args_tail, shared_mem=sm)
    store_best(out, problems, P, C, lab, inertia, n_iter, conv)


def route(probs: Problems, itemsize: int, limit: int, path: str = "auto") -> tuple[list[int], list[int]]:
    """Problems for the fused kernel and for the packed path.  ``path`` forces one ("fused" still
    sends problems that do not fit to the packed path)."""
    ns = np.array([ds.shape[0] for ds in probs.datasets], dtype=np.int64)
    ds_ = np.array([ds.shape[1] for ds in probs.datasets], dtype=np.int64)
    di = np.asarray(probs.data_index, dtype=np.int64)
    ok = fits_fused(ns[di], ds_[di], np.asarray(probs.k, dtype=np.int64), itemsize, limit) & (path != "packed")
    return np.flatnonzero(ok).tolist(), np.flatnonzero(~ok).tolist()


def solve(probs: Problems, *, path: str | None = None) -> RawResult:
    """Solve every problem of ``probs`` (torch tensors on one CUDA device) with the CUDA kernels.

    ``path``: ``"auto"`` (default; env ``KCENGINE_CUDA_PATH``), ``"fused"`` or ``"packed"``.
    """
    check_supported(probs, "cuda")
    dev = probs.datasets[0].device
    if dev.type != "cuda":
        raise RuntimeError(f"the cuda backend takes CUDA tensors, got data on {dev}")
    path = path or os.environ.get("KCENGINE_CUDA_PATH", "auto")
    if path not in ("auto", "fused", "packed"):
        raise ValueError(f"path must be 'auto', 'fused' or 'packed', got {path!r}")
    itemsize = probs.datasets[0].element_size()
    out: list = []
    with device_scope(dev):  # the data's device current: CuPy's streams and attributes read the current one
        fused, packed = route(probs, itemsize, smem_limit(dev), path)
        if fused:
            _solve_fused(probs, fused, out)
        if packed:
            solve_packed(probs, packed, CupyKernels(dev, probs.datasets[0].dtype), out)
        return collect(probs, out)
