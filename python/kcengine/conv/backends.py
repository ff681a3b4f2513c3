"""The ``torch`` and ``cpu`` implementations of :func:`kcengine.indexed_conv2d`.

Both receive arguments already validated by ``indexed_conv2d`` (stride/padding/dilation as pairs,
groups == 1) and share one signature::

    impl(x, codebook, index, bias, stride, padding, dilation, granularity, scale, shift, relu, residual) -> y

* ``torch``: plain torch ops on any device; autograd-native.  Filter: ``conv2d(x, codebook)`` then
  ``index_select`` on channels.  Kernel, outside autograd: a grouped (depthwise, channel multiplier M)
  conv with the codebook kernels each input channel uses, then the gather-sum as a sparse
  ``[C_out, P]`` one-hot matrix times the ``[P, N*H*W]`` maps.
* ``cpu``: filter: the same K-filter conv (torch/oneDNN), then the C++ core's one-pass gather (+ bias,
  BN affine, residual, ReLU).  In inference on float32 channels-last input, a module's K-filter conv
  runs on a codebook reordered once into oneDNN's blocked layout (:class:`PackedCodebook`) instead of
  per call (half the conv time at batch 1 for resnet18's deep layers; same values), except for small
  batch-1 convs (CIFAR's), where ``F.conv2d``'s own im2col path is faster (:func:`_im2col_is_faster`).  Kernel,
  inference: one native direct kernel (``conv_kernel_direct``:
  per pixel tile, each input channel's M codebook responses in registers, scattered into the C_out
  accumulators; the depthwise maps never exist in memory), channels-last output, where it does less work
  than a dense conv or the output is small (M at most 3/4 of C_out and kernels larger than 1x1, or fewer
  than 32,768 output values: :func:`direct_kernel_pays`);
  elsewhere the dense weight gathered once per codebook version, its conv (reordered once, as above),
  and the native gather as the epilogue alone, in ``x``'s memory format.  Float32/float64
  only (other dtypes take the torch path).  Filter, under autograd: the native gather is wrapped in a
  Function whose backward re-runs the torch reference of that step (same maths, autograd-derived) —
  exact weight-sharing gradients.  Outside autograd, native outputs of 1 MiB and more come from the
  core's buffer cache (:func:`output_cache_info`), so a steady inference loop writes into memory that is
  already mapped.
* Kernel granularity under autograd (training), in every backend (torch, cpu, triton): the dense weight
  ``codebook[index]`` and one dense conv (:func:`kernel_dense_conv`), far cheaper in time and memory
  than the depthwise maps and their gather-sum (which stay the torch and triton backends' inference
  path; the cpu backend infers through its direct kernel).
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .functional import _fold_bias, _torch_epilogue, dense_weight, output_hw

__all__ = ["torch_indexed_conv2d", "cpu_indexed_conv2d", "KernelPlan", "kernel_plan"]


# ------------------------------------------------------------------------------------------------
# Kernel granularity: which codebook kernels each input channel needs.
INFERENCE_TENSOR = "inference"  # tensor_version's value for tensors made under torch.inference_mode


def tensor_version(t: torch.Tensor):
    """``t``'s in-place version counter (part of every cache key derived from ``t``), or
    ``INFERENCE_TENSOR`` for a tensor made under ``torch.inference_mode``, which has none.  Such a tensor
    can only be written in place inside inference mode, and torch counts none of those writes: like a
    write through ``.data``, it needs ``ClusteredConv2d.invalidate_cache()`` (a model built or loaded
    under inference mode would otherwise rebuild its caches on every call)."""
    try:
        return t._version
    except RuntimeError:
        return INFERENCE_TENSOR


# ------------------------------------------------------------------------------------------------
@dataclass
class KernelPlan:
    """How a kernel-granularity layer is computed.

    ``slots [C_in, M]``: codebook id of each depthwise map of input channel ``i`` (``M`` = most
    distinct kernels any input channel uses; shorter rows repeat their first id as padding).
    ``pair [C_out, C_in]`` (int64): the map ``p[:, pair[o, i]]`` (``= i*M + slot``) that output ``o``
    takes from input channel ``i``.  ``P = C_in * M`` maps in all.
    """

    slots: torch.Tensor
    pair: torch.Tensor
    m: int
    _cache: dict = field(default_factory=dict, repr=False)

    def slot_table(self) -> torch.Tensor:
        """int32 ``[C_in, C_out]``: the slot (``< M``) output ``o`` takes from input channel ``i`` (built for
        :meth:`direct_pack`, whose pack keeps its own copy)."""
        c_in = self.pair.shape[1]
        offs = torch.arange(c_in, device=self.pair.device)[None, :] * self.m
        return (self.pair - offs).t().contiguous().to(torch.int32)

    def tap_weights(self, codebook: torch.Tensor) -> torch.Tensor:
        """``[C_in, kh*kw, M]``: ``wt[i, t, j] = codebook[slots[i, j]].flatten()[t]``."""
        c_in, m = self.slots.shape
        wt = codebook.detach().index_select(0, self.slots.reshape(-1)).reshape(c_in, m, -1).transpose(1, 2)
        return wt.contiguous()

    def direct_pack(self, codebook: torch.Tensor):
        """The native ``conv_kernel_direct``'s codebook side (tap weights and slot table in the layout its
        tiles read), cached per codebook version: rebuilt per call it cost a quarter of a batch-1 call."""
        key = (codebook.data_ptr(), tensor_version(codebook), codebook.dtype, codebook.device)
        hit = self._cache.get("direct_pack")
        if hit is not None and hit[0] == key:
            return hit[1]
        pack = _core().conv_kernel_pack(self.tap_weights(codebook).numpy(), self.slot_table().numpy())
        self._cache["direct_pack"] = (key, pack, codebook)  # (kept: its address is not reused while cached)
        return pack

    def dense(self, codebook: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """:func:`~kcengine.conv.functional.dense_weight` of ``codebook`` and ``index`` (the index this plan was
        built from), for layers the direct kernel does not pay for (:func:`direct_kernel_pays`); cached per
        codebook version, as :meth:`direct_pack`."""
        key = (codebook.data_ptr(), tensor_version(codebook), codebook.dtype, codebook.device)
        hit = self._cache.get("dense")
        if hit is not None and hit[0] == key:
            return hit[1]
        w = dense_weight(codebook.detach(), index, "kernel")
        self._cache["dense"] = (key, w, codebook)  # (kept: its address is not reused while cached)
        return w

    def identity32(self) -> torch.Tensor:
        """int32 ``arange(C_out)``: the native gather as the epilogue alone, after a dense conv."""
        hit = self._cache.get("identity32")
        if hit is None:
            hit = self._cache["identity32"] = torch.arange(self.pair.shape[0], dtype=torch.int32)
        return hit

    def __getstate__(self):  # copies and pickles leave the caches behind (rebuilt on first use)
        state = self.__dict__.copy()
        state["_cache"] = {}  # the direct pack, the dense weight, the identity index
        return state

    @property
    def n_maps(self) -> int:
        return int(self.slots.numel())


_DENSE_MIN_OUTPUT = 1 << 15  # output values (N * C_out * H_out * W_out) below which the direct kernel always runs


def _takes_direct(x, codebook, plan: KernelPlan, stride, padding, dilation) -> bool:
    """:func:`direct_kernel_pays` for this call of a kernel-granularity layer."""
    c_out = plan.pair.shape[0]
    ho, wo = output_hw(x.shape, codebook.shape[-2:], stride, padding, dilation)
    return direct_kernel_pays(plan.m, c_out, *codebook.shape[-2:], x.shape[0] * c_out * ho * wo)


def direct_kernel_pays(m: int, c_out: int, kh: int, kw: int, out_values: int) -> bool:
    """Whether inference at kernel granularity runs the native direct kernel (per input channel its ``m``
    distinct codebook responses, each scattered into the ``c_out`` outputs that use it) rather than one dense
    conv with the weight gathered from the codebook, then the native epilogue.

    Measured eager per layer (fused, channels-last; resnet18 at 224x224, batch 1 and 8; resnet20 at 32x32,
    batch 1 and 64; K from 8 to 256 a layer), the direct kernel's time over the dense path's:
    - 3x3 with ``m`` at most 1/2 of ``c_out``: 0.34-0.99 (1.18 on resnet20's 16-channel layers at batch 64);
    - 3x3 from 0.69 to 0.75: 0.62-1.32 (mostly below 1 at batch 1, above at larger batches);
    - 3x3 above 0.8: 1.11-1.33 on resnet18 and on resnet20 at batch 64;
    - 1x1 (resnet18's downsampling convs), any ``m``: 0.95-2.85, where the dense conv is one GEMM;
    - resnet20 at batch 1 (4,096-16,384 output values), any ``m``: 0.54-0.77: there the dense path's two calls
      cost more than the work it saves.
    So the direct kernel runs below 32,768 output values, and above it up to ``m = 3/4 c_out`` and not for
    1x1 kernels."""
    return out_values < _DENSE_MIN_OUTPUT or (kh * kw > 1 and 4 * m <= 3 * c_out)


def kernel_plan(index: torch.Tensor, k: int) -> KernelPlan:
    """Build the :class:`KernelPlan` of a ``[C_out, C_in]`` index into a codebook of ``k`` kernels.

    Each input channel's slot list holds the kernels its column of the index uses, ascending (unused slots
    repeat the channel's first); ``pair[o, i]`` is the slot of ``index[o, i]`` in channel i's list.  Built
    from the sorted distinct (channel, kernel) pairs: memory O(C_out C_in), whatever ``k`` (a [C_in, k]
    table was 8 bytes per channel and centroid: gigabytes for 1x1 convs clustered at k = C_out C_in / 2)."""
    idx = index.long()
    c_out, c_in = idx.shape
    dev = idx.device
    chan = torch.arange(c_in, device=dev)
    uniq, inverse = torch.unique((chan[None, :] * k + idx).reshape(-1), sorted=True, return_inverse=True)
    ch, kern = uniq // k, uniq % k
    counts = torch.bincount(ch, minlength=c_in)
    m = int(counts.max())
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(uniq.numel(), device=dev) - start[ch]  # each distinct pair's slot in its channel's list
    slots = kern[start][:, None].repeat(1, m)  # every channel uses at least one kernel (C_out >= 1)
    slots[ch, pos] = kern
    pair = chan[None, :] * m + pos[inverse].reshape(c_out, c_in)
    return KernelPlan(slots=slots, pair=pair.contiguous(), m=m)


def _depthwise_maps(x, codebook, plan: KernelPlan, stride, padding, dilation):
    """p [N, C_in*M, H_out, W_out]: every input channel convolved with each kernel of its slot list."""
    c_in = x.shape[1]
    w = codebook.index_select(0, plan.slots.reshape(-1)).unsqueeze(1)  # [C_in*M, 1, kh, kw]
    return F.conv2d(x, w, None, stride, padding, dilation, c_in)


def kernel_dense_conv(x, codebook, index, stride, padding, dilation):
    """Kernel granularity under autograd (training): the dense weight ``codebook[index]`` and one dense conv.

    The weight (``C_out * C_in * kh * kw`` values) is small next to the depthwise maps
    (``N * C_in * M * H_out * W_out``) that the inference paths compute and autograd would keep, and the
    backward is two dense convs plus ``index_select``'s backward, which sums the gradient of every kernel
    into its centroid: weight sharing, exact.  One SGD step of resnet20 clustered at k = C_out/2 per layer
    (kernel granularity, batch 64, two threads) took 4.7 s through the depthwise maps and the sparse
    gather-sum, 28x a dense step (0.17 s); this way 0.12 s."""
    return F.conv2d(x, dense_weight(codebook, index, "kernel"), None, stride, padding, dilation)


def torch_gather_sum(p: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """y[:, o] = sum_i p[:, pair[o, i]] as a sparse one-hot [C_out, P] matrix times the maps."""
    n, n_maps, h, w = p.shape
    c_out, c_in = pair.shape
    rows = torch.arange(c_out, device=p.device).repeat_interleave(c_in)
    sel = torch.sparse_coo_tensor(torch.stack([rows, pair.reshape(-1).long()]),
                                  torch.ones(c_out * c_in, dtype=p.dtype, device=p.device),
                                  (c_out, n_maps), check_invariants=False).coalesce()
    flat = p.permute(1, 0, 2, 3).reshape(n_maps, n * h * w)
    return torch.sparse.mm(sel, flat).reshape(c_out, n, h, w).permute(1, 0, 2, 3)


# ------------------------------------------------------------------------------------------------
# torch backend
# ------------------------------------------------------------------------------------------------
def torch_indexed_conv2d(x, codebook, index, bias, stride, padding, dilation, granularity, scale, shift, relu,
                         residual, plan: KernelPlan | None = None):
    if granularity == "filter":
        u = F.conv2d(x, codebook, None, stride, padding, dilation)
        y = u.index_select(1, index.long().reshape(-1))
    elif _needs_grad(x, codebook, bias, scale, shift, residual):
        y = kernel_dense_conv(x, codebook, index, stride, padding, dilation)
    else:
        plan = plan if plan is not None else kernel_plan(index, codebook.shape[0])
        # Half dtypes: the maps and their sums in float32, rounded once at the end, as F.conv2d accumulates
        # (summed in float16/bfloat16, the C_in maps came out 3-6x further from the exact conv than F.conv2d)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        p = _depthwise_maps(x.to(acc), codebook.to(acc), plan, stride, padding, dilation)
        y = torch_gather_sum(p, plan.pair).to(x.dtype)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return _torch_epilogue(y, scale, shift, relu, residual)


# ------------------------------------------------------------------------------------------------
# cpu backend (C++ core)
# ------------------------------------------------------------------------------------------------
_NATIVE_DTYPES = (torch.float32, torch.float64)


_CORE = None


def _core():
    global _CORE
    if _CORE is None:
        from .. import _core

        _CORE = _core
    return _CORE


def _np(t):
    """A tensor's numpy view (contiguous; a numpy array or None passes through)."""
    if t is None or isinstance(t, np.ndarray):
        return t
    return t.detach().contiguous().numpy()


# Native epilogues run single-threaded below this many output elements, where starting a parallel region
# costs more than the pass.  Measured on the idle 2-core machine (the gather of resnet18's layers): two
# threads were 1.5x faster at 200k elements (batch 1, 64 x 56 x 56) and ~2x from 0.8M up.  (Under heavy
# load from other jobs one thread can win: a 2-thread region waits whenever either thread is descheduled.)
_PARALLEL_MIN_ELEMS = 1 << 17


def _threads(numel: int) -> int:
    return 1 if numel < _PARALLEL_MIN_ELEMS else 0  # 0 = all OpenMP threads


# Native outputs of at least this many bytes come from the core's buffer cache (csrc/cpu/buffers.cpp)
# when the call is not recorded by autograd: blocks stay mapped between calls, so a steady inference
# loop pays no first-touch page faults on them (glibc malloc hands a large tensor fresh pages or not,
# depending on what the process freed before: 8 ms of a 14 ms layer on resnet18's layer1 at batch 32).
# Smaller ones come from malloc's heap, already mapped.
_POOL_MIN_BYTES = 1 << 20
_pool_limit: int | None = None  # bytes; None until the first pooled request reads KCENGINE_OUTPUT_CACHE_MB


def only_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is channels-last and not also NCHW-contiguous (a tensor both layouts describe, such as one of
    a 1 x 1 image, counts as NCHW): the input format the native and Triton kernels keep in their output."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _empty_out(shape, dtype, channels_last: bool, pooled: bool = True) -> torch.Tensor:
    """An uninitialized output tensor (channels-last or contiguous), from the buffer cache where it applies."""
    # (the limit is read by the first output, whatever its size: a bad KCENGINE_OUTPUT_CACHE_MB was named only
    # once an output of 1 MiB came, and smaller models never saw it)
    limit = _pool_limit if _pool_limit is not None else _cache_limit()
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if pooled and nbytes >= _POOL_MIN_BYTES and dtype in _NATIVE_DTYPES:
        if limit > 0:
            np_dtype = "float64" if dtype == torch.float64 else "float32"
            return torch.from_numpy(_core().pooled_empty(list(shape), np_dtype, channels_last))
    if channels_last:
        return torch.empty_permuted(shape, (0, 2, 3, 1), dtype=dtype)
    return torch.empty(shape, dtype=dtype)


_MAX_CACHE_MIB = 1 << 30  # 1 PiB: any real limit; keeps the byte count inside int64


def _cache_limit() -> int:
    """The cache's limit in bytes, read from KCENGINE_OUTPUT_CACHE_MB on first use."""
    if _pool_limit is None:
        _set_limit_bytes(_env_cache_bytes())
    return _pool_limit


def _env_cache_bytes() -> int:
    raw = os.environ.get("KCENGINE_OUTPUT_CACHE_MB", "512")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"KCENGINE_OUTPUT_CACHE_MB must be a number of MiB (0 = off), got {raw!r}") from None
    if not 0 <= mb <= _MAX_CACHE_MIB:  # also NaN
        raise ValueError(f"KCENGINE_OUTPUT_CACHE_MB must be between 0 and {_MAX_CACHE_MIB} MiB, got {raw!r}")
    return int(mb * (1 << 20))


def output_cache_info() -> dict:
    """The native output-buffer cache: ``cached_bytes`` / ``cached_blocks`` (free blocks kept mapped),
    ``limit_bytes``, ``hits`` / ``misses`` (requests served from it or newly allocated).

    The ``cpu`` backend's float32/float64 outputs of 1 MiB and more, computed outside autograd, come
    from this cache: a block returns to it when the last tensor sharing its memory is freed and serves
    the next output of the same size without page faults.  Such an output is an ordinary tensor except
    that its storage is not resizable (``resize_`` to a larger size raises, as for any tensor from
    ``torch.from_numpy``).  The limit is ``KCENGINE_OUTPUT_CACHE_MB`` (default 512; 0 turns the cache
    off) or :func:`set_output_cache_limit`; beyond it the oldest free blocks are freed first, and
    :func:`empty_output_cache` frees them all."""
    _cache_limit()
    return dict(_core().pool_stats())


def set_output_cache_limit(mib: float) -> None:
    """Keep at most ``mib`` MiB of free output blocks (0 turns the cache off); frees blocks beyond it."""
    if isinstance(mib, bool) or not isinstance(mib, numbers.Real) or not 0 <= mib <= _MAX_CACHE_MIB:
        raise ValueError(f"mib must be a number between 0 and {_MAX_CACHE_MIB}, got {mib!r}")
    _set_limit_bytes(int(mib * (1 << 20)))


def _set_limit_bytes(limit: int) -> None:
    """The native cache's limit and its Python mirror (read on every pooled request without a native call)."""
    global _pool_limit
    _core().pool_set_limit(limit)
    _pool_limit = limit


def empty_output_cache() -> int:
    """Frees every kept output block; returns the bytes freed (live outputs are untouched)."""
    return int(_core().pool_release())


def _rows(t: torch.Tensor, c: int):
    """A channels-last ``[N, C, H, W]`` tensor as its ``[N*H*W, C]`` numpy view (``view``: never a copy)."""
    return t.permute(0, 2, 3, 1).view(-1, c).numpy()


def _native_gather(u, index32, scale, shift, residual, relu, pooled=True):
    """One pass: out = act(u[:, index] * scale + shift + residual), keeping u's memory format.  ``index32``,
    ``scale`` and ``shift`` are tensors or their numpy views (:class:`FilterInferenceCall`)."""
    n, k, h, w = u.shape
    c_out = index32.shape[0]
    u = u.detach()
    index32, scale, shift = _np(index32), _np(scale), _np(shift)
    if only_channels_last(u):
        out = _empty_out((n, c_out, h, w), u.dtype, True, pooled)
        res = None
        if residual is not None:
            res = _rows(residual.detach().contiguous(memory_format=torch.channels_last), c_out)
        _core().conv_gather_epilogue(_rows(u, k), index32, scale, shift, res, relu, _rows(out, c_out),
                                     _threads(out.numel()))
        return out
    out = _empty_out((n, c_out, h, w), u.dtype, False, pooled)
    res = None if residual is None else residual.detach().contiguous().reshape(n, c_out, h * w).numpy()
    _core().conv_gather_epilogue(u.contiguous().reshape(n, k, h * w).numpy(), index32, scale, shift, res, relu,
                                 out.reshape(n, c_out, h * w).numpy(), _threads(out.numel()))
    return out


def _ref_gather(u, index, scale, shift, residual, relu):
    return _torch_epilogue(u.index_select(1, index.long()), scale, shift, relu, residual)


class _NativeEpilogue(torch.autograd.Function):
    """Native forward of the filter-granularity gather epilogue; backward via the torch reference.  (Kernel
    granularity never gets here under autograd: it trains through :func:`kernel_dense_conv`.  The triton
    backend subclasses this for its forward, gather and gather-sum alike; only a gather is ever recorded.)"""

    @staticmethod
    def forward(ctx, kind, src, index32, scale, shift, residual, relu):
        ctx.kind, ctx.relu = kind, relu
        ctx.save_for_backward(src, index32, scale, shift, residual)
        # autograd's outputs come from torch's allocator (a cached block is a numpy-owned storage)
        return _native_gather(src, index32, scale, shift, residual, relu, pooled=False)

    @staticmethod
    def backward(ctx, grad):
        if ctx.kind != "gather":  # pragma: no cover - kernel granularity trains through kernel_dense_conv
            raise RuntimeError(f"no backward for the {ctx.kind} epilogue")
        src, index32, scale, shift, residual = ctx.saved_tensors
        ref = _ref_gather
        # Grad mode is on here only in a backward with create_graph=True (a double backward: gradient
        # penalties, input-gradient regularizers): the gradients are then built as functions of the saved
        # tensors themselves, so they differentiate further; otherwise of detached copies.
        create_graph = torch.is_grad_enabled()
        leaves = [t if create_graph or t is None else t.detach().requires_grad_(True)
                  for t in (src, scale, shift, residual)]
        with torch.enable_grad():
            y = ref(leaves[0], index32, leaves[1], leaves[2], leaves[3], ctx.relu)
            want = [t for t, need in zip(leaves, (ctx.needs_input_grad[1], ctx.needs_input_grad[3],
                                                  ctx.needs_input_grad[4], ctx.needs_input_grad[5]))
                    if t is not None and need]
            grads = iter(torch.autograd.grad(y, want, grad, create_graph=create_graph) if want else ())
        out = []
        for t, need in zip(leaves, (ctx.needs_input_grad[1], ctx.needs_input_grad[3], ctx.needs_input_grad[4],
                                    ctx.needs_input_grad[5])):
            out.append(next(grads) if (t is not None and need) else None)
        return None, out[0], None, out[1], out[2], out[3], None


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


class PackedCodebook:
    """A filter codebook reordered once into oneDNN's blocked weight layout, for inference.

    ``F.conv2d`` on the CPU reorders its weight into that layout on every call; for a small input
    (batch 1, resnet18's 14x14 and 7x7 layers) the reorder is about half of the conv.  A module keeps
    one of these and :meth:`conv` runs ``F.conv2d(x, codebook, None, stride, padding, dilation)``
    through ``torch.ops.mkldnn._convolution_pointwise`` with the stored reorder, refreshed when the
    codebook (identity, storage, in-place version) or the geometry changes.  Returns None where it
    does not apply (autograd, not float32, not channels-last, no oneDNN, the private op missing or
    failing in this torch build, then it stays off; or a small batch-1 conv, :func:`_im2col_is_faster`)
    and the caller runs ``F.conv2d``.

    Nor for a single input channel: there the private op, given a stride along W above 1 and an output
    one pixel wide, returned wrong values (torch 2.15: 117 of 1,150 such random geometries, errors as
    large as the outputs or far larger, values it never computed), where ``F.conv2d`` is right.  No other
    channel count showed it (fuzzed with 1 to 64 input channels)."""

    _supported: bool | None = None  # probed once per process

    def __init__(self):
        self._entry = None  # (key, reordered weight), replaced as one object: calls from several threads
        #                     each use a consistent pair

    def __getstate__(self):
        """Copies and pickles leave the reorder behind (made again on the next call): it is an opaque oneDNN
        tensor with no storage, which ``copy.deepcopy``, ``pickle`` and ``torch.save`` cannot copy (a layer,
        or a dense baseline, that had run channels-last float32 inference could not be copied, so a model
        could be neither fused nor finetuned after it)."""
        return {"_entry": None}

    @property
    def key(self):
        """What the stored reorder was made for (None before the first packed call)."""
        entry = self._entry
        return entry[0] if entry is not None else None

    @classmethod
    def _available(cls) -> bool:
        if cls._supported is None:
            cls._supported = bool(torch.backends.mkldnn.is_available()
                                  and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                                  and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))
        return cls._supported

    def conv(self, x, codebook, stride, padding, dilation):
        if (x.device.type != "cpu" or x.dtype != torch.float32 or codebook.dtype != torch.float32 or x.dim() != 4
                or x.shape[1] == 1 or not x.is_contiguous(memory_format=torch.channels_last)
                or _needs_grad(x, codebook) or not self._available()
                or _im2col_is_faster(x.shape, codebook.shape, stride, padding, dilation)):
            return None
        version = tensor_version(codebook)
        args = (list(padding), list(stride), list(dilation), 1)
        key = (id(codebook), codebook.data_ptr(), version, tuple(x.shape), args)
        try:
            entry = self._entry
            if entry is None or entry[0] != key:
                # the codebook is kept with its reorder: while cached, no other tensor gets its id and address
                entry = (key, torch.ops.mkldnn._reorder_convolution_weight(codebook.detach(), *args, list(x.shape)),
                         codebook)
                self._entry = entry
            return torch.ops.mkldnn._convolution_pointwise(x, entry[1], None, *args, "none", [], "")
        except Exception:  # a torch build whose private op differs: stay on F.conv2d from now on
            type(self)._supported = False
            self._entry = None
            return None


# F.conv2d's own choice for a batch of one with kernels of at most 3x3: oneDNN (with the per-call reorder)
# only above this many input values, its im2col GEMM below (torch's ``use_mkldnn``).
_TORCH_IM2COL_MAX_INPUT = 20480
_IM2COL_MAX_OUTPUT = 8192  # unique-conv output values below which that GEMM beats the stored reorder


def _im2col_is_faster(x_shape, w_shape, stride, padding, dilation) -> bool:
    """Whether ``F.conv2d`` beats :class:`PackedCodebook` for this K-filter conv: a batch of one, small enough
    that F.conv2d takes its im2col path, with fewer than 8,192 output values.  Measured per shape (3x3,
    stride 1, channels-last, inference, two threads; F.conv2d's time over the packed call's, two runs): on
    CIFAR ResNets' layers at batch 1 (16 to 64 channels at 32x32 to 8x8, K from 2 to C_out) 0.55-1.01 below
    8,192 output values, where the packed call's fixed cost of about 30 us dominates, and 0.92-1.43 from
    there up; at batch 2 and more, and on resnet18's shapes at batch 1 (inputs of 25,088 values and more),
    1.0-7.2: there F.conv2d runs oneDNN and reorders the weight on every call."""
    n, c, h, w = x_shape
    if n != 1 or w_shape[-2] > 3 or w_shape[-1] > 3 or n * c * h * w > _TORCH_IM2COL_MAX_INPUT:
        return False
    ho, wo = output_hw(x_shape, w_shape[-2:], stride, padding, dilation)
    return w_shape[0] * ho * wo < _IM2COL_MAX_OUTPUT


def unique_maps(x, codebook, index, granularity, stride, padding, dilation, plan=None, index32=None,
                packed: PackedCodebook | None = None):
    """The compute-bound half shared by the cpu and triton backends, run by torch (oneDNN / cuDNN):
    ``("gather", u, index32)`` with ``u`` = the K unique filters' output maps (filter granularity), or
    ``("gather_sum", p, pair32)`` with ``p`` = the depthwise codebook maps (kernel granularity, triton only:
    the cpu backend computes that granularity directly; float32 maps for half dtypes).  The backend's epilogue
    turns them into the layer's output.  ``packed``: a module's reordered codebook (filter granularity, CPU
    inference), used where it applies."""
    if granularity == "filter":
        idx32 = index32 if index32 is not None else index.to(torch.int32).contiguous()
        u = packed.conv(x, codebook, stride, padding, dilation) if packed is not None else None
        if u is None:
            u = F.conv2d(x, codebook, None, stride, padding, dilation)
        return "gather", u, idx32
    plan = plan if plan is not None else kernel_plan(index, codebook.shape[0])
    # Half dtypes: the maps in float32 (the gather-sum then sums and rounds once), as the torch backend does:
    # maps rounded to half before the sum came out twice as far from the exact conv as F.conv2d (bfloat16)
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    src = _depthwise_maps(x.to(acc), codebook.to(acc), plan, stride, padding, dilation)
    return "gather_sum", src, plan.pair.to(torch.int32).contiguous()


def cpu_indexed_conv2d(x, codebook, index, bias, stride, padding, dilation, granularity, scale, shift, relu,
                       residual, plan: KernelPlan | None = None, index32: torch.Tensor | None = None,
                       packed: PackedCodebook | None = None):
    if x.device.type != "cpu":
        raise RuntimeError(f"the cpu backend takes CPU tensors, got x on {x.device}")
    if x.dtype not in _NATIVE_DTYPES:  # half precision: the torch path (documented)
        return torch_indexed_conv2d(x, codebook, index, bias, stride, padding, dilation, granularity, scale, shift,
                                    relu, residual, plan)
    scale, shift = _fold_bias(bias, scale, shift)
    if granularity == "kernel":
        if _needs_grad(x, codebook, scale, shift, residual):
            y = kernel_dense_conv(x, codebook, index, stride, padding, dilation)
            return _torch_epilogue(y, scale, shift, relu, residual)
        plan = plan if plan is not None else kernel_plan(index, codebook.shape[0])
        if _takes_direct(x, codebook, plan, stride, padding, dilation):
            return _kernel_direct(x, codebook, plan, stride, padding, dilation, scale, shift, relu, residual)
        # The dense weight as C_out filters taken in order: the filter path below, its gather the epilogue alone.
        codebook, index32 = plan.dense(codebook, index), plan.identity32()
        if scale is None and shift is None and residual is None and not relu:  # no epilogue: the conv is all
            return unique_maps(x, codebook, None, "filter", stride, padding, dilation, None, index32, packed)[1]
    _, u, idx32 = unique_maps(x, codebook, index, "filter", stride, padding, dilation, plan, index32, packed)
    if _needs_grad(u, scale, shift, residual):
        return _NativeEpilogue.apply("gather", u, idx32, scale, shift, residual, relu)
    return _native_gather(u, idx32, scale, shift, residual, relu)


class FilterInferenceCall:
    """One layer's eager inference call on the cpu backend at filter granularity, prepared once.

    What :func:`cpu_indexed_conv2d` looks up and checks on every call (the backend, the conv's path, the
    numpy views of the int32 index, scale and shift) is settled here for one call signature, which
    :class:`~kcengine.conv.module.ClusteredConv2d` keeps and compares before each use (its
    ``_steady_key``).  At batch 1 on CIFAR's layers those lookups cost as much as the conv itself.  The
    call computes what :func:`cpu_indexed_conv2d` computes, the same way: the K-filter conv (``F.conv2d``,
    or the stored reorder where that is faster), then the native gather.  The numpy views share memory
    with the layer's tensors, so in-place writes into ``scale`` and ``shift`` are read by the next call;
    the reorder follows the codebook's version itself."""

    __slots__ = ("key", "codebook", "stride", "padding", "dilation", "packed", "use_packed", "index32",
                 "scale", "shift", "relu", "__weakref__")

    def __init__(self, key, x, codebook, cache, stride, padding, dilation, scale, shift, relu):
        self.key = key
        self.codebook, self.stride, self.padding, self.dilation = codebook, stride, padding, dilation
        self.packed = cache.packed
        self.use_packed = x.dtype == torch.float32 and not _im2col_is_faster(x.shape, codebook.shape, stride,
                                                                              padding, dilation)
        self.index32 = cache.index32.numpy()
        self.scale, self.shift = _np(scale), _np(shift)
        self.relu = relu

    def __call__(self, x, residual):
        u = self.packed.conv(x, self.codebook, self.stride, self.padding, self.dilation) if self.use_packed else None
        if u is None:
            u = F.conv2d(x, self.codebook, None, self.stride, self.padding, self.dilation)
        return _native_gather(u, self.index32, self.scale, self.shift, residual, self.relu)


class KernelInferenceCall:
    """The same at kernel granularity, where the native direct kernel runs (:func:`direct_kernel_pays`): the
    plan and the numpy views of scale and shift settled; the codebook's pack follows its version
    (:meth:`KernelPlan.direct_pack`)."""

    __slots__ = ("key", "codebook", "plan", "stride", "padding", "dilation", "scale", "shift", "relu",
                 "__weakref__")

    def __init__(self, key, codebook, plan, stride, padding, dilation, scale, shift, relu):
        self.key, self.codebook, self.plan = key, codebook, plan
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.scale, self.shift = _np(scale), _np(shift)
        self.relu = relu

    def __call__(self, x, residual):
        return _kernel_direct(x, self.codebook, self.plan, self.stride, self.padding, self.dilation, self.scale,
                              self.shift, self.relu, residual)


def inference_call(key, x, codebook, cache, granularity, bias, stride, padding, dilation, scale, shift, relu,
                   residual):
    """A prepared call (:class:`FilterInferenceCall`, :class:`KernelInferenceCall`) for this call of the cpu
    backend, or None where one does not apply: gradients recorded, data the native kernels do not take,
    scale or shift not contiguous (their views would be copies), a bias to fold into scale and shift (a new
    tensor on every call; fused layers have none), or kernel granularity where the direct kernel does not
    run."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype not in _NATIVE_DTYPES or x.dim() != 4:
        return None
    folded_scale, folded_shift = _fold_bias(bias, scale, shift)
    if folded_scale is not scale or (folded_shift is not shift and folded_shift is not bias):
        return None  # the fold made a new tensor
    scale, shift = folded_scale, folded_shift
    if any(t is not None and (t.dtype != x.dtype or t.device != x.device) for t in (codebook, scale, shift, residual)):
        return None
    if any(t is not None and not t.is_contiguous() for t in (scale, shift)):  # the views must be the tensors'
        return None
    if granularity == "filter":
        return FilterInferenceCall(key, x, codebook, cache, stride, padding, dilation, scale, shift, relu)
    if cache.plan is None or not _takes_direct(x, codebook, cache.plan, stride, padding, dilation):
        return None
    return KernelInferenceCall(key, codebook, cache.plan, stride, padding, dilation, scale, shift, relu)


def _kernel_direct(x, codebook, plan, stride, padding, dilation, scale, shift, relu, residual):
    """Inference kernel granularity in one native pass (no depthwise maps in memory); channels-last output."""
    n, c_in, _, _ = x.shape
    kh, kw = codebook.shape[-2:]
    ho, wo = output_hw(x.shape, (kh, kw), stride, padding, dilation)
    c_out = plan.pair.shape[0]
    xl = x.detach().contiguous(memory_format=torch.channels_last)
    out = _empty_out((n, c_out, ho, wo), x.dtype, True)
    res = None
    if residual is not None:
        res = residual.detach().contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).numpy()
    geom = [kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]]
    _core().conv_kernel_direct(xl.permute(0, 2, 3, 1).numpy(), plan.direct_pack(codebook), geom, _np(scale),
                               _np(shift), res, relu, out.permute(0, 2, 3, 1).numpy(), 0)
    return out
