"""Per-layer clustering problems at each granularity, and the modules clustered layers become.

Granularities of a conv weight ``W [C_out, C_in/groups, kh, kw]`` (``D = C_in/groups*kh*kw``):

* ``"filter"``: one problem, ``C_out`` points of dimension ``D`` (the flattened filters);
* ``"kernel"``: one problem, ``C_out*C_in/groups`` points of dimension ``kh*kw`` (the 2-D kernels);
* ``"element"``: ``D`` one-dimensional problems, one per coordinate of the filters, each with the
  ``C_out`` values that coordinate takes across filters; solved exactly (``algorithm="exact1d"``)
  and reassembled.

Representations of a clustered layer:

* filter / kernel: :class:`kcengine.nn.ClusteredConv2d` (``codebook`` + ``index``).
* threshold option (filter / kernel): a filter (kernel) farther than ``tau`` (Euclidean distance
  between it and its centroid, in weight units) keeps its own weights; those weights become extra
  codebook entries with their own index, so they count as unique parameters.  Centroids no point
  uses any more are dropped from the codebook.
* cosine option (filter only): filters are scaled to unit norm before clustering, centroids are
  re-normalized to unit norm, and each filter is rebuilt as ``norm_o * centroid[index[o]]``: the
  layer is a ClusteredConv2d whose ``scale`` buffer holds the ``C_out`` norms (kept exactly) and
  whose ``shift`` holds the conv's bias (so ``forward = conv_codebook(x)[index] * norm + bias``);
  ``to_dense()`` of such a layer gives the unit-norm filters, :func:`effective_weight` the real
  ones.  The norms count as unique parameters.
* element: :class:`ElementClusteredConv2d`, a dense convolution whose weight is reassembled
  from a per-coordinate codebook ``[D, K]`` and an index ``[C_out, D]`` (the codebook+index form
  of ClusteredConv2d does not fit per-coordinate sharing); unique parameters = ``D*K`` values.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from ..conv.functional import check_integer_index, index_out_of_range
from ..conv.module import conv_padding, pad_input, pads_input

__all__ = ["GRANULARITIES", "LayerProblem", "ElementClusteredConv2d", "conv_weight_counts", "effective_weight",
           "n_points"]

GRANULARITIES = ("filter", "kernel", "element")


def n_points(weight_shape, granularity: str) -> int:
    """Number of points k is chosen against (``C_out``, or ``C_out*C_in/groups`` for kernels: the weight's
    second dimension is already ``C_in/groups``)."""
    c_out, cig = weight_shape[0], weight_shape[1]
    return c_out * cig if granularity == "kernel" else c_out


class ElementClusteredConv2d(nn.Module):
    """A conv whose weight is ``codebook[d, index[o, d]]`` for filter ``o`` and coordinate ``d``.

    Attributes:
        codebook: ``nn.Parameter [D, K]`` — the K values of each of the D coordinates.
        index: buffer ``[C_out, D]`` int64.
        bias: ``nn.Parameter [C_out]`` or None.
    """

    padding_mode = "zeros"  # the class default is what layers pickled before padding modes existed read
    padding_extra = (0, 0)  # as ClusteredConv2d's: more padding at the bottom and right

    def __init__(self, conv: nn.Conv2d, codebook: torch.Tensor, index: torch.Tensor):
        super().__init__()
        c_out, cig, kh, kw = conv.weight.shape
        D = cig * kh * kw
        if codebook.dim() != 2 or codebook.shape[0] != D:
            raise ValueError(f"codebook must have shape [D={D}, K], got {tuple(codebook.shape)}")
        if tuple(index.shape) != (c_out, D):
            raise ValueError(f"index must have shape [{c_out}, {D}], got {tuple(index.shape)}")
        check_integer_index(index)  # (a float was truncated)
        bad = index_out_of_range(index, codebook.shape[1])  # (it failed in forward's gather; a file wrapped it)
        if bad is not None:
            raise ValueError(f"index values must be in [0, K={codebook.shape[1]}), got {bad}")
        self.weight_shape = (c_out, cig, kh, kw)
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups
        self.padding, self.padding_extra = conv_padding(conv)  # "same"/"valid" as numbers (as files record them)
        self.padding_mode = conv.padding_mode
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.num_clusters = int(codebook.shape[1])
        self.codebook = nn.Parameter(codebook.detach().to(conv.weight.dtype).clone(),
                                     requires_grad=conv.weight.requires_grad)  # a frozen conv stays frozen
        self.register_buffer("index", index.detach().to(torch.int64).clone())
        self.bias = (nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
                     if conv.bias is not None else None)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[C_out, C_in/groups, kh, kw]`` weight (differentiable in the codebook)."""
        w = torch.gather(self.codebook, 1, self.index.t())  # [D, C_out]
        return w.t().reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if pads_input(self):  # as nn.Conv2d: the input padded first, the conv pads nothing
            x, padding = pad_input(x, self.padding, self.padding_mode, self.padding_extra), 0
        return F.conv2d(x, self.to_dense(), self.bias, self.stride, padding, self.dilation, self.groups)

    @property
    def unique_parameters(self) -> int:
        """The stored codebook (``D*K``, padding included for coordinates with fewer than K clusters) plus the
        bias; the compression report's ``unique_weights`` counts the values the index uses instead."""
        return self.codebook.numel() + (self.bias.numel() if self.bias is not None else 0)

    @property
    def dense_parameters(self) -> int:
        return int(np.prod(self.weight_shape)) + (self.bias.numel() if self.bias is not None else 0)

    @property
    def compression_ratio(self) -> float:
        return self.dense_parameters / self.unique_parameters

    def extra_repr(self) -> str:
        c_out, cig, kh, kw = self.weight_shape
        return f"{cig * self.groups}, {c_out}, kernel_size={(kh, kw)}, K={self.num_clusters}, granularity='element'"


def clustered_sizes(m: nn.Module) -> tuple[int, int] | None:
    """``(weights, stored)`` of a clustered conv layer (``ClusteredConv2d``, ``ElementClusteredConv2d``): the conv
    weights it applies, as dense, and the values it stores for them (codebook, cosine norms), biases left out;
    None for any other module."""
    from ..conv.module import ClusteredConv2d

    if not isinstance(m, (ClusteredConv2d, ElementClusteredConv2d)):
        return None
    bias = m._bias_numel() if isinstance(m, ClusteredConv2d) else (m.bias.numel() if m.bias is not None else 0)
    return m.dense_parameters - bias, m.unique_parameters - bias


def conv_weight_counts(model: nn.Module) -> dict:
    """What of ``model``'s convs is clustered: ``clustered`` / ``dense`` layer counts (``ClusteredConv2d`` and
    ``ElementClusteredConv2d`` / plain ``nn.Conv2d``; ``element`` of the clustered are per-element), ``weights``
    (the conv weights the model applies, as dense) and ``stored`` (the values it stores for them: codebooks,
    with the cosine option's per-filter norms, and the dense convs' weights).  Biases are not counted, as in the
    compression report; a module reached by two paths counts once."""
    counts = dict(clustered=0, element=0, dense=0, weights=0, stored=0)
    for m in model.modules():  # modules() yields each module once
        sizes = clustered_sizes(m)
        if sizes is not None:
            counts["clustered"] += 1
            counts["element"] += isinstance(m, ElementClusteredConv2d)
            counts["weights"] += sizes[0]
            counts["stored"] += sizes[1]
        elif isinstance(m, nn.Conv2d):
            counts["dense"] += 1
            counts["weights"] += m.weight.numel()
            counts["stored"] += m.weight.numel()
    return counts


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight a (clustered or plain) conv layer applies, per-filter scales included."""
    if isinstance(layer, nn.Conv2d):
        return layer.weight.detach()
    w = layer.to_dense().detach()
    scale = getattr(layer, "scale", None)
    if scale is not None and getattr(layer, "_kc_cosine", False):
        w = w * scale.view(-1, 1, 1, 1)
    return w


class LayerProblem:
    """The clustering problem(s) of one conv layer at one granularity.

    ``points()`` gives the arrays to cluster (one for filter/kernel, ``D`` for element), numpy in float64 for a
    float64 layer and float32 otherwise (half-precision weights are clustered in float32);
    ``reconstruct(cents, labels)`` the dense weight those centroids give; ``build(...)`` the replacement module.  The layer's weights are copied: the caller's conv is never touched.
    """

    def __init__(self, name: str, conv: nn.Conv2d, granularity: str, cosine: bool = False):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got granularity={granularity!r}")
        if cosine and granularity != "filter":
            raise ValueError(f"cosine=True clusters normalized filters and needs granularity='filter', "
                             f"got granularity={granularity!r}")
        self.name, self.conv, self.granularity, self.cosine = name, conv, granularity, cosine
        wide = conv.weight.dtype == torch.float64
        self.np_dtype = np.float64 if wide else np.float32  # what the points, centroids and codebooks are in
        w = conv.weight.detach().to("cpu", torch.float64 if wide else torch.float32).clone()
        self.weight = w
        self.shape = tuple(w.shape)
        c_out, cig, kh, kw = self.shape
        self.N = n_points(self.shape, granularity)
        if granularity == "filter":
            self._x = w.reshape(c_out, -1).numpy().copy()
        elif granularity == "kernel":
            self._x = w.reshape(c_out * cig, kh * kw).numpy().copy()
        else:
            flat = w.reshape(c_out, -1).numpy()
            self._x = [np.ascontiguousarray(flat[:, j:j + 1]) for j in range(flat.shape[1])]
        self.norms = None
        if cosine:
            norms = np.linalg.norm(self._x, axis=1)
            self.norms = norms.astype(self.np_dtype)
            safe = np.where(norms > 0, norms, 1.0)
            self._x = (self._x / safe[:, None]).astype(self.np_dtype)

    @property
    def dense_weights(self) -> int:
        return int(np.prod(self.shape))

    def points(self) -> list:
        return list(self._x) if self.granularity == "element" else [self._x]

    def total_sum_of_squares(self) -> float:
        """Inertia at k = 1 (sum of squared distances to the mean), summed over the layer's problems."""
        return float(sum(((p.astype(np.float64) - p.mean(0, dtype=np.float64)) ** 2).sum() for p in self.points()))

    # ------------------------------------------------------------------ centroids -> weights
    def _unit(self, cents: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(cents, axis=1, keepdims=True)
        return np.where(n > 0, cents / np.where(n > 0, n, 1.0), cents).astype(self.np_dtype)

    def codebook_and_index(self, cents: list, labels: list, threshold: float | None = None):
        """(codebook, index, n_kept) for filter/kernel, after the cosine and threshold options.

        ``codebook`` ``[K', D]`` in ``np_dtype``, ``index`` ``[N]`` int64; K' counts only used entries.
        """
        c = np.asarray(cents[0], dtype=self.np_dtype)
        lab = np.asarray(labels[0], dtype=np.int64)
        if self.cosine:
            c = self._unit(c)
        n_kept = 0
        if threshold is not None:
            x = self._x
            if self.cosine:
                # distance in weight units between each filter and its rebuilt filter
                d = np.linalg.norm((x - c[lab]) * self.norms[:, None], axis=1)
            else:
                d = np.linalg.norm(x - c[lab], axis=1)
            far = np.nonzero(d > threshold)[0]
            n_kept = int(far.size)
            if n_kept:
                c = np.concatenate([c, x[far].astype(self.np_dtype)])
                lab = lab.copy()
                lab[far] = c.shape[0] - n_kept + np.arange(n_kept)
        used = np.unique(lab)
        if used.size < c.shape[0]:  # drop entries no point uses (clusters emptied by the threshold)
            remap = np.full(c.shape[0], -1, dtype=np.int64)
            remap[used] = np.arange(used.size)
            c, lab = c[used], remap[lab]
        return c, lab, n_kept

    def reconstruct(self, cents: list, labels: list, threshold: float | None = None) -> torch.Tensor:
        """The dense weight (in ``np_dtype``, the layer's shape) the clustering gives."""
        if self.granularity == "element":
            cols = [np.asarray(cj, dtype=self.np_dtype)[np.asarray(lj, dtype=np.int64), 0]
                    for cj, lj in zip(cents, labels)]
            return torch.from_numpy(np.stack(cols, axis=1)).reshape(self.shape)
        c, lab, _ = self.codebook_and_index(cents, labels, threshold)
        w = c[lab]
        if self.cosine:
            w = w * self.norms[:, None]
        return torch.from_numpy(np.ascontiguousarray(w)).reshape(self.shape)

    def unique_weights(self, cents: list, labels: list, threshold: float | None = None) -> int:
        """Distinct stored weight values: codebook entries used (plus norms for cosine)."""
        if self.granularity == "element":
            return int(sum(np.unique(np.asarray(lj)).size for lj in labels))
        c, _, _ = self.codebook_and_index(cents, labels, threshold)
        return int(c.size) + (self.shape[0] if self.cosine else 0)

    def build(self, cents: list, labels: list, threshold: float | None = None, backend: str = "auto") -> nn.Module:
        """The replacement module for this layer."""
        conv = self.conv
        dtype = conv.weight.dtype
        if self.granularity == "element":
            K = max(np.asarray(cj).shape[0] for cj in cents)
            D = len(cents)
            cb = np.zeros((D, K), dtype=self.np_dtype)
            for j, cj in enumerate(cents):
                cb[j, :np.asarray(cj).shape[0]] = np.asarray(cj, dtype=self.np_dtype)[:, 0]
            idx = np.stack([np.asarray(lj, dtype=np.int64) for lj in labels], axis=1)
            mod = ElementClusteredConv2d(conv, torch.from_numpy(cb), torch.from_numpy(idx))
            return mod.to(device=conv.weight.device)
        from types import SimpleNamespace

        from ..conv.module import ClusteredConv2d

        c, lab, _ = self.codebook_and_index(cents, labels, threshold)
        res = SimpleNamespace(centroids=torch.from_numpy(c).to(dtype), labels=torch.from_numpy(lab))
        mod = ClusteredConv2d.from_conv(conv, res, self.granularity, backend=backend)
        if self.cosine:
            dev = conv.weight.device
            mod.scale = torch.from_numpy(self.norms).to(device=dev, dtype=dtype)
            shift = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(self.shape[0], dtype=dtype,
                                                                                           device=dev)
            mod.shift = shift.to(device=dev, dtype=dtype)
            mod.bias = None
            mod._kc_cosine = True
            mod._kc_cosine_bias = conv.bias is not None
        return mod
