"""Centroid-indexed convolution: a conv whose weight is a codebook of centroids plus an index.

Two granularities (``K`` = number of centroids):

* ``"filter"``: ``codebook [K, C_in, kh, kw]``, ``index [C_out]``.  The layer convolves ``x`` with
  the K unique filters (``u = conv(x, codebook)``, K output maps) and gathers channels:
  ``y[:, o] = u[:, index[o]]``.
* ``"kernel"``: ``codebook [K, kh, kw]``, ``index [C_out, C_in]``.  Every input channel is convolved
  (depthwise) with the codebook kernels it uses, giving maps ``p[:, (i, k)]``, then
  ``y[:, o] = sum_i p[:, (i, index[o, i])]`` (a gather-sum).

Either way the dense weight ``codebook[index]`` is never built in forward.  An optional epilogue
``y = act((y + bias) * scale + shift + residual)`` (per output channel ``scale``/``shift``, e.g. an
eval-mode BatchNorm; ``act`` the identity or ReLU; ``residual`` shaped like ``y``) is fused into
the gather by the backends that can (``cpu``: the C++ core; ``triton``).

``groups > 1`` takes a documented dense path: ``F.conv2d(x, codebook[index], groups=groups)``
(the grouped conv is already K-free in cost terms only when groups == C_in; clustering it gains
storage, not time).

Backends (chosen by :mod:`kcengine._registry`, op ``"conv"``): ``cpu`` (torch/oneDNN conv + the
C++ fused gather), ``torch`` (plain torch ops, any device: the reference of the fast paths) and
``triton`` (CUDA).  The oracle of all of them is ``F.conv2d(x, dense_weight(...))``.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as _forward_ad

from .. import _registry
from .._checks import check_bool

__all__ = ["indexed_conv2d", "dense_weight", "GRANULARITIES", "FLOAT_DTYPES"]

GRANULARITIES = ("filter", "kernel")
_MAX_BYTES = 2**62  # any buffer of a conv must stay well inside a signed 64-bit byte count
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

_registry.register("conv", "cpu", "kcengine.conv.backends:cpu_indexed_conv2d")
_registry.register("conv", "torch", "kcengine.conv.backends:torch_indexed_conv2d")
_registry.register("conv", "triton", "kcengine.conv.triton_kernels:triton_indexed_conv2d")


_INT32_MAX = 2**31 - 1


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (int(v), int(v))
    if not (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in v)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if any(abs(int(e)) > _INT32_MAX for e in v):  # torch's conv takes int64 and the native kernels int32
        raise ValueError(f"{name} must be an int or a pair of ints below 2**31, got {name}={tuple(v)}")
    return int(v[0]), int(v[1])


def string_padding(padding: str, kernel_size, stride, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """``padding="valid"`` or ``"same"`` as F.conv2d reads it: ``((top, left), (extra_bottom, extra_right))``.

    ``"same"`` pads ``dilation * (kernel - 1)`` in all along each dimension, half on each side and the odd one
    (an even kernel) at the bottom or right, and needs stride 1, as in torch.  ValueError naming the value
    for any other string, or for ``"same"`` with a stride."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if stride != (1, 1):
        raise ValueError(f"padding='same' needs stride=1 (as in F.conv2d), got stride={stride}")
    total = [dilation[d] * (kernel_size[d] - 1) for d in (0, 1)]
    return (total[0] // 2, total[1] // 2), (total[0] % 2, total[1] % 2)


def dense_weight(codebook: torch.Tensor, index: torch.Tensor, granularity: str, in_channels: Optional[int] = None):
    """The dense ``[C_out, C_in, kh, kw]`` weight the codebook and index stand for (the oracle's weight).

    Differentiable in ``codebook``; for the kernel granularity ``index`` is ``[C_out, C_in]``.
    """
    check_integer_index(index)
    idx = index.long()
    if granularity == "filter":
        return codebook.index_select(0, idx.reshape(-1))
    if granularity == "kernel":
        c_out, c_in = idx.shape
        kh, kw = codebook.shape[-2:]
        return codebook.index_select(0, idx.reshape(-1)).reshape(c_out, c_in, kh, kw)
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def output_hw(x_shape, kernel, stride, padding, dilation) -> tuple[int, int]:
    """(H_out, W_out) of a conv of ``kernel`` (kh, kw) over an input of shape ``x_shape`` [N, C, H, W], with
    pairs for stride, padding and dilation (may be < 1 for an input too small: callers check)."""
    return tuple((x_shape[2 + d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1
                 for d in (0, 1))


def _check_vector(v, name: str, c_out: int, x: torch.Tensor):
    if v is None:
        return None
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
    if v.shape != (c_out,):
        raise ValueError(f"{name} must have shape ({c_out},) (C_out), got {tuple(v.shape)}")
    if v.dtype != x.dtype:
        raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {v.dtype}")
    if v.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {v.device}")
    return v


def _validate(x, codebook, index, bias, stride, padding, dilation, groups, granularity, scale, shift, residual,
              check_range: bool = True):
    """All checks on the caller's arguments; returns normalized (stride, padding, dilation)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C_in, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.shape[1] < 1:  # (as a layer's in_channels: the native and torch paths each failed their own way)
        raise ValueError(f"x must have C_in >= 1 channels, got shape {tuple(x.shape)}")
    if not isinstance(codebook, torch.Tensor):
        raise ValueError(f"codebook must be a torch.Tensor, got {type(codebook).__name__}")
    if codebook.dtype != x.dtype:
        raise ValueError(f"codebook must have the dtype of x ({x.dtype}), got {codebook.dtype}")
    if codebook.device != x.device:
        raise ValueError(f"codebook must be on the device of x ({x.device}), got {codebook.device}")
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in INDEX_DTYPES:
        raise ValueError(f"index must be an integer tensor (uint8/int8/int16/int32/int64), got dtype {index.dtype}")
    if index.device != x.device:
        raise ValueError(f"index must be on the device of x ({x.device}), got {index.device}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    c_in = x.shape[1]
    if c_in % groups:
        raise ValueError(f"x has C_in={c_in} channels, not divisible by groups={groups}")
    if granularity == "filter":
        if codebook.dim() != 4:
            raise ValueError(f"codebook must be [K, C_in/groups, kh, kw] for granularity='filter', "
                             f"got shape {tuple(codebook.shape)}")
        if codebook.shape[1] != c_in // groups:
            raise ValueError(f"codebook has shape {tuple(codebook.shape)} but x has C_in={c_in} channels "
                             f"(groups={groups}): codebook.shape[1] must be {c_in // groups}")
        if index.dim() != 1:
            raise ValueError(f"index must be [C_out] for granularity='filter', got shape {tuple(index.shape)}")
        kh, kw = codebook.shape[2:]
    else:
        if codebook.dim() != 3:
            raise ValueError(f"codebook must be [K, kh, kw] for granularity='kernel', "
                             f"got shape {tuple(codebook.shape)}")
        if index.dim() != 2 or index.shape[1] != c_in // groups:
            raise ValueError(f"index must be [C_out, C_in/groups={c_in // groups}] for granularity='kernel', "
                             f"got shape {tuple(index.shape)}")
        kh, kw = codebook.shape[1:]
    k = codebook.shape[0]
    if k < 1:
        raise ValueError(f"codebook must hold K >= 1 centroids, got shape {tuple(codebook.shape)}")
    c_out = index.shape[0]
    if c_out < 1 or c_out % groups:
        raise ValueError(f"index gives C_out={c_out} output channels, which must be >= 1 and divisible by "
                         f"groups={groups}")
    bad = index_out_of_range(index, k) if check_range else None
    if bad is not None:
        raise ValueError(f"index values must be in [0, K={k}) for a codebook of K={k} centroids, got {bad}")
    _check_vector(bias, "bias", c_out, x)
    _check_vector(scale, "scale", c_out, x)
    _check_vector(shift, "shift", c_out, x)
    h, w = x.shape[2:]
    if isinstance(h, int) and isinstance(w, int) and h * w == 0 and x.shape[0] > 0:  # (as F.conv2d refuses it:
        # padding would otherwise make an output of bias alone on the cpu kernel path)
        raise ValueError(f"x has an empty spatial dimension (shape {tuple(x.shape)}): only an empty batch is taken")
    ho, wo = output_hw(x.shape, (kh, kw), stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"x of spatial size {h}x{w} is too small for a {kh}x{kw} kernel with padding={padding}, "
                         f"dilation={dilation} (output would be {ho}x{wo})")
    # Sizes past what a 64-bit byte count holds wrap around inside torch's own allocation arithmetic
    # (F.conv2d with padding=2**31 asks for ~1 TB instead of ~3e20 bytes): refuse them here, by name.
    cig = x.shape[1] // groups
    sizes = (x.shape[0] * c_out * ho * wo, cig * kh * kw * ho * wo,
             x.shape[0] * x.shape[1] * (h + 2 * padding[0]) * (w + 2 * padding[1]))
    # Symbolic sizes (torch.export with a dynamic dimension) are left to torch: a comparison here would
    # pin the dimension to a range in the exported program.
    if all(isinstance(n, int) for n in sizes) and any(n * x.element_size() >= _MAX_BYTES for n in sizes):
        biggest = max(sizes)
        raise ValueError(f"padding={padding}, stride={stride}, dilation={dilation} on x of shape {tuple(x.shape)} "
                         f"would make an output of {ho}x{wo} pixels: buffers of {biggest} elements, past what "
                         f"a 64-bit byte count can address")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise ValueError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        want = (x.shape[0], c_out, ho, wo)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual must have the output's shape {want}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must have the dtype/device of x ({x.dtype}, {x.device}), "
                             f"got ({residual.dtype}, {residual.device})")
    return stride, padding, dilation


def _fold_bias(bias, scale, shift):
    """(scale, shift) of the epilogue with the conv bias folded in: (y + b)*s + t = y*s + (b*s + t)."""
    if bias is None:
        return scale, shift
    if scale is None:
        return None, bias if shift is None else bias + shift
    return scale, bias * scale + (shift if shift is not None else 0)


def indexed_conv2d(
    x: torch.Tensor,
    codebook: torch.Tensor,
    index: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    granularity: str = "filter",
    *,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    relu: bool = False,
    residual: Optional[torch.Tensor] = None,
    backend: Optional[str] = "auto",
) -> torch.Tensor:
    """2-D convolution computed from a codebook and an index, never from the dense weight.

    Args:
        x: ``[N, C_in, H, W]`` input (float16/bfloat16/float32/float64; any memory format).
        codebook: ``[K, C_in/groups, kh, kw]`` (granularity ``"filter"``) or ``[K, kh, kw]`` (``"kernel"``),
            dtype and device of ``x``.
        index: integer tensor (uint8 ... int64): ``[C_out]`` (filter) or ``[C_out, C_in/groups]`` (kernel),
            values in ``[0, K)``.
        bias: optional ``[C_out]``, added before the epilogue.
        stride, padding, dilation: as :func:`torch.nn.functional.conv2d` (int or pair; padding also "valid"
            or "same", which pads an even kernel's odd row and column at the bottom and right, as torch does).
        groups: ``> 1`` runs the documented dense fallback ``F.conv2d(x, codebook[index], groups=groups)``.
        granularity: ``"filter"`` or ``"kernel"``.
        scale, shift: optional ``[C_out]`` per-channel affine applied after the bias (an eval BatchNorm:
            ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``).
        relu: apply ReLU last.
        residual: optional ``[N, C_out, H_out, W_out]`` added before the ReLU (a ResNet block's identity).
        backend: ``"auto"`` (default), ``"cpu"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[N, C_out, H_out, W_out]``: ``act((conv2d(x, codebook[index]) + bias) * scale + shift + residual)``,
        in ``x``'s memory format (channels-last in, channels-last out) on the cpu and triton backends.  One exception,
        on the cpu backend: where kernel granularity runs its direct kernel, it writes channels-last whatever ``x``'s
        format.  It runs where each input channel uses at most 3/4 C_out distinct kernels larger than 1x1, or the
        output is small (under 32,768 values; 1x1 kernels included); elsewhere it computes a dense conv and the
        output follows ``x``.  Outputs the native kernels write (the gather, the direct kernel) outside autograd
        are not resizable (their storage is theirs, as a tensor from ``torch.from_numpy``).

    Raises:
        ValueError naming the argument and value on any bad input.

    Gradients flow to ``x``, ``codebook``, ``bias``, ``scale``, ``shift`` and ``residual``; each centroid
    receives the sum of the gradients of the filters/kernels that share it.

    Under ``torch.autocast`` the conv runs as autocast runs ``F.conv2d``: its floating arguments (but
    float64 ones) cast to the autocast dtype, the result in that dtype.

    Under graph capture (``torch.export``, ``torch.jit.trace``, ``torch.compile``) the conv is written in torch
    ops (:func:`captured_conv2d`), but for ``torch.compile`` of inference on the CPU (float32/float64, no
    gradient wanted) where the native kernels are the faster form, which the graph calls as the custom op
    ``torch.ops.kcengine.indexed_conv2d`` (:mod:`kcengine.conv.native_op`).  Under a ``TorchDispatchMode``
    (``FlopCounterMode``, ``FakeTensorMode``) CPU inference always calls that op, whose FLOP formula counts
    the work the native kernels do, and anything else is written in torch ops (:func:`dispatch_mode_active`).
    """
    relu = relu if relu is True or relu is False else check_bool(relu, "relu")
    if isinstance(padding, str):
        if not isinstance(codebook, torch.Tensor) or codebook.dim() not in (3, 4):
            padding = 0  # the codebook's own error comes from _validate
        else:
            padding, extra = string_padding(padding, codebook.shape[-2:], stride, dilation)
            if any(extra) and isinstance(x, torch.Tensor):  # the odd one of an even kernel: bottom and right
                x = F.pad(x, (0, extra[1], 0, extra[0]))
    ac = autocast_dtype(x) if isinstance(x, torch.Tensor) else None
    if ac is not None:  # as autocast runs F.conv2d: in its dtype (gradients reach the originals), autocast off inside
        c = [autocast_cast(t, ac) for t in (x, codebook, bias, scale, shift, residual)]
        with torch.autocast(x.device.type, enabled=False):
            return indexed_conv2d(c[0], c[1], index, c[2], stride, padding, dilation, groups, granularity,
                                  scale=c[3], shift=c[4], relu=relu, residual=c[5], backend=backend)
    capture = capturing(x)
    # Under forward-mode AD or a torch.func transform torch ops carry the tangents or the batch dimension (the
    # native kernels and the op would drop them); under
    # capture or a dispatch mode the conv is the op where it applies, else torch ops.  (The compiler cannot trace
    # the other two questions: capture is asked first.)
    tangents = not capture and (forward_ad_active() or functorch_active())
    if capture or tangents or dispatch_mode_active():
        if not torch.jit.is_tracing():  # see captured_conv2d for what is checked where
            stride, padding, dilation = _validate(x, codebook, index, bias, stride, padding, dilation, groups,
                                                  granularity, scale, shift, residual, check_range=tangents)
        _registry.check_op_backend("conv", backend)  # a name only (plain Python, traced away), as in eager
        from . import native_op  # imported with the package (it registers the op): a lookup here

        # under a dispatch mode wherever the op can run, so that the mode sees the native work
        if not tangents and native_op.applies(x, codebook, index, bias, scale, shift, residual, stride, padding,
                                              dilation, groups, granularity, backend, always=not capture):
            if not capture:
                native_op.register_flop_formula()
            return native_op.indexed_conv2d_op(x, codebook, index, bias, stride, padding, dilation, granularity,
                                               scale, shift, relu, residual)
        return captured_conv2d(x, codebook, index, bias, stride, padding, dilation, groups, granularity, scale,
                               shift, relu, residual)
    stride, padding, dilation = _validate(x, codebook, index, bias, stride, padding, dilation, groups,
                                          granularity, scale, shift, residual)
    if groups > 1:
        return _dense_fallback(x, codebook, index, bias, stride, padding, dilation, groups, granularity,
                               scale, shift, relu, residual)

    def call(name, impl):
        return impl(x, codebook, index, bias, stride, padding, dilation, granularity, scale, shift, relu, residual)

    _, y = _registry.run_with_fallback("conv", backend, x.device, call)
    return y


_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling  # torch < 2.3


def dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` is on (``torch.utils.flop_counter.FlopCounterMode``, ``FakeTensorMode``,
    a debugging mode): it sees only ops that go through torch's dispatcher, and fake tensors have no data
    for the native kernels, so the conv then runs as the op ``torch.ops.kcengine.indexed_conv2d`` (which
    carries a FLOP formula and a fake implementation) where that applies, else in torch ops
    (:func:`captured_conv2d`).  Asked only outside graph capture: the compiler cannot trace it."""
    try:
        return torch._C._len_torch_dispatch_stack() > 0
    except AttributeError:  # pragma: no cover - a torch without it: no modes seen
        return False


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``): the native kernels and
    the op know no tangents (the output's would read zero), so the conv is written in torch ops then."""
    return getattr(_forward_ad, "_current_level", -1) >= 0  # (a private counter: a torch without it, no level)


# (looked up once: functorch_active runs on every eager forward; a torch without it sees no transform)
_functorch_level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", lambda: None)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform is running (``vmap``, ``grad``, ``jvp``): its wrapped tensors have no
    storage for the native kernels, and the prepared eager call would see only their logical shape, so the conv
    is written in torch ops then."""
    return _functorch_level() is not None


def check_integer_index(index: torch.Tensor) -> None:
    """ValueError for an index of a float, bool or complex dtype (``.long()`` would truncate a float)."""
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.is_complex():
        raise ValueError(f"index must be an integer tensor, got dtype {index.dtype}")


def index_out_of_range(index: torch.Tensor, k: int):
    """A value of ``index`` outside ``[0, k)`` (its minimum if negative, else its maximum), or None when all are
    in range (an empty index is)."""
    if not index.numel():
        return None
    lo, hi = int(index.min()), int(index.max())
    return lo if lo < 0 else hi if hi >= k else None


def capturing(x) -> bool:
    """Whether the conv must be written in torch ops (:func:`captured_conv2d`): torch is capturing a graph
    (``torch.jit.trace``, ``torch.compile``, ``torch.export``), or ``x`` is on the meta device."""
    return torch.jit.is_tracing() or _is_compiling() or getattr(x, "is_meta", False)


def autocast_dtype(x) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs convs in on ``x``'s device, or None where it is off."""
    dev = x.device.type
    if dev == "meta":  # no autocast there (torch asks for a device it knows)
        return None
    try:
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    except (TypeError, AttributeError):  # torch < 2.4: per-device functions
        if dev == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if dev == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None


def autocast_cast(t, dtype):
    """``t`` as ``torch.autocast`` hands a conv its arguments: floating tensors but float64 in ``dtype``."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def captured_conv2d(x, codebook, index, bias, stride, padding, dilation, groups, granularity, scale, shift, relu,
                    residual):
    """The conv in torch ops only, for graph capture and meta tensors.

    The native kernels write into buffers torch cannot see, so a captured graph would replay their outputs
    as uninitialized tensors (``torch.jit.trace``), or capture could not run them on its fake tensors
    (``torch.export``).  Here the graph computes what the ``torch`` backend does: filter granularity, the
    K-filter conv of ``x`` with the codebook and a gather of its channels; kernel granularity (and
    ``groups > 1``), one conv with the dense weight ``codebook[index]``, gathered in the graph; then the
    epilogue.  Callers check the arguments as an eager call does, but for the range of the index values
    (data a graph cannot read at capture; an index out of range fails in the gather), and not at all
    under ``torch.jit.trace``, which hands sizes over as tensors (comparing them would warn) and replays
    the graph on whatever shapes it is given.  ``torch.compile`` of CPU inference takes the native kernels
    instead, through a custom op (:mod:`kcengine.conv.native_op`), which checks the index values."""
    if granularity != "filter" or groups > 1:
        return _dense_fallback(x, codebook, index, bias, stride, padding, dilation, groups, granularity, scale,
                               shift, relu, residual)
    y = F.conv2d(x, codebook, None, stride, padding, dilation).index_select(1, index.long())
    if bias is not None:  # per output channel, after the gather
        y = y + bias.view(1, -1, 1, 1)
    return _torch_epilogue(y, scale, shift, relu, residual)


def _dense_fallback(x, codebook, index, bias, stride, padding, dilation, groups, granularity, scale, shift, relu,
                    residual):
    """groups > 1: build the dense weight and run F.conv2d (documented; no speed gain from clustering)."""
    w = dense_weight(codebook, index, granularity)
    y = F.conv2d(x, w, bias, stride, padding, dilation, groups)
    return _torch_epilogue(y, scale, shift, relu, residual)


def _torch_epilogue(y, scale, shift, relu, residual):
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return y
