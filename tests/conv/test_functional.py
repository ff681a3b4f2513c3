"""indexed_conv2d against the F.conv2d(x, codebook[index]) oracle: forward, gradients, bad input."""
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kcengine
from kcengine.conv import dense_weight

# Per-dtype (atol, rtol) against an F.conv2d reference of the same dtype (atol scaled by max|ref| + 1).
TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-12, 1e-10)}

# (N, C_in, C_out, H, W, kernel, stride, padding, dilation, K)
SHAPES = [
    (2, 5, 7, 13, 11, 3, 1, 1, 1, 3),     # primes, odd H/W
    (1, 3, 11, 17, 9, 3, 2, 1, 1, 1),     # K = 1, stride 2
    (2, 7, 5, 10, 15, 3, 1, 0, 1, 5),     # K = C_out, no padding
    (3, 6, 13, 9, 9, 1, 1, 0, 1, 4),      # 1x1
    (1, 3, 8, 23, 19, 7, 2, 3, 1, 2),     # 7x7 stem-like with padding 3
    (2, 4, 6, 12, 12, 1, 2, 0, 1, 3),     # 1x1 stride 2 (downsample)
    (1, 5, 7, 14, 13, 3, 1, 2, 2, 4),     # dilation 2
    (2, 3, 50, 11, 10, 3, 1, 1, 1, 40),   # K = 40 > 32: pixel lanes (16-pixel tiles) in the kernel granularity
    (1, 2, 37, 9, 21, 3, 1, 1, 1, 20),    # 16 < K <= 32, C_out not a multiple of 16, W_out not a multiple of 8
    (1, 2, 140, 6, 7, 3, 1, 1, 1, 130),   # K = 130 > 64 maps: pixel lanes with 8-pixel tiles
    # C_in >= 16: the kernel granularity's direct pass loads input channels in blocks of 16
    (1, 16, 24, 8, 11, 5, 1, 2, 1, 40),   # exactly one block, 5x5
    (1, 19, 9, 10, 13, 3, 1, 1, 1, 5),    # a full block and a tail of 3 channels
    (2, 37, 20, 9, 12, 3, 2, 1, 2, 6),    # two blocks and a tail, stride 2 with dilation 2
    (1, 20, 61, 7, 10, 3, 1, 1, 1, 24),   # 49..64 outputs in registers, 16 < maps <= 32
    (2, 17, 30, 6, 9, 3, 2, 1, 1, 12),    # 17..32 outputs in registers, maps <= 16
    (1, 5, 41, 7, 9, 3, 1, 1, 1, 36),     # more than 32 maps (pixels as lanes) with an odd C_out
]
BACKENDS = ["cpu", "torch"]


def _case(shape, granularity, dtype, seed=0):
    n, ci, co, h, w, k, s, p, d, kk = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g, dtype=dtype)
    if granularity == "filter":
        cb = torch.randn(kk, ci, k, k, generator=g, dtype=dtype)
        idx = torch.randint(0, kk, (co,), generator=g)
    else:
        cb = torch.randn(kk, k, k, generator=g, dtype=dtype)
        idx = torch.randint(0, kk, (co, ci), generator=g)
    idx[0] = kk - 1  # the last centroid is always used
    return x, cb, idx, dict(stride=s, padding=p, dilation=d)


def _close(y, ref, dtype):
    atol, rtol = TOL[dtype]
    scale = ref.abs().max().item() + 1.0
    torch.testing.assert_close(y, ref, atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_dense(shape, granularity, dtype, backend):
    x, cb, idx, conv = _case(shape, granularity, dtype)
    ref = F.conv2d(x, dense_weight(cb, idx, granularity), **conv)
    y = kcengine.indexed_conv2d(x, cb, idx, granularity=granularity, backend=backend, **conv)
    assert y.shape == ref.shape
    _close(y, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_bias_bn_residual_relu(granularity, dtype, backend, channels_last):
    shape = (2, 5, 7, 13, 11, 3, 2, 1, 1, 3)
    x, cb, idx, conv = _case(shape, granularity, dtype, seed=1)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(2)
    bias, scale, shift = (torch.randn(7, generator=g, dtype=dtype) for _ in range(3))
    bn = torch.nn.BatchNorm2d(7).to(dtype).eval()
    bn.running_mean.copy_(torch.randn(7, generator=g, dtype=dtype))
    bn.running_var.copy_(torch.rand(7, generator=g, dtype=dtype) + 0.5)
    bn.weight.data.copy_(scale)
    bn.bias.data.copy_(shift)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    t = bn.bias - bn.running_mean * s
    dense = F.conv2d(x, dense_weight(cb, idx, granularity), bias, **conv)
    residual = torch.randn(dense.shape, generator=g, dtype=dtype)
    with torch.no_grad():
        ref = torch.relu(bn(dense) + residual)
        y = kcengine.indexed_conv2d(x, cb, idx, bias, granularity=granularity, scale=s, shift=t, relu=True,
                                    residual=residual, backend=backend, **conv)
        ref2 = torch.relu(bn(dense))
        y2 = kcengine.indexed_conv2d(x, cb, idx, bias, granularity=granularity, scale=s, shift=t, relu=True,
                                     backend=backend, **conv)
    _close(y, ref, dtype)
    _close(y2, ref2, dtype)
    assert (ref2 == 0).any() and (ref2 > 0).any()  # the ReLU really clips something


@pytest.fixture
def kernel_path(request, monkeypatch):
    """Forces the cpu backend's kernel-granularity inference onto one path ("direct": the native direct kernel,
    "dense": the dense weight's conv and the native epilogue; None: its own choice) and counts direct calls."""
    from kcengine.conv import backends

    path = request.param
    if path is not None:
        monkeypatch.setattr(backends, "direct_kernel_pays", lambda *a: path == "direct")
    calls = []
    direct = backends._kernel_direct
    monkeypatch.setattr(backends, "_kernel_direct", lambda *a, **k: calls.append(1) or direct(*a, **k))
    return path, calls


@pytest.mark.parametrize("kernel_path", ["direct", "dense"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_granularity_paths_match_dense(shape, dtype, kernel_path):
    """Both inference paths of the cpu backend at kernel granularity, on every shape, whichever it would pick."""
    path, calls = kernel_path
    x, cb, idx, conv = _case(shape, "kernel", dtype)
    ref = F.conv2d(x, dense_weight(cb, idx, "kernel"), **conv)
    for fmt in (torch.contiguous_format, torch.channels_last):
        with torch.no_grad():
            y = kcengine.indexed_conv2d(x.contiguous(memory_format=fmt), cb, idx, granularity="kernel", backend="cpu",
                                        **conv)
        _close(y, ref, dtype)
        # the direct kernel writes channels-last; the dense path keeps x's format
        assert y.is_contiguous(memory_format=torch.channels_last if path == "direct" else fmt)
    assert len(calls) == (2 if path == "direct" else 0)


@pytest.mark.parametrize("kernel_path", [None], indirect=True)
def test_kernel_granularity_takes_the_dense_conv_where_the_direct_kernel_does_more_work(kernel_path):
    """The direct kernel runs where each input channel uses at most 3/4 of C_out distinct kernels and the kernels
    are larger than 1x1, or the output is small; elsewhere the dense conv does less work, so it runs (fused
    epilogue, both formats)."""
    from kcengine.conv.backends import direct_kernel_pays, kernel_plan

    _, calls = kernel_path
    g = torch.Generator().manual_seed(3)
    cases = [  # (C_out, K, kernel, input H = W, direct?); batch 2: 2 * C_out * H * W output values
        (8, 6, 3, 64, True),    # M = 6 = 3/4 C_out
        (8, 7, 3, 64, False),   # M = 7 > 3/4 C_out
        (12, 2, 1, 64, False),  # 1x1
        (8, 7, 3, 40, True),    # 25,600 output values: below 32,768
        (12, 2, 1, 32, True),   # 24,576
    ]
    for c_out, k, ks, hw, direct in cases:
        idx = torch.arange(c_out * 5).reshape(c_out, 5) % k  # every input channel uses min(k, c_out) kernels
        assert direct_kernel_pays(kernel_plan(idx, k).m, c_out, ks, ks, 2 * c_out * hw * hw) == direct
        cb = torch.randn(k, ks, ks, generator=g)
        x = torch.randn(2, 5, hw, hw, generator=g)
        scale, shift = torch.randn(c_out, generator=g), torch.randn(c_out, generator=g)
        dense = F.conv2d(x, dense_weight(cb, idx, "kernel"), None, 1, ks // 2)
        residual = torch.randn(dense.shape, generator=g)
        ref = torch.relu(dense * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) + residual)
        for fmt in (torch.contiguous_format, torch.channels_last):
            calls.clear()
            with torch.no_grad():
                y = kcengine.indexed_conv2d(x.contiguous(memory_format=fmt), cb, idx, None, 1, ks // 2,
                                            granularity="kernel", scale=scale, shift=shift, relu=True,
                                            residual=residual.contiguous(memory_format=fmt), backend="cpu")
            _close(y, ref, torch.float32)
            assert len(calls) == int(direct)


def test_kernel_layer_dense_path_sees_codebook_writes():
    """A layer on the dense path keeps the dense weight per codebook version: an in-place write (an optimizer
    step, load_state_dict) gives the new weight's conv."""
    from kcengine.nn import ClusteredConv2d

    layer = ClusteredConv2d(5, 4, 3, 6, padding=1, granularity="kernel", bias=False).eval()
    x = torch.randn(4, 5, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        layer.index.copy_(torch.arange(20).reshape(4, 5) % 6)  # M = 4 = C_out, 65,536 output values: the dense path
        for _ in range(2):
            _close(layer(x), F.conv2d(x, layer.to_dense(), None, 1, 1), torch.float32)
            layer.codebook.mul_(-2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_gradients_are_tied_dense_gradients(granularity, backend):
    dtype = torch.float64
    x, cb, idx, conv = _case((2, 5, 7, 9, 11, 3, 1, 1, 1, 3), granularity, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    bias, scale, shift = (torch.randn(7, generator=g, dtype=dtype) for _ in range(3))
    grad_out = torch.randn(2, 7, 9, 11, generator=g, dtype=dtype)
    residual = torch.randn(2, 7, 9, 11, generator=g, dtype=dtype)

    leaves = [t.clone().requires_grad_(True) for t in (x, cb, bias, scale, shift, residual)]
    y = kcengine.indexed_conv2d(leaves[0], leaves[1], idx, leaves[2], granularity=granularity, scale=leaves[3],
                                shift=leaves[4], relu=True, residual=leaves[5], backend=backend, **conv)
    y.backward(grad_out)

    # Independent reference: a dense conv whose weight is a free tensor, then sum its gradient per cluster.
    w = dense_weight(cb, idx, granularity).detach().requires_grad_(True)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, bias, scale, shift, residual)]
    xr, br, sr, tr, rr = ref_leaves
    yr = torch.relu((F.conv2d(xr, w, br, **conv)) * sr.view(1, -1, 1, 1) + tr.view(1, -1, 1, 1) + rr)
    yr.backward(grad_out)
    _close(y.detach(), yr.detach(), dtype)  # the forward under autograd (kernel: the dense-weight path) too
    if granularity == "filter":
        cb_grad = torch.zeros_like(cb).index_add_(0, idx, w.grad)
    else:
        cb_grad = torch.zeros_like(cb).index_add_(0, idx.reshape(-1), w.grad.reshape(-1, *cb.shape[1:]))
    _close(leaves[1].grad, cb_grad, dtype)
    for got, want in zip([leaves[0], *leaves[2:]], ref_leaves):
        _close(got.grad, want.grad, dtype)
    assert cb_grad.abs().sum() > 0


def test_groups_fall_back_to_dense():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 9, 9, generator=g)
    cb = torch.randn(3, 2, 3, 3, generator=g)
    idx = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    y = kcengine.indexed_conv2d(x, cb, idx, padding=1, groups=3)
    _close(y, F.conv2d(x, cb[idx], padding=1, groups=3), torch.float32)


@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_index_dtypes(index_dtype):
    x, cb, idx, conv = _case(SHAPES[0], "filter", torch.float32)
    ref = F.conv2d(x, cb[idx], **conv)
    _close(kcengine.indexed_conv2d(x, cb, idx.to(index_dtype), **conv), ref, torch.float32)


def test_bfloat16_takes_torch_path_on_cpu():
    x, cb, idx, conv = _case(SHAPES[0], "filter", torch.float32)
    y = kcengine.indexed_conv2d(x.bfloat16(), cb.bfloat16(), idx, backend="cpu", **conv)
    ref = F.conv2d(x.bfloat16(), cb.bfloat16()[idx], **conv)
    torch.testing.assert_close(y, ref, atol=0.1, rtol=0.05)


def test_inputs_not_mutated():
    x, cb, idx, conv = _case(SHAPES[0], "kernel", torch.float32)
    copies = [t.clone() for t in (x, cb, idx)]
    kcengine.indexed_conv2d(x, cb, idx, granularity="kernel", relu=True, **conv)
    for a, b in zip((x, cb, idx), copies):
        assert torch.equal(a, b)


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_bad_inputs_raise_value_error(granularity):
    x, cb, idx, conv = _case(SHAPES[0], granularity, torch.float32)
    bad_idx = idx.clone()
    bad_idx.view(-1)[1] = 3  # K = 3
    with pytest.raises(ValueError, match=r"index values must be in \[0, K=3\).*got 3"):
        kcengine.indexed_conv2d(x, cb, bad_idx, granularity=granularity, **conv)
    neg = idx.clone()
    neg.view(-1)[0] = -1
    with pytest.raises(ValueError, match=r"index .*got -1"):
        kcengine.indexed_conv2d(x, cb, neg, granularity=granularity, **conv)
    with pytest.raises(ValueError, match=r"index must be an integer tensor.*float32"):
        kcengine.indexed_conv2d(x, cb, idx.float(), granularity=granularity, **conv)
    with pytest.raises(ValueError, match=r"codebook must have the dtype of x \(torch.float32\), got torch.float64"):
        kcengine.indexed_conv2d(x, cb.double(), idx, granularity=granularity, **conv)
    with pytest.raises(ValueError, match=r"granularity must be one of .*'channel'"):
        kcengine.indexed_conv2d(x, cb, idx, granularity="channel", **conv)
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor.*\(5, 13, 11\)"):
        kcengine.indexed_conv2d(x[0], cb, idx, granularity=granularity, **conv)
    with pytest.raises(ValueError, match=r"stride must be >= 1, got \(0, 0\)"):
        kcengine.indexed_conv2d(x, cb, idx, granularity=granularity, stride=0)
    with pytest.raises(ValueError, match=r"bias must have shape \(7,\).*got \(6,\)"):
        kcengine.indexed_conv2d(x, cb, idx, torch.zeros(6), granularity=granularity, **conv)
    with pytest.raises(ValueError, match=r"residual must have the output's shape"):
        kcengine.indexed_conv2d(x, cb, idx, granularity=granularity, residual=torch.zeros(1), **conv)
    # a k-means-only backend is a bad value of the argument (ValueError), not a backend that cannot run here
    with pytest.raises(ValueError, match=r"backend='cuda' does not implement conv; conv has \('auto', 'cpu'"):
        kcengine.indexed_conv2d(x, cb, idx, granularity=granularity, backend="cuda", **conv)


# Every check of indexed_conv2d's arguments not exercised above: (what is wrong, the call's changes, the message).
# Filter granularity on SHAPES[0]: x [2, 5, 13, 11], codebook [3, 5, 3, 3], index [7].
_BAD_ARGS = [
    ("x not a tensor", lambda a: a.update(x=a["x"].numpy()), r"x must be a 4-D tensor \[N, C_in, H, W\], got ndarray"),
    ("x of integers", lambda a: a.update(x=a["x"].long()), r"x must be a floating tensor, got dtype torch.int64"),
    ("x without channels", lambda a: a.update(x=a["x"][:, :0], codebook=a["codebook"][:, :0]),
     r"x must have C_in >= 1 channels, got shape \(2, 0, 13, 11\)"),
    ("codebook a list", lambda a: a.update(codebook=a["codebook"].tolist()), r"codebook must be a torch.Tensor, got list"),
    ("codebook on meta", lambda a: a.update(codebook=a["codebook"].to("meta")),
     r"codebook must be on the device of x \(cpu\), got meta"),
    ("index a list", lambda a: a.update(index=a["index"].tolist()), r"index must be a torch.Tensor, got list"),
    ("index on meta", lambda a: a.update(index=a["index"].to("meta")),
     r"index must be on the device of x \(cpu\), got meta"),
    ("groups 0", lambda a: a.update(groups=0), r"groups must be a positive int, got 0"),
    ("groups True", lambda a: a.update(groups=True), r"groups must be a positive int, got True"),
    ("relu a string", lambda a: a.update(relu="no"), r"relu must be True or False, got relu='no'"),  # read as True
    ("relu a float", lambda a: a.update(relu=0.5), r"relu must be True or False, got relu=0.5"),
    ("groups 2 of 5 channels", lambda a: a.update(groups=2), r"x has C_in=5 channels, not divisible by groups=2"),
    ("stride of one entry", lambda a: a.update(stride=(1,)), r"stride must be an int or a pair of ints, got \(1,\)"),
    ("stride a float", lambda a: a.update(stride=1.5), r"stride must be an int or a pair of ints, got 1.5"),
    ("padding negative", lambda a: a.update(padding=-1), r"padding must be >= 0, got \(-1, -1\)"),
    ("padding unknown string", lambda a: a.update(padding="full"),
     r"padding must be an int, a pair of ints, 'valid' or 'same', got 'full'"),
    ("padding same with stride", lambda a: a.update(padding="same", stride=2),
     r"padding='same' needs stride=1 \(as in F.conv2d\), got stride=\(2, 2\)"),
    ("dilation 0", lambda a: a.update(dilation=(1, 0)), r"dilation must be >= 1, got \(1, 0\)"),
    ("codebook 3-D", lambda a: a.update(codebook=a["codebook"][:, 0]),
     r"codebook must be \[K, C_in/groups, kh, kw\] for granularity='filter', got shape \(3, 3, 3\)"),
    ("no centroids", lambda a: a.update(codebook=a["codebook"][:0], index=a["index"][:0]),
     r"codebook must hold K >= 1 centroids, got shape \(0, 5, 3, 3\)"),
    ("no outputs", lambda a: a.update(index=a["index"][:0]), r"index gives C_out=0 output channels"),
    ("C_out not divisible by groups", lambda a: a.update(x=a["x"][:, :4], codebook=a["codebook"][:, :2], groups=2),
     r"index gives C_out=7 output channels, which must be >= 1 and divisible by groups=2"),
    ("bias not a tensor", lambda a: a.update(bias=[0.0] * 7), r"bias must be a torch.Tensor or None, got list"),
    ("scale of another dtype", lambda a: a.update(scale=torch.ones(7, dtype=torch.float64)),
     r"scale must have the dtype of x \(torch.float32\), got torch.float64"),
    ("shift on meta", lambda a: a.update(shift=torch.zeros(7, device="meta")),
     r"shift must be on the device of x \(cpu\), got meta"),
    ("shift of another shape", lambda a: a.update(shift=torch.zeros(7, 1)),
     r"shift must have shape \(7,\) \(C_out\), got \(7, 1\)"),
    ("x too small", lambda a: a.update(x=a["x"][:, :, :1, :1], padding=0),
     r"x of spatial size 1x1 is too small for a 3x3 kernel with padding=\(0, 0\), dilation=\(1, 1\) "
     r"\(output would be -1x-1\)"),
    ("x of height 0", lambda a: a.update(x=a["x"][:, :, :0], padding=2),
     r"x has an empty spatial dimension \(shape \(2, 5, 0, 11\)\): only an empty batch is taken"),
    ("residual a list", lambda a: a.update(residual=[0.0]), r"residual must be a torch.Tensor or None, got list"),
    ("residual of another dtype", lambda a: a.update(residual=torch.zeros(2, 7, 13, 11, dtype=torch.float64)),
     r"residual must have the dtype/device of x \(torch.float32, cpu\), got \(torch.float64, cpu\)"),
]


@pytest.mark.parametrize("what, change, match", _BAD_ARGS, ids=[c[0] for c in _BAD_ARGS])
def test_each_bad_argument_is_named(what, change, match):
    """Each of the argument checks raises a ValueError naming the argument and the value given, before any
    backend runs, whatever the backend; the good call with the same tensors still works."""
    x, cb, idx, conv = _case(SHAPES[0], "filter", torch.float32)
    ref = F.conv2d(x, cb[idx], **conv)
    for backend in BACKENDS:
        args = dict(x=x, codebook=cb, index=idx, backend=backend, **conv)
        change(args)
        with pytest.raises(ValueError, match=match):
            kcengine.indexed_conv2d(**args)
    _close(kcengine.indexed_conv2d(x, cb, idx, **conv), ref, torch.float32)


def test_codebook_index_shape_mismatch():
    x, cb, idx, conv = _case(SHAPES[0], "filter", torch.float32)
    with pytest.raises(ValueError, match=r"codebook.shape\[1\] must be 5"):
        kcengine.indexed_conv2d(x, cb[:, :4], idx, **conv)
    with pytest.raises(ValueError, match=r"index must be \[C_out\] for granularity='filter', got shape \(7, 5\)"):
        kcengine.indexed_conv2d(x, cb, idx[:, None].expand(7, 5), **conv)
    with pytest.raises(ValueError, match=r"codebook must be \[K, kh, kw\] for granularity='kernel'"):
        kcengine.indexed_conv2d(x, cb, idx, granularity="kernel", **conv)
    kcb = torch.randn(3, 3, 3)
    with pytest.raises(ValueError, match=r"index must be \[C_out, C_in/groups=5\].*got shape \(7, 4\)"):
        kcengine.indexed_conv2d(x, kcb, torch.zeros(7, 4, dtype=torch.long), granularity="kernel", **conv)


def test_native_core_checks_its_inputs():
    """The C++ kernels keep their own checks: nothing Python can pass reads out of bounds."""
    import numpy as np

    from kcengine import _core

    u = np.zeros((2, 3, 10), np.float32)
    out = np.zeros((2, 4, 10), np.float32)
    with pytest.raises(ValueError, match=r"index values must be in \[0, 3\), got 3 at position 2"):
        _core.conv_gather_epilogue(u, np.array([0, 1, 3, 0], np.int32), None, None, None, False, out)
    with pytest.raises(ValueError, match=r"index must be int32, got int64"):
        _core.conv_gather_epilogue(u, np.array([0, 1, 2, 0], np.int64), None, None, None, False, out)
    with pytest.raises(ValueError, match=r"index must have 4 entries, got 3"):
        _core.conv_gather_epilogue(u, np.array([0, 1, 2], np.int32), None, None, None, False, out)
    with pytest.raises(ValueError, match=r"out must have the dtype of u"):
        _core.conv_gather_epilogue(u, np.zeros(4, np.int32), None, None, None, False, out.astype(np.float64))
    with pytest.raises(ValueError, match=r"scale .*C_out=4"):
        _core.conv_gather_epilogue(u, np.zeros(4, np.int32), np.ones(3, np.float32), None, None, False, out)
    with pytest.raises(ValueError, match=r"residual must have the shape of out"):
        _core.conv_gather_epilogue(u, np.zeros(4, np.int32), None, None, np.zeros((2, 4, 9), np.float32), False, out)
    with pytest.raises(ValueError, match=r"u must be C-contiguous"):
        _core.conv_gather_epilogue(np.zeros((2, 10, 3), np.float32).transpose(0, 2, 1), np.zeros(4, np.int32),
                                   None, None, None, False, out)
    with pytest.raises(ValueError, match=r"out must be writeable"):
        ro = out.copy()
        ro.setflags(write=False)
        _core.conv_gather_epilogue(u, np.zeros(4, np.int32), None, None, None, False, ro)
    with pytest.raises(ValueError, match=r"u must be float32 or float64, got int32"):
        _core.conv_gather_epilogue(u.astype(np.int32), np.zeros(4, np.int32), None, None, None, False,
                                   out.astype(np.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c_in,c_out,k,kk", [
    # With 8-pixel tiles (7 of them; AVX-512 register paths, and AVX2 pixel lanes above 64 maps) C_in = 50
    # splits into 32 + 18 channels on 2 and 3 threads, 47 into 16 + 16 + 15 on 3; 37 not at all (a last
    # part of 5 would cost more than it balances).  With 16-pixel tiles (4; AVX-512 pixel lanes, AVX2 ones
    # up to 64 maps) they split on 3 threads only.  The cases below name the AVX-512 paths; on AVX2 all
    # take pixel lanes.
    (50, 40, 3, 12),   # <= 64 outputs, 9..16 maps, 3x3: responses and sums in registers
    (50, 40, 3, 6),    # <= 8 maps, 3x3: pixels as lanes
    (50, 40, 5, 6),    # <= 8 maps, 5x5: responses in registers, permuted into the sums
    (50, 60, 5, 20),   # <= 64 outputs, 16 < maps <= 32, 5x5: responses in registers, permuted into the sums
    (50, 80, 3, 20),   # > 64 outputs: pixels as lanes
    (37, 70, 3, 48),   # > 32 maps: pixels as lanes, a last quad of input channels with 1 of 4 live
    (47, 70, 3, 48),   # the same with 3 of 4 live
    (50, 70, 5, 80),   # 5x5, pixels as lanes, 2 of 4 live
])
def test_native_direct_kernel_any_thread_count(c_in, c_out, k, kk, dtype):
    """conv_kernel_direct with 1, 2 and 3 threads on a 7x7 output (4 or 7 pixel tiles): where the tiles do not
    divide among the threads, each tile's sum over C_in is split into per-thread parts added afterwards;
    every path and thread count equals F.conv2d.  The pack (codebook side, built once) is checked against
    the call's input, and stays usable after its layer is copied or pickled (the copy builds its own)."""
    import copy
    import pickle

    import numpy as np

    from kcengine import _core
    from kcengine.conv.backends import kernel_plan

    g = torch.Generator().manual_seed(c_in + kk)
    x = torch.randn(1, c_in, 7, 7, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    cb = torch.randn(kk, k, k, generator=g, dtype=dtype)
    idx = torch.randint(0, kk, (c_out, c_in), generator=g)
    a, b = torch.randn(c_out, generator=g, dtype=dtype), torch.randn(c_out, generator=g, dtype=dtype)
    ref = F.conv2d(x, dense_weight(cb, idx, "kernel"), padding=k // 2) * a[:, None, None] + b[:, None, None]
    plan = kernel_plan(idx, kk)
    pack = plan.direct_pack(cb)
    assert plan.direct_pack(cb) is pack and pack.shape == (c_in, k * k, plan.m, c_out)
    if dtype == torch.float32 and pack.isa != "generic":  # the path the case is named for is taken
        lanes = pack.isa == "avx2" or plan.m > 32 or c_out > 64 or (plan.m <= 8 and k <= 3)
        assert pack.pixel_lanes == lanes, (plan.m, pack.pixel_lanes)
        assert pack.tile_pixels == (16 if lanes and (pack.isa == "avx512" or plan.m <= 64) else 8)
    geom = [k, k, 1, 1, k // 2, k // 2, 1, 1]
    xn = x.permute(0, 2, 3, 1).numpy()
    for threads in (1, 2, 3):
        out = torch.empty_like(ref, memory_format=torch.channels_last)
        _core.conv_kernel_direct(xn, pack, geom, a.numpy(), b.numpy(), None, True, out.permute(0, 2, 3, 1).numpy(),
                                 threads)
        _close(out, ref.relu(), dtype)
    on = np.zeros((1, 7, 7, c_out), xn.dtype)
    other = np.float32 if dtype == torch.float64 else np.float64
    with pytest.raises(ValueError, match=r"pack was built for float(32|64) but x is float(64|32)"):
        _core.conv_kernel_direct(xn.astype(other), pack, geom, None, None, None, False, on.astype(other))
    with pytest.raises(ValueError, match=rf"x has {c_in - 1} channels but the pack has C_in={c_in}"):
        _core.conv_kernel_direct(np.ascontiguousarray(xn[..., 1:]), pack, geom, None, None, None, False, on)
    with pytest.raises(ValueError, match=rf"geom has kh\*kw=1 but the pack has {k * k} taps"):
        _core.conv_kernel_direct(xn, pack, [1, 1, 1, 1, 0, 0, 1, 1], None, None, None, False, on)
    with pytest.raises(ValueError, match=rf"slot values must be in \[0, {plan.m}\)"):
        bad = plan.slot_table().numpy()  # a fresh table: editing it leaves the plan's slots alone
        bad[1, 2] = plan.m
        _core.conv_kernel_pack(plan.tap_weights(cb).numpy(), bad)
    for twin in (copy.deepcopy(plan), pickle.loads(pickle.dumps(plan))):
        assert "direct_pack" not in twin._cache
        assert twin.direct_pack(cb).shape == pack.shape


@pytest.mark.parametrize("c_out", [40, 1100, 2100])
def test_native_direct_kernel_slot_offset_widths(c_out):
    """The pixel-lane path stores each output's four response offsets in 16 bits while they fit (four
    channels' responses, Mpad * tile_pixels floats each, within 65,535: up to 2032 maps per input channel
    with 8-pixel tiles, 1008 with 16-pixel ones) and in 32 bits beyond: both equal F.conv2d.  c_out = 1100
    or 2100 with every output of a channel on its own kernel gives that many maps per channel."""
    from kcengine import _core
    from kcengine.conv.backends import kernel_plan

    g = torch.Generator().manual_seed(c_out)
    c_in, kk = 5, max(c_out, 36)
    x = torch.randn(1, c_in, 6, 9, generator=g).contiguous(memory_format=torch.channels_last)
    cb = torch.randn(kk, 3, 3, generator=g)
    idx = torch.stack([torch.randperm(kk, generator=g)[:c_out] for _ in range(c_in)], 1)  # [c_out, c_in]
    plan = kernel_plan(idx, kk)
    pack = plan.direct_pack(cb)
    if not pack.pixel_lanes:
        pytest.skip("this CPU has no pixel-lane path (AVX2 or AVX-512)")
    assert pack.slot_bits == (16 if plan.m <= (2032 if pack.tile_pixels == 8 else 1008) else 32)
    ref = F.conv2d(x, dense_weight(cb, idx, "kernel"), padding=1)
    for threads in (1, 2):
        out = torch.empty_like(ref, memory_format=torch.channels_last)
        _core.conv_kernel_direct(x.permute(0, 2, 3, 1).numpy(), pack, [3, 3, 1, 1, 1, 1, 1, 1], None, None, None,
                                 False, out.permute(0, 2, 3, 1).numpy(), threads)
        _close(out, ref, torch.float32)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("shape", [
    # (N, C_in, C_out, H, W, k, stride, padding, dilation, maps per channel)
    (3, 6, 21, 9, 11, 3, 2, 1, 2, 12),    # 16-pixel tiles across rows and images, a quad with 2 live channels
    (2, 3, 31, 15, 13, 7, 2, 3, 1, 29),   # stem-like 7x7 on 3 channels, 29 maps
    # 7x7 with 16-pixel tiles: blocks of 6 maps, then a last block of 6 (29 above), 4 (3 or 16 maps), 2 (7
    # or 32) or none (48, which also takes pixel lanes on AVX-512)
    (1, 3, 33, 12, 11, 7, 2, 3, 1, 3),
    (1, 3, 33, 12, 11, 7, 2, 3, 1, 7),
    (1, 3, 40, 12, 11, 7, 2, 3, 1, 16),
    (1, 3, 64, 12, 11, 7, 2, 3, 1, 32),
    (1, 3, 70, 12, 11, 7, 2, 3, 1, 48),
    (2, 9, 53, 7, 10, 3, 1, 1, 1, 48),    # Mpad 48: 16-pixel tiles; > 32 maps, pixel lanes on AVX-512 too
    (1, 8, 70, 5, 9, 1, 1, 0, 1, 70),     # Mpad 80: 8-pixel tiles, 1x1
    (1, 47, 30, 7, 7, 3, 1, 1, 1, 12),    # 4 tiles: on 3 threads C_in splits into 16 + 16 + 15 (a 3-live quad)
    # wide enough for register tiles whose windows lie inside the image (read in place, not copied),
    # beside border tiles: the RGB stem's padded window rows, and 3x3 groups of 8 or 4 pixels
    (2, 3, 40, 20, 30, 7, 1, 3, 1, 20),
    (1, 20, 40, 12, 26, 3, 1, 1, 1, 12),
    (1, 20, 60, 12, 26, 3, 1, 1, 1, 24),
])
def test_native_direct_kernel_every_isa_copy(isa, shape, runnable_isas):
    """conv_kernel_direct with each instruction set's copy this CPU can run (KCENGINE_CPU_ISA): the
    pack records the set it was built for and the path it takes (pixel lanes on AVX2 for every M, on
    AVX-512 above 32 maps, above 64 outputs or at most 8 maps of a 3x3 or smaller kernel; 16-pixel tiles:
    AVX-512's vectors, AVX2's pairs of vectors up to 64 padded maps), and every copy equals F.conv2d with
    the fused affine, residual and ReLU, on 1, 2 and 3 threads."""
    from kcengine import _core
    from kcengine.conv.backends import kernel_plan

    if isa not in runnable_isas:
        pytest.skip(f"this CPU cannot run the {isa} copy")
    n, ci, co, h, w, k, s, p, d, kk = shape
    g = torch.Generator().manual_seed(ci * co + kk)
    x = torch.randn(n, ci, h, w, generator=g)
    cb = torch.randn(kk, k, k, generator=g)
    # every input channel uses all kk kernels (each appears in its column), so the plan has exactly kk maps
    idx = torch.stack([torch.randperm(co, generator=g) % kk for _ in range(ci)], 1)
    a, b = torch.randn(co, generator=g), torch.randn(co, generator=g)
    conv = F.conv2d(x, dense_weight(cb, idx, "kernel"), stride=s, padding=p, dilation=d)
    res = torch.randn(conv.shape, generator=g)
    ref = (conv * a[:, None, None] + b[:, None, None] + res).relu()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KCENGINE_CPU_ISA", isa)
        plan = kernel_plan(idx, kk)
        assert plan.m == kk
        pack = _core.conv_kernel_pack(plan.tap_weights(cb).numpy(), plan.slot_table().numpy())
    assert pack.isa == isa
    lanes = {"generic": False, "avx2": True, "avx512": kk > 32 or co > 64 or (kk <= 8 and k <= 3)}[isa]
    assert pack.pixel_lanes == lanes
    assert pack.tile_pixels == (16 if lanes and (isa == "avx512" or (kk + 15) // 16 * 16 <= 64) else 8)
    xn = x.permute(0, 2, 3, 1).contiguous().numpy()
    rn = res.permute(0, 2, 3, 1).contiguous().numpy()
    for threads in (1, 2, 3):
        out = torch.empty_like(ref, memory_format=torch.channels_last)
        _core.conv_kernel_direct(xn, pack, [k, k, s, s, p, p, d, d], a.numpy(), b.numpy(), rn, True,
                                 out.permute(0, 2, 3, 1).numpy(), threads)
        _close(out, ref, torch.float32)


def test_native_gather_matches_numpy():
    import numpy as np

    from kcengine import _core

    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        u = rng.standard_normal((3, 5, 37)).astype(dt)
        idx = rng.integers(0, 5, 11).astype(np.int32)
        a, b = rng.standard_normal(11).astype(dt), rng.standard_normal(11).astype(dt)
        r = rng.standard_normal((3, 11, 37)).astype(dt)
        out = np.empty((3, 11, 37), dt)
        _core.conv_gather_epilogue(u, idx, a, b, r, True, out)
        want = np.maximum(u[:, idx] * a[None, :, None] + b[None, :, None] + r, 0)
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
        # channels-last layout [M, K]
        ul = np.ascontiguousarray(u.transpose(0, 2, 1).reshape(-1, 5))
        outl = np.empty((ul.shape[0], 11), dt)
        _core.conv_gather_epilogue(ul, idx, a, None, None, False, outl)
        np.testing.assert_allclose(outl, ul[:, idx] * a, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"threads must be >= 0.*got -1"):
        _core.conv_gather_epilogue(ul, idx, None, None, None, False, outl, -1)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_native_gather_every_isa_copy(isa, runnable_isas):
    """The channels-last float32 gather's hand-written copies (KCENGINE_CPU_ISA) against numpy, and which
    copy each K takes (conv_gather_copy).  AVX-512: one register pair per 32 codebook maps up to K = 128.
    AVX2: one register per 8 maps up to K = 32, a transpose through a [K][8] block above, up to
    K = 1024.  Past those, the plain loop; nothing is written outside out.  The cases
    cover every register count with a partial last register, K not a multiple of 8 on the transpose, C
    not a multiple of 8 or 16, pixel counts that leave fewer than 8 pixels in a thread's last block,
    residual + ReLU and without, 1 and 2 threads."""
    import numpy as np

    from kcengine import _core

    if isa not in runnable_isas:
        pytest.skip(f"this CPU cannot run the {isa} copy")
    rng = np.random.default_rng(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KCENGINE_CPU_ISA", isa)
        copies = {k: _core.conv_gather_copy(k, np.float32) for k in (1, 32, 33, 128, 129, 1024, 1025)}
        assert _core.conv_gather_copy(16, np.float64) == "plain"
    want = {"generic": {k: "plain" for k in copies},
            "avx2": {1: "avx2_permute", 32: "avx2_permute", 33: "avx2_transpose", 128: "avx2_transpose",
                     129: "avx2_transpose", 1024: "avx2_transpose", 1025: "plain"},
            "avx512": {1: "avx512_permute", 32: "avx512_permute", 33: "avx512_permute", 128: "avx512_permute",
                       129: "avx2_transpose", 1024: "avx2_transpose", 1025: "plain"}}[isa]
    assert copies == want
    for k, c in ((1, 3), (5, 8), (8, 16), (13, 7), (16, 64), (20, 37), (24, 9), (32, 16), (33, 19), (40, 41),
                 (64, 64), (65, 80), (100, 33), (127, 17), (128, 512), (129, 40), (256, 24), (1024, 8), (1025, 9)):
        for m in (101, 64 * 3 + 8, 7):
            u = rng.standard_normal((m, k)).astype(np.float32)
            idx = rng.integers(0, k, c).astype(np.int32)
            idx[0] = k - 1  # the last map is always read
            a, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
            r = rng.standard_normal((m, c)).astype(np.float32)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("KCENGINE_CPU_ISA", isa)
                for threads in (1, 2):
                    buf = np.full(m * c + 64, np.nan, np.float32)  # 32 guard floats either side of out
                    out = buf[32:-32].reshape(m, c)
                    _core.conv_gather_epilogue(u, idx, a, b, r, True, out, threads)
                    np.testing.assert_allclose(out, np.maximum(u[:, idx] * a + b + r, 0), rtol=1e-6, atol=1e-6,
                                               err_msg=f"K={k} C={c} M={m} threads={threads}")
                    assert np.isnan(buf[:32]).all() and np.isnan(buf[-32:]).all(), "wrote outside out"
                    out = np.full((m, c), np.nan, np.float32)
                    _core.conv_gather_epilogue(u, idx, a, b, None, False, out, threads)
                    np.testing.assert_allclose(out, u[:, idx] * a + b, rtol=1e-6, atol=1e-6,
                                               err_msg=f"K={k} C={c} M={m} threads={threads} no residual")


def test_import_touches_no_triton_or_cupy():
    code = "import sys, kcengine, kcengine.nn; print(any(m.split('.')[0] in ('triton', 'cupy') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("padding", [2**31, 2**40])
def test_huge_padding_is_refused_by_name(padding):
    """torch's own size arithmetic wraps there (F.conv2d with padding=2**31 asks its allocator for ~1 TB, not
    the ~3e20 bytes meant): the argument check refuses it before any backend runs (geometry past 32 bits since
    session 46; before, by the padded input's byte count)."""
    from kcengine.conv.functional import indexed_conv2d

    x = torch.randn(1, 2, 4, 4)
    cb, idx = torch.randn(2, 2, 3, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=rf"padding must be an int or a pair of ints below 2\*\*31, "
                                         rf"got padding=\({padding}, {padding}\)"):
        indexed_conv2d(x, cb, idx, padding=padding)


def test_padded_input_past_a_64bit_byte_count_is_refused_by_name():
    """Geometry within 32 bits can still ask for more than a 64-bit byte count (padding 2**31 - 1 on both
    sides of a wide batch): refused before any backend runs."""
    from kcengine.conv.functional import indexed_conv2d

    x = torch.randn(1, 2, 4, 4).expand(2**31 - 1, 2, 4, 4)
    cb, idx = torch.randn(2, 2, 3, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"past what a 64-bit byte count"):
        indexed_conv2d(x, cb, idx, padding=2**31 - 1)


def _reference_plan(index, k):
    """The kernel plan from a dense [C_in, k] table of the kernels each input channel uses."""
    idx = index.long()
    c_out, c_in = idx.shape
    used = torch.zeros(c_in, k, dtype=torch.bool)
    used[torch.arange(c_in).expand(c_out, c_in), idx] = True
    m = int(used.sum(1).max())
    pos = used.long().cumsum(1) - 1
    slots = used.long().argmax(1)[:, None].repeat(1, m)
    ii, kk = used.nonzero(as_tuple=True)
    slots[ii, pos[ii, kk]] = kk
    pair = torch.arange(c_in)[None, :] * m + pos.gather(1, idx.t().contiguous()).t()
    return slots, pair, m


def test_kernel_plan_equals_the_dense_table_reference_and_needs_no_table():
    """kernel_plan builds from the sorted distinct (channel, kernel) pairs; it used to allocate the [C_in, K]
    table (and an int64 cumsum of it): 0.5 GB for a 320x1280 1x1 conv at K = N/2, gigabytes for resnet50's.
    Same plan as the table gives; and a K no table could hold (2**31 - 1) is no problem."""
    from kcengine.conv.backends import kernel_plan

    g = torch.Generator().manual_seed(0)
    for t in range(200):
        c_out, c_in, k = (int(v) for v in torch.randint(1, 40, (3,), generator=g))
        idx = torch.randint(0, k, (c_out, c_in), generator=g)
        if t % 3 == 0:
            idx = idx % max(1, k // 4)  # channels sharing few kernels
        plan = kernel_plan(idx.to(torch.uint8 if k <= 256 else torch.int32), k)
        slots, pair, m = _reference_plan(idx, k)
        assert plan.m == m and torch.equal(plan.slots, slots) and torch.equal(plan.pair, pair), (c_out, c_in, k)
    big = 2**31 - 1
    idx = torch.tensor([[0, big - 1, 5], [big - 1, big - 1, 7]], dtype=torch.int32)
    plan = kernel_plan(idx, big)
    assert plan.m == 2 and plan.slots.tolist() == [[0, big - 1], [big - 1, big - 1], [5, 7]]
    assert torch.equal(plan.slots.reshape(-1)[plan.pair.reshape(-1)].reshape(2, 3), idx.long())


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_forward_mode_ad_carries_the_tangent(granularity, backend):
    """Under torch.autograd.forward_ad the native kernels dropped the tangent (the output's read None, i.e. zero,
    with no warning), and the torch backend's kernel granularity raised NotImplementedError (_sparse_addmm).
    The tangent equals F.conv2d's on the dense weight, for the function and for a frozen layer."""
    import torch.autograd.forward_ad as fwad

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=g)
    t = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=g)
    if granularity == "filter":
        cb, idx = torch.randn(3, 4, 3, 3, dtype=torch.float64, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    else:
        cb, idx = torch.randn(3, 3, 3, dtype=torch.float64, generator=g), torch.randint(0, 3, (6, 4), generator=g)
    w = cb[idx]
    bias = torch.randn(6, dtype=torch.float64, generator=g)
    with fwad.dual_level():
        y = kcengine.indexed_conv2d(fwad.make_dual(x, t), cb, idx, bias, padding=1, granularity=granularity,
                                    relu=True, backend=backend)
        primal, tangent = fwad.unpack_dual(y)
        ref, ref_t = fwad.unpack_dual(F.relu(F.conv2d(fwad.make_dual(x, t), w, bias, padding=1)))
    assert tangent is not None
    torch.testing.assert_close(primal, ref)
    torch.testing.assert_close(tangent, ref_t)
    layer = kcengine.nn.ClusteredConv2d(4, 6, 3, 3, padding=1, granularity=granularity, backend=backend)
    layer = layer.double().requires_grad_(False)
    with fwad.dual_level():
        lt = fwad.unpack_dual(layer(fwad.make_dual(x, t))).tangent
    torch.testing.assert_close(lt, F.conv2d(t, layer.to_dense(), padding=1))
    with fwad.dual_level(), pytest.raises(ValueError, match=r"^backend='bogus' is not one of \('auto', "):
        kcengine.indexed_conv2d(fwad.make_dual(x, t), cb, idx, granularity=granularity, backend="bogus")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_granularity_in_half_dtypes_is_as_close_as_conv2d(dtype):
    """Kernel granularity in float16/bfloat16 summed its C_in depthwise maps in that dtype: 3-6x further from the
    exact conv than F.conv2d on the dense weight in the same dtype (which accumulates in float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 12, 12, generator=g).to(dtype)
    cb = torch.randn(4, 3, 3, generator=g).to(dtype)
    idx = torch.randint(0, 4, (32, 64), generator=g)
    w = cb[idx]
    exact = F.conv2d(x.double(), w.double(), padding=1)
    with torch.no_grad():
        ours = kcengine.indexed_conv2d(x, cb, idx, padding=1, granularity="kernel")
    assert ours.dtype == dtype
    err, ref_err = ((t.double() - exact).abs().max().item() for t in (ours, F.conv2d(x, w, padding=1)))
    assert err <= 1.5 * ref_err


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_empty_spatial_input_is_refused_as_conv2d_refuses_it(granularity, backend):
    """F.conv2d takes an empty batch but not an empty height or width; with padding the cpu kernel path made an
    output of bias rows from a 0-high input, where the other paths raised torch's error."""
    cb = torch.randn(2, 3, 1, 1) if granularity == "filter" else torch.randn(2, 1, 1)
    idx = torch.zeros(4, dtype=torch.long) if granularity == "filter" else torch.zeros(4, 3, dtype=torch.long)
    w = dense_weight(cb, idx, granularity)
    for shape in ((2, 3, 0, 5), (2, 3, 4, 0)):
        with pytest.raises(RuntimeError):
            F.conv2d(torch.randn(shape), w, padding=1)
        with pytest.raises(ValueError, match=rf"^x has an empty spatial dimension \(shape {re.escape(str(shape))}\)"):
            kcengine.indexed_conv2d(torch.randn(shape), cb, idx, padding=1, granularity=granularity, backend=backend)
    x = torch.randn(0, 3, 0, 5)
    y = kcengine.indexed_conv2d(x, cb, idx, padding=1, granularity=granularity, backend=backend)
    assert y.shape == F.conv2d(x, w, padding=1).shape == (0, 4, 2, 7)
