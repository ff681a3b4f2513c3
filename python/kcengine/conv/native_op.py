"""The ``cpu`` backend as a torch custom op, so that ``torch.compile`` keeps the native kernels.

Graph capture cannot see the native kernels, so a captured clustered conv is written in torch ops
(:func:`~kcengine.conv.functional.captured_conv2d`).  That form is right everywhere, and it is what
``torch.export`` and ``torch.jit.trace`` record (a portable program).  Under ``torch.compile`` for
inference it can cost speed: kernel granularity gathers the dense weight and runs one dense conv, up to
four times slower than the native direct kernel on resnet18's deep layers.  So where the native kernels
are the faster form, a compiled graph calls them as ``torch.ops.kcengine.indexed_conv2d`` instead.  That
is an opaque op, with a fake implementation that gives the compiler the output's shape and memory format;
its real implementation is the ``cpu`` backend's eager call.

It applies where all of these hold (:func:`applies`):
- ``torch.compile`` is capturing (not ``torch.export`` nor ``torch.jit.trace``);
- the data is on the CPU in float32 or float64;
- ``groups`` is 1 and the backend resolves to ``cpu``;
- no gradient is wanted;
- the native kernels were measured faster there than the compiled torch-op form: filter granularity with
  at least 131,072 output values, kernel granularity with K at most C_out / 2 and kernels larger than
  1x1 (the measurements are beside :func:`_faster_than_torch_ops`).

The op has no autograd formula. A compiled training step keeps the torch-op form, which the compiler
differentiates.

Under a ``TorchDispatchMode`` (``FlopCounterMode``, ``FakeTensorMode``) eager CPU inference calls the op
wherever it can run (``applies(..., always=True)``): the mode sees it, its FLOP formula counts the native
work (:func:`_indexed_conv2d_flops`), and fake tensors take its fake implementation.

The op keeps what it derives from an index (the int32 copy, the kernel plan, the codebook's reorders)
per index tensor, as a layer does, rebuilt when the index's storage or in-place version changes, and it
checks the index values once per such change.
"""
from __future__ import annotations

import sys
import threading
import weakref
from typing import Optional, Sequence

import torch

from .. import _registry
from .backends import _NATIVE_DTYPES, cpu_indexed_conv2d, only_channels_last, tensor_version
from .functional import output_hw
from .module import _Cache

__all__ = ["applies", "indexed_conv2d_op"]


_HAVE_CUSTOM_OPS = hasattr(torch.library, "custom_op") and hasattr(torch.compiler, "is_exporting")  # torch >= 2.5


def applies(x, codebook, index, bias, scale, shift, residual, stride, padding, dilation, groups: int,
            granularity: str, backend: Optional[str], always: bool = False) -> bool:
    """Whether a captured conv should call the native op (see the module's docstring); stride, padding and
    dilation as pairs.  ``always``: wherever the op can run, whether or not it is the faster form (under a
    dispatch mode, :func:`~kcengine.conv.functional.dispatch_mode_active`)."""
    if not _HAVE_CUSTOM_OPS or torch.jit.is_tracing() or torch.compiler.is_exporting() or groups != 1:
        return False
    if x.device.type != "cpu" or x.dtype not in _NATIVE_DTYPES:
        return False
    if not _resolves_to_cpu(backend):
        return False
    ts = (x, codebook, bias, scale, shift, residual)
    if any(t is not None and t.dtype != x.dtype for t in ts):
        return False  # mixed dtypes: the eager cpu backend refuses them too; torch ops say why
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts):
        return False
    return always or _faster_than_torch_ops(x, codebook, index, stride, padding, dilation, granularity)


# Where the compiled torch-op form is faster, it stays (measured per layer on resnet18 at 224x224, batch 1
# and 8, and resnet20 at 32x32, batch 1 and 64; fused, channels-last, on the 2-core machine of the
# records):
# - Filter granularity: both forms run the same K-filter conv, and the op's fused gather gains where the
#   output is large (0.47-0.98 of the torch-op form's time from 200,704 output values up).  The op's
#   dispatch costs about 50 us a call, so at 16,384 values and below it took 1.5-2.3 times as long, and
#   at 25,088-100,352 values 0.76-1.21 times.
# - Kernel granularity: the torch-op form is one dense conv with the weight gathered from the codebook.
#   The native direct kernel does less work only where each input channel uses few distinct kernels:
#   with K <= C_out / 2 it took 0.25-0.92 of the time, at any size.  With K >= C_out (resnet20 at 64
#   kernels, resnet18's 64-channel layers) it took 1.1-1.7 times as long, and 1.5-2.2 times for 1x1
#   convs, where a dense 1x1 conv is one GEMM.
_MIN_FILTER_OUTPUT = 1 << 17  # output values (N * C_out * H_out * W_out)


def _faster_than_torch_ops(x, codebook, index, stride, padding, dilation, granularity: str) -> bool:
    c_out = index.shape[0]
    kh, kw = codebook.shape[-2:]
    if granularity == "kernel":
        return kh * kw > 1 and 2 * codebook.shape[0] <= c_out
    ho, wo = output_hw(x.shape, (kh, kw), stride, padding, dilation)
    return x.shape[0] * c_out * ho * wo >= _MIN_FILTER_OUTPUT


def _resolves_to_cpu(backend: Optional[str]) -> bool:
    """Whether ``backend`` runs the cpu backend for CPU data, as the registry would resolve it."""
    if backend in (None, "auto"):
        backend = _registry.env_backend()
    return backend in ("auto", "cpu") and _CPU_OK


# Read once at import (importing the native module takes about 2 ms): the compiler traces applies(), and
# cannot trace an import.
_CPU_OK = _registry.backend_status("cpu") is None


# ------------------------------------------------------------------------------------------------
# What the op derives from an index, kept per index tensor.

_prepared: dict[int, tuple] = {}  # id(index) -> (weakref to the index, its _Cache)
_lock = threading.Lock()


def _prepare(index: torch.Tensor, k: int, granularity: str) -> _Cache:
    """The layer's :class:`~kcengine.conv.module._Cache` for ``index`` (its values checked once per version, which
    a captured graph cannot do), kept per index tensor until the index is freed."""
    key = (index.data_ptr(), tensor_version(index), index.dtype, tuple(index.shape), k, granularity)
    hit = _prepared.get(id(index))
    if hit is not None and hit[0]() is index and hit[1].key == key:
        return hit[1]
    c = _Cache(key, index, k, granularity, pin=False)  # (known by identity: a pinned index would never be freed)
    ident = id(index)

    def forget(_ref):  # runs as the index is freed, before its id can be reused
        with _lock:
            if _prepared.get(ident, (None, None))[1] is c:
                del _prepared[ident]

    with _lock:
        _prepared[ident] = (weakref.ref(index, forget), c)
    return c


def forget_index(index) -> None:
    """Drop what :func:`_prepare` keeps for ``index`` (``ClusteredConv2d.invalidate_cache``: after writes its
    version counter does not see)."""
    with _lock:
        hit = _prepared.get(id(index))
        if hit is not None and hit[0]() is index:
            del _prepared[id(index)]


def _channels_last_out(x: torch.Tensor, granularity: str) -> bool:
    """The cpu backend's output format: channels-last for kernel granularity (its direct kernel) and for a
    channels-last ``x``, contiguous otherwise."""
    return granularity == "kernel" or only_channels_last(x)


# ------------------------------------------------------------------------------------------------
# The op.

def _indexed_conv2d_op(x: torch.Tensor, codebook: torch.Tensor, index: torch.Tensor, bias: Optional[torch.Tensor],
                      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], granularity: str,
                      scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], relu: bool,
                      residual: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`kcengine.indexed_conv2d` on the cpu backend, arguments already checked (stride, padding and
    dilation as pairs, groups 1); the output in the format :func:`_channels_last_out` says."""
    p = _prepare(index, codebook.shape[0], granularity)
    y = cpu_indexed_conv2d(x, codebook, index, bias, tuple(stride), tuple(padding), tuple(dilation), granularity,
                           scale, shift, relu, residual, plan=p.plan, index32=p.index32, packed=p.packed)
    fmt = torch.channels_last if _channels_last_out(x, granularity) else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def _indexed_conv2d_fake(x, codebook, index, bias, stride, padding, dilation, granularity, scale, shift, relu,
                         residual):
    ho, wo = output_hw(x.shape, codebook.shape[-2:], stride, padding, dilation)
    c_out = index.shape[0]
    fmt = torch.channels_last if _channels_last_out(x, granularity) else torch.contiguous_format
    return x.new_empty((x.shape[0], c_out, ho, wo)).contiguous(memory_format=fmt)


def _indexed_conv2d_flops(x, codebook, index, bias, stride, padding, dilation, granularity, scale, shift, relu,
                          residual, *args, out_val=None, **kwargs) -> int:
    """``FlopCounterMode``'s count for the op (multiply and add counted apart, as torch counts convs): filter
    granularity, the K-filter conv, ``2 N H_out W_out K C_in kh kw``; kernel granularity, the M codebook
    responses of each input channel, ``2 N H_out W_out C_in M kh kw``, plus their sums into the outputs,
    ``N H_out W_out C_out C_in``.  M (the most kernels any input channel uses) is read from the index; an
    index without data (fake tensors) counts M = min(K, C_out), its largest value.  The epilogue (scale,
    shift, residual, ReLU) is not counted, as torch counts no elementwise op."""
    n, c_in = x.shape[0], x.shape[1]
    kh, kw = codebook.shape[-2:]
    ho, wo = output_hw(x.shape, (kh, kw), stride, padding, dilation)
    px = n * ho * wo
    k = codebook.shape[0]
    if granularity == "filter":
        return 2 * px * k * c_in * kh * kw
    c_out = index.shape[0]
    try:
        m = _prepare(index, k, granularity).plan.m
    except Exception:  # noqa: BLE001 - no values to read (fake tensors): the bound
        m = min(k, c_out)
    return 2 * px * c_in * m * kh * kw + px * c_out * c_in


_flops_registered = False


def register_flop_formula() -> None:
    """Tell ``torch.utils.flop_counter`` how to count the op, if that module is loaded (a ``FlopCounterMode``
    can only be on once it is; importing it with kcengine would import triton).  Called as a dispatch mode
    meets a clustered conv: the formula goes into the module's registry once, and into the registry of each
    flop-counting mode on the stack, which keeps a copy made when the mode was built.  Torch versions whose
    API differs count nothing for the op."""
    global _flops_registered
    fc = sys.modules.get("torch.utils.flop_counter")
    if fc is None or not _HAVE_CUSTOM_OPS:
        return
    packet = torch.ops.kcengine.indexed_conv2d
    if not _flops_registered:
        _flops_registered = True
        try:
            fc.register_flop_formula(packet, get_raw=True)(_indexed_conv2d_flops)
        except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - older torch, or registered already
            pass
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        stack = _get_current_dispatch_mode_stack()
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        return
    for mode in stack:
        registry = getattr(getattr(mode, "counter", mode), "flop_registry", None)
        if isinstance(registry, dict) and packet not in registry:
            registry[packet] = _indexed_conv2d_flops


if _HAVE_CUSTOM_OPS:
    indexed_conv2d_op = torch.library.custom_op("kcengine::indexed_conv2d", mutates_args=())(_indexed_conv2d_op)
    indexed_conv2d_op.register_fake(_indexed_conv2d_fake)
else:  # pragma: no cover - old torch: applies() is always False
    indexed_conv2d_op = None
