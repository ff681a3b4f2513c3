"""Hypothesis fuzzing of the native kernel-granularity conv (``conv_kernel_direct``): random shapes,
geometries, codebook sizes, epilogues, thread counts and instruction-set copies, each call equal to
``F.conv2d`` on the dense weight in float64.  The shapes cross every routing boundary of the native
tiles (register tiles at <= 64 outputs and 9..32 maps, pixel lanes elsewhere, 8/16-pixel tiles, quads of
input channels with 1-4 live, C_in split across threads where tiles are few)."""
import os

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kcengine.bench.common import runnable_isas
from kcengine.conv import dense_weight

ISAS = runnable_isas()


@st.composite
def conv_case(draw):
    kh, kw = draw(st.sampled_from([1, 2, 3, 5, 7])), draw(st.sampled_from([1, 3, 5]))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, kh // 2 + 1)), draw(st.integers(0, kw // 2 + 1))
    need_h, need_w = max(1, dh * (kh - 1) + 1 - 2 * ph), max(1, dw * (kw - 1) + 1 - 2 * pw)
    h, w = draw(st.integers(need_h, need_h + 9)), draw(st.integers(need_w, need_w + 9))
    n = draw(st.integers(1, 3))
    c_in, c_out = draw(st.integers(1, 40)), draw(st.integers(1, 90))
    k = draw(st.integers(1, min(80, c_in * c_out)))  # maps per input channel: up to min(k, c_out)
    return {
        "isa": draw(st.sampled_from(ISAS)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float32, torch.float32, torch.float64])),
        "shape": (n, c_in, c_out, h, w, kh, kw, k),
        "geom": [kh, kw, sh, sw, ph, pw, dh, dw],
        "affine": draw(st.booleans()),
        "residual": draw(st.booleans()),
        "relu": draw(st.booleans()),
        "threads": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**31)),
    }


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_case())
def test_native_kernel_conv_equals_f_conv2d_on_random_shapes(case):
    from kcengine import _core
    from kcengine.conv.backends import kernel_plan

    n, c_in, c_out, h, w, kh, kw, k = case["shape"]
    kh_, kw_, sh, sw, ph, pw, dh, dw = case["geom"]
    dtype = case["dtype"]
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(n, c_in, h, w, generator=g, dtype=dtype)
    cb = torch.randn(k, kh, kw, generator=g, dtype=dtype)
    idx = torch.randint(0, k, (c_out, c_in), generator=g)
    ref = F.conv2d(x.double(), dense_weight(cb, idx, "kernel").double(), stride=(sh, sw), padding=(ph, pw),
                   dilation=(dh, dw))
    a = b = res = None
    if case["affine"]:
        a, b = torch.randn(c_out, generator=g, dtype=dtype), torch.randn(c_out, generator=g, dtype=dtype)
        ref = ref * a.double()[:, None, None] + b.double()[:, None, None]
    if case["residual"]:
        res = torch.randn(ref.shape, generator=g, dtype=dtype)
        ref = ref + res.double()
    if case["relu"]:
        ref = ref.relu()
    plan = kernel_plan(idx, k)
    old = os.environ.get("KCENGINE_CPU_ISA")
    os.environ["KCENGINE_CPU_ISA"] = case["isa"]
    try:
        pack = _core.conv_kernel_pack(plan.tap_weights(cb).numpy(), plan.slot_table().numpy())
    finally:
        if old is None:
            del os.environ["KCENGINE_CPU_ISA"]
        else:
            os.environ["KCENGINE_CPU_ISA"] = old
    assert pack.isa == case["isa"] and pack.shape == (c_in, kh * kw, plan.m, c_out)
    xn = x.permute(0, 2, 3, 1).contiguous().numpy()
    before = xn.copy()
    out = np.full((n, ref.shape[2], ref.shape[3], c_out), np.nan, xn.dtype)
    _core.conv_kernel_direct(xn, pack, case["geom"], None if a is None else a.numpy(),
                             None if b is None else b.numpy(),
                             None if res is None else res.permute(0, 2, 3, 1).contiguous().numpy(), case["relu"],
                             out, case["threads"])
    assert np.array_equal(xn, before)  # the input is read, never written
    got = torch.from_numpy(out).permute(0, 3, 1, 2).double()
    scale = ref.abs().max().item() + 1.0
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(got, ref, atol=tol * scale, rtol=tol)
