"""Public entry points of batched k-means: validation, packing and dispatch.

All checks on the caller's input happen here, once, before any backend runs; the native core
repeats the cheap structural ones with the same messages.  Nothing the caller passed is modified:
backends read the data through zero-copy views and write only into arrays they allocate.
"""
from __future__ import annotations

import math
import numbers
from collections import abc
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .. import _registry
from .._checks import check_float, check_int, scalar_value, tensor_from_numpy
from .result import KMeansResult

__all__ = ["kmeans", "kmeans_sweep", "Problems", "RawResult", "ALGORITHMS", "INITS"]

INITS = ("k-means++", "random")
ALGORITHMS = ("auto", "lloyd", "hamerly", "yinyang", "topm", "gram", "lloyd1d", "exact1d")


@dataclass
class Problems:
    """A validated batch of k-means problems, as every backend receives it.

    ``datasets[j]`` is an ``[N_j, D_j]`` array (numpy for the cpu backend, torch for the others),
    ``weights[j]`` its ``[N_j]`` sample weights or ``None``; problem ``p`` clusters dataset
    ``data_index[p]`` into ``k[p]`` clusters (several problems may share one dataset: a k sweep).
    ``init_centers[p]`` is the ``[k_p, D]`` start of problem ``p`` when ``init == "given"``.
    ``tol`` is *relative*: each backend scales it by the mean per-feature variance of the data.
    """

    datasets: list
    weights: list | None
    data_index: np.ndarray
    k: np.ndarray
    init: str
    init_centers: list | None
    n_init: int
    max_iter: int
    tol: float
    seed: int
    algorithm: str
    weight_exps: list | None = None  # per problem: its weights were multiplied by 2**weight_exps[p]

    @property
    def n_problems(self) -> int:
        return int(self.k.shape[0])


@dataclass
class RawResult:
    """What a backend returns: per-problem lists plus ``[B]`` arrays (numpy or torch)."""

    centroids: list
    labels: list
    inertia: Any
    n_iter: Any
    converged: Any
    algorithm: list


# ----------------------------------------------------------------------------- input checks

def _is_torch(a) -> bool:
    if type(a) is np.ndarray:  # the common case first: this runs once per problem of a batch
        return False
    mod = type(a).__module__
    return mod.startswith("torch") and hasattr(a, "detach")


def _dtype_name(a) -> str:
    """"float32", "float64", ... for a numpy array or torch tensor."""
    return _name_of_dtype(a.dtype)


def _name_of_dtype(dt) -> str:
    """The name of a numpy or torch dtype, cached per dtype (``str`` of a numpy dtype costs microseconds,
    thousands of times per ragged batch of small problems)."""
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = _DTYPE_NAMES[dt] = str(dt).replace("torch.", "")
    return name


_DTYPE_NAMES: dict = {}


def _as_array(a, what: str):
    """A numpy array or torch tensor for ``a`` (array-likes go through numpy; a numpy array of non-native byte
    order, e.g. float64 read big-endian from a file, becomes a native copy: the caller's is not touched)."""
    if _is_torch(a) and a.device.type == "meta":
        raise ValueError(f"{what} is a tensor on the meta device: it has a shape but no values to cluster")
    if _is_torch(a) and str(a.layout) != "torch.strided":
        raise ValueError(f"{what} is a {str(a.layout).replace('torch.', '')} tensor; pass a dense one (.to_dense())")
    if isinstance(a, np.ma.MaskedArray):  # its mask would be dropped: masked outliers clustered as points
        raise ValueError(f"{what} is a numpy masked array; drop the masked rows (or fill them) and pass a plain "
                         f"array")
    if isinstance(a, np.ndarray):
        return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))
    if _is_torch(a):
        return a
    try:
        return np.asarray(a)
    except Exception as exc:  # ragged nested lists and the like
        raise ValueError(f"{what} could not be read as an array: {exc}") from None


def _check_float(a, what: str) -> None:
    if _dtype_name(a) not in ("float32", "float64"):
        value = f" ({type(a.item()).__name__} {a.item()!r:.60})" if isinstance(a, np.ndarray) and a.ndim == 0 else ""
        raise ValueError(f"{what} must be float32 or float64, got dtype {_dtype_name(a)}{value}")


def _all_finite(a) -> bool:
    if _is_torch(a):
        import torch

        return bool(torch.isfinite(a).all())
    return bool(np.isfinite(a).all())


def _one_torch_device(arrays) -> bool:
    """Whether ``arrays`` is non-empty and all torch tensors on one device (checked as one batch)."""
    return bool(arrays) and all(_is_torch(a) for a in arrays) and len({str(a.device) for a in arrays}) == 1


def _nonfinite(arrays) -> list[int]:
    """Indices of the arrays holding NaN or Inf.  Torch tensors on one device (a GPU batch above all)
    are checked together: each distinct tensor once (a list may repeat one), one flat copy and one
    device synchronization for the whole batch, not one per array; only when that finds something
    (or for numpy arrays, or a mix) are they checked one by one."""
    if _one_torch_device(arrays):
        import torch

        uniq = list({id(a): a.reshape(-1) for a in arrays}.values())
        dtypes = {u.dtype for u in uniq}
        dtype = uniq[0].dtype if len(dtypes) == 1 else torch.float64  # bool/int first must not swallow a NaN
        whole = uniq[0] if len(uniq) == 1 else torch.cat([u.to(dtype) for u in uniq])
        if bool(torch.isfinite(whole).all()):  # a value cast out of range reads Inf: checked one by one below
            return []
    return [i for i, a in enumerate(arrays) if not _all_finite(a)]


_INT32_MAX = 2**31 - 1


def _plain_float_arrays(xs) -> bool:
    """Whether ``xs`` are all 2-D numpy arrays of one native float dtype: the batch the checks of
    :func:`_split_input` pass with no conversion (checked as one signature set: a ragged batch of thousands
    of 1-D problems spent milliseconds on per-array checks)."""
    if not all(type(a) is np.ndarray for a in xs):
        return False
    sig = {(a.ndim, a.dtype) for a in xs}
    if len(sig) != 1:
        return False
    ndim, dt = next(iter(sig))
    return ndim == 2 and dt in (np.dtype(np.float32), np.dtype(np.float64))  # native byte order only


def _split_input(x):
    """(list of [N, D] problem arrays, layout) with layout in {"single", "dense", "ragged"}."""
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError("x is an empty list: a ragged batch needs at least one problem")
        if _plain_float_arrays(x):  # the common ragged batch: nothing to convert, one signature to check
            return list(x), "ragged"
        parts = [_as_array(a, f"x[{i}]") for i, a in enumerate(x)]
        kinds = {_is_torch(a) for a in parts}
        if len(kinds) > 1:
            raise ValueError("x mixes numpy arrays and torch tensors; pass one kind")
        for i, a in enumerate(parts):
            if a.ndim != 2:
                hint = ("; a list of points is read as a ragged batch of problems: for one dataset pass "
                        "np.asarray(x)" + (".reshape(-1, 1)" if a.ndim == 0 else "")
                        if a.ndim <= 1 and not hasattr(x[i], "shape") else "")
                raise ValueError(f"x[{i}] must have shape [N, D], got shape {tuple(a.shape)}{hint}")
            _check_float(a, f"x[{i}]")
        dtypes = {_dtype_name(a) for a in parts}
        if len(dtypes) > 1:
            raise ValueError(f"x mixes dtypes {sorted(dtypes)}; pass one dtype for the whole batch")
        if parts[0].__class__.__module__.startswith("torch"):
            devices = {str(a.device) for a in parts}
            if len(devices) > 1:
                raise ValueError(f"x spans several devices {sorted(devices)}; pass one device")
        return parts, "ragged"
    x = _as_array(x, "x")
    _check_float(x, "x")
    if x.ndim == 2:
        return [x], "single"
    if x.ndim == 3:
        if x.shape[0] == 0:
            raise ValueError("x has shape [0, N, D]: a batch needs at least one problem")
        return [x[b] for b in range(x.shape[0])], "dense"
    raise ValueError(f"x must have shape [N, D], [B, N, D] or be a list of [N_i, D_i], got shape {tuple(x.shape)}")


def _check_problems(parts, layout) -> None:
    if not all(a.shape[0] and a.shape[1] for a in parts):
        for i, a in enumerate(parts):
            name = "x" if layout == "single" else f"problem {i}"
            if a.shape[0] == 0 or a.shape[1] == 0:
                raise ValueError(f"{name} is empty (shape {tuple(a.shape)}): it needs N >= 1 points of D >= 1 "
                                 "features")
    # One pass over all the data answers both questions below for the usual input; only data that fails
    # it is examined problem by problem, to name the first bad one.
    keys = {(a.dtype, a.shape[1]) for a in parts}
    if _max_abs_all(parts) <= min(_overflow_limit(_name_of_dtype(t), d) for t, d in keys):
        return
    bad = _nonfinite(parts)
    if bad:
        name = "x" if layout == "single" else f"problem {bad[0]}"
        raise ValueError(f"{name} holds NaN or Inf values; k-means needs finite data")
    big = _past_overflow_limit(parts)
    if big is not None:
        i, m, limit = big
        name = "x" if layout == "single" else f"problem {i}"
        raise ValueError(f"{name} holds values up to {m:.3g} in magnitude: squared distances between its "
                         f"D={parts[i].shape[1]}-dimensional points would overflow {_dtype_name(parts[i])} "
                         f"(|values| must stay below {limit:.3g}); rescale the data, k-means is scale-equivariant")


def _overflow_limit(dtype_name: str, d: int) -> float:
    """The largest |value| whose squared distances (at most 4·D·m² between two points, then summed into
    the inertia and the centroid updates) stay a factor 4 inside the dtype's range."""
    return math.sqrt(_FMAX[dtype_name] / (16.0 * d))


_FMAX = {"float32": float(np.finfo(np.float32).max), "float64": float(np.finfo(np.float64).max)}


def _max_abs(a) -> float:
    """Largest |value| of one array, NaN when it holds a NaN; no copy of a numpy array."""
    if _is_torch(a):
        return float(a.detach().abs().amax()) if a.numel() else 0.0
    if a.size == 0:
        return 0.0
    return float(np.maximum(np.max(a), -np.min(a)))  # np.maximum keeps a NaN


_JOIN_ELEMS = 1 << 14  # numpy arrays up to this size are scanned joined, in pieces of about this size


def _max_abs_all(arrays) -> float:
    """Largest |value| over all ``arrays`` (NaN when one holds a NaN, inf for an Inf).  Many small arrays (the
    ragged batches of 1-D problems) are joined and scanned at once: one call per array costs more than the
    scan.  Numpy arrays are joined in pieces of at most 64 KB of float32 and larger ones scanned in place, so
    the check allocates nothing big: a fresh megabyte-sized temporary costs its page faults (0.5 ms for 1 MB
    here, 3% of resnet20's whole 3x3-kernel batch) where max and min over the data cost 0.05 ms."""
    if (len(arrays) > 8 and _one_torch_device(arrays)  # numpy batches fail this at their first array
            and sum(a.numel() for a in arrays) <= (1 << 22)):
        import torch

        flat = [a.reshape(-1) for a in arrays]
        if len({a.dtype for a in arrays}) > 1:
            flat = [a.to(torch.float64) for a in flat]
        return float(torch.cat(flat).abs().amax())
    worst = 0.0
    piece, size = [], 0
    arrays = _scan_units(arrays)

    def take(m: float) -> bool:  # False once a NaN is seen
        nonlocal worst
        if not m <= worst:  # NaN or larger
            if m != m:
                return False
            worst = m
        return True

    def flush() -> bool:
        nonlocal piece, size
        joined = piece[0] if len(piece) == 1 else np.concatenate([p.reshape(-1) for p in piece])
        piece, size = [], 0
        return take(_max_abs(joined))

    for a in arrays:
        if _is_torch(a) or a.size > _JOIN_ELEMS:
            if not take(_max_abs(a)):
                return float("nan")
            continue
        if size + a.size > _JOIN_ELEMS and piece and not flush():
            return float("nan")
        piece.append(a)
        size += a.size
    if piece and not flush():
        return float("nan")
    return worst


def _scan_units(arrays) -> list:
    """What :func:`_max_abs_all` scans for ``arrays``: each distinct object once (a k sweep passes one array
    per k), and numpy views of one base (the columns of a weight matrix as 1-D problems) as that base, when
    every element of the views is an element of the base and the base is at most twice their size.  One
    call per array costs ~0.5 us; resnet20's 5,643 per-coordinate problems are 19 bases.  A superset is
    safe: a value outside the views that fails the check only sends the caller to its per-problem path."""
    groups: dict = {}
    out = []
    seen = set()
    for a in arrays:
        if id(a) in seen:
            continue
        seen.add(id(a))
        b = a.base if type(a) is np.ndarray else None
        # Same dtype, both aligned (for float32/64: address and strides multiples of the item size): the view
        # reads whole items of the base, not bytes straddling two.
        if type(b) is np.ndarray and b.dtype == a.dtype and a.flags.aligned:
            g = groups.get(id(b))
            if g is None:
                g = groups[id(b)] = (b, []) if b.flags.aligned else None
            if g is not None:
                g[1].append(a)
                continue
        out.append(a)
    for b, views in (g for g in groups.values() if g is not None):
        if b.size <= 2 * sum(v.size for v in views):
            out.append(b)
        else:
            out.extend(views)
    return out


def _past_overflow_limit(parts, like=None) -> tuple[int, float, float] | None:
    """(index, largest |value|, limit) of the first problem whose values would overflow its distances
    (:func:`_overflow_limit`), or None.  ``like``: the arrays whose dtype and width set each limit (the data,
    for given centroids solved in its dtype); default ``parts`` themselves.  Finite data assumed."""
    for i, (a, ref) in enumerate(zip(parts, parts if like is None else like)):
        m, limit = _max_abs(a), _overflow_limit(_dtype_name(ref), ref.shape[1])
        if m > limit:
            return i, m, limit
    return None


def _check_k(k, parts, layout, name: str = "k") -> np.ndarray:
    """One k per problem as int64, each in [1, N_i].  ``name`` is "ks" for a sweep, whose entries are
    named ``ks[i]`` in errors (``k ... for problem i`` otherwise)."""
    B = len(parts)
    k = scalar_value(k)  # a 0-d array or tensor is one k, like numpy's integer scalars
    if isinstance(k, (list, tuple, np.ndarray)) or _is_torch(k):
        ks = [v.item() if hasattr(v, "item") else v for v in (k.tolist() if hasattr(k, "tolist") else k)]
        if layout == "single":
            raise ValueError(f"k must be an int for a single problem, got a sequence of {len(ks)}")
        if len(ks) != B:
            raise ValueError(f"k has {len(ks)} entries but x holds {B} problems; pass one k per problem or one int")
        if not all(type(v) is int for v in ks):  # plain ints (and numpy's, via tolist) need no per-entry check
            ks = [check_int(v, f"{name}[{i}]") for i, v in enumerate(ks)]
    else:
        ks = [check_int(k, "k")] * B
    if ks and -2**63 <= min(ks) and max(ks) < 2**63:  # the usual case, checked as one array; a bad entry is
        karr = np.asarray(ks, dtype=np.int64)          # found and named by the loop below
        rows = np.fromiter((a.shape[0] for a in parts), dtype=np.int64, count=B)
        if ((karr >= 1) & (karr <= rows)).all():
            return karr
    for i, (kv, a) in enumerate(zip(ks, parts)):
        if name == "ks":
            what, where = f"ks[{i}]", ""
        else:
            what, where = "k", ("" if layout == "single" else f" for problem {i}")
        if kv < 1:
            raise ValueError(f"{what} must be >= 1{where}, got {what}={kv}")
        if kv > a.shape[0]:
            raise ValueError(f"n_samples={a.shape[0]} should be >= {what}={kv}{where}")
    return np.asarray(ks, dtype=np.int64)


_WEIGHT_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint64", "uint32",
                  "uint16", "uint8", "bool")


def _check_weights(sample_weight, parts, layout):
    """(weights per problem, the exponent e of the 2**e each was multiplied by), or (None, None) without weights."""
    if sample_weight is None:
        return None, None
    if isinstance(sample_weight, (list, tuple)) and layout != "single":
        ws = [_as_array(w, f"sample_weight[{i}]") for i, w in enumerate(sample_weight)]
        if len(ws) != len(parts):
            raise ValueError(f"sample_weight has {len(ws)} entries but x holds {len(parts)} problems")
    else:
        w = _as_array(sample_weight, "sample_weight")
        if layout == "dense" and w.ndim == 2:
            ws = [w[b] for b in range(w.shape[0])] if w.shape[0] == len(parts) else None
            if ws is None:
                raise ValueError(f"sample_weight has shape {tuple(w.shape)}, "
                                 f"expected [{len(parts)}, {parts[0].shape[0]}]")
        elif layout == "ragged":
            raise ValueError("sample_weight for a ragged batch must be a list with one [N_i] array per problem")
        else:
            ws = [w] * len(parts)
    out = []
    same: dict = {}  # one array per distinct caller's array, so that _share_repeated still sees the repeats
    for i, (w, a) in enumerate(zip(ws, parts)):
        name = "sample_weight" if layout == "single" else f"sample_weight of problem {i}"
        if w.ndim != 1 or w.shape[0] != a.shape[0]:
            value = f" ({w.item()!r:.60})" if w.ndim == 0 else ""
            raise ValueError(f"{name} must have shape [{a.shape[0]}], got shape {tuple(w.shape)}{value}")
        if _dtype_name(w) not in _WEIGHT_DTYPES:
            raise ValueError(f"{name} must be a real number per point (float or integer), got dtype {_dtype_name(w)}")
        if id(w) not in same:  # weights that require grad are read, never differentiated
            same[id(w)] = w.detach() if _is_torch(w) and w.requires_grad else w
        out.append(same[id(w)])
    bad = _nonfinite(out)
    if bad:
        raise ValueError(f"{'sample_weight' if layout == 'single' else f'sample_weight of problem {bad[0]}'} "
                         "holds NaN or Inf values")
    if _one_torch_device(out):
        import torch  # one synchronization for the batch, not three per problem

        mins = torch.stack([w.min().double() for w in out]).cpu().numpy()
        maxs = torch.stack([w.max().double() for w in out]).cpu().numpy()
    else:
        host = [_to_numpy(w) for w in out]
        mins = [float(np.min(w)) for w in host]
        maxs = [float(np.max(w)) for w in host]
    exps, scaled = [], {}
    for i, (wmin, wmax) in enumerate(zip(mins, maxs)):
        name = "sample_weight" if layout == "single" else f"sample_weight of problem {i}"
        if wmin < 0:
            raise ValueError(f"{name} must be >= 0, got a minimum of {float(wmin)}")
        if wmax <= 0:
            raise ValueError(f"{name} sums to 0: at least one point needs a positive weight")
        # Weights far from 1 (1e308 each, whose sum overflows; 5e-324, whose products with the data are
        # denormal; 1e-50, which float32 cannot hold) are multiplied by 2**e, which brings the largest into
        # [1, 2): exact, and k-means' answer does not change when every weight is scaled alike; the inertia is
        # scaled back (_unscale_inertia).
        e = 0
        if not 2.0 ** -64 <= wmax <= 2.0 ** 64:
            e = 1 - math.frexp(float(wmax))[1]
            if id(out[i]) not in scaled:
                w = out[i] if _dtype_name(out[i]) in ("float32", "float64") else _to_numpy(out[i], np.float64)
                scaled[id(out[i])] = _times_pow2(w, e)
            out[i] = scaled[id(out[i])]
        exps.append(e)
    return out, exps


def _pow2_factors(e):
    """Two float64 factors whose product is ``2**e`` (an int or an int array, |e| up to 2098), each finite where
    ``2**e`` alone would overflow or underflow."""
    h = np.asarray(e) // 2
    return np.ldexp(1.0, h), np.ldexp(1.0, np.asarray(e) - h)


def _times_pow2(a, e: int):
    """``a * 2**e``, exact unless it overflows or underflows."""
    f1, f2 = _pow2_factors(e)
    return a * float(f1) * float(f2)


def _unscale_inertia(raw: RawResult, exps) -> RawResult:
    """The inertia of problems whose weights :func:`_check_weights` scaled by ``2**exps[p]``, in the caller's
    weights (inf where that overflows float64, as the caller's own sum would)."""
    if exps is None or not any(exps):
        return raw
    f1, f2 = _pow2_factors(-np.asarray(exps, dtype=np.int64))
    if _is_torch(raw.inertia):
        import torch

        as_t = lambda f: torch.as_tensor(f, dtype=raw.inertia.dtype, device=raw.inertia.device)  # noqa: E731
        inertia = raw.inertia * as_t(f1) * as_t(f2)
    else:
        with np.errstate(over="ignore"):
            inertia = np.asarray(raw.inertia) * f1 * f2
    return RawResult(raw.centroids, raw.labels, inertia, raw.n_iter, raw.converged, raw.algorithm)


def _check_init(init, parts, layout, k_arg):
    """(init kind, per-problem centers or None, k array or None when k comes from centers)."""
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS} or an array of initial centroids, got {init!r}")
        return init, None
    if callable(init):
        raise ValueError(f"init must be one of {INITS} or an array of initial centroids, got the callable "
                         f"{getattr(init, '__name__', type(init).__name__)!r} (scikit-learn's init(X, k, random_state) "
                         "form is not taken: call it and pass the centroids it returns)")
    if init is None or isinstance(init, (numbers.Number, dict, set)):
        raise ValueError(f"init must be one of {INITS} or an array of initial centroids, got {init!r}")
    if layout == "single" and isinstance(init, (list, tuple)) and not (len(init) == 1 and
                                                                      getattr(init[0], "ndim", None) == 2):
        try:  # one problem's centroids written as rows (nested lists, or a list of 1-D arrays or tensors)
            rows = np.asarray([_to_numpy(r) if _is_torch(r) else r for r in init])
        except (ValueError, TypeError, RuntimeError):
            rows = None
        if rows is not None and rows.ndim == 3 and rows.shape[0] == 1:  # [[row, ...]]: the batch form of one
            rows = rows[0]
        if rows is None or rows.dtype.kind not in "iuf":
            raise ValueError(f"init must be one of {INITS} or a [k, {parts[0].shape[1]}] array of initial "
                             f"centroids, got {type(init).__name__} {init!r:.80}")
        init = rows.astype(np.float64, copy=False)
    if layout == "ragged" or isinstance(init, (list, tuple)):
        if not isinstance(init, (list, tuple)) or len(init) != len(parts):
            raise ValueError(f"init for a batch of {len(parts)} problems must be a list of {len(parts)} "
                             "[k_i, D_i] arrays")
        cs = [_as_array(c, f"init[{i}]") for i, c in enumerate(init)]
    else:
        c = _as_array(init, "init")
        if layout == "single":
            cs = [c]
        else:
            if c.ndim != 3 or c.shape[0] != len(parts):
                raise ValueError(f"init must have shape [{len(parts)}, k, {parts[0].shape[1]}], "
                                 f"got shape {tuple(c.shape)}")
            cs = [c[b] for b in range(c.shape[0])]
    for i, (c, a) in enumerate(zip(cs, parts)):
        name = "init" if layout == "single" else f"init of problem {i}"
        if c.ndim != 2 or c.shape[1] != a.shape[1]:
            raise ValueError(f"{name} must have shape [k, {a.shape[1]}], got shape {tuple(c.shape)}")
        if c.shape[0] == 0:  # (was "k must be >= 1, got k=0", though no k was passed)
            raise ValueError(f"{name} holds no centroids (shape {tuple(c.shape)}): give at least one row")
        cs[i] = c = _init_values(c)
        if _dtype_name(c) not in ("float32", "float64"):
            raise ValueError(f"{name} must hold real numbers (a float or integer dtype), got dtype {_dtype_name(c)}")
    bad = _nonfinite(cs)
    if bad:
        raise ValueError(f"{'init' if layout == 'single' else f'init of problem {bad[0]}'} holds NaN or Inf values")
    big = _past_overflow_limit(cs, like=parts)  # in the data's dtype, which the centroids are solved in
    if big:
        i, m, limit = big
        raise ValueError(f"{'init' if layout == 'single' else f'init of problem {i}'} holds values up to {m:.3g} "
                         f"in magnitude: its distances to the points would overflow {_dtype_name(parts[i])} (|values| "
                         f"must stay below {limit:.3g})")
    return "given", cs


def _init_values(c):
    """Given centroids of an integer or half dtype as float64 (exact), as a list of integer rows is read; they are
    solved in the data's dtype.  Any other dtype is returned as it is, for the float check to name."""
    name = _dtype_name(c)
    if name not in ("float16", "bfloat16") and not name.startswith(("int", "uint")):
        return c
    if _is_torch(c):
        import torch

        return c.to(dtype=torch.float64)
    return c.astype(np.float64)


def _to_numpy(a, dtype=None):
    if _is_torch(a):
        a = a.detach().resolve_neg()  # a lazily negated view (``z.conj().imag``) has no numpy form until resolved
        if a.device.type != "cpu":
            a = a.cpu()
        if _dtype_name(a) == "bfloat16":  # numpy has no bfloat16 (weights only: x is float32/float64)
            a = a.float()
        a = a.numpy()
    a = np.ascontiguousarray(a)
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return a


def _to_torch(a, like, dtype=None):
    if (_is_torch(a) and not a.requires_grad and a.device == like.device and (dtype is None or a.dtype == dtype)
            and a.is_contiguous()):
        return a  # already in the form asked for (the common case of a GPU batch: no per-problem work)
    t = a.detach() if _is_torch(a) else tensor_from_numpy(a)
    return t.to(device=like.device, dtype=dtype if dtype is not None else t.dtype).contiguous()


def _resolve_seed(seed) -> int:
    if seed is None:
        return int(np.random.default_rng().integers(0, 2**63 - 1))
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**63 - 1))
    return check_int(seed, "seed", 0, 2**63 - 1)  # what every backend's generator takes


def check_solver_options(n_init, max_iter, algorithm) -> tuple[int, int]:
    """``(n_init, max_iter)`` as ints in [1, 2**31 - 1] (the native core counts in int32), with ``algorithm`` one
    of ``ALGORITHMS``; ValueError naming the argument and the value otherwise.  (Also what :func:`kcengine.compress`
    checks its k-means options with, before any work.)"""
    n_init = check_int(n_init, "n_init", 1, _INT32_MAX)
    max_iter = check_int(max_iter, "max_iter", 1, _INT32_MAX)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return n_init, max_iter


def _build(x, k, *, init, n_init, max_iter, tol, sample_weight, seed, algorithm, sweep_ks=None):
    """Validate everything and return (Problems-without-conversion, parts, layout, is_torch)."""
    parts, layout = _split_input(x)
    _check_problems(parts, layout)
    kind, centers = _check_init(init, parts, layout, k)
    if sweep_ks is not None:
        ks = _check_k(list(sweep_ks), parts * len(sweep_ks), "ragged", name="ks")
        data_index = np.zeros(len(ks), dtype=np.int64)
    else:
        if kind == "given" and k is None:
            k = [c.shape[0] for c in centers] if layout != "single" else centers[0].shape[0]
        if k is None:
            raise ValueError("k is required unless init gives the initial centroids")
        ks = _check_k(k, parts, layout)
        data_index = np.arange(len(parts), dtype=np.int64)
    if centers is not None:
        for i, (c, kv) in enumerate(zip(centers, ks)):
            if c.shape[0] != kv:
                name = "init" if layout == "single" else f"init of problem {i}"
                raise ValueError(f"{name} has {c.shape[0]} centroids but k={kv}")
    weights, exps = _check_weights(sample_weight, parts, layout)
    n_init, max_iter = check_solver_options(n_init, max_iter, algorithm)
    if kind == "given" and n_init != 1:
        raise ValueError(f"n_init={n_init} with given initial centroids would rerun the same start; pass n_init=1")
    tol = check_float(tol, "tol", 0.0)  # (a 0-d array or tensor too, as k takes one)
    if algorithm == "exact1d" and kind == "given":
        raise ValueError("algorithm='exact1d' finds the optimal clustering from no start: given init centroids would "
                         "be ignored; pass k instead (or algorithm='lloyd1d' to run Lloyd from them)")
    if algorithm in ("exact1d", "lloyd1d"):
        bad = [i for i, a in enumerate(parts) if a.shape[1] != 1]
        if bad:
            raise ValueError(f"algorithm={algorithm!r} needs 1-D points (D == 1); problem {bad[0]} "
                             f"has D={parts[bad[0]].shape[1]}")
    if layout == "ragged" and sweep_ks is None:
        parts, weights, data_index = _share_repeated(parts, weights)
    probs = Problems(
        datasets=parts, weights=weights, data_index=data_index, k=ks, init=kind, init_centers=centers,
        n_init=n_init, max_iter=max_iter, tol=float(tol), seed=_resolve_seed(seed), algorithm=algorithm,
        weight_exps=None if exps is None else (exps * len(ks) if sweep_ks is not None else exps),
    )
    return probs, layout


def _share_repeated(parts, weights):
    """Problems of a ragged list that pass the very same array (and weights) share one dataset,
    so per-dataset work (Gram matrix, sort) is done once: ``kmeans([w1, w1, w2], [2, 3, 2])``."""
    if weights is None and len({id(a) for a in parts}) == len(parts):  # nothing repeated: the usual ragged batch
        return parts, None, np.arange(len(parts), dtype=np.int64)
    seen: dict = {}
    uniq, uw, index = [], [], []
    for i, a in enumerate(parts):
        key = (id(a), None if weights is None else id(weights[i]))
        if key not in seen:
            seen[key] = len(uniq)
            uniq.append(a)
            if weights is not None:
                uw.append(weights[i])
        index.append(seen[key])
    return uniq, (None if weights is None else uw), np.asarray(index, dtype=np.int64)


def _check_float32_weights(weights, backend: str) -> None:
    """NotImplementedError (an auto choice moves on to the torch backend, which weighs in float64) where a
    positive weight is below what float32 holds in full precision (``finfo.tiny``) and would read 0 or as a
    subnormal in the GPU kernels: 1e-46 beside 1, or 1 beside 1e50 (weights past 2**64 are scaled so that the
    largest is in [1, 2)), gave inertia 0 and labels unlike the cpu backend's."""
    tiny = float(np.finfo(np.float32).tiny)
    if _one_torch_device(weights):  # one synchronization for the batch
        import torch

        low = torch.stack([torch.where(w > 0, w.double(), math.inf).min() for w in weights]).cpu().numpy()
    else:
        low = np.array([np.where(a > 0, a, math.inf).min() for a in (_to_numpy(w, np.float64) for w in weights)])
    bad = np.flatnonzero(low < tiny)
    if bad.size:
        i = int(bad[0])
        largest = float(_to_numpy(weights[i], np.float64).max())
        where = "" if len(weights) == 1 else f" of problem {i}"
        raise NotImplementedError(
            f"sample_weight{where} spans more than float32's range (its smallest positive weight is "
            f"{float(low[i]) / largest:.3g} of its largest): the {backend} backend weighs in the "
            f"data's dtype; pass float64 data, or backend='torch' (which weighs in float64)")


def _convert(probs: Problems, backend: str) -> Problems:
    """The same problems with arrays in the form ``backend`` takes (numpy for cpu, torch else)."""
    ref = probs.datasets[0]
    if backend == "cpu":
        dtype = np.dtype(_dtype_name(ref))

        def conv(a):
            if type(a) is np.ndarray and a.dtype == dtype and a.flags.c_contiguous:
                return a  # already the native core's form (no call, for batches of thousands)
            return _to_numpy(a, dtype)
        convw = lambda a: _to_numpy(a, np.float64)  # noqa: E731
    else:
        import torch

        like = ref if _is_torch(ref) else torch.empty(0)
        dtype = getattr(torch, _dtype_name(ref))
        conv = lambda a: _to_torch(a, like, dtype)  # noqa: E731
        # The torch reference weighs in float64, as the cpu core does (in float32, weights spanning more than its
        # range, 1e50 beside 1, read 0); the CUDA kernels take them in the data's dtype.
        wdtype = torch.float64 if backend == "torch" else dtype
        if wdtype == torch.float32 and probs.weights is not None:
            _check_float32_weights(probs.weights, backend)
        convw = lambda a: _to_torch(a, like, wdtype)  # noqa: E731
    return Problems(
        datasets=[conv(a) for a in probs.datasets],
        weights=None if probs.weights is None else [convw(w) for w in probs.weights],
        data_index=probs.data_index, k=probs.k, init=probs.init,
        init_centers=None if probs.init_centers is None else [conv(c) for c in probs.init_centers],
        n_init=probs.n_init, max_iter=probs.max_iter, tol=probs.tol, seed=probs.seed, algorithm=probs.algorithm,
    )


def _device_of(a):
    return a.device if _is_torch(a) else "cpu"


def _format(raw: RawResult, layout: str, like, backend: str) -> KMeansResult:
    """Shape a backend's per-problem lists into the caller's layout and array type."""
    torch_out = _is_torch(like)

    def arr(a):
        if torch_out:
            return _to_torch(a, like)
        return a.detach().cpu().numpy() if _is_torch(a) else np.asarray(a)

    plain = not torch_out and all(type(c) is np.ndarray for c in raw.centroids) and all(
        type(lab) is np.ndarray for lab in raw.labels)
    cents = list(raw.centroids) if plain else [arr(c) for c in raw.centroids]
    labels = list(raw.labels) if plain else [arr(lab) for lab in raw.labels]
    inertia, n_iter, conv = arr(raw.inertia), arr(raw.n_iter), arr(raw.converged)
    if layout == "single":
        return KMeansResult(cents[0], labels[0], inertia[0], n_iter[0], conv[0], backend, raw.algorithm[0])
    if layout == "dense":
        stack = (lambda xs: __import__("torch").stack(xs)) if torch_out else np.stack
        same_k = len({tuple(c.shape) for c in cents}) == 1
        return KMeansResult(stack(cents) if same_k else cents, stack(labels), inertia, n_iter, conv, backend,
                            list(raw.algorithm))
    return KMeansResult(cents, labels, inertia, n_iter, conv, backend, list(raw.algorithm))


def _run(probs: Problems, backend, like) -> tuple[str, RawResult]:
    return _registry.run_with_fallback("kmeans", backend, _device_of(like),
                                       lambda name, impl: impl(_convert(probs, name)))


def far_shift(mean, var):
    """The centering rule every backend applies (the cpu core's ``prepare`` is its C++ twin): a dataset
    farther from the origin than its spread, ``|mean|^2 >`` its summed per-feature variances, is
    clustered as ``x - mean``.  ``mean``, ``var``: ``[..., D]`` float64 tensors.  Returns ``far``
    (``[...]`` bool) and the shift (``mean`` where far, else +0.0)."""
    import torch

    far = (mean * mean).sum(-1) > var.sum(-1)
    return far, torch.where(far.unsqueeze(-1), mean, torch.zeros_like(mean))


# Greedy k-means++'s local trials: scikit-learn's 2 + int(ln k), capped here as the cpu core caps it (the cap is
# reached at k > 1.2 million); the GPU and torch backends read this.
KPP_MAX_TRIALS = 16


def kpp_trials(k: int) -> int:
    """Local trials of greedy k-means++ for ``k`` clusters: ``min(16, 2 + int(ln k))``."""
    return min(KPP_MAX_TRIALS, 2 + int(math.log(k)))


# Summed per-feature variances below which a dataset is clustered scaled by a power of two (the cpu core's
# ``Prepared::scale_exp``): float32 squares reach FLT_MIN near 2**-63, and a dataset of 1e-20 or less read as one
# cluster.  The scaling is exact, so the iterates are those of the data at its own scale.
TINY_VARIANCE = {"float32": 2.0 ** -60, "float64": 2.0 ** -500}


def tiny_scale(x, var_sum):
    """Every backend's rule for data of tiny spread: ``x`` ``[B, N, D]`` (the data the solver sees, centered
    where it is), ``var_sum`` ``[B]`` float64.  Returns ``(x', e)``: ``x`` times ``2**e[b]`` per problem, ``e``
    (int64 ``[B]``) bringing the largest |value| into [0.5, 1) where ``var_sum`` is below
    :data:`TINY_VARIANCE` and the data not all zero, else 0 (``x`` itself when every ``e`` is 0)."""
    import torch

    e = tiny_exponents(var_sum, x.abs().amax((1, 2)).double(), _name_of_dtype(x.dtype))
    if e is None:
        return x, torch.zeros_like(var_sum, dtype=torch.int64)
    return times_pow2(x, e), e


def tiny_exponents(var_sum, amax, dtype_name: str):
    """The exponents of the tiny-spread rule: per dataset, ``-frexp(amax)`` (its largest |value| times ``2**e`` in
    [0.5, 1)) where the summed variances ``var_sum`` lie below :data:`TINY_VARIANCE` and ``amax > 0``, else 0;
    None where every one is 0 (one host synchronization).  Float64 tensors in, int64 out."""
    import torch

    tiny = (var_sum < TINY_VARIANCE[dtype_name]) & (amax > 0)
    if not bool(tiny.any()):
        return None
    return torch.where(tiny, -torch.frexp(amax).exponent.long(), 0)


def times_pow2(a, e):
    """``a * 2**e[b]`` for ``a`` ``[B, ...]`` (in float64, two factors: ``2**e`` alone may overflow), in ``a``'s
    dtype: exact unless the result is subnormal."""
    h = e.div(2, rounding_mode="floor")
    shape = (-1,) + (1,) * (a.dim() - 1)
    f1 = (2.0 ** h.double()).view(shape)
    f2 = (2.0 ** (e - h).double()).view(shape)
    return (a.double() * f1 * f2).to(a.dtype)


# The mantissa bits the repair's distance key clears (``far_first``); the cpu core's ``round_low_bits``
# (csrc/cpu/kmeans/common.h) and the CUDA kernel's ``kc_round_low_bits`` clear the same, which
# tests/kmeans/test_cuda_sources.py checks in their sources.
REPAIR_KEY_LOW_BITS = 20


def _row_key(row) -> bytes:
    return (np.asarray(row, dtype=np.float64) + 0.0).tobytes()  # -0 read as +0, as == compares


class CopyClusters:
    """The repair's rule against stacked centers (the cpu core's ``relocate`` is its C++ twin): a point whose
    copies make up a whole cluster -- its own, whose center it becomes once it leaves, or another, whose center
    it is -- is not taken for an empty one.  ``X`` ``[n, d]``, ``w`` ``[n]``, ``lab`` ``[n]`` numpy; members of
    positive weight count, a single one too."""

    def __init__(self, X, w, lab, k: int):
        self.X, self.w, self.lab = np.asarray(X), np.asarray(w), np.asarray(lab)
        self.taken = np.zeros(self.lab.shape[0], dtype=bool)
        self.copies = np.zeros(k, dtype=bool)
        self.keys: set = set()
        idx = np.nonzero(self.w > 0)[0]
        if idx.size == 0:
            return
        order = idx[np.argsort(self.lab[idx], kind="stable")]
        labs = self.lab[order]
        starts = np.r_[0, np.nonzero(np.diff(labs))[0] + 1]
        firsts = order[starts]
        rep = np.repeat(firsts, np.diff(np.r_[starts, order.size]))
        same = np.logical_and.reduceat((self.X[order] == self.X[rep]).all(1), starts)
        for c, f, s in zip(labs[starts], firsts, same):
            if s:
                self.copies[c] = True
                self.keys.add(_row_key(self.X[f]))

    def blocks(self, i: int) -> bool:
        return _row_key(self.X[i]) in self.keys

    def take(self, i: int, src: int) -> None:
        """Point ``i`` left cluster ``src``: what stays may be copies of one point now."""
        self.taken[i] = True
        if not self.copies[src]:
            m = np.nonzero((self.lab == src) & ~self.taken & (self.w > 0))[0]
            if m.size and bool((self.X[m] == self.X[m[0]]).all()):
                self.copies[src] = True
                self.keys.add(_row_key(self.X[m[0]]))


def far_first(d2, cand) -> list[int]:
    """The order in which the empty-cluster repair offers points (the cpu core's ``relocate`` is its C++
    twin): the point indices ``cand`` by decreasing ``d2[i]`` (squared distance to the point's own center),
    distances equal to about 32 bits (the low 20 of the 52 mantissa bits cleared) counting as a tie that the
    lower index wins.  Equal distances in exact arithmetic (the two members of a two-point cluster) then order
    alike in every backend, whatever the last bits of their centers."""
    cand = np.asarray(cand, dtype=np.int64)
    if cand.size == 0:
        return []
    low = np.uint64((1 << REPAIR_KEY_LOW_BITS) - 1)
    key = (np.asarray(d2, dtype=np.float64)[cand].view(np.uint64) & ~low).view(np.float64)
    return cand[np.lexsort((cand, -key))].tolist()


def kmeans(x, k=None, *, init="k-means++", n_init: int = 1, max_iter: int = 300, tol: float = 1e-4,
           sample_weight=None, seed=None, backend: str = "auto", algorithm: str = "auto") -> KMeansResult:
    """Cluster one problem, a dense batch or a ragged batch of problems with Lloyd's k-means.

    Args:
        x: ``[N, D]`` (one problem), ``[B, N, D]`` (a batch) or a list of ``[N_i, D_i]`` arrays
            (a ragged batch); numpy arrays or torch tensors, float32 or float64.
        k: clusters per problem: an int, or one int per problem.  May be omitted when ``init``
            gives the centroids.
        init: ``"k-means++"`` (greedy, ``2 + int(ln k)`` local trials, as scikit-learn; at most 16, reached at
            k > 1.2 million), ``"random"`` (k distinct points drawn by weight), or the initial centroids:
            ``[k, D]``, ``[B, k, D]`` or a list of ``[k_i, D_i]``, of a float or integer dtype (solved in
            ``x``'s dtype).
        n_init: runs per problem from different seeds; the one of lowest inertia is returned.
        max_iter: Lloyd iterations at most.
        tol: relative tolerance: a problem stops when the squared centroid shift, summed over
            clusters, is ``<= tol * mean(var(x, axis=0))``, or when no label changed.
            (Data farther from the origin than its spread, ``|mean(x, axis=0)|^2 > sum(var(x, axis=0))``,
            is clustered centered, as scikit-learn clusters all data, so an offset costs no precision;
            centroids come back in ``x``'s coordinates.  Every backend does this.  Data of tiny spread, summed
            variances below 2**-60 in float32 or 2**-500 in float64, is clustered times a power of two, exactly:
            float32 kernels of 1e-20 had squared distances of 0 and came back as one cluster.  Every backend does
            this too.)
        sample_weight: ``[N]`` (``[B, N]`` or a list for batches) non-negative weights.  The cuda and triton
            backends weigh in the data's dtype: for float32 data they refuse a positive weight float32 cannot
            hold (below about 1.2e-38, once weights past 2**64 are scaled toward 1); "auto" then runs the torch one.
        seed: int in ``[0, 2**63 - 1]`` for a reproducible run (per backend), a ``numpy.random.Generator``
            (one integer is drawn from it), or ``None``.  On the cpu, cuda and triton
            backends every problem of a batch draws from the same stream, so a problem gets the
            same result in a batch as alone (the torch reference draws batch-wide).  The seeding computes its
            distances as the solver does (Gram-matrix or direct), so under another ``algorithm``, or for data
            scaled by other than a power of two, a near tie between two candidates' potentials can seed
            differently from the same seed.
        backend: ``"auto"``, ``"cpu"``, ``"torch"``, ``"cuda"``, ``"triton"`` (env
            ``KCENGINE_BACKEND`` overrides ``"auto"``).
        algorithm: ``"auto"`` (exact Lloyd with the fastest exact method per problem: Gram-matrix
            distances when D is large against N; for k >= 20 top-m bounds (exact bounds for each
            point's 2 nearest competitors up to 8192 points, 4 above, and one for all others) when D <= 16, else Yinyang group
            bounds; Hamerly bounds for k < 20; sorted 1-D sweeps when D == 1; on the cpu backend,
            for k == N points, all distinct and of positive weight, with a k-means++ or random init,
            each point as its own centroid, reported as ``"distinct"`` (not a name ``algorithm``
            takes): the one clustering of inertia 0, which every seeding reaches in exact arithmetic,
            returned exactly where a solver's float means may miss it by an ulp), one of those by name
            (``"lloyd"`` = plain Lloyd, ``"hamerly"``, ``"yinyang"``, ``"topm"``, ``"gram"``,
            ``"lloyd1d"``; ``"gram"`` runs Hamerly where the N x N Gram matrix would pass 512 MiB, N >
            8192, as ``res.algorithm`` says), or ``"exact1d"``: the globally optimal 1-D clustering (D == 1
            and ``k * (N + 1) <= 2**29`` only, for its table of splits; it takes no given ``init`` and runs no
            iterations: ``max_iter`` and ``tol`` do not apply,
            ``n_iter`` is 0; its interval costs are exact to ~1e-16 of the data's spread about its mean, and
            to ~1e-32 in double-double where that could make it miss the optimum, as for clusters a
            millionth of the data's range wide).  The torch, cuda and triton backends run plain Lloyd for
            every name but ``"exact1d"``, which they refuse (``res.algorithm`` says ``"lloyd"``).
            ``"topm"`` hands float32 data beyond 1e18 in magnitude to Yinyang (its float distances
            would overflow).  The methods walk Lloyd's iterates up to rounding.  Each computes distances
            its own way -- plain Lloyd and Hamerly (and the torch backend) in the dot form
            ``|x|^2 - 2 x.c + |c|^2`` in the data's precision, as scikit-learn does, with a rounding of
            about eps * |x|^2 (Yinyang's full assignments too); top-m, Yinyang's bound checks and the 1-D
            methods as double-precision differences -- and
            the generic, AVX2 and AVX-512 builds sum in different orders.  So a point whose two nearest
            centers are equally far to within that rounding (in float32 about 1e-7 of |x|^2; in float64
            about 1e-16, centers within some 1e-8 |x| of each other) may go to either, and the runs part
            from there: in fuzzing, a few in a thousand float32 problems of up to 3000 points (6 in
            2,000); in float64 one of 10,000 1-2-D problems with k >= N/2 (two points 2e-8 apart), none in
            the 36,000 examples of a long trajectory fuzz.

    Empty clusters: an M-step that leaves a cluster empty moves it onto a far point, farthest from its old
    center first, as scikit-learn does; but kcengine takes only points of positive weight, at positive
    distance, whose cluster keeps another member, never two copies of one point, and never a point whose
    copies make up a whole cluster, so that k distinct centroids come back whenever the data has k distinct
    points of positive weight (the cuda backend's fused kernel, which runs problems small enough for one
    thread block's shared memory, does not have that last rule yet).  scikit-learn has none of these rules (it
    can take a singleton's only member, a zero-weight point or a second copy), so where a run repairs, its
    iterates can differ from scikit-learn's; without a repair they are the same.  A final E-step follows any
    iteration that repaired, so labels always match the returned centroids.

    Returns:
        :class:`KMeansResult` with centroids, labels, inertia, n_iter, converged per problem,
        shaped like ``x`` (see its docstring) and of ``x``'s array type and device.

    Raises:
        ValueError: bad input (the message names the argument and the offending value), including data or
            given centroids holding NaN/Inf or values so large that squared distances overflow the dtype
            (``|x| >= sqrt(finfo.max / (16 D))``: about 3.4e153 / sqrt(D) in float64, 4.6e18 / sqrt(D) in float32).
        RuntimeError: an explicitly requested backend cannot run here.
    """
    probs, layout = _build(x, k, init=init, n_init=n_init, max_iter=max_iter, tol=tol,
                           sample_weight=sample_weight, seed=seed, algorithm=algorithm)
    like = probs.datasets[0]
    name, raw = _run(probs, backend, like)
    raw = _unscale_inertia(raw, probs.weight_exps)
    return _format(raw, layout, like, name)


def kmeans_sweep(x, ks: Iterable[int], *, init="k-means++", n_init: int = 1, max_iter: int = 300,
                 tol: float = 1e-4, sample_weight=None, seed=None, backend: str = "auto",
                 algorithm: str = "auto") -> list[KMeansResult]:
    """Cluster one ``[N, D]`` dataset for every k in ``ks`` in one batched call.

    Equivalent to ``[kmeans(x, k, seed=seed, ...) for k in ks]`` (same seed, same results on the cpu, cuda
    and triton backends; the torch reference draws its random numbers batch-wide, so there a sweep's seeding
    differs from the separate calls') but solved as one batch: the data is shared, not copied, and per-dataset
    work (the Gram matrix of high-dimensional points, sorting of 1-D points) is done once for all k.

    Returns:
        One single-problem :class:`KMeansResult` per entry of ``ks``, in order.
    """
    if isinstance(ks, (str, bytes)) or not isinstance(ks, abc.Iterable) or (_is_torch(ks) and ks.dim() != 1) or \
            (isinstance(ks, np.ndarray) and ks.ndim != 1):
        raise ValueError(f"ks must be a sequence of ints (e.g. range(2, 17)), got {type(ks).__name__} "
                         f"{ks!r:.60}; for one k call kmeans(x, k)")
    ks = list(ks)
    if len(ks) == 0:
        raise ValueError("ks is empty: pass at least one k")
    if not isinstance(init, str):
        raise ValueError("kmeans_sweep takes init='k-means++' or 'random'; given centroids fix k, use kmeans()")
    parts, layout = _split_input(x)
    if layout != "single":
        raise ValueError(f"kmeans_sweep takes one [N, D] dataset, got {layout} input")
    probs, _ = _build(x, None, init=init, n_init=n_init, max_iter=max_iter, tol=tol, sample_weight=sample_weight,
                      seed=seed, algorithm=algorithm, sweep_ks=ks)
    like = probs.datasets[0]
    name, raw = _run(probs, backend, like)
    raw = _unscale_inertia(raw, probs.weight_exps)
    out = []
    for i in range(len(ks)):
        one = RawResult([raw.centroids[i]], [raw.labels[i]], raw.inertia[i:i + 1], raw.n_iter[i:i + 1],
                        raw.converged[i:i + 1], [raw.algorithm[i]])
        out.append(_format(one, "single", like, name))
    return out
