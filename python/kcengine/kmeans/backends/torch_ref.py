"""The ``torch`` backend: a plain batched torch implementation, on any device.

It is the oracle of the tests and the baseline of the GPU benchmarks, so it favours obviously
correct code over speed: problems of the same shape are stacked into a dense [B, N, D] batch and
run through Lloyd's iterations together (converged problems are masked out, not resumed), with
the same semantics as the cpu backend (greedy k-means++, tol relative to the mean per-feature
variance, strict convergence, empty clusters moved to far points, final E-step, data farther from
the origin than its spread clustered centered).  Problems of
different shapes form separate groups.  Memory per group is O(B * (N * D + N * k)): distances
are computed as ``||c||^2 - 2 x.c`` through ``bmm``, never as an N x k x D difference tensor.

Random streams come from one ``torch.Generator`` seeded with ``seed``: runs are reproducible on
the same device, but a problem's start depends on its batch (unlike the cpu backend).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..api import CopyClusters, Problems, RawResult, far_first, far_shift, kpp_trials, tiny_scale, times_pow2


def _sqdist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[B, N, K] squared distances between x [B, N, D] and c [B, K, D] (expanded form)."""
    xn = (x * x).sum(-1, keepdim=True)
    cn = (c * c).sum(-1).unsqueeze(1)
    return (xn - 2.0 * torch.bmm(x, c.transpose(1, 2)) + cn).clamp_min_(0.0)


def _repeats(c: torch.Tensor) -> torch.Tensor | None:
    """[B, K] mask of the centers whose coordinates equal a lower-index center's (None when there are none).

    A weighted sum of each row finds the problems that may hold equal rows cheaply (equal rows: equal sums);
    rows of equal sum are not always equal (gridded data: (0, 2, 0) and (1, 0, 1) with weights 1, 1.5, 2), so
    those problems' rows are then grouped exactly."""
    B, K, D = c.shape
    if K < 2:
        return None
    h = c.double() @ torch.linspace(1.0, 2.0, D, dtype=torch.float64, device=c.device)
    hs, _ = h.sort(dim=1)
    maybe = (hs[:, 1:] == hs[:, :-1]).any(1)
    if not bool(maybe.any()):
        return None
    # Those problems' rows grouped exactly in one call: each row led by its problem's number, so that no group
    # spans two problems (float64 holds both the number and any float32 or float64 coordinate exactly).
    rows = c[maybe].double() + 0.0  # (+ 0.0: -0 as +0, as == reads it)
    nb = rows.shape[0]
    lead = torch.arange(nb, dtype=torch.float64, device=c.device).repeat_interleave(K)
    _, inv = torch.unique(torch.cat([lead[:, None], rows.reshape(nb * K, D)], 1), dim=0, return_inverse=True)
    ar = torch.arange(nb * K, device=c.device)
    first = torch.full((nb * K,), nb * K, dtype=torch.long, device=c.device).scatter_reduce_(0, inv, ar, "amin")
    dup = torch.zeros(B, K, dtype=torch.bool, device=c.device)
    dup[maybe] = (first[inv] != ar).reshape(nb, K)
    return dup if bool(dup.any()) else None


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[B, N] index of each point's nearest center, the lowest index among centers with equal coordinates.

    The dot form's matrix product rounds a column by where it sits, so two identical centers gave one point
    different distances, and copies of a point split between them: the cluster that the cpu backend (which
    gives identical centers identical distances, the tie to the lower index) empties and repairs stayed, and a
    run ended with two identical centroids."""
    d2 = _sqdist(x, c)
    dup = _repeats(c)
    if dup is not None:
        d2 = d2.masked_fill(dup.unsqueeze(1), float("inf"))
    return d2.argmin(2)


def _kmeanspp(x, w, k, gen) -> torch.Tensor:
    """Greedy k-means++ for a [B, N, D] batch; returns [B, k] point indices."""
    B, N, _ = x.shape
    trials = kpp_trials(k)
    ar = torch.arange(B, device=x.device)
    first = torch.multinomial(w, 1, generator=gen).squeeze(1)
    idx = torch.empty(B, k, dtype=torch.long, device=x.device)
    idx[:, 0] = first
    closest = _sqdist(x, x[ar, first].unsqueeze(1)).squeeze(2)  # [B, N]
    for c in range(1, k):
        cum = torch.cumsum(closest * w, dim=1)
        r = torch.rand(B, trials, generator=gen, device=x.device, dtype=x.dtype) * cum[:, -1:]
        cand = torch.searchsorted(cum, r, right=True).clamp_(max=N - 1)  # [B, trials]
        dc = _sqdist(x, x[ar.unsqueeze(1), cand])  # [B, N, trials]
        dc = torch.minimum(dc, closest.unsqueeze(2))
        cpot = (dc * w.unsqueeze(2)).sum(1)  # [B, trials]
        best = cpot.argmin(1)
        closest = dc[ar, :, best]
        idx[:, c] = cand[ar, best]
    return idx


def _random_init(w, k, gen) -> torch.Tensor:
    # Points of zero weight are drawn only when fewer than k points have weight.
    ww = torch.where(w > 0, w, torch.full_like(w, 1e-30))
    return torch.multinomial(ww, k, replacement=False, generator=gen)


def _relocate(x, w, lab, c, sums, wsum):
    """scikit-learn's empty-cluster repair for one problem (in place on sums/wsum); x, w, c in double."""
    empty = torch.nonzero(wsum <= 0).flatten().tolist()
    if not empty:
        return
    # Each point's squared distance to its (old) center c[lab], as the cpu core takes it: differences
    # squared in double, not the E-step's dot form, whose rounding (1e-12 relative on points well away
    # from the origin) could order two equally far points unlike the cpu backend does.
    d2own = ((x - c[lab]) ** 2).sum(1)
    order = far_first(d2own.cpu().numpy(), range(x.shape[0]))
    # A cluster keeps weight while it keeps a member of positive weight (counted, as the cpu backend
    # counts: a difference of weight sums would carry rounding).
    members = torch.bincount(lab[w > 0].long(), minlength=wsum.shape[0]).tolist()
    stacked = CopyClusters(x.cpu().numpy(), w.cpu().numpy(), lab.cpu().numpy(), wsum.shape[0])
    picked: list[int] = []
    pos = 0
    for e in empty:
        while pos < len(order):
            i = order[pos]
            pos += 1
            wi = float(w[i])
            if wi <= 0 or float(d2own[i]) <= 0 or members[int(lab[i])] <= 1:
                continue
            if any(torch.equal(x[q], x[i]) for q in picked) or stacked.blocks(i):
                continue
            f = int(lab[i])
            stacked.take(i, f)
            sums[f] -= wi * x[i]
            wsum[f] -= wi
            sums[e] = wi * x[i]
            wsum[e] = wi
            members[f] -= 1
            members[e] = 1
            picked.append(i)
            break


def _lloyd(x, w, c, max_iter, tol_abs):
    """Batched Lloyd on x [B, N, D], w [B, N], c [B, k, D] -> (c, labels, n_iter, converged)."""
    B, N, D = x.shape
    k = c.shape[1]
    active = torch.ones(B, dtype=torch.bool, device=x.device)
    strict = torch.zeros(B, dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(B, dtype=torch.int32, device=x.device)
    lab_old = torch.full((B, N), -1, dtype=torch.long, device=x.device)
    lab = lab_old.clone()
    for _ in range(max_iter):
        a = active.nonzero().flatten()
        if a.numel() == 0:
            break
        xa, wa, ca = x[a], w[a], c[a]
        la = _nearest(xa, ca)
        sums = torch.zeros(a.numel(), k, D, dtype=torch.float64, device=x.device)
        sums.scatter_add_(1, la.unsqueeze(2).expand(-1, -1, D), (xa * wa.unsqueeze(2)).double())
        wsum = torch.zeros(a.numel(), k, dtype=torch.float64, device=x.device)
        wsum.scatter_add_(1, la, wa.double())
        had_empty = (wsum <= 0).any(1)
        for j in torch.nonzero(had_empty).flatten().tolist():
            _relocate(xa[j].double(), wa[j].double(), la[j], ca[j].double(), sums[j], wsum[j])
        cnew = torch.where(wsum.unsqueeze(2) > 0, sums / wsum.clamp_min(1e-300).unsqueeze(2), ca.double()).to(x.dtype)
        shift = ((cnew.double() - ca.double()) ** 2).sum((1, 2))
        c[a] = cnew
        lab[a] = la
        n_iter[a] += 1
        same = (la == lab_old[a]).all(1)
        # A relocation in this very step moved a center: labels must be recomputed at the end.
        strict[a] = same & ~had_empty
        done = same | (shift <= tol_abs[a])
        lab_old[a] = la
        active[a] = ~done
    converged = ~active
    # Final E-step where convergence was not strict.
    redo = (~strict).nonzero().flatten()
    if redo.numel():
        lab[redo] = _nearest(x[redo], c[redo])
    return c, lab, n_iter, converged


def _group_key(probs: Problems, p: int):
    ds = probs.datasets[int(probs.data_index[p])]
    return (tuple(ds.shape), int(probs.k[p]))


def _shift_back(x, labels, c, shift):
    """Centroids ``c`` of centered data back in the caller's coordinates (``x``: the caller's points ``[B, N, D]``,
    ``shift``: ``[B, 1, D]`` float64), as the cpu core's ``shift_back`` does: a coordinate all of a cluster's
    members share comes back as that very value when the centroid lies within the round trip's rounding of it
    (a cluster of one repeated point is that point, not it plus a few ulps of the shift)."""
    B, K, D = c.shape
    idx = labels.unsqueeze(2).expand(-1, -1, D)
    lo = torch.full((B, K, D), math.inf, dtype=x.dtype, device=x.device).scatter_reduce(1, idx, x, "amin")
    hi = torch.full((B, K, D), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(1, idx, x, "amax")
    back = c.double() + shift
    v = lo.double()
    near = (v - back).abs() <= 4.0 * torch.finfo(x.dtype).eps * torch.maximum(v.abs(), shift.abs())
    return torch.where((lo == hi) & near, lo, back.to(x.dtype))


def solve(probs: Problems) -> RawResult:
    if probs.algorithm == "exact1d":
        raise NotImplementedError("algorithm='exact1d' is implemented by the cpu backend only")
    ref = probs.datasets[0]
    dev, dtype = ref.device, ref.dtype
    gen = torch.Generator(device=dev)
    gen.manual_seed(probs.seed)
    B = probs.n_problems
    groups: dict = defaultdict(list)
    for p in range(B):
        groups[_group_key(probs, p)].append(p)
    cents: list = [None] * B
    labels: list = [None] * B
    inertia = torch.zeros(B, dtype=torch.float64, device=dev)
    n_iter = torch.zeros(B, dtype=torch.int32, device=dev)
    conv = torch.zeros(B, dtype=torch.bool, device=dev)
    for (_, k), members in groups.items():
        di = [int(probs.data_index[p]) for p in members]
        x = torch.stack([probs.datasets[j] for j in di])
        if probs.weights is None:
            w = torch.ones(x.shape[:2], dtype=dtype, device=dev)
        else:
            # float64 whatever the data's dtype, as the cpu core takes them: in float32, weights spanning more
            # than float32's range (1e50 beside 1) read 0 and their points were dropped
            w = torch.stack([probs.weights[j] for j in di]).to(torch.float64)
        xd = x.double()
        var = xd.var(1, unbiased=False)
        tol_abs = probs.tol * var.mean(1)
        # as the cpu backend: data farther from the origin than its spread is clustered centered, and data of
        # tiny spread scaled by a power of two (the tolerance then from the scaled data)
        far, shift = far_shift(xd.mean(1), var)
        x_given = x
        if bool(far.any()):
            shift = shift[:, None, :]
            x = (xd - shift).to(dtype)
        else:
            shift = None
        del xd
        x, scale = tiny_scale(x, var.sum(1))
        scaled = bool(scale.any())
        if scaled:
            tol_abs = torch.where(scale != 0, probs.tol * x.double().var(1, unbiased=False).mean(1), tol_abs)
        best = None
        runs = 1 if probs.init == "given" else probs.n_init
        for _ in range(runs):
            if probs.init == "given":
                c0 = torch.stack([probs.init_centers[p] for p in members])
                if shift is not None:
                    c0 = (c0.double() - shift).to(dtype)
                if scaled:
                    c0 = times_pow2(c0, scale)
            else:
                idx = _kmeanspp(x, w, k, gen) if probs.init == "k-means++" else _random_init(w, k, gen)
                c0 = x[torch.arange(x.shape[0], device=dev).unsqueeze(1), idx]
            c, lab, it, cv = _lloyd(x, w, c0, probs.max_iter, tol_abs)
            diff = x - c.gather(1, lab.unsqueeze(2).expand(-1, -1, x.shape[2]))
            inert = ((diff.double() ** 2).sum(2) * w.double()).sum(1)
            if best is None:
                best = [c, lab, it, cv, inert]
            else:
                better = inert < best[4]
                for f, new in enumerate((c, lab, it, cv, inert)):
                    shape = (-1,) + (1,) * (new.dim() - 1)
                    best[f] = torch.where(better.view(shape), new, best[f])
        c, lab, it, cv, inert = best
        if scaled:
            c, inert = times_pow2(c, -scale), times_pow2(inert, -2 * scale)
        if shift is not None:
            c = _shift_back(x_given, lab, c, shift)
        del x_given
        for q, p in enumerate(members):
            cents[p], labels[p] = c[q], lab[q]
            inertia[p], n_iter[p], conv[p] = inert[q], it[q], cv[q]
    return RawResult(cents, labels, inertia, n_iter, conv, ["lloyd"] * B)
