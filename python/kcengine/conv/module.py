"""``ClusteredConv2d``: a Conv2d layer stored as a codebook of centroids plus an index."""
from __future__ import annotations

import copy
import math
import numbers
import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _registry
from .._checks import check_device, tensor_from_numpy
from .backends import PackedCodebook, inference_call, kernel_plan, tensor_version
from .functional import (GRANULARITIES, _pair, _torch_epilogue, _validate, autocast_cast, autocast_dtype, capturing,
                         check_integer_index, dense_weight, dispatch_mode_active, forward_ad_active, functorch_active,
                         index_out_of_range, indexed_conv2d, output_hw, string_padding)

__all__ = ["ClusteredConv2d", "index_dtype_for", "conv_padding", "PADDING_MODES", "replace_module", "pad_input"]


def index_dtype_for(k: int) -> torch.dtype:
    """The smallest integer dtype that holds indices into ``k`` centroids: uint8 (k <= 256), int16, int32."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k < 2**31:
        raise ValueError(f"k must be an int in [1, 2**31), got k={k!r}")
    if k <= 256:
        return torch.uint8
    if k <= 32768:
        return torch.int16
    return torch.int32


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of the submodule at dotted path ``name`` of ``root``, at every path where that same
    module object sits (a module registered twice, one conv applied at two places or a shared encoder, stays
    one module), in place on ``root``; returns the root, which is ``new`` itself where ``name`` is ``""`` (the
    model is the module).  ``new`` takes the train/eval mode of the module it replaces."""
    old = root.get_submodule(name)
    new.train(old.training)  # the mode of the module it stands for (an eval model stays all eval)
    if not name:
        return new
    for path, mod in list(root.named_modules(remove_duplicate=False)):
        if path and mod is old:
            parent_path, _, child = path.rpartition(".")
            setattr(root.get_submodule(parent_path) if parent_path else root, child, new)
    return root


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")  # nn.Conv2d's


def conv_padding(conv: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """``conv``'s padding as a clustered layer stores it: ``((top, left), (extra_bottom, extra_right))``, the
    first pair padded on both sides and the second once more at the bottom and right.  Numeric padding as it
    is (no extra), ``"valid"`` none, ``"same"`` as torch pads it (:func:`~kcengine.conv.functional.string_padding`:
    an even kernel's odd row and column at the bottom and right)."""
    if isinstance(conv.padding, str):
        return string_padding(conv.padding, conv.kernel_size, conv.stride, conv.dilation)
    return (int(conv.padding[0]), int(conv.padding[1])), tuple(getattr(conv, "padding_extra", (0, 0)))


def pads_input(layer: nn.Module) -> bool:
    """Whether ``layer`` (a clustered layer, or a dense ``nn.Conv2d``) pads its input before a conv that pads
    nothing: a ``padding_mode`` other than zeros, or a padding that is larger at the bottom or right
    (:func:`conv_padding`'s extra: ``padding_extra``, or a dense conv's ``"same"`` with an even kernel)."""
    if layer.padding_mode != "zeros":
        return True
    # (a clustered layer's forward asks on every call: its stored padding_extra, not conv_padding's tuples)
    return any(conv_padding(layer)[1] if isinstance(layer.padding, str) else getattr(layer, "padding_extra", (0, 0)))


def pad_input(x: torch.Tensor, padding, padding_mode: str, extra=(0, 0)) -> torch.Tensor:
    """``x`` padded by ``padding`` (a pair) on both sides and by ``extra`` more at the bottom and right, in
    ``padding_mode``, as nn.Conv2d pads it before a conv that pads nothing: the clustered layers and the
    refit's patches do it the same way."""
    ph, pw = _pair(padding, "padding")
    eh, ew = extra
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, (pw, pw + ew, ph, ph + eh), mode=mode)


def _as_tensor(a, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    if isinstance(a, np.ndarray):
        return tensor_from_numpy(a)
    raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")


class _Cache:
    """What forward derives from an index (and, in ``packed``, from the codebook), made for ``key``.  The index
    itself is kept (``source``) where the key holds its address, which no other tensor gets while it lives; a
    keeper that knows the index by identity (:mod:`~kcengine.conv.native_op`'s weak references) passes
    ``pin=False``."""
    __slots__ = ("key", "source", "index32", "plan", "packed")

    def __init__(self, key, index: torch.Tensor, k: int, granularity: str, groups: int = 1, pin: bool = True):
        """Checks the index values against ``k`` (ValueError), then derives: the int32 index, the kernel plan
        (kernel granularity, groups 1), an empty oneDNN reorder of the codebook (cpu backend, inference)."""
        bad = index_out_of_range(index, k)
        if bad is not None:
            raise ValueError(f"index values must be in [0, K={k}), got {bad}")
        self.key, self.source = key, (index if pin else None)
        self.index32 = index.to(torch.int32).contiguous()
        if not pin and self.index32 is index:  # an int32 index would pin itself
            self.index32 = index.clone()
        self.plan = None
        if granularity == "kernel" and groups == 1:
            self.plan = kernel_plan(index, k)
        self.packed = PackedCodebook()


def check_plain_conv(conv: nn.Conv2d) -> None:
    """ValueError for a subclass of nn.Conv2d that computes its own way (a weight-standardized conv, one that
    pads in forward, a fused conv-BN): a clustered conv would run a plain conv of its weight instead, a
    different function.  Subclasses that keep nn.Conv2d's forward (a parametrized weight, read through
    ``conv.weight``) are plain."""
    cls = type(conv)
    if cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward:
        raise ValueError(f"it is a {cls.__module__}.{cls.__qualname__}, a subclass of nn.Conv2d with its own "
                         f"forward, which a clustered conv (a plain conv of the clustered weight) would drop")


class ClusteredConv2d(nn.Module):
    """A 2-D convolution whose weight is ``codebook[index]``, computed without building it.

    ``ClusteredConv2d(in_channels, out_channels, kernel_size, num_clusters, stride=1, padding=0, dilation=1,
    groups=1, bias=True, granularity="filter", ...)``: ``nn.Conv2d``'s arguments with ``num_clusters`` (K, the
    codebook's rows) fourth, where nn.Conv2d takes ``stride`` -- pass the geometry by keyword.  A new layer holds
    a codebook and bias drawn as nn.Conv2d draws its weight and bias, and ``index = arange % K``: a placeholder
    until :meth:`set_index` and a codebook are given; :meth:`from_conv` (or :func:`kcengine.compress`) builds
    a layer from a conv's clustered weights.

    Attributes:
        codebook: ``nn.Parameter`` ``[K, C_in/groups, kh, kw]`` (``granularity="filter"``) or
            ``[K, kh, kw]`` (``"kernel"``).  Gradients reach it summed over the filters/kernels sharing
            each centroid.
        index: buffer of the smallest integer dtype for K (uint8 when K <= 256, else int16/int32):
            ``[C_out]`` (filter) or ``[C_out, C_in/groups]`` (kernel).  Not trained.
        bias: ``nn.Parameter [C_out]`` or None.
        scale, shift: ``[C_out]`` buffers of a fused eval BatchNorm (None until :meth:`fuse_bn_relu`), or
            of :func:`kcengine.compress`'s cosine option: each filter's norm and the conv's bias.
        relu: whether a ReLU is fused after the affine.
        _kc_cosine: True for a layer of the cosine option (its centroids unit-norm, norms in ``scale``).
        backend: ``"auto"`` or a backend name for :func:`kcengine.indexed_conv2d`'s registry.
        padding: ``(top, left)``, padded on both sides; the constructor also takes ``"valid"`` and ``"same"``.
        padding_extra: ``(bottom, right)`` padded once more on that side: ``"same"`` with an even kernel, as
            torch pads it; ``(0, 0)`` otherwise.  The constructor takes it beside a numeric padding.
        padding_mode: as nn.Conv2d's (``"zeros"``, ``"reflect"``, ``"replicate"``, ``"circular"``); other than
            zeros, or with a ``padding_extra``, forward pads the input first and the conv itself pads nothing.

    ``forward(x, residual=None)`` returns ``act((conv(x) + bias) * scale + shift + residual)``; a residual of
    the output's shape and x's dtype is added in the conv's epilogue, one that broadcasts with the output (or
    of another dtype, promoted as torch's ``+`` does) after it, the result taking the broadcast shape as ``+``
    gives it.

    Forward keeps what it derives from ``index`` and ``codebook`` (int32 index, kernel plan, the
    codebook reordered for oneDNN) and rebuilds it when their storage or in-place version changes:
    optimizer steps, in-place ops, ``load_state_dict`` and ``.to()`` are seen.  Writes through
    ``.data``, and in-place writes into tensors made under ``torch.inference_mode`` (a layer built or
    loaded there), bypass the version counter: call :meth:`invalidate_cache` after them.  Eager inference on
    the cpu backend also keeps its call prepared for the last input signature (the backend, the conv's
    path and the epilogue's numpy views looked up once; at batch 1 on CIFAR's layers
    those lookups cost as much as the conv): assigning any attribute, ``.to()``, ``load_state_dict`` and
    :meth:`invalidate_cache` drop it, and a new storage or version of the index, new storage of
    scale, shift or bias, another input signature, grad mode or ``KCENGINE_BACKEND`` set it aside.

    Under ``torch.autocast`` the layer runs in the autocast dtype, as ``F.conv2d`` does there.  Under graph
    capture (``torch.compile``, ``torch.export``, ``torch.jit.trace``), and on the meta device,
    forward is written in torch ops instead of the native kernels, which capture cannot see (see
    :func:`~kcengine.conv.functional.captured_conv2d`); but ``torch.compile`` of CPU inference calls the
    native kernels through a custom op (:mod:`kcengine.conv.native_op`).  Under a ``TorchDispatchMode``
    (``FlopCounterMode``, ``FakeTensorMode``) CPU inference always calls that op, which the mode sees, and
    the rest is written in torch ops.
    """

    _kc_cosine = False  # set by compress (cosine option) and by layer_from_config
    _kc_cosine_bias = True  # a cosine layer's conv had a bias (in shift); False: shift holds zeros it never had
    padding_mode = "zeros"  # the class default is what layers pickled before padding modes existed read
    padding_extra = (0, 0)  # more padding at the bottom and right (an even kernel's "same"), as nn.Conv2d's

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_clusters: int, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, granularity: str = "filter", device=None,
                 dtype=None, backend: str = "auto", padding_mode: str = "zeros", padding_extra=(0, 0)):
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        _registry.check_backend_name(backend, op="conv")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("num_clusters", num_clusters),
                        ("groups", groups)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:  # numpy's ints too
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        in_channels, out_channels, num_clusters, groups = map(int, (in_channels, out_channels, num_clusters, groups))
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be None or a floating torch.dtype (torch.float32, ...), got dtype={dtype!r}")
        if device is not None:
            device = check_device(device)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                             f"groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        extra = _pair(padding_extra, "padding_extra")
        if isinstance(padding, str):  # "valid", or "same" as torch pads it (one more at the bottom and right)
            if any(extra):
                raise ValueError(f"padding_extra={extra} goes with a numeric padding; padding={padding!r} sets its own")
            self.padding, self.padding_extra = string_padding(padding, self.kernel_size, self.stride, self.dilation)
        else:
            self.padding, self.padding_extra = _pair(padding, "padding"), extra
        for name, v, low in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1),
                             ("padding", self.padding, 0), ("padding_extra", self.padding_extra, 0),
                             ("dilation", self.dilation, 1)):
            if min(v) < low:  # (forward checks these too; a layer that can never run is refused here)
                raise ValueError(f"{name} must be >= {low}, got {name}={v}")
        self.padding_mode = padding_mode
        self._granularity = granularity
        self.num_clusters = num_clusters
        self.backend = backend
        self.relu = False
        kh, kw = self.kernel_size
        cig = in_channels // groups
        fk = dict(device=device, dtype=dtype)
        cb_shape, idx_shape = self._shapes()
        self.codebook = nn.Parameter(torch.empty(cb_shape, **fk))
        bound = 1.0 / math.sqrt(cig * kh * kw)
        nn.init.uniform_(self.codebook, -bound, bound)
        n_idx = int(np.prod(idx_shape))
        self.register_buffer("index", (torch.arange(n_idx, device=device) % num_clusters)
                             .reshape(idx_shape).to(index_dtype_for(num_clusters)))
        self.bias = nn.Parameter(torch.empty(out_channels, **fk).uniform_(-bound, bound)) if bias else None
        self.register_buffer("scale", None)
        self.register_buffer("shift", None)
        self._cache: Optional[_Cache] = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, kmeans_result, granularity: str = "filter", backend: str = "auto", *,
                  seed: int = 0):
        """A clustered copy of ``conv`` from a k-means result over its filters or kernels.

        ``kmeans_result`` has ``.centroids`` and ``.labels`` (numpy or torch), e.g. from
        ``kcengine.kmeans``: for ``"filter"``, centroids ``[K, C_in/groups*kh*kw]`` and labels ``[C_out]``
        (points = flattened filters); for ``"kernel"``, centroids ``[K, kh*kw]`` and labels
        ``[C_out*C_in/groups]`` (points = flattened 2-D kernels in ``weight.reshape(-1, kh*kw)`` order).
        Or an int K: the conv's filters or kernels are clustered here, ``kcengine.kmeans(points, K, seed=seed)``
        (in float32 for a half-precision weight).
        The conv's bias is copied; the codebook and bias take ``requires_grad`` from the conv's weight and bias
        (a frozen conv stays frozen); ``conv`` is not modified.
        """
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        try:
            check_plain_conv(conv)
        except ValueError as exc:
            raise ValueError(f"conv: {exc}") from None
        padding, extra = conv_padding(conv)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if isinstance(kmeans_result, numbers.Integral) and not isinstance(kmeans_result, bool):
            from ..kmeans import kmeans  # (kmeans imports nothing of conv; imported here to keep it that way)

            w = conv.weight.detach()
            points = w.reshape(w.shape[0], -1) if granularity == "filter" else w.reshape(-1, w.shape[2] * w.shape[3])
            if points.dtype not in (torch.float32, torch.float64):
                points = points.float()
            if not 1 <= kmeans_result <= points.shape[0]:
                raise ValueError(f"kmeans_result={kmeans_result} as a number of clusters must be in [1, "
                                 f"{points.shape[0]}] (the conv's {granularity}s)")
            if points.is_meta:
                raise ValueError("conv.weight is on the meta device: it has a shape but no values to cluster")
            if not bool(torch.isfinite(points).all()):
                raise ValueError("conv.weight holds NaN or Inf values: k-means needs finite data")
            kmeans_result = kmeans(points, int(kmeans_result), seed=seed)
        for field in ("centroids", "labels"):
            if not hasattr(kmeans_result, field):
                raise ValueError(f"kmeans_result must be a k-means result (with .centroids and .labels) or an int "
                                 f"number of clusters, got {type(kmeans_result).__name__} without .{field}")
        cent = _as_tensor(kmeans_result.centroids, "kmeans_result.centroids")
        labels = _as_tensor(kmeans_result.labels, "kmeans_result.labels")
        w = conv.weight
        c_out, cig, kh, kw = w.shape
        if cent.dim() != 2 or cent.shape[0] < 1:
            raise ValueError(f"kmeans_result.centroids must be [K, D] with K >= 1, got shape {tuple(cent.shape)}")
        k = int(cent.shape[0])
        want_d, want_n = (cig * kh * kw, c_out) if granularity == "filter" else (kh * kw, c_out * cig)
        if cent.shape[1] != want_d:
            raise ValueError(f"kmeans_result.centroids has shape {tuple(cent.shape)}; granularity={granularity!r} "
                             f"on a conv of weight {tuple(w.shape)} needs D={want_d}")
        if labels.dim() != 1 or labels.shape[0] != want_n:
            raise ValueError(f"kmeans_result.labels has shape {tuple(labels.shape)}; granularity={granularity!r} "
                             f"on a conv of weight {tuple(w.shape)} needs ({want_n},)")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"kmeans_result.labels must be integers, got dtype {labels.dtype}")
        bad = index_out_of_range(labels, k)
        if bad is not None:
            raise ValueError(f"kmeans_result.labels must be in [0, K={k}), got {bad}")
        # (the constructor's placeholder codebook and bias, overwritten below, would draw from the caller's RNG)
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            mod = cls(conv.in_channels, conv.out_channels, (kh, kw), k, conv.stride, padding, conv.dilation,
                      conv.groups, conv.bias is not None, granularity, device=w.device, dtype=w.dtype,
                      backend=backend, padding_mode=conv.padding_mode, padding_extra=extra)
        with torch.no_grad():
            cb_shape = (k, cig, kh, kw) if granularity == "filter" else (k, kh, kw)
            mod.codebook.copy_(cent.to(device=w.device, dtype=w.dtype).reshape(cb_shape))
            mod.set_index(labels.reshape(mod.index.shape))
            if conv.bias is not None:
                mod.bias.copy_(conv.bias.detach())
        mod.codebook.requires_grad_(w.requires_grad)  # a frozen conv stays frozen
        if conv.bias is not None:
            mod.bias.requires_grad_(conv.bias.requires_grad)
        return mod

    def set_index(self, index) -> None:
        """Replace the index (validated: shape, integer dtype, range [0, K)); stored in the compact dtype."""
        index = _as_tensor(index, "index")
        check_integer_index(index)
        if tuple(index.shape) != tuple(self.index.shape):
            raise ValueError(f"index must have shape {tuple(self.index.shape)}, got {tuple(index.shape)}")
        bad = index_out_of_range(index, self.num_clusters)
        if bad is not None:
            raise ValueError(f"index values must be in [0, K={self.num_clusters}), got {bad}")
        # a copy always: the layer's index is its own (a caller's array of the compact dtype was shared, so a
        # write to it changed the layer behind its prepared cache, and load_state_dict wrote into the caller's)
        self.index = index.to(device=self.index.device, dtype=index_dtype_for(self.num_clusters),
                              memory_format=torch.contiguous_format, copy=True)
        self._cache = None

    # ------------------------------------------------------------------ properties
    def to_dense(self) -> torch.Tensor:
        """The dense ``[C_out, C_in/groups, kh, kw]`` weight (differentiable in the codebook)."""
        return dense_weight(self.codebook, self.index, self.granularity)

    @property
    def granularity(self) -> str:
        """"filter" or "kernel": what one codebook row is.  Fixed at construction, since it sets the codebook's and
        the index's shapes."""
        return self._granularity

    @granularity.setter
    def granularity(self, value) -> None:
        raise AttributeError(f"granularity is fixed at construction (it sets the codebook's and the index's shapes; "
                             f"this layer's is {self._granularity!r}), got granularity={value!r}; build a new "
                             "ClusteredConv2d, e.g. with from_conv")

    def __setstate__(self, state) -> None:
        if "granularity" in state:  # a layer pickled before granularity became read-only
            state["_granularity"] = state.pop("granularity")
        super().__setstate__(state)

    def _bias_numel(self) -> int:
        """The bias's numbers: ``bias``, or on a layer of compress's cosine option ``shift``, which holds it (none
        where the conv had no bias)."""
        if self._kc_cosine and self.shift is not None:
            return self.shift.numel() if self._kc_cosine_bias else 0
        return self.bias.numel() if self.bias is not None else 0

    @property
    def unique_parameters(self) -> int:
        """Distinct numbers of the layer's weight and bias: the codebook plus the bias (on a layer of compress's
        cosine option also the per-filter norms, in ``scale``; a fused BatchNorm's scale is not counted)."""
        norms = self.scale.numel() if self._kc_cosine and self.scale is not None else 0
        return self.codebook.numel() + norms + self._bias_numel()

    @property
    def dense_parameters(self) -> int:
        """Parameters of the equivalent dense Conv2d (weight plus bias)."""
        kh, kw = self.kernel_size
        n = self.out_channels * (self.in_channels // self.groups) * kh * kw
        return n + self._bias_numel()

    @property
    def compression_ratio(self) -> float:
        """Dense parameters / unique parameters (the index, a few bits per filter/kernel, not counted;
        see :func:`kcengine.save_compressed` for on-disk bytes)."""
        return self.dense_parameters / self.unique_parameters

    def freeze_codebook(self) -> "ClusteredConv2d":
        """Stop gradients to the codebook (frozen-filters finetune); returns self."""
        self.codebook.requires_grad_(False)
        return self

    def fuse_bn_relu(self, bn: nn.BatchNorm2d, relu: bool = True) -> "ClusteredConv2d":
        """A copy of this layer with ``bn`` (its running statistics, i.e. eval mode) and optionally a ReLU
        applied in the gather.  Neither this layer nor ``bn`` is modified.

        Its state dict holds the BatchNorm as ``scale`` and ``shift``, which a plain layer loading it takes on;
        the ReLU is the attribute ``relu``, configuration like ``stride``, which no state dict carries: set
        ``layer.relu = True`` on the layer that loads it (:func:`~kcengine.save_compressed` keeps both)."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != self.out_channels:
            raise ValueError(f"bn.num_features={bn.num_features} must equal out_channels={self.out_channels}")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("bn must track running statistics (track_running_stats=True) to be fused")
        if self.relu:
            raise ValueError("this layer already ends in a fused ReLU; a BatchNorm after it cannot be fused")
        with torch.no_grad():
            s = torch.rsqrt(bn.running_var.to(self.codebook.dtype) + bn.eps)
            if bn.weight is not None:
                s = s * bn.weight.to(s.dtype)
            t = -bn.running_mean.to(s.dtype) * s
            if bn.bias is not None:
                t = t + bn.bias.to(s.dtype)
            new = copy.deepcopy(self)
            if self.scale is not None:
                new.scale = self.scale * s
                new.shift = (self.shift if self.shift is not None else torch.zeros_like(s)) * s + t
            else:
                new.scale, new.shift = s.contiguous(), t.contiguous()
        new.relu = bool(relu)
        new._cache = None
        return new

    # ------------------------------------------------------------------ forward
    @property
    def _conv_padding(self):
        """The conv's own zero padding: ``padding``, or none where the input is padded first (:func:`pads_input`)."""
        return (0, 0) if pads_input(self) else self.padding

    def _prepared(self) -> _Cache:
        idx = self.index
        version = tensor_version(idx)
        # Tensors made under inference_mode cannot enter autograd: a cache built there is not
        # reused outside it (evaluate, then finetune, must just work).
        key = (idx.data_ptr(), version, idx.device, idx.dtype, self.num_clusters, torch.is_inference_mode_enabled())
        c = self._cache
        if c is not None and c.key == key:
            return c
        c = _Cache(key, idx, self.num_clusters, self.granularity, self.groups)
        self._cache = c  # one assignment: a concurrent call keeps the cache it read
        return c

    def _checked_geometry(self, x, residual) -> tuple:
        """(``_validate``'s normalized (stride, padding, dilation), whether the residual goes into the epilogue
        (:meth:`_residual_in_epilogue`)), re-derived only when something it checks
        changed: its verdict depends on the shapes, dtypes and devices of the arguments alone (index
        values are checked by ``_prepared``), so a forward with the same signature as the last one
        skips the ~20 checks (tens of microseconds per layer, noticeable at batch 1)."""
        def sig(t):
            return (type(t), t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t)

        cb, idx = self.codebook, self.index
        key = (sig(x), sig(residual), sig(cb), sig(idx), sig(self.bias), sig(self.scale), sig(self.shift),
               self.stride, self._conv_padding, self.dilation, self.groups, self.granularity)
        checked = self.__dict__.get("_checked")
        if checked is not None and checked[0] == key:
            return checked[1]
        self._check_own_shapes()
        in_epilogue = self._residual_in_epilogue(x, residual)
        geometry = _validate(x, cb, idx, self.bias, self.stride, self._conv_padding, self.dilation, self.groups,
                             self.granularity, self.scale, self.shift, residual if in_epilogue else None,
                             check_range=False)
        self.__dict__["_checked"] = (key, (geometry, in_epilogue))
        return geometry, in_epilogue

    def _residual_in_epilogue(self, x, residual) -> bool:
        """Whether ``residual`` goes into the conv's epilogue: it has exactly the output's shape and x's dtype
        (``_validate`` judges anything that is not a tensor of x's device).  A residual that only broadcasts with
        the output (either way: a global-context map ``[N, C, 1, 1]``, or a full map added to the conv of a pooled
        input), or of another dtype, is added after the conv instead, as the unfused ``bn(conv(x)) + r`` of
        :func:`fuse_for_inference`'s input would add it; one that does not broadcast is a ValueError."""
        if residual is None or not isinstance(residual, torch.Tensor) or not isinstance(x, torch.Tensor) or \
                x.dim() != 4 or residual.device != x.device:
            return True
        try:
            geometry = (self.kernel_size, self.stride, self._conv_padding, self.dilation)
            ho, wo = output_hw(x.shape, *(_pair(v, name) for v, name in
                                          zip(geometry, ("kernel_size", "stride", "padding", "dilation"))))
        except (ValueError, ZeroDivisionError):  # reassigned geometry: _validate names what is wrong
            return True
        out = (x.shape[0], self.out_channels, ho, wo)
        if ho < 1 or wo < 1 or (tuple(residual.shape) == out and residual.dtype == x.dtype):
            return True
        try:
            torch.broadcast_shapes(out, residual.shape)
        except RuntimeError:
            raise ValueError(f"residual must have the output's shape {out} or broadcast with it, got "
                             f"{tuple(residual.shape)}") from None
        return False

    def _shapes(self) -> tuple:
        """(codebook shape, index shape) this layer's configuration calls for."""
        kh, kw = self.kernel_size
        cig = self.in_channels // self.groups
        if self.granularity == "filter":
            return (self.num_clusters, cig, kh, kw), (self.out_channels,)
        return (self.num_clusters, kh, kw), (self.out_channels, cig)

    def _check_own_shapes(self) -> None:
        """``codebook`` and ``index`` are plain attributes a caller can reassign: one of another shape
        would otherwise compute a different convolution than ``kernel_size``/``num_clusters`` describe
        (a 5x5 codebook in a 3x3 layer) or fail deep in a backend with a message about something else."""
        cb_shape, idx_shape = self._shapes()
        for name, want in (("codebook", cb_shape), ("index", idx_shape)):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"{name} must have shape {want} for this layer (num_clusters={self.num_clusters}, "
                    f"kernel_size={self.kernel_size}, granularity={self.granularity!r}), got {got}; build a new "
                    f"ClusteredConv2d for another shape")

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() != 4:
            if x.dim() != 3:  # (the functional form names only 4-D)
                raise ValueError(f"x must be a 3-D [C_in, H, W] or 4-D [N, C_in, H, W] tensor, got shape "
                                 f"{tuple(x.shape)}")
            # unbatched [C_in, H, W], as nn.Conv2d takes it
            if isinstance(residual, torch.Tensor) and residual.dim() == 3:
                residual = residual.unsqueeze(0)
            return self.forward(x.unsqueeze(0), residual).squeeze(0)
        if pads_input(self) and isinstance(x, torch.Tensor):
            x = pad_input(x, self.padding, self.padding_mode, self.padding_extra)
        if isinstance(x, torch.Tensor) and (autocast_dtype(x) is not None or capturing(x)
                                            or dispatch_mode_active() or forward_ad_active()
                                            or functorch_active()):
            return self._through_functional(x, residual)
        steady = self.__dict__.get("_steady")
        if steady is not None and steady.key == self._steady_key(x, residual):
            return steady(x, residual)
        cache = self._prepared()
        (stride, padding, dilation), in_epilogue = self._checked_geometry(x, residual)
        relu = self.relu
        if not in_epilogue:  # a broadcast residual (or one of another dtype): added after the conv
            residual_after, residual, relu = residual, None, False
        if self.groups > 1:
            y = F.conv2d(x, self.to_dense(), self.bias, stride, padding, dilation, self.groups)
            y = _torch_epilogue(y, self.scale, self.shift, relu, residual)
        else:
            y = self._indexed(x, residual, relu, cache, stride, padding, dilation)
        if not in_epilogue:
            y = y + residual_after
            if self.relu:
                y = torch.relu(y)
        return y

    def _through_functional(self, x, residual) -> torch.Tensor:
        """``forward`` under ``torch.autocast``, graph capture or on the meta device: :func:`indexed_conv2d` runs
        those itself (autocast: the conv in its dtype; capture and meta: torch ops, see
        :func:`~kcengine.conv.functional.captured_conv2d`, or the native op under ``torch.compile``); the layer
        adds what is its own, its shape checks and a residual that only broadcasts, added after as eager forward
        adds it.  Under autocast the residual is judged in the dtype the conv runs in."""
        ac = autocast_dtype(x)
        xj, rj = (autocast_cast(x, ac), autocast_cast(residual, ac)) if ac is not None else (x, residual)
        tracing = torch.jit.is_tracing()  # no checks there (see captured_conv2d)
        if not tracing:
            self._check_own_shapes()
        in_epilogue = tracing or self._residual_in_epilogue(xj, rj)
        y = indexed_conv2d(xj, self.codebook, self.index, self.bias, self.stride, self._conv_padding, self.dilation,
                           self.groups, self.granularity, scale=self.scale, shift=self.shift,
                           relu=self.relu and in_epilogue, residual=rj if in_epilogue else None,
                           backend=self.backend)
        if not in_epilogue:
            y = y + residual
            if self.relu:
                y = torch.relu(y)
        return y

    def _indexed(self, x, residual, relu, cache, stride, padding, dilation) -> torch.Tensor:
        """The conv through the backend registry (its epilogue: bias, scale/shift, residual, ``relu``).  A call
        the cpu backend ran without autograd leaves a prepared call for the next ones with the same signature
        (:meth:`_steady_key`)."""
        def call(name, impl):
            extra = {}
            if name in ("cpu", "torch"):
                extra["plan"] = cache.plan
            if name == "cpu":
                extra["index32"] = cache.index32
                extra["packed"] = cache.packed
            return impl(x, self.codebook, self.index, self.bias, stride, padding, dilation, self.granularity,
                        self.scale, self.shift, relu, residual, **extra)

        name, y = _registry.run_with_fallback("conv", self.backend, x.device, call)
        if name == "cpu" and relu == self.relu and not torch.is_grad_enabled():  # (training prepares nothing)
            key = self._steady_key(x, residual)
            if key is not None:
                self.__dict__["_steady"] = inference_call(
                    key, x, self.codebook, cache, self.granularity, self.bias, stride, padding, dilation,
                    self.scale, self.shift, relu, residual)
        return y

    def _steady_key(self, x, residual):
        """What a prepared inference call (:func:`~kcengine.conv.backends.inference_call`) was made for,
        beyond the layer's attributes (assigning any of them drops it, as do ``.to()``, ``load_state_dict``
        and :meth:`invalidate_cache`): the signature of ``x`` and ``residual``, grad and inference mode,
        ``KCENGINE_BACKEND``, the codebook's shape and dtype, the index's storage and version, the storage
        and shape of scale, shift and bias.  None where the layer's tensors are not where forward put them
        (the call is then not prepared)."""
        if type(x) is not torch.Tensor or (residual is not None and type(residual) is not torch.Tensor):
            return None
        p, b = self._parameters, self._buffers
        cb, idx = p.get("codebook"), b.get("index")
        if cb is None or idx is None:
            return None
        vecs = tuple(None if t is None else (t.data_ptr(), t.shape) for t in (b.get("scale"), b.get("shift"),
                                                                              p.get("bias")))
        # id(cb): the codebook the prepared call holds (so no other tensor has that id while it lives); a
        # codebook swapped in without __setattr__ (torch.func.functional_call) was read as the old one
        return (x.shape, x.dtype, x.device,
                None if residual is None else (residual.shape, residual.dtype, residual.device),
                torch.is_grad_enabled(), torch.is_inference_mode_enabled(), os.environ.get(_registry._ENV),
                id(cb), cb.shape, cb.dtype, idx.data_ptr(), tensor_version(idx), vecs)

    def __setattr__(self, name, value):
        self.__dict__.pop("_steady", None)  # made for the attributes as they were
        super().__setattr__(name, value)

    def __delattr__(self, name):
        self.__dict__.pop("_steady", None)
        super().__delattr__(name)

    def __getstate__(self):  # copies and pickles leave the prepared call behind: its views are this layer's
        state = super().__getstate__()
        state.pop("_steady", None)
        return state

    def invalidate_cache(self) -> None:
        """Drop what forward derived from ``index`` and ``codebook``.  Needed only after writes torch's
        version counter does not see: through ``.data``, or in place into tensors made under
        ``torch.inference_mode`` (a layer built or loaded there)."""
        self._cache = None
        self.__dict__.pop("_checked", None)
        from .native_op import forget_index  # torch.compile's and dispatch modes' own cache of this index

        forget_index(self.index)

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._cache = None
        key = prefix + "index"
        t, refused = state_dict.get(key), False
        if isinstance(t, torch.Tensor):  # any integer dtype loads (ours is kept), values in [0, K) only
            problem = None
            if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
                problem = f"must be integers, got dtype {t.dtype}"
            elif t.numel() and t.device.type != "meta":
                # Checked before a dtype conversion, which would wrap a value past our dtype into the range
                # (300 into uint8 is 44), and for our own dtype too: a bad index is refused at load, with the
                # key named, rather than found by the first forward.
                lo, hi = int(t.min()), int(t.max())
                if lo < 0 or hi >= self.num_clusters:
                    problem = (f"must be in [0, K={self.num_clusters}) for this layer's "
                               f"{self.num_clusters} centroids, got {lo if lo < 0 else hi}")
            if problem is not None:  # reported as load_state_dict reports a size mismatch; our index stays
                error_msgs.append(f"index values of {key} {problem}")
                state_dict = {k: v for k, v in state_dict.items() if k != key}
                refused = True
            elif t.dtype != self.index.dtype:  # (a new dict: the caller's is not modified)
                state_dict = {**state_dict, key: t.to(self.index.dtype)}
        for name in ("scale", "shift"):  # epilogue buffers appear only on fused layers; made in this layer's
            if prefix + name in state_dict and getattr(self, name) is None:  # dtype, as the load converts then
                setattr(self, name, torch.empty_like(state_dict[prefix + name], dtype=self.codebook.dtype,
                                                     device=self.codebook.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if refused and key in missing_keys:  # it was given, not missing: the error above says what is wrong
            missing_keys.remove(key)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, K={self.num_clusters}, "
             f"granularity={self.granularity!r}, stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if any(self.padding_extra):
            s += f", padding_extra={self.padding_extra}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self._kc_cosine:  # unit-norm centroids; the norms in scale, the bias in shift
            s += ", cosine=True"
        else:
            if self.bias is None:
                s += ", bias=False"
            if self.scale is not None:
                s += ", fused_bn=True"
        if self.relu:
            s += ", relu=True"
        return s
