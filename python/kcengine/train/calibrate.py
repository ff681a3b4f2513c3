"""Output-aware clustering: refit each clustered layer so its OUTPUT matches the dense layer's on calibration data.

k-means on weights minimizes ``sum ||W_o - c_j||^2``, a distance in weight space that ignores what the
layer sees.  What matters is the layer's response on real inputs, and in a conv -> BatchNorm network a
channel's response only matters up to a per-channel affine map: after BN (with recalibrated
statistics) the output of channel ``o`` is ``gamma_o * (y_o - mean) / std + beta_o`` whatever the scale
of ``y_o``, and a negative scale is absorbed by flipping the sign of ``gamma_o``.  So two filters can
share a centroid when their responses are strongly *correlated*, not only when their weights are close.

For each clustered filter-granularity layer, in forward order (each layer sees the inputs produced by
the already-refit layers before it, ``X_c``; the dense teacher's layer sees ``X_d``), with ``S_cc`` the
covariance of the student's input patches, ``S_cd`` their cross-covariance with the teacher's and
``W_o`` the teacher's filters:

  maximize  sum_o  w_o * cos^2(o, c_j(o)),     cos^2(o, c) = (c^T S_cd W_o)^2 / ((c^T S_cc c) (W_o^T S_dd W_o))

i.e. the fraction of each dense channel's variance explained by its (scaled) centroid's response;
``w_o = gamma_o^2`` weighs channels as the following BN does.  Lloyd iterations from the k-means
index: assignment = argmax of ``cos^2``; update = top generalized eigenvector of
``(sum_o w_o b_o b_o^T, S_cc)`` with ``b_o = S_cd W_o / ||W_o||_{S_dd}``.  Each iteration cannot lower
the objective.  The BN's running statistics are then set analytically for the new responses and
``gamma_o`` flipped where the best scale is negative.  Without a BN right after the conv (or
``affine=False``) the scale cannot be absorbed: the index is kept and the codebook is the least-squares
fit of the dense outputs, ``c_j = S_cc^-1 S_cd mean_o W_o`` on uncentered moments (with per-filter scales
``s_o``: ``S_cc^-1 S_cd sum_o s_o W_o / sum_o s_o^2``).

Each layer needs its input in both models, the student's produced by the layers refit before it.  Models
that torch.fx can trace (the CIFAR ResNets, torchvision's) are run once, student and teacher node by node in
lockstep, each layer refit when both reach it (:func:`_lockstep_inputs`); others are run from the start up
to each layer in turn, O(L^2) forward work for L layers (resnet56 at 512 images: the whole refit took
127 s that way, 21 s in lockstep, with the same result bit for bit).
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..conv.functional import output_hw
from ..conv.fuse import _Tracer
from ..conv.module import ClusteredConv2d, conv_padding, pad_input, pads_input
from .._checks import check_bool, check_float, check_int
from .._modes import eval_mode

__all__ = ["calibrate_outputs", "following_batchnorm", "layer_mismatch"]


class _Stop(Exception):
    pass


def _conv_layers(model: nn.Module, clustered: bool) -> dict[str, tuple]:
    """``{name: geometry}`` of the conv layers of ``model``: ``nn.Conv2d``, and with ``clustered`` the layers that
    stand for one (ClusteredConv2d, ElementClusteredConv2d)."""
    from ..compress.layers import ElementClusteredConv2d  # (compress imports train lazily too)

    kinds = (nn.Conv2d, ClusteredConv2d, ElementClusteredConv2d) if clustered else (nn.Conv2d,)
    return {n: (m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation), m.groups)
            for n, m in model.named_modules() if isinstance(m, kinds)}


def layer_mismatch(student: nn.Module, teacher: nn.Module) -> str | None:
    """None when ``teacher`` is a dense counterpart of ``student``: its ``nn.Conv2d`` layers are the student's
    conv layers (dense or clustered) by name, channels, kernel, stride, dilation and groups; else what differs,
    in words.  The refit and finetune's block features match a student's layers to such a model's."""
    s, t = _conv_layers(student, True), _conv_layers(teacher, False)
    only_s, only_t = [n for n in s if n not in t], [n for n in t if n not in s]

    def some(names):
        return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")

    if only_s or only_t:
        parts = ([f"only the student has {some(only_s)}"] if only_s else []) + \
                ([f"only the teacher has {some(only_t)}"] if only_t else [])
        return "; ".join(parts)
    field = ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups")
    for n in s:
        if s[n] != t[n]:
            i = next(i for i, (a, b) in enumerate(zip(s[n], t[n])) if a != b)
            return f"layer {n!r} has {field[i]}={s[n][i]} in the student and {t[n][i]} in the teacher"
    return None


def following_batchnorm(model: nn.Module, x: torch.Tensor) -> dict[str, nn.BatchNorm2d]:
    """``{conv name: BatchNorm2d}`` for each conv (dense or clustered) whose output goes straight into a
    BatchNorm2d, found by watching one forward pass on ``x`` (in eval mode: BN statistics stay as they are)."""
    outputs, pairs, hooks = {}, {}, []
    names = {m: n for n, m in model.named_modules()}

    def conv_hook(mod, inp, out):
        outputs[id(out)] = names[mod]

    def bn_hook(mod, inp):
        src = outputs.get(id(inp[0]))
        if src is not None and mod.num_features == inp[0].shape[1]:
            pairs[src] = mod

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, ClusteredConv2d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return pairs


def _layer_input(model: nn.Module, layer: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The input of ``layer`` over ``images`` (forward stopped right after it)."""
    got = []

    def hook(mod, inp):
        got.append(inp[0].detach())
        raise _Stop

    h = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), eval_mode(model):
            for i in range(0, images.shape[0], batch_size):
                try:
                    model(images[i:i + batch_size])
                except _Stop:
                    pass
    finally:
        h.remove()
    return torch.cat(got)


def _traced_graph(model: nn.Module):
    """``(graph, constants)``: ``model``'s forward, in its current mode, as a torch.fx graph with
    ``ClusteredConv2d`` as leaf calls, and the tensor constants tracing hoisted out of it (taken back off
    ``model``, which is left as it was); None when it cannot be traced, takes more than one input, or has
    hooks the graph would not run (on the model or on a module traced through)."""
    tracer = _Tracer()
    for name, m in model.named_modules():
        hooked = m._forward_hooks or m._forward_pre_hooks
        if hooked and (m is model or not tracer.is_leaf_module(m, name)):
            return None
    before = set(vars(model))
    try:
        graph = tracer.trace(model)
    except Exception:  # any untraceable forward (data-dependent control flow, ...): the per-layer path
        return None
    finally:
        constants = {a: vars(model).pop(a) for a in set(vars(model)) - before}
    if sum(n.op == "placeholder" for n in graph.nodes) != 1:
        return None
    return graph, constants


class _Runner(torch.fx.Interpreter):
    """Runs a graph from :func:`_traced_graph` on the model's own modules (their hooks run); the tensor
    constants tracing hoisted come from ``constants``."""

    def __init__(self, model: nn.Module, graph, constants: dict):
        super().__init__(model, graph=graph)
        self.constants = constants

    def fetch_attr(self, target: str):
        return self.constants[target] if target in self.constants else super().fetch_attr(target)


def _lockstep_inputs(model: nn.Module, traced, x: torch.Tensor, names):
    """Run ``traced`` (from :func:`_traced_graph` on ``model``) on ``x`` node by node, yielding
    ``(name, input)`` at the first call of each module named in ``names``, before it runs, so the caller can
    change that module first.  Values are dropped after their last use."""
    graph, constants = traced
    run = _Runner(model, graph, constants)
    seen = set()
    for node in graph.nodes:
        if node.op == "output":
            return
        if node.op == "placeholder":
            run.env[node] = x
        else:
            if node.op == "call_module" and node.target in names and node.target not in seen:
                seen.add(node.target)
                yield node.target, run.fetch_args_kwargs_from_env(node)[0][0]
            run.env[node] = run.run_node(node)
        if not node.users:
            del run.env[node]
        for done in run.user_to_last_uses.get(node, []):
            del run.env[done]


def _patch_rows(x: torch.Tensor, rows: torch.Tensor, *, kernel_size, dilation, padding, stride) -> torch.Tensor:
    """Rows ``rows`` of ``F.unfold(x, ...).transpose(1, 2).reshape(-1, C * kh * kw)`` (row = image * positions +
    position), gathered from the zero-padded input without unfolding the other positions."""
    ho, wo = output_hw(x.shape, kernel_size, stride, padding, dilation)
    per_image = ho * wo
    img, pos = rows // per_image, rows % per_image
    ys = (pos // wo * stride[0])[:, None, None] + (torch.arange(kernel_size[0]) * dilation[0])[None, :, None]
    xs = (pos % wo * stride[1])[:, None, None] + (torch.arange(kernel_size[1]) * dilation[1])[None, None, :]
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    patches = xp[img[:, None, None], :, ys, xs]  # [m, kh, kw, C]: the indexed dims first
    return patches.permute(0, 3, 1, 2).reshape(rows.shape[0], -1)


def _moments(layer: nn.Module, xc: torch.Tensor, xd: torch.Tensor, max_patches: int, seed: int,
             chunk: int = 64):
    """Second moments of the im2col patches: (Ecc, Ecd, Edd, mean_c, mean_d), float64, D = C_in*kh*kw.

    ``layer`` is a ClusteredConv2d, or the dense ``nn.Conv2d`` it stands for (the output sensitivity's): its
    patches are the windows its own forward sees, padding and padding mode included.

    At most ``max_patches`` patch positions (a fixed random subset, the same for student and teacher).
    ``xd is xc`` (the student's input is the teacher's: every layer before it is dense) computes one product
    and returns it for all three."""
    same = xd is xc
    padding, extra = conv_padding(layer)  # (the output sensitivity passes dense nn.Conv2d layers too)
    if pads_input(layer):  # the inputs padded as the layer pads them, then no zero padding
        xc = pad_input(xc, padding, layer.padding_mode, extra)
        xd = xc if same else pad_input(xd, padding, layer.padding_mode, extra)
        padding = (0, 0)
    kw = dict(kernel_size=layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
    d = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    acc = [torch.zeros(d, d, dtype=torch.float64, device=xc.device) for _ in range(3)]
    mc = torch.zeros(d, dtype=torch.float64, device=xc.device)
    md = torch.zeros_like(mc)
    n = 0
    g = torch.Generator().manual_seed(seed)
    n_img = xc.shape[0]
    ho, wo = output_hw(xc.shape, layer.kernel_size, layer.stride, padding, layer.dilation)
    for i in range(0, n_img, chunk):
        rows = min(chunk, n_img - i) * ho * wo
        keep = max(1, int(max_patches * min(chunk, n_img - i) / n_img))
        if keep < rows:  # the kept rows only (unfolding every position cost most of the refit)
            sel = torch.randperm(rows, generator=g)[:keep]
            take = lambda t: _patch_rows(t, sel, **kw)  # noqa: E731
        else:
            take = lambda t: F.unfold(t, **kw).transpose(1, 2).reshape(-1, d)  # noqa: E731
        pc = take(xc[i:i + chunk])
        pd = pc if same else take(xd[i:i + chunk])
        acc[0] += (pc.T @ pc).double()
        mc += pc.double().sum(0)
        n += pc.shape[0]
        if same:
            continue
        acc[1] += (pc.T @ pd).double()
        acc[2] += (pd.T @ pd).double()
        md += pd.double().sum(0)
    # back to the CPU once: the refit's float64 algebra runs there, whatever the models' device
    acc, mc, md = [a.cpu() for a in acc], mc.cpu(), md.cpu()
    if same:
        ecc, mean = acc[0] / n, mc / n
        return ecc, ecc, ecc, mean, mean
    return acc[0] / n, acc[1] / n, acc[2] / n, mc / n, md / n


def _epilogue(layer: ClusteredConv2d):
    """The layer's per-filter ``(scale, shift)`` as CPU float64 (either None when absent): its output is
    ``(conv(x) + bias) * scale + shift``."""
    return tuple(None if t is None else t.detach().double().cpu() for t in (layer.scale, layer.shift))


def _ridged_cholesky(s: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s_r, L)``: ``s_r = s + r I`` with ``r = ridge * mean variance`` and its Cholesky factor.  The moments
    carry float32 rounding (about 1e-7 of the largest eigenvalue, which can be negative); with few calibration
    patches the spectrum is so skewed that ``r`` falls below that and the factorization fails.  Then ``r``
    grows tenfold until it succeeds (a well-conditioned ``s``, every recorded refit, factors at the first)."""
    dim = s.shape[0]
    base = torch.trace(s) / dim + 1e-12
    eye = torch.eye(dim, dtype=s.dtype)
    for _ in range(12):
        s_r = s + ridge * base * eye
        chol, info = torch.linalg.cholesky_ex(s_r)
        if int(info) == 0:
            return s_r, chol
        ridge *= 10.0
    raise ValueError("the calibration images' input covariance could not be factored even with a ridge of "
                     f"{ridge / 10:g} x its mean variance; use more calibration images")


def _refit_with_bn(layer: ClusteredConv2d, bn: nn.BatchNorm2d, w: torch.Tensor, mom, iterations: int,
                   ridge: float) -> dict:  # noqa: C901
    ecc, ecd, edd, mc, md = mom
    scc = ecc - torch.outer(mc, mc)
    scd = ecd - torch.outer(mc, md)
    sdd = edd - torch.outer(md, md)
    scc_r, chol = _ridged_cholesky(scc, ridge)
    ridge_amount = float((scc_r.diagonal() - scc.diagonal()).mean())  # scc_r = scc + ridge_amount * I
    var_d = torch.einsum("od,de,oe->o", w, sdd, w).clamp_min(1e-20)  # dense channel variances
    b = (w @ scd.T) / var_d.sqrt()[:, None]  # [C_out, D] rows b_o = S_cd W_o / ||W_o||
    gw = bn.weight.detach().double().cpu() ** 2  # (an affine BN: _refit_layer sends the others to least squares)
    ub = b * gw.sqrt()[:, None]  # rows sqrt(w_o) b_o
    sub = torch.cholesky_solve(ub.T, chol)  # [D, C_out]: S^-1 sqrt(w_o) b_o

    k = layer.num_clusters
    idx = layer.index.long().cpu().clone()
    cb = layer.codebook.detach().double().cpu().reshape(k, -1).clone()
    # A codebook the centroid step made is cb = (sub @ v)^T, v [C_out, K] (below), so its quadratic forms in
    # D dimensions reduce to C_out x C_out ones: c_j^T S c_j = v_j^T gram v_j and b_o^T c_j = (cross v_j)_o.
    gram = ub @ sub  # [C_out, C_out]: U^T S^-1 U; every cluster's block (below) is a block of it
    cross = b @ sub  # [C_out, C_out]: b_o^T S^-1 sqrt(w_p) b_p
    sw = (b * var_d.sqrt()[:, None]).T  # [D, C_out]: S_cd W_o, so that c^T S_cd W_o = (c @ sw)_o

    def scores(cb):  # [C_out, K]: cos^2 of every filter with every centroid of an arbitrary codebook
        num = (b @ cb.T) ** 2
        den = torch.einsum("kd,de,ke->k", cb, scc_r, cb).clamp_min(1e-30)
        return num / den[None, :]

    def scores_of(v):  # the same for cb = (sub @ v)^T, in C_out x C_out algebra
        num = (cross @ v) ** 2
        den = ((gram @ v) * v).sum(0).clamp_min(1e-30)
        return num / den[None, :]

    def fill_empty(idx, sc):
        """Each empty cluster takes the worst-explained filter of a cluster that keeps a member (``sc``: the
        current codebook's scores)."""
        counts = torch.bincount(idx, minlength=k)
        empty = (counts == 0).nonzero()[:, 0].tolist()
        if empty:
            explained = sc.gather(1, idx[:, None])[:, 0]
            for j in empty:
                explained[counts[idx] < 2] = float("inf")
                worst = int(explained.argmin())
                counts[idx[worst]] -= 1
                idx[worst], counts[j] = j, 1
                explained[worst] = float("inf")
        return idx

    def centroids(idx, cb, v_old):
        """``(cb, its scores, v)`` with every non-empty cluster's centroid: ``argmax_c (c^T U U^T c) / (c^T S c)``
        for ``U`` the columns ``sqrt(w_o) b_o`` of its members is ``c = S^-1 U v``, ``v`` the top eigenvector of the
        small ``U^T S^-1 U`` (``U U^T`` has rank <= its members), a block of ``gram``.  Clusters of one size share
        one batched eigh, and ``sub @ V`` (column j of V: ``v`` over cluster j's members) gives every centroid.
        With every cluster used the codebook is left as ``v`` (cb None; ``(sub @ v).T`` when wanted); an empty
        cluster keeps its old row (from ``cb``, or ``v_old`` where cb is None), which ``v`` does not describe."""
        counts = torch.bincount(idx, minlength=k)
        members = torch.argsort(idx, stable=True)  # cluster by cluster, each in ascending filter order
        first = torch.cumsum(counts, 0) - counts
        v = torch.zeros(idx.shape[0], k, dtype=gram.dtype)
        for size in counts.unique().tolist():
            if size == 0:
                continue
            js = (counts == size).nonzero()[:, 0]
            mem = members[first[js][:, None] + torch.arange(size)[None, :]]  # [n, size]
            m = gram[mem[:, :, None], mem[:, None, :]]
            _, vecs = torch.linalg.eigh(0.5 * (m + m.transpose(1, 2)))
            v[mem, js[:, None].expand_as(mem)] = vecs[:, :, -1]
        if bool((counts > 0).all()):
            return None, scores_of(v), v
        cb = (sub @ v_old).T if cb is None else cb.clone()
        cb[counts > 0] = (sub @ v).T[counts > 0]
        return cb, scores(cb), None

    def objective(idx, sc):
        return float((gw * sc.gather(1, idx[:, None])[:, 0]).sum() / gw.sum())

    sc = scores(cb)
    before = objective(idx, sc)
    v = None
    for _ in range(iterations):
        idx = fill_empty(idx, sc)
        cb, sc, v = centroids(idx, cb, v)
        new_idx = sc.argmax(1)
        if torch.equal(new_idx, idx):
            break
        idx = new_idx
    cb, sc, v = centroids(idx, cb, v)  # refresh centroids for the final assignment
    after = objective(idx, sc)
    if cb is None:
        cb = (sub @ v).T
    # per-filter best scale s_o = c^T S_cd W_o / c^T S_cc c; orient each centroid to its members' majority sign
    # and give it the mean member output scale (keeps weights at their natural magnitude; cosine layers keep
    # unit-norm centroids, their norms being the filters')
    # A layer's own per-filter scale (the cosine option's norms: output = (c . x + bias) * scale + shift) multiplies
    # each filter's response: it enters the magnitude, the signs and the BN statistics below.
    scale, shift = _epilogue(layer)
    proj = cb @ sw  # [K, C_out]: c_j^T S_cd W_o
    if scale is not None:
        proj = proj * scale[None, :]
    own = proj.gather(0, idx[None, :])[0]  # each filter's response to its dense channel
    counts = torch.bincount(idx, minlength=k)
    sgn = torch.sign(torch.zeros(k, dtype=cb.dtype).index_add_(0, idx, gw * own))
    sgn[sgn == 0] = 1.0  # an empty sum: 1
    if v is not None:  # the centroids' output variances c^T S_cc c (unridged)
        var_c = ((gram @ v) * v).sum(0) - ridge_amount * (cb * cb).sum(1)
    else:
        var_c = ((cb @ scc) * cb).sum(1)
    if layer._kc_cosine:  # every row unit-norm, an unused one too
        norm = cb.norm(dim=1)
        factor = torch.where(norm > 0, sgn / norm.clamp_min(1e-300), torch.ones_like(norm))
    else:
        target = torch.zeros(k, dtype=cb.dtype).index_add_(0, idx, var_d.sqrt()) / counts.clamp_min(1)
        factor = torch.where((counts > 0) & (var_c > 0), sgn * target / var_c.clamp_min(1e-300).sqrt(),
                             torch.ones_like(var_c))
    cb = cb * factor[:, None]
    var_c = var_c * factor ** 2
    flip = own * factor[idx] < 0  # the sign of each filter's best scale
    with torch.no_grad():
        layer.codebook.copy_(cb.reshape(layer.codebook.shape).to(layer.codebook.dtype))
        layer.set_index(idx)
        mean_y = cb[idx] @ mc
        var_y = var_c[idx]
        if layer.bias is not None:
            mean_y = mean_y + layer.bias.detach().double().cpu()
        if scale is not None:
            mean_y, var_y = mean_y * scale, var_y * scale ** 2
        if shift is not None:
            mean_y = mean_y + shift
        flip_d = flip.to(bn.weight.device)
        bn.weight[flip_d] = -bn.weight[flip_d]
        bn.running_mean.copy_(mean_y.to(bn.running_mean.dtype))
        bn.running_var.copy_(var_y.clamp_min(0).to(bn.running_var.dtype))
    return {"explained_before": before, "explained_after": after, "sign_flips": int(flip.sum())}


def _refit_least_squares(layer: ClusteredConv2d, w: torch.Tensor, mom, ridge: float) -> dict:
    ecc, ecd, _, _, _ = mom
    dim = ecc.shape[0]
    a = ecc + ridge * (torch.trace(ecc) / dim + 1e-12) * torch.eye(dim, dtype=ecc.dtype)
    idx = layer.index.long().cpu()
    cb = layer.codebook.detach().double().cpu().reshape(layer.num_clusters, -1).clone()
    scale, _ = _epilogue(layer)
    for j in range(layer.num_clusters):
        members = (idx == j).nonzero()[:, 0]
        if not members.numel():
            continue
        if scale is None:
            cb[j] = torch.linalg.solve(a, ecd @ w[members].mean(0))
        else:  # filter o is scale_o * c_j: the fit weighs each member's target by its scale
            sm = scale[members]
            if float((sm * sm).sum()) > 0:
                cb[j] = torch.linalg.solve(a, ecd @ (sm[:, None] * w[members]).sum(0)) / float((sm * sm).sum())
    with torch.no_grad():
        layer.codebook.copy_(cb.reshape(layer.codebook.shape).to(layer.codebook.dtype))
    return {"explained_before": float("nan"), "explained_after": float("nan"), "sign_flips": 0}


def calibrate_outputs(student: nn.Module, teacher: nn.Module, images: torch.Tensor, *, layers=None,
                      iterations: int = 10, ridge: float = 1e-4, batch_size: int = 256,
                      max_patches: int = 32768, seed: int = 0, lockstep: bool = True) -> dict[str, dict]:
    """Refit the clustered layers of ``student`` (IN PLACE) to reproduce ``teacher``'s layer outputs.

    See the module docstring for the objective.  Only ``ClusteredConv2d`` layers of filter granularity
    with ``groups == 1`` whose name is a ``Conv2d`` of ``teacher`` are refit; others are left as they are,
    and so are layers fused for inference (:meth:`ClusteredConv2d.fuse_bn_relu`: a ReLU in the layer, or the
    teacher's BatchNorm after it folded in), whose outputs are not the teacher conv's.  A layer's per-filter
    ``scale`` and ``shift`` (the cosine option's norms and bias, :func:`kcengine.compress`) are kept and
    accounted for: each filter is ``scale_o`` times its centroid.

    Args:
        student: the clustered model (its codebooks, indices and following BN layers are modified).
        teacher: the dense model it was clustered from (not modified): ValueError naming what differs unless its
            ``nn.Conv2d`` layers are the student's conv layers, by name and shape (:func:`layer_mismatch`).
        images: calibration batch ``[N, C, H, W]`` (a few hundred training images).
        layers: which layers to refit, as :func:`kcengine.compress` selects them (None: every eligible layer,
            ``"first"``, a regex matched in full, or a list of names, each a conv layer of ``student``:
            ValueError otherwise), processed in forward order; the ineligible ones among them are left alone.
        iterations: Lloyd iterations of the assignment/eigenvector updates per layer.
        ridge: Tikhonov term, relative to the mean input variance (grown tenfold at a time for a layer whose
            input covariance would not factor with it: few calibration patches, see :func:`_ridged_cholesky`).
        max_patches: patch positions used for the moments of each layer (a fixed random subset).
        seed: seed of that subset.
        batch_size: images per forward.  The lockstep run holds every batch's pending activations of both
            models at once (about two to three times the memory of the per-layer path on a plain ResNet):
            pass fewer ``images`` where that is too much.
        lockstep: run traceable models once, in lockstep (same result as ``False``, the forward up to each
            layer in turn, bit for bit).  Models whose forward hooks sit on modules the trace goes through,
            or that cannot be traced, take the per-layer path anyway; so do the layers left after a graph
            that fails to run.  ``False`` is the way out for a forward that tracing would freeze wrongly
            (Python state it changes, branches on anything but tensors and ``self.training``, which is
            traced in eval mode).

    Returns ``{layer: {"explained_before", "explained_after", "sign_flips"}}`` (weighted mean ``cos^2``).
    The models and ``images`` may live on any one device; the moments come back to the CPU, where the refit's
    float64 algebra runs.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    iterations = check_int(iterations, "iterations", 0)
    batch_size = check_int(batch_size, "batch_size", 1)
    max_patches = check_int(max_patches, "max_patches", 1)
    seed = check_int(seed, "seed", 0, 2**63 - 1)
    ridge = check_float(ridge, "ridge")
    lockstep = check_bool(lockstep, "lockstep")
    bad = layer_mismatch(student, teacher)
    if bad is not None:
        raise ValueError(f"teacher must be the dense model the student was clustered from (the same conv layers): "
                         f"{bad}")
    if layers is not None:  # as compress selects them: a string is a regex (full match), a name must be a conv's
        from ..compress.plan import select_layers

        layers = set(select_layers(list(_conv_layers(student, True)), layers, student))
    t_mods = dict(teacher.named_modules())
    order = []
    seen = []

    def rec(mod, inp):
        seen.append(mod)

    hooks = [m.register_forward_pre_hook(rec) for m in student.modules() if isinstance(m, ClusteredConv2d)]
    try:  # one probe forward (eval mode) records the layers' order and the conv -> BN pairs
        bn_of = following_batchnorm(student, images[:2])
    finally:
        for h in hooks:
            h.remove()
    t_bn = following_batchnorm(teacher, images[:2])  # the teacher's conv -> BN pairs: which layers were fused
    names = {m: n for n, m in student.named_modules()}
    for m in seen:
        n = names[m]
        if n in order:
            continue
        if m.granularity != "filter" or m.groups != 1 or not isinstance(t_mods.get(n), nn.Conv2d):
            continue
        if m.relu or (n in t_bn and n not in bn_of):  # fused for inference: its output is past the BN
            continue
        if layers is not None and n not in layers:
            continue
        order.append(n)
    out = {}

    def refit(n, xc, xd):
        if torch.equal(xc, xd):  # the layers before are dense (the first clustered one): one product, not three
            xd = xc
        layer = student.get_submodule(n)
        mom = _moments(layer, xc, xd, max_patches, seed)
        out[n] = _refit_layer(layer, t_mods[n], bn_of.get(n), mom, iterations, ridge)

    def advance(runs):  # every chunk's run to its next layer; None where any stops short or fails
        try:
            got = [next(r, (None, None)) for r in runs]
        except Exception:  # a graph that traced but does not run as the module does: the per-layer path
            return None
        return got

    done = 0
    runs = []
    with eval_mode(student), eval_mode(teacher):  # every submodule's mode comes back as it was
        try:
            g_s, g_t = (_traced_graph(student), _traced_graph(teacher)) if order and lockstep else (None, None)
            if g_s is not None and g_t is not None:
                chunks = [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]
                wanted = set(order)
                runs_s = [_lockstep_inputs(student, g_s, c, wanted) for c in chunks]
                runs_t = [_lockstep_inputs(teacher, g_t, c, wanted) for c in chunks]
                runs = runs_s + runs_t
                with torch.no_grad():
                    for n in order:  # the traced forward order is the hooks' order; stop at any mismatch
                        got_s, got_t = advance(runs_s), advance(runs_t)
                        if got_s is None or got_t is None or any(name != n for name, _ in got_s + got_t):
                            break
                        refit(n, torch.cat([x for _, x in got_s]), torch.cat([x for _, x in got_t]))
                        done += 1
        finally:
            for r in runs:
                r.close()
    for n in order[done:]:  # untraceable models (or a mismatch): each layer's input by a forward up to it
        refit(n, _layer_input(student, student.get_submodule(n), images, batch_size),
              _layer_input(teacher, t_mods[n], images, batch_size))
    return out


def _refit_layer(layer: ClusteredConv2d, tconv: nn.Conv2d, bn, mom, iterations: int, ridge: float) -> dict:
    """Refit one layer from its patch moments ``mom`` (:func:`_moments`), with or without its following BN."""
    w = tconv.weight.detach().double().cpu().reshape(tconv.out_channels, -1)
    # A BN without affine parameters cannot take a sign flip (it has no gamma to negate): least squares, as the
    # module docstring says (session 55: it took the BN path, which negated the flipped channels' outputs)
    if bn is not None and bn.track_running_stats and bn.affine:
        return _refit_with_bn(layer, bn, w, mom, iterations, ridge)
    return _refit_least_squares(layer, w, mom, ridge)
