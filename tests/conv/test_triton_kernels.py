"""Triton kernels: under TRITON_INTERPRET=1 on CPU tensors (small shapes), and on CUDA when present (marked gpu)."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from kcengine.conv import dense_weight
from kcengine.conv.backends import torch_gather_sum

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from kcengine.conv import triton_kernels

    return triton_kernels


def _epilogue_ref(y, scale, shift, residual, relu):
    y = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) + residual
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_gather_epilogue_interpreted(interpret, channels_last, relu):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 5, 7, generator=g)
    if channels_last:
        u = u.to(memory_format=torch.channels_last)
    idx = torch.tensor([2, 0, 1, 1, 2], dtype=torch.int32)
    scale, shift = torch.randn(5, generator=g), torch.randn(5, generator=g)
    res = torch.randn(2, 5, 5, 7, generator=g)
    y = interpret.gather_epilogue(u, idx, scale, shift, res, relu, block=16)  # 35 positions: 3 blocks, last partial
    ref = _epilogue_ref(u[:, idx.long()], scale, shift, res, relu)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    y2 = interpret.gather_epilogue(u, idx)
    torch.testing.assert_close(y2, u[:, idx.long()], atol=0, rtol=0)


def test_width_one_tensors_whose_width_stride_is_free_interpreted(interpret):
    """torch calls a [N, C, H, 1] tensor contiguous whatever its width stride (a transposed [N, C, 1, H] has
    sw = H): the kernels read it at sw per position, off the rows and past the storage's end (error 2-3 against
    F.conv2d).  Inputs, residual and the whole conv at both granularities, each against the torch reference."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 3, 1, 4, generator=g).transpose(2, 3)  # [2, 3, 4, 1], strides (12, 4, 1, 4)
    assert u.is_contiguous() and u.stride()[3] == 4
    idx = torch.tensor([2, 0, 1, 1], dtype=torch.int32)
    res = torch.randn(2, 4, 1, 4, generator=g).transpose(2, 3)
    scale, shift = torch.randn(4, generator=g), torch.randn(4, generator=g)
    y = interpret.gather_epilogue(u, idx, scale, shift, res, False)
    torch.testing.assert_close(y, _epilogue_ref(u[:, idx.long()], scale, shift, res, False), atol=1e-6, rtol=1e-6)
    pair = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 0]], dtype=torch.int32)
    y = interpret.gather_sum(u, pair, None, None, res, False)
    torch.testing.assert_close(y, u[:, pair.long()].sum(2) + res, atol=1e-6, rtol=1e-6)
    x = torch.randn(2, 3, 6, 3, generator=g)
    for granularity, cb, index in (("filter", torch.randn(3, 3, 3, 3, generator=g), torch.tensor([0, 2, 1, 2])),
                                   ("kernel", torch.randn(5, 3, 3, generator=g), torch.randint(0, 5, (4, 3),
                                                                                              generator=g))):
        res = torch.randn(2, 4, 1, 4, generator=g).transpose(2, 3)  # the conv's output is [2, 4, 4, 1]
        y = interpret.triton_indexed_conv2d(x, cb, index, None, (1, 1), (0, 0), (1, 1), granularity, None, None,
                                            False, res)
        ref = F.conv2d(x, dense_weight(cb, index, granularity)) + res
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5, msg=granularity)


def test_strided_and_expanded_scale_and_shift_interpreted(interpret):
    """The kernels read scale[o] and shift[o] at o, whatever the strides: an expanded scale (every output 2.0) or
    a strided shift were read as other values (errors of 1.7-3)."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 3, 4, 4, generator=g)
    idx = torch.tensor([2, 0, 1, 1, 2, 0], dtype=torch.int32)
    scale = torch.tensor(2.0).expand(6)
    shift = torch.randn(12, generator=g)[::2]
    y = interpret.gather_epilogue(u, idx, scale, shift, None, False)
    torch.testing.assert_close(y, _epilogue_ref(u[:, idx.long()], scale, shift, 0.0, False), atol=1e-6, rtol=1e-6)
    pair = torch.tensor([[0, 1], [2, 0], [1, 1], [2, 2], [0, 0], [1, 2]], dtype=torch.int32)
    y = interpret.gather_sum(u, pair, scale, shift, None, False)
    ref = _epilogue_ref(torch_gather_sum(u, pair.long()), scale, shift, 0.0, False)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_relu_passes_nan_interpreted(interpret):
    """A NaN reaching the fused ReLU comes out NaN, as torch.relu gives it (it came out 0)."""
    u = torch.randn(1, 3, 2, 9)
    u[0, 1, 1, 4] = float("nan")
    idx = torch.tensor([1, 0, 1], dtype=torch.int32)
    for kind, fn in (("gather", lambda: interpret.gather_epilogue(u, idx, relu=True, block=8)),
                     ("gather_sum", lambda: interpret.gather_sum(u, idx.view(3, 1), relu=True, block=8))):
        y = fn()
        assert torch.equal(torch.isnan(y), torch.isnan(torch.relu(u[:, idx.long()]))), kind


def test_gather_sum_interpreted(interpret):
    g = torch.Generator().manual_seed(1)
    p = torch.randn(2, 8, 3, 5, generator=g)
    pair = torch.randint(0, 8, (4, 3), generator=g, dtype=torch.int32)
    scale, shift = torch.randn(4, generator=g), torch.randn(4, generator=g)
    res = torch.randn(2, 4, 3, 5, generator=g)
    y = interpret.gather_sum(p, pair, scale, shift, res, True, block=8)
    ref = _epilogue_ref(torch_gather_sum(p, pair), scale, shift, res, True)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"pair values must be in \[0, 8\), got 8"):
        interpret.gather_sum(p, torch.full((4, 3), 8, dtype=torch.int32))


def test_float64_is_computed_in_float64_interpreted(interpret):
    """float64 tensors accumulate in fp64 (they were cast to fp32 inside the kernels: relative errors of ~1e-8,
    found by fuzzing the triton conv against F.conv2d in float64)."""
    g = torch.Generator().manual_seed(3)
    p = torch.randn(2, 8, 3, 5, generator=g, dtype=torch.float64) * 1e3
    pair = torch.randint(0, 8, (4, 5), generator=g, dtype=torch.int32)
    scale, shift = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2))
    res = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    y = interpret.gather_sum(p, pair, scale, shift, res, False, block=8)
    torch.testing.assert_close(y, _epilogue_ref(torch_gather_sum(p, pair), scale, shift, res, False), atol=0, rtol=1e-13)
    idx = pair[:, 0].contiguous()
    y = interpret.gather_epilogue(p, idx, scale, shift, res, False, block=8)
    torch.testing.assert_close(y, _epilogue_ref(p[:, idx.long()], scale, shift, res, False), atol=0, rtol=1e-13)


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_triton_backend_forward_and_grad_interpreted(interpret, granularity):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 6, 5, generator=g, requires_grad=True)
    if granularity == "filter":
        cb = torch.randn(2, 3, 3, 3, generator=g)
        idx = torch.tensor([1, 0, 1, 1])
    else:
        cb = torch.randn(2, 3, 3, generator=g)
        idx = torch.randint(0, 2, (4, 3), generator=g)
    cb.requires_grad_(True)
    bias = torch.randn(4, generator=g)
    y = interpret.triton_indexed_conv2d(x, cb, idx, bias, (2, 2), (1, 1), (1, 1), granularity, None, None, True, None)
    w = dense_weight(cb, idx, granularity)
    ref = torch.relu(F.conv2d(x, w, bias, 2, 1))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    go = torch.randn(y.shape, generator=g)
    gx, gcb = torch.autograd.grad(y, (x, cb), go)
    rx, rcb = torch.autograd.grad(ref, (x, cb), go)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gcb, rcb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_backend_output_follows_the_input_format_interpreted(interpret, granularity, channels_last):
    """Channels-last in, channels-last out, as on the cpu backend (kernel granularity's gather-sum wrote NCHW
    whatever x's format); the values are F.conv2d's either way."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 7, 6, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if granularity == "filter":
        cb, idx = torch.randn(3, 5, 3, 3, generator=g), torch.randint(0, 3, (6,), generator=g)
    else:
        cb, idx = torch.randn(3, 3, 3, generator=g), torch.randint(0, 3, (6, 5), generator=g)
    res = torch.randn(2, 6, 7, 6, generator=g)
    y = interpret.triton_indexed_conv2d(x, cb, idx, None, (1, 1), (1, 1), (1, 1), granularity, None, None, True, res)
    ref = torch.relu(F.conv2d(x, dense_weight(cb, idx, granularity), None, 1, 1) + res)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    assert channels_last == (not y.is_contiguous())


def test_triton_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from kcengine.conv import triton_kernels

    with pytest.raises(RuntimeError, match=r"needs CUDA tensors \(or TRITON_INTERPRET=1\), got x on cpu"):
        triton_kernels.triton_indexed_conv2d(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 1, 1), torch.zeros(1),
                                             None, (1, 1), (0, 0), (1, 1), "filter", None, None, False, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_triton_backend_on_cuda(granularity):
    import kcengine

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 13, 11, generator=g).cuda()
    if granularity == "filter":
        cb, idx = torch.randn(3, 7, 3, 3, generator=g), torch.randint(0, 3, (5,), generator=g)
    else:
        cb, idx = torch.randn(3, 3, 3, generator=g), torch.randint(0, 3, (5, 7), generator=g)
    cb, idx = cb.cuda(), idx.cuda()
    scale, shift = torch.randn(5).cuda(), torch.randn(5).cuda()
    y = kcengine.indexed_conv2d(x, cb, idx, stride=2, padding=1, granularity=granularity, scale=scale,
                                shift=shift, relu=True, backend="triton")
    ref = torch.relu(F.conv2d(x, dense_weight(cb, idx, granularity), None, 2, 1) * scale.view(1, -1, 1, 1)
                     + shift.view(1, -1, 1, 1))
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_kernel_granularity_rounds_once_interpreted(interpret, dtype):
    """float16/bfloat16 at kernel granularity: the depthwise maps were computed in the half dtype and rounded
    before the gather-sum, twice F.conv2d's error in bfloat16 (4.4e-3 against 2.2e-3 at C_in = 128).  They are
    float32 now, as on the torch backend: the error is within 10% of F.conv2d's own, against a float64 conv."""
    from kcengine.conv.backends import torch_indexed_conv2d

    errs = {"triton": [], "torch": [], "F.conv2d": []}
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 128, 5, 5, generator=g).to(dtype)
        cb = torch.randn(4, 3, 3, generator=g).to(dtype)
        idx = torch.randint(0, 4, (4, 128), generator=g)
        w = dense_weight(cb, idx, "kernel")
        ref = F.conv2d(x.double(), w.double(), padding=1)
        outs = {"triton": interpret.triton_indexed_conv2d(x, cb, idx, None, (1, 1), (1, 1), (1, 1), "kernel", None,
                                                           None, False, None),
                "torch": torch_indexed_conv2d(x, cb, idx, None, (1, 1), (1, 1), (1, 1), "kernel", None, None, False,
                                              None),
                "F.conv2d": F.conv2d(x, w, padding=1)}
        for name, y in outs.items():
            assert y.dtype == dtype, name
            errs[name].append(float((y.double() - ref).abs().max() / ref.abs().max()))
    mean = {name: sum(v) / len(v) for name, v in errs.items()}
    assert mean["triton"] <= 1.1 * mean["F.conv2d"], mean
