"""Triton kernels of batched k-means on a packed ragged batch (see ``cuda.Packed``).

* ``_assign_kernel``: one program per tile of ``BLOCK_N`` points of one job; the job's centroids
  stream through in ``BLOCK_K`` x ``BLOCK_D`` tiles; ``dist = ||c||^2 - 2 x.c`` as a GEMM
  (``tl.dot``, exact fp32 by default: ``input_precision="ieee"``; TF32 only when asked), fused
  with the running argmin (first index of the minimum).  No N x k matrix is ever stored.
  float64 data uses a broadcast-multiply reduction instead of ``tl.dot``.
* ``_segment_sum_kernel``: one program per (cluster, D-block): sums ``w x`` and ``w`` in float64
  over the cluster's points (entries sorted by cluster), in a fixed order: deterministic.
* ``_kpp_pass_kernel``: k-means++ candidate pass: ``out[t, j, i] = min(||x_i - x_cand||^2,
  closest[j, i])`` for each of a job's trial candidates (difference form).
* ``_sqdist_kernel``: ``w_e ||x_e - c_{lab_e}||^2`` per point in float64 (the inertia).

Each kernel skips jobs whose mask is off (converged problems cost one load).  Triton is imported
only when a kernel is first needed; under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors
(that is how tests/kmeans/test_triton_interpret.py checks them without a GPU).
"""
from __future__ import annotations

import os

import torch

__all__ = ["TritonKernels", "interpreting"]

_KERNELS: dict[bool, dict] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels() -> dict:
    mode = interpreting()
    if mode in _KERNELS:
        return _KERNELS[mode]
    import triton
    import triton.language as tl

    @triton.jit
    def _assign_kernel(x_ptr, c_ptr, cn_ptr, lab_ptr, mask_ptr, tile_job_ptr, tile_row0_ptr,
                       xoff_ptr, loff_ptr, coff_ptr, goff_ptr, n_ptr, d_ptr, k_ptr,
                       USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        tile = tl.program_id(0)
        job = tl.load(tile_job_ptr + tile)
        if tl.load(mask_ptr + job) != 0:
            row0 = tl.load(tile_row0_ptr + tile)
            n = tl.load(n_ptr + job)
            d = tl.load(d_ptr + job)
            k = tl.load(k_ptr + job)
            xoff = tl.load(xoff_ptr + job)
            coff = tl.load(coff_ptr + job)
            goff = tl.load(goff_ptr + job)
            rows = row0 + tl.arange(0, BLOCK_N)
            rmask = rows < n
            best = tl.full([BLOCK_N], float("inf"), tl.float32 if USE_DOT else tl.float64)
            bidx = tl.full([BLOCK_N], 0, tl.int32)
            for k0 in range(0, k, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                cmask = cols < k
                if USE_DOT:
                    acc = tl.full([BLOCK_N, BLOCK_K], 0.0, tl.float32)
                else:
                    acc = tl.full([BLOCK_N, BLOCK_K], 0.0, tl.float64)
                for d0 in range(0, d, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    dmask = dd < d
                    x = tl.load(x_ptr + xoff + rows[:, None] * d + dd[None, :],
                                mask=rmask[:, None] & dmask[None, :], other=0.0)
                    ct = tl.load(c_ptr + coff + cols[None, :] * d + dd[:, None],
                                 mask=cmask[None, :] & dmask[:, None], other=0.0)
                    if USE_DOT:
                        acc = tl.dot(x, ct, acc, input_precision=PRECISION)
                    else:
                        acc += tl.sum(x[:, :, None] * ct[None, :, :], axis=1)
                cn = tl.load(cn_ptr + goff + cols, mask=cmask, other=0.0)
                dist = cn[None, :] - 2.0 * acc
                dist = tl.where(cmask[None, :], dist, float("inf"))
                m = tl.min(dist, axis=1)
                a = (tl.argmin(dist, axis=1) + k0).to(tl.int32)  # k0 is int64 (k is loaded)
                upd = m < best
                best = tl.where(upd, m, best)
                bidx = tl.where(upd, a, bidx)
            loff = tl.load(loff_ptr + job)
            tl.store(lab_ptr + loff + rows, bidx, mask=rmask)

    @triton.jit
    def _segment_sum_kernel(x_ptr, w_ptr, order_ptr, seg_start_ptr, counts_ptr, gmask_ptr, g_job_ptr, g_coff_ptr,
                            xoff_ptr, roff_ptr, loff_ptr, d_ptr, sums_ptr, wsum_ptr,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        g = tl.program_id(0)
        db = tl.program_id(1)
        job = tl.load(g_job_ptr + g)
        d = tl.load(d_ptr + job)
        if (tl.load(gmask_ptr + g) != 0) & (db * BLOCK_D < d):
            start = tl.load(seg_start_ptr + g)
            cnt = tl.load(counts_ptr + g)
            xoff = tl.load(xoff_ptr + job)
            roff = tl.load(roff_ptr + job)
            loff = tl.load(loff_ptr + job)
            dd = db * BLOCK_D + tl.arange(0, BLOCK_D)
            dmask = dd < d
            acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float64)
            wacc = tl.full([BLOCK_M], 0.0, tl.float64)
            for m0 in range(0, cnt, BLOCK_M):
                mm = m0 + tl.arange(0, BLOCK_M)
                mmask = mm < cnt
                e = tl.load(order_ptr + start + mm, mask=mmask, other=0)
                row = e - loff
                w = tl.load(w_ptr + roff + row, mask=mmask, other=0.0).to(tl.float64)
                x = tl.load(x_ptr + xoff + row[:, None] * d + dd[None, :],
                            mask=mmask[:, None] & dmask[None, :], other=0.0).to(tl.float64)
                acc += w[:, None] * x
                wacc += w
            gc = tl.load(g_coff_ptr + g)
            tl.store(sums_ptr + gc + dd, tl.sum(acc, axis=0), mask=dmask)
            if db == 0:
                tl.store(wsum_ptr + g, tl.sum(wacc, axis=0))

    @triton.jit
    def _kpp_pass_kernel(x_ptr, cand_ptr, closest_ptr, out_ptr, live_ptr, tile_job_ptr, tile_row0_ptr,
                         xoff_ptr, n_ptr, d_ptr, cand_stride, nmax, n_jobs,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        tile = tl.program_id(0)
        t = tl.program_id(1)
        job = tl.load(tile_job_ptr + tile)
        if tl.load(live_ptr + job) != 0:
            row0 = tl.load(tile_row0_ptr + tile)
            n = tl.load(n_ptr + job)
            d = tl.load(d_ptr + job)
            xoff = tl.load(xoff_ptr + job)
            rows = row0 + tl.arange(0, BLOCK_N)
            rmask = rows < n
            c = tl.load(cand_ptr + job * cand_stride + t)
            acc = tl.full([BLOCK_N], 0.0, x_ptr.dtype.element_ty)
            for d0 in range(0, d, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                dmask = dd < d
                x = tl.load(x_ptr + xoff + rows[:, None] * d + dd[None, :],
                            mask=rmask[:, None] & dmask[None, :], other=0.0)
                xc = tl.load(x_ptr + xoff + c * d + dd, mask=dmask, other=0.0)
                u = x - xc[None, :]
                acc += tl.sum(u * u, axis=1)
            cl = tl.load(closest_ptr + job * nmax + rows, mask=rmask, other=0.0)
            v = tl.minimum(acc.to(tl.float64), cl)
            tl.store(out_ptr + (t * n_jobs + job) * nmax + rows, v, mask=rmask)

    @triton.jit
    def _sqdist_kernel(x_ptr, w_ptr, c_ptr, lab_ptr, out_ptr, tile_job_ptr, tile_row0_ptr,
                       xoff_ptr, roff_ptr, loff_ptr, coff_ptr, n_ptr, d_ptr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        tile = tl.program_id(0)
        job = tl.load(tile_job_ptr + tile)
        row0 = tl.load(tile_row0_ptr + tile)
        n = tl.load(n_ptr + job)
        d = tl.load(d_ptr + job)
        xoff = tl.load(xoff_ptr + job)
        roff = tl.load(roff_ptr + job)
        loff = tl.load(loff_ptr + job)
        coff = tl.load(coff_ptr + job)
        rows = row0 + tl.arange(0, BLOCK_N)
        rmask = rows < n
        lab = tl.load(lab_ptr + loff + rows, mask=rmask, other=0).to(tl.int64)
        acc = tl.full([BLOCK_N], 0.0, tl.float64)
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m2 = rmask[:, None] & (dd < d)[None, :]
            x = tl.load(x_ptr + xoff + rows[:, None] * d + dd[None, :], mask=m2, other=0.0).to(tl.float64)
            c = tl.load(c_ptr + coff + lab[:, None] * d + dd[None, :], mask=m2, other=0.0).to(tl.float64)
            u = x - c
            acc += tl.sum(u * u, axis=1)
        w = tl.load(w_ptr + roff + rows, mask=rmask, other=0.0).to(tl.float64)
        tl.store(out_ptr + loff + rows, w * acc, mask=rmask)

    kern = dict(assign=_assign_kernel, segment_sum=_segment_sum_kernel, kpp_pass=_kpp_pass_kernel,
                sqdist=_sqdist_kernel)
    _KERNELS[mode] = kern
    return kern


def _pow2(v: int, lo: int, hi: int) -> int:
    p = lo
    while p < hi and p < v:
        p *= 2
    return p


class TritonKernels:
    """The packed driver's kernel interface (see ``cuda.TorchKernels``) with Triton kernels.

    Block sizes: ``BLOCK_N`` points per tile (64; 16 under the interpreter), ``BLOCK_K``
    centroids and ``BLOCK_D`` features per ``tl.dot`` step (powers of two >= 16, as ``tl.dot``
    needs, capped at 64 / 32).  ``tf32=True`` lets the distance GEMM use TF32 tensor cores
    (labels may then differ from the cpu backend's where distances tie within TF32's 1e-3).
    """

    name = "triton"

    def __init__(self, tf32: bool = False, block_n: int | None = None):
        self.tf32 = tf32
        self.block_n = block_n or (16 if interpreting() else 64)
        self._tiles: dict = {}

    def _tile_table(self, P, device):
        from .cuda import assign_tiles

        key = id(P)
        if key not in self._tiles:
            tj, tr = assign_tiles(P.n, self.block_n)
            self._tiles = {key: (torch.as_tensor(tj, device=device), torch.as_tensor(tr, device=device))}
        return self._tiles[key]

    def _dmax_block(self, P, lo=16, hi=32):
        return _pow2(int(P.d.max()), lo, hi)

    def assign(self, P, C, cnorm, mask, lab):
        kern = _kernels()["assign"]
        tj, tr = self._tile_table(P, C.device)
        use_dot = C.dtype == torch.float32
        prec = "tf32" if self.tf32 else "ieee"
        bk = _pow2(int(P.k.max()), 16, 64)
        bd = self._dmax_block(P) if use_dot else _pow2(int(P.d.max()), 1, 16)
        if not use_dot:
            bk = _pow2(int(P.k.max()), 1, 16)
        v = P.dev
        kern[(int(tj.numel()),)](P.X, C, cnorm, lab, mask.to(torch.int8), tj, tr, v["xoff"], v["loff"], v["coff"],
                                 v["goff"], v["n"], v["d"], v["k"], USE_DOT=use_dot, PRECISION=prec,
                                 BLOCK_N=self.block_n, BLOCK_K=bk, BLOCK_D=bd)

    def segment_sum(self, P, order, seg_start, counts, gmask, sums, wsum):
        kern = _kernels()["segment_sum"]
        bd = _pow2(int(P.d.max()), 1, 64)
        nd = (int(P.d.max()) + bd - 1) // bd
        v = P.dev
        kern[(P.n_clusters, nd)](P.X, P.W, order, seg_start, counts, gmask.to(torch.int8), v["g_job"], v["g_coff"],
                                 v["xoff"], v["roff"], v["loff"], v["d"], sums, wsum, BLOCK_M=self.block_n, BLOCK_D=bd)

    def kpp_pass(self, P, cand, closest, live, out):
        kern = _kernels()["kpp_pass"]
        tj, tr = self._tile_table(P, closest.device)
        cand = cand.contiguous()
        bd = _pow2(int(P.d.max()), 1, 32)
        v = P.dev
        kern[(int(tj.numel()), int(out.shape[0]))](P.X, cand, closest.contiguous(), out, live.to(torch.int8), tj, tr,
                                                   v["xoff"], v["n"], v["d"], cand.shape[1],
                                                   closest.shape[1], P.n_jobs, BLOCK_N=self.block_n, BLOCK_D=bd)

    def sqdist(self, P, C, lab):
        kern = _kernels()["sqdist"]
        tj, tr = self._tile_table(P, C.device)
        out = torch.empty(P.n_entries, dtype=torch.float64, device=C.device)
        bd = _pow2(int(P.d.max()), 1, 32)
        v = P.dev
        kern[(int(tj.numel()),)](P.X, P.W, C, lab, out, tj, tr, v["xoff"], v["roff"], v["loff"], v["coff"], v["n"],
                                 v["d"], BLOCK_N=self.block_n, BLOCK_D=bd)
        return out
