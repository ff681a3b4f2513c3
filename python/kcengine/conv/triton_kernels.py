"""Triton kernels of indexed convolution (CUDA): the fused gather epilogue and the gather-sum.

The convolutions themselves (K unique filters; depthwise codebook kernels) run in cuDNN through
torch; these kernels finish the layer in one pass over memory, like the C++ core on the CPU:

* ``_gather_epilogue_kernel``: ``out[n, o, s] = act(u[n, index[o], s] * scale[o] + shift[o] (+ res[n, o, s]))``
* ``_gather_sum_kernel``: ``out[n, o, s] = act(sum_i p[n, pair[o, i], s] * scale[o] + shift[o] (+ res))``

(``s`` = flattened spatial position; any memory format works through strides; accumulation in fp32, in fp64
for float64 tensors: fp32 arithmetic gave float64 outputs relative errors of 1e-8.)
Triton is imported only when a kernel is first needed, so ``import kcengine`` never loads it.
Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (that is how the tests check them
without a GPU); kernels are built once per interpreter setting.  The kernels use only core builtins
(``tl.load``/``tl.full``/``tl.maximum``...), not the ``triton.language.standard`` helpers (``tl.zeros``,
``tl.sum``...): those are ``@triton.jit`` functions decorated when triton is first imported, so when
triton was imported before ``TRITON_INTERPRET=1`` was set (torchvision imports it via torch._dynamo) they
are compiled-mode functions the interpreter refuses to call ("Cannot call @triton.jit'd outside of the
scope of a kernel").
"""
from __future__ import annotations

import functools
import os

import torch

from .._checks import device_scope

__all__ = ["gather_epilogue", "gather_sum", "triton_indexed_conv2d"]

_KERNELS: dict[bool, tuple] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels():
    mode = _interpreting()
    if mode in _KERNELS:
        return _KERNELS[mode]
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_epilogue_kernel(u_ptr, idx_ptr, a_ptr, b_ptr, r_ptr, o_ptr, C, S,
                                u_sn, u_sc, u_ss, o_sn, o_sc, o_ss, r_sn, r_sc, r_ss,
                                HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
                                RELU: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # n * C + o; in int64, so n * u_sn cannot wrap past 2**31 elements
        n = row // C
        o = row % C
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S
        src = tl.load(idx_ptr + o).to(tl.int64)
        v = tl.load(u_ptr + n * u_sn + src * u_sc + offs * u_ss, mask=mask, other=0.0).to(ACC)
        if HAS_A:
            v = v * tl.load(a_ptr + o).to(ACC)
        if HAS_B:
            v = v + tl.load(b_ptr + o).to(ACC)
        if HAS_R:
            v = v + tl.load(r_ptr + n * r_sn + o * r_sc + offs * r_ss, mask=mask, other=0.0).to(ACC)
        if RELU:
            v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN passes, as torch.relu
        tl.store(o_ptr + n * o_sn + o * o_sc + offs * o_ss, v.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather_sum_kernel(p_ptr, pair_ptr, a_ptr, b_ptr, r_ptr, o_ptr, C, CIN, S,
                           p_sn, p_sc, p_ss, o_sn, o_sc, o_ss, r_sn, r_sc, r_ss,
                           HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
                           RELU: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        n = row // C
        o = row % C
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S
        acc = tl.full([BLOCK], 0.0, ACC)  # core builtin: tl.zeros is a stdlib @jit fn (see module doc)
        base = p_ptr + n * p_sn + offs * p_ss
        for i in range(0, CIN):
            src = tl.load(pair_ptr + o * CIN + i).to(tl.int64)
            acc += tl.load(base + src * p_sc, mask=mask, other=0.0).to(ACC)
        if HAS_A:
            acc = acc * tl.load(a_ptr + o).to(ACC)
        if HAS_B:
            acc = acc + tl.load(b_ptr + o).to(ACC)
        if HAS_R:
            acc = acc + tl.load(r_ptr + n * r_sn + o * r_sc + offs * r_ss, mask=mask, other=0.0).to(ACC)
        if RELU:
            acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(o_ptr + n * o_sn + o * o_sc + offs * o_ss, acc.to(o_ptr.dtype.element_ty), mask=mask)

    _KERNELS[mode] = (triton, _gather_epilogue_kernel, _gather_sum_kernel)
    return _KERNELS[mode]


def _flat_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(n, c, s) strides of a 4-D tensor whose spatial dims flatten to one stride (NCHW or channels-last)."""
    sn, sc, sh, sw = t.stride()
    if t.shape[2] > 1 and t.shape[3] > 1 and sh != sw * t.shape[3]:
        raise ValueError(f"tensor of shape {tuple(t.shape)} and strides {t.stride()} is neither NCHW nor "
                         f"channels-last contiguous")
    # a width of 1 leaves sw free (torch ignores a size-1 dim's stride when it says contiguous: a transposed
    # [N, C, 1, H] passes as [N, C, H, 1] with sw = H): the flat position is then the row, at sh
    return sn, sc, sh if t.shape[3] == 1 else sw


def _prep(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _check_device(t: torch.Tensor, name: str):
    if t.device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {name} on {t.device}")


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    from .backends import only_channels_last

    return torch.channels_last if only_channels_last(t) else torch.contiguous_format


def _launch(kind, src, index32, scale, shift, residual, relu, block=None, out_format=None):
    """One epilogue launch; the output in ``out_format`` (default: ``src``'s)."""
    _check_device(src, "u" if kind == "gather" else "p")
    triton, k_gather, k_sum = _kernels()
    src = _prep(src)
    n, _, h, w = src.shape
    c_out = index32.shape[0]
    s = h * w
    fmt = out_format if out_format is not None else _memory_format(src)
    out = torch.empty((n, c_out, h, w), dtype=src.dtype, device=src.device, memory_format=fmt)
    res = _prep(residual) if residual is not None else out
    block = block or min(1024, triton.next_power_of_2(s))
    grid = (n * c_out, triton.cdiv(s, block))
    # the kernels read scale[o] and shift[o] at o: an expanded or strided vector is made contiguous first
    a = scale.contiguous() if scale is not None else out
    b = shift.contiguous() if shift is not None else out
    acc = triton.language.float64 if src.dtype == torch.float64 else triton.language.float32
    common = dict(HAS_A=scale is not None, HAS_B=shift is not None, HAS_R=residual is not None, RELU=bool(relu),
                  BLOCK=block, ACC=acc)
    strides = (*_flat_strides(src), *_flat_strides(out), *_flat_strides(res))
    with device_scope(src.device):  # Triton launches on the current device, whatever device the data is on
        if kind == "gather":
            k_gather[grid](src, index32, a, b, res, out, c_out, s, *strides, **common)
        else:
            k_sum[grid](src, index32, a, b, res, out, c_out, index32.shape[1], s, *strides, **common)
    return out


def _check_epilogue_args(src, index32, scale, shift, residual, kind):
    if src.dim() != 4:
        raise ValueError(f"{'u' if kind == 'gather' else 'p'} must be 4-D, got shape {tuple(src.shape)}")
    want_dim = 1 if kind == "gather" else 2
    if index32.dtype != torch.int32 or index32.dim() != want_dim or index32.device != src.device:
        raise ValueError(f"{'index' if kind == 'gather' else 'pair'} must be a {want_dim}-D int32 tensor on "
                         f"{src.device}, got {index32.dtype} of shape {tuple(index32.shape)} on {index32.device}")
    index32 = index32.contiguous()
    if index32.numel():
        lo, hi = int(index32.min()), int(index32.max())
        if lo < 0 or hi >= src.shape[1]:
            raise ValueError(f"{'index' if kind == 'gather' else 'pair'} values must be in [0, {src.shape[1]}), "
                             f"got {lo if lo < 0 else hi}")
    c_out = index32.shape[0]
    for name, v in (("scale", scale), ("shift", shift)):
        if v is not None and (v.shape != (c_out,) or v.device != src.device):
            raise ValueError(f"{name} must be [{c_out}] on {src.device}, got {tuple(v.shape)} on {v.device}")
    if residual is not None and tuple(residual.shape) != (src.shape[0], c_out, *src.shape[2:]):
        raise ValueError(f"residual must have shape {(src.shape[0], c_out, *src.shape[2:])}, "
                         f"got {tuple(residual.shape)}")
    return index32


def gather_epilogue(u, index32, scale=None, shift=None, residual=None, relu=False, block=None):
    """Launcher: ``act(u[:, index] * scale + shift + residual)``; u ``[N, K, H, W]``, index int32 ``[C_out]``."""
    index32 = _check_epilogue_args(u, index32, scale, shift, residual, "gather")
    return _launch("gather", u, index32, scale, shift, residual, relu, block)


def gather_sum(p, pair32, scale=None, shift=None, residual=None, relu=False, block=None):
    """Launcher: ``act(sum_i p[:, pair[:, i]] * scale + shift + residual)``; p ``[N, P, H, W]``,
    pair ``[C_out, C_in]``."""
    pair32 = _check_epilogue_args(p, pair32, scale, shift, residual, "gather_sum")
    return _launch("gather_sum", p, pair32, scale, shift, residual, relu, block)


@functools.cache  # built once: a class per call cost ~30 us of host time
def _epilogue_fn():
    from .backends import _NativeEpilogue

    class _TritonEpilogue(_NativeEpilogue):
        """Triton forward; backward inherited (torch reference of the same step)."""

        @staticmethod
        def forward(ctx, kind, src, index32, scale, shift, residual, relu):
            ctx.kind, ctx.relu = kind, relu
            ctx.save_for_backward(src, index32, scale, shift, residual)
            return _launch(kind, src.detach(), index32, None if scale is None else scale.detach(),
                           None if shift is None else shift.detach(),
                           None if residual is None else residual.detach(), relu)

    return _TritonEpilogue


def triton_indexed_conv2d(x, codebook, index, bias, stride, padding, dilation, granularity, scale, shift, relu,
                          residual, plan=None, index32=None, **_):
    """The ``triton`` backend: cuDNN conv (K filters / depthwise maps) + one fused Triton pass."""
    from .backends import _fold_bias, _needs_grad, _torch_epilogue, kernel_dense_conv, unique_maps

    _check_device(x, "x")
    scale, shift = _fold_bias(bias, scale, shift)
    if granularity == "kernel" and _needs_grad(x, codebook, scale, shift, residual):  # training: dense weight
        y = kernel_dense_conv(x, codebook, index, stride, padding, dilation)
        return _torch_epilogue(y, scale, shift, relu, residual)
    kind, src, idx32 = unique_maps(x, codebook, index, granularity, stride, padding, dilation, plan, index32)
    if kind == "gather_sum":  # never under autograd (above); the maps read NCHW, the output in x's format
        y = _launch(kind, src.contiguous(), idx32, scale, shift, residual, relu, out_format=_memory_format(x))
    else:
        y = _epilogue_fn().apply(kind, src, idx32, scale, shift, residual, relu)
    return y.to(x.dtype)  # (half inputs' kernel maps are float32: rounded once, here)
