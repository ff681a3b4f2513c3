"""ClusteredConv2d and indexed_conv2d with torch's machinery: graph capture (torch.jit.trace, torch.export,
torch.compile), the meta device, torch.autocast.

The native kernels write into buffers torch cannot see: a capture that recorded them would replay an
uninitialized output (torch.jit.trace did, and then failed its own sanity check) or could not run them on
fake tensors (torch.export).  Under capture the layer computes with torch ops; these tests check that a
captured graph, run on inputs other than those it was captured with, gives what eager forward gives,
against F.conv2d with the dense weight as the reference.  Under autocast the layer runs in the autocast
dtype, as F.conv2d does (the native kernels take float32/float64 only, and autocast hands a layer
activations of its dtype).
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kcengine
from kcengine.models.zoo import load_model
from kcengine.nn import ClusteredConv2d, fuse_for_inference


def _close(y, ref):
    torch.testing.assert_close(y, ref, atol=2e-5 * (ref.abs().max().item() + 1), rtol=2e-5)


def _layer(granularity: str, *, groups: int = 1, bias: bool = True, fused: bool = False, seed: int = 0):
    """A 6 -> 10 channel layer (stride 2, padding 1) with random codebook, index and epilogue."""
    g = torch.Generator().manual_seed(seed)
    m = ClusteredConv2d(6, 10, 3, 4, stride=2, padding=1, groups=groups, bias=bias, granularity=granularity)
    with torch.no_grad():
        m.codebook.copy_(torch.randn(m.codebook.shape, generator=g))
        m.index.copy_(torch.randint(0, 4, m.index.shape, generator=g))
        if bias:
            m.bias.copy_(torch.randn(10, generator=g))
    if fused:
        bn = nn.BatchNorm2d(10).eval()
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(10, generator=g))
            bn.running_var.copy_(torch.rand(10, generator=g) + 0.5)
            bn.weight.copy_(torch.randn(10, generator=g))
            bn.bias.copy_(torch.randn(10, generator=g))
        m = m.fuse_bn_relu(bn, relu=True)
    return m.eval()


def _dense_reference(m: ClusteredConv2d, x, residual=None):
    """The layer as F.conv2d with its dense weight, then its epilogue, written out here."""
    y = F.conv2d(x, m.to_dense(), m.bias, m.stride, m.padding, m.dilation, m.groups)
    if m.scale is not None:
        y = y * m.scale.view(1, -1, 1, 1) + m.shift.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if m.relu else y


CASES = [  # (granularity, groups, bias, fused, residual shape: None, "full" or "broadcast")
    ("filter", 1, True, False, None),
    ("filter", 1, False, True, "full"),
    ("filter", 1, True, True, "broadcast"),
    ("filter", 2, True, False, None),
    ("kernel", 1, True, False, None),
    ("kernel", 1, False, True, "full"),
    ("kernel", 2, True, True, None),
]


def _inputs(residual: str | None, seed: int, n: int = 3, hw=(9, 11)):
    """x for _layer (and a residual: None, "full" or "broadcast"), batch n at H x W = hw."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, *hw, generator=g)
    if residual is None:
        return (x,)
    ho, wo = ((s - 1) // 2 + 1 for s in hw)  # _layer's 3x3, stride 2, padding 1
    shape = (n, 10, ho, wo) if residual == "full" else (1, 10, 1, wo)
    return x, torch.randn(shape, generator=g)


@pytest.mark.parametrize("granularity,groups,bias,fused,residual", CASES)
def test_trace_replays_on_new_inputs(granularity, groups, bias, fused, residual):
    m = _layer(granularity, groups=groups, bias=bias, fused=fused)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation notice
        traced = torch.jit.trace(m, _inputs(residual, 1))
        new = _inputs(residual, 2)
        y = traced(*new)
        _close(y, m(*new))
        _close(y, _dense_reference(m, *new))


@pytest.mark.parametrize("granularity,groups,bias,fused,residual", CASES)
def test_export_runs_torch_ops_from_the_codebook(granularity, groups, bias, fused, residual):
    m = _layer(granularity, groups=groups, bias=bias, fused=fused)
    ep = torch.export.export(m, _inputs(residual, 1))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert all(str(t).startswith("aten.") for t in targets), targets
    assert any("conv2d" in str(t) for t in targets)
    # the codebook stays a parameter of the graph: the dense weight is not baked in as a constant
    assert "codebook" in ep.graph_signature.parameters
    assert not ep.constants
    new = _inputs(residual, 2)
    with torch.no_grad():
        y = ep.module()(*new)
        _close(y, m(*new))
        _close(y, _dense_reference(m, *new))
    if granularity == "filter" and groups == 1:  # the conv runs the K unique filters, then a gather
        conv = next(n for n in ep.graph.nodes if "conv2d" in str(n.target))
        assert conv.args[1].meta["val"].shape[0] == m.num_clusters


@pytest.mark.parametrize("granularity,groups,bias,fused,residual", CASES)
def test_compile_fullgraph(granularity, groups, bias, fused, residual):
    m = _layer(granularity, groups=groups, bias=bias, fused=fused)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break fails
    new = _inputs(residual, 2)
    with torch.no_grad():
        _close(compiled(*new), m(*new))


def test_compile_trains_the_codebook():
    """Under torch.compile the codebook gets the gradient eager autograd gives it."""
    x = _inputs(None, 3)[0]
    grads = []
    for fn in (lambda m: m, lambda m: torch.compile(m, backend="aot_eager", fullgraph=True)):
        m = _layer("filter").train()
        fn(m)(x).square().sum().backward()
        grads.append(m.codebook.grad.clone())
    _close(grads[1], grads[0])


class _Functional(nn.Module):
    """A user's module calling kcengine.indexed_conv2d with its own codebook and index."""

    def __init__(self, layer: ClusteredConv2d):
        super().__init__()
        self.layer = layer

    def forward(self, x, residual=None):
        m = self.layer
        return kcengine.indexed_conv2d(x, m.codebook, m.index, m.bias, m.stride, m.padding, m.dilation, m.groups,
                                       m.granularity, scale=m.scale, shift=m.shift, relu=m.relu, residual=residual)


@pytest.mark.parametrize("granularity,groups,bias,fused,residual", [c for c in CASES if c[4] != "broadcast"])
def test_indexed_conv2d_under_capture(granularity, groups, bias, fused, residual):
    m = _Functional(_layer(granularity, groups=groups, bias=bias, fused=fused))
    new = _inputs(residual, 2)
    with torch.no_grad():
        eager = m(*new)
        _close(eager, _dense_reference(m.layer, *new))
        _close(torch.export.export(m, _inputs(residual, 1)).module()(*new), eager)
        _close(torch.compile(m, backend="aot_eager", fullgraph=True)(*new), eager)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            _close(torch.jit.trace(m, _inputs(residual, 1))(*new), eager)
        meta = m.layer.to("meta")
        assert _Functional(meta)(*(t.to("meta") for t in new)).shape == eager.shape


@pytest.mark.parametrize("name, msg", [
    ("cpux", r"^backend='cpux' is not one of \('auto', 'cpu', 'torch', 'cuda', 'triton'\)$"),
    ("cuda", r"^backend='cuda' does not implement conv; conv has \('auto', 'cpu', 'torch', 'triton'\)$")])
def test_a_bad_backend_name_is_refused_under_capture_as_in_eager(name, msg):
    """Under export, compile, trace and the meta device the conv runs in torch ops whatever ``backend`` names, but
    a name that is no conv backend is the caller's error there as in eager (it ran without a word)."""
    layer = _layer("filter")

    class Bad(nn.Module):
        def forward(self, x):
            return kcengine.indexed_conv2d(x, layer.codebook, layer.index, padding=1, backend=name)

    x = torch.randn(2, layer.in_channels, 9, 9)
    with torch.no_grad():
        with pytest.raises(ValueError, match=msg):
            Bad()(x)
        with pytest.raises(ValueError, match=msg):
            torch.export.export(Bad(), (x,))
        with pytest.raises(ValueError, match=msg), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.trace(Bad(), (x,))
        layer.to("meta")
        with pytest.raises(ValueError, match=msg):
            Bad()(x.to("meta"))


def test_meta_device_gives_the_output_shape():
    """A model moved to the meta device (shape inference, empty-weight initialization) runs forward."""
    for granularity, plan in (("filter", 0.5), ("kernel", {"layers": {"re:layer.*": 8}})):
        small, _ = kcengine.compress(load_model("resnet20", None).model.eval(), plan, granularity=granularity)
        for m in (small, fuse_for_inference(small)):
            x = torch.randn(5, 3, 32, 32)
            y = m.to("meta")(x.to("meta"))
            assert y.is_meta and y.shape == (5, 10)


def test_export_a_compressed_fused_resnet():
    """A whole model: resnet20 clustered at both granularities, BN, residual and ReLU fused into its convs,
    exported with a dynamic batch size and run on another batch of another size."""
    model = load_model("resnet20", None).model.eval()  # default init: the shapes and the blocks are what matter
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(4, 3, 32, 32)
    for granularity, plan in (("filter", 0.5), ("kernel", {"layers": {"re:layer.*": 8}})):
        small, _ = kcengine.compress(model, plan, granularity=granularity)
        fused = fuse_for_inference(small)
        ep = torch.export.export(fused, (x1,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        with torch.no_grad():
            _close(ep.module()(x2), fused(x2))
            _close(ep.module()(x2), small(x2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity,groups,bias,fused,residual", CASES)
def test_autocast_runs_in_the_autocast_dtype(granularity, groups, bias, fused, residual, dtype):
    m = _layer(granularity, groups=groups, bias=bias, fused=fused)
    args = _inputs(residual, 4)
    with torch.no_grad():
        exact = _dense_reference(m, *args)
        with torch.autocast("cpu", dtype=dtype):
            y = m(*args)
            y_fn = _Functional(m)(*args) if residual != "broadcast" else y
    # a residual that only broadcasts is added after the conv, promoted as torch's + promotes (float32 here)
    assert y.dtype == (torch.float32 if residual == "broadcast" else dtype) and y_fn.dtype == y.dtype
    for out in (y, y_fn):
        torch.testing.assert_close(out.float(), exact, atol=3e-2 * (exact.abs().max().item() + 1), rtol=3e-2)


def test_autocast_training_reaches_the_float32_codebook():
    m = _layer("filter", fused=False).train()
    x = _inputs(None, 5)[0]
    m(x).square().sum().backward()
    exact = m.codebook.grad.clone()
    m.codebook.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x).float().square().sum()
    loss.backward()
    assert m.codebook.grad.dtype == torch.float32
    torch.testing.assert_close(m.codebook.grad, exact, atol=5e-2 * exact.abs().max().item(), rtol=5e-2)


def test_autocast_a_compressed_fused_resnet():
    model = load_model("resnet20", None).model.eval()
    x = torch.randn(4, 3, 32, 32)
    for granularity, plan in (("filter", 0.5), ("kernel", {"layers": {"re:layer.*": 8}})):
        small, _ = kcengine.compress(model, plan, granularity=granularity)
        for m in (small, fuse_for_inference(small)):
            with torch.no_grad():
                exact = m(x)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = m(x)
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), exact, atol=5e-2 * (exact.abs().max().item() + 1), rtol=5e-2)


def test_autocast_under_capture():
    """torch.compile and torch.export of a clustered model inside torch.autocast."""
    model = load_model("resnet20", None).model.eval()
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    for granularity, plan in (("filter", 0.5), ("kernel", {"layers": {"re:layer.*": 8}})):
        fused = fuse_for_inference(kcengine.compress(model, plan, granularity=granularity)[0])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            eager = fused(x2)
            compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)(x2)
            exported = torch.export.export(fused, (x1,)).module()(x2)
        for y in (compiled, exported):
            assert y.dtype == eager.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), eager.float(), atol=3e-2 * (eager.abs().max().item() + 1), rtol=3e-2)


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("epilogue", [False, True])
def test_second_derivatives(granularity, epilogue):
    """Double backward (gradient penalties, input-gradient regularizers) through indexed_conv2d on the cpu
    backend: torch.autograd.gradcheck and gradgradcheck in float64, over x, the codebook, the epilogue's
    vectors and the residual (before, the filter granularity's second derivatives came back wrong: its
    backward was not itself differentiable)."""
    g = torch.Generator().manual_seed(6)
    k, c_out = 3, 5
    cb_shape, idx_shape = ((k, 4, 3, 3), (c_out,)) if granularity == "filter" else ((k, 3, 3), (c_out, 4))
    index = torch.randint(0, k, idx_shape, generator=g)
    leaf = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, codebook = leaf(2, 4, 5, 6), leaf(*cb_shape)
    extra = (leaf(c_out), leaf(c_out), leaf(2, c_out, 5, 6)) if epilogue else ()

    def fn(x, codebook, *extra):
        scale, shift, residual = extra if extra else (None, None, None)
        return kcengine.indexed_conv2d(x, codebook, index, None, 1, 1, granularity=granularity, scale=scale,
                                       shift=shift, residual=residual, relu=epilogue, backend="cpu")

    args = (x, codebook, *extra)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_gradient_penalty_through_a_clustered_layer():
    """The codebook's gradient of a penalty on the input gradient equals the dense layer's."""
    layer = _layer("filter", fused=True).double()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64, requires_grad=True)

    def penalty_grad(f):
        layer.codebook.grad = None
        gx, = torch.autograd.grad(torch.tanh(f(x)).sum(), x, create_graph=True)
        gx.square().sum().backward()
        return layer.codebook.grad.clone()

    _close(penalty_grad(layer), penalty_grad(lambda a: _dense_reference(layer, a)))


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_relu_passes_nan_and_inf(granularity, dtype):
    """NaN and +-inf in the input reach the output as they do through F.conv2d, BN and torch.relu: the native
    epilogues' ReLU turned a NaN into 0, hiding a diverged model."""
    m = _layer(granularity, fused=True).to(dtype)
    for val in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(2, 6, 9, 11, dtype=dtype)
        x[1, 2, 4, 5] = val
        ref = _dense_reference(m, x)
        for fmt in (torch.contiguous_format, torch.channels_last):
            with torch.no_grad():
                y = m(x.contiguous(memory_format=fmt))
            assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
            finite = torch.isfinite(ref)
            torch.testing.assert_close(y[finite], ref[finite], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# torch.compile for inference calls the native kernels through torch.ops.kcengine.indexed_conv2d.

from kcengine.conv import native_op  # noqa: E402

needs_custom_ops = pytest.mark.skipif(not native_op._HAVE_CUSTOM_OPS, reason="torch.library.custom_op: torch >= 2.5")

def _compiled_targets(m, *args):
    """``m`` compiled (fullgraph) with a backend that keeps dynamo's graph and runs it as it is; returns the
    compiled output and the functions the graph calls."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()  # traced afresh: the environment and grad mode are read while tracing
    y = torch.compile(m, backend=keep, fullgraph=True)(*args)
    return y, [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]


def _calls_native_op(targets) -> bool:
    return any("kcengine.indexed_conv2d" in t for t in targets)


@needs_custom_ops
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("granularity,groups,bias,fused,residual", CASES)
def test_compiled_inference_runs_the_native_op(granularity, groups, bias, fused, residual, channels_last):
    """Under no_grad a compiled graph calls the op where eager runs the native kernels (groups 1) and they are
    the faster form, and gives eager's values in eager's memory format; grouped convs keep the torch-op form."""
    m = _layer(granularity, groups=groups, bias=bias, fused=fused)  # kernel: K = 4 <= C_out / 2 = 5
    new = _inputs(residual, 2, n=4, hw=(130, 130))  # 4 * 10 * 65 * 65 = 169,000 output values: the op applies
    if channels_last:
        new = tuple(t.contiguous(memory_format=torch.channels_last) for t in new)
    with torch.no_grad():
        eager = m(*new)
        y, targets = _compiled_targets(m, *new)
    assert _calls_native_op(targets) == (groups == 1), targets
    if groups == 1 and residual != "broadcast":  # the same kernels on the same inputs
        assert torch.equal(y, eager)
        assert y.stride() == eager.stride()
    _close(y, _dense_reference(m, *new))


@needs_custom_ops
def test_compiled_inference_keeps_torch_ops_where_they_are_faster():
    """Filter granularity below 131,072 output values, kernel granularity with K above C_out / 2 or 1x1 kernels:
    there the compiled torch-op form was measured faster than the op (native_op._faster_than_torch_ops)."""
    with torch.no_grad():
        small = _inputs(None, 1)[0]  # 3 * 10 * 5 * 6 output values
        assert not _calls_native_op(_compiled_targets(_layer("filter"), small)[1])
        assert _calls_native_op(_compiled_targets(_layer("kernel"), small)[1])  # K = 4, C_out = 10
        wide = ClusteredConv2d(6, 10, 3, 6, stride=2, padding=1, granularity="kernel").eval()  # K = 6 > 5
        pointwise = ClusteredConv2d(6, 10, 1, 4, granularity="kernel").eval()
        for m in (wide, pointwise):
            y, targets = _compiled_targets(m, small)
            assert not _calls_native_op(targets)
            _close(y, _dense_reference(m, small))


@needs_custom_ops
def test_compiled_graph_keeps_torch_ops_where_the_op_does_not_apply(monkeypatch):
    """Training (gradients wanted), float16, the torch backend (argument or KCENGINE_BACKEND) and torch.export
    keep the torch-op form."""
    x = _inputs(None, 3)[0]
    m = _layer("kernel")  # K = 4 <= C_out / 2: the op where it applies at all
    _, targets = _compiled_targets(m, x)  # grad mode on and a codebook that wants it
    assert not _calls_native_op(targets)
    with torch.no_grad():
        assert _calls_native_op(_compiled_targets(m, x)[1])
        assert not _calls_native_op(_compiled_targets(_layer("kernel").half(), x.half())[1])
        m.backend = "torch"
        assert not _calls_native_op(_compiled_targets(m, x)[1])
        m.backend = "auto"
        monkeypatch.setenv("KCENGINE_BACKEND", "torch")
        assert not _calls_native_op(_compiled_targets(m, x)[1])
        monkeypatch.delenv("KCENGINE_BACKEND")
        torch._dynamo.reset()
        ep = torch.export.export(m, (x,))
    assert not any("kcengine" in str(n.target) for n in ep.graph.nodes)


@needs_custom_ops
def test_compiled_inference_sees_index_writes_and_checks_their_range():
    """The op rebuilds what it derived from an index written in place, and refuses values out of range, which
    the torch-op form of a captured graph cannot check."""
    m = _layer("kernel", fused=True)
    x = _inputs(None, 4)[0]
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(x)
        m.index[0, 0] = (m.index[0, 0] + 1) % m.num_clusters
        _close(compiled(x), _dense_reference(m, x))
        m.index[0, 0] = m.num_clusters
        with pytest.raises(ValueError, match=r"index values must be in \[0, K=4\), got 4"):
            compiled(x)


def _op_arguments():
    """Argument sets of torch.ops.kcengine.indexed_conv2d: both granularities, every epilogue part, both
    memory formats, float32 and float64."""
    g = torch.Generator().manual_seed(7)
    out = []
    for granularity in ("filter", "kernel"):
        for dtype, fmt, extras in ((torch.float32, torch.contiguous_format, False),
                                   (torch.float32, torch.channels_last, True),
                                   (torch.float64, torch.contiguous_format, True)):
            rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
            x = rnd(2, 6, 9, 11).contiguous(memory_format=fmt)
            cb = rnd(4, 6, 3, 3) if granularity == "filter" else rnd(4, 3, 3)
            idx = torch.randint(0, 4, (10,) if granularity == "filter" else (10, 6), generator=g).to(torch.uint8)
            bias, scale, shift, res = (rnd(10), rnd(10), rnd(10), rnd(2, 10, 5, 6)) if extras else (None,) * 4
            out.append((x, cb, idx, bias, [2, 2], [1, 1], [1, 1], granularity, scale, shift, extras, res))
    return out


@needs_custom_ops
@pytest.mark.parametrize("args", _op_arguments())
def test_native_op_passes_torch_opcheck(args):
    """torch.library.opcheck: the schema, the fake implementation against the real one (shape, dtype, strides),
    and the op under AOT dispatch with static and dynamic shapes."""
    torch.library.opcheck(torch.ops.kcengine.indexed_conv2d.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                      "test_aot_dispatch_dynamic"))


def test_inductor_compiles_a_fused_clustered_resnet():
    """The default torch.compile backend (inductor, which generates code from the fake outputs' strides) on a
    fused resnet20 clustered at both granularities, channels-last, and a second batch of another size (which
    the compiler takes as a dynamic size).  At filter granularity layer1 calls the op and the deeper layers
    keep torch ops; at kernel granularity every layer calls the op (K = 8, C_out 16-64)."""
    model = load_model("resnet20", None).model.eval()
    x1 = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(12, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    for granularity, plan in (("filter", 0.5), ("kernel", {"layers": {"re:layer.*": 8}})):
        fused = fuse_for_inference(kcengine.compress(model, plan, granularity=granularity)[0])
        fused = fused.to(memory_format=torch.channels_last)
        compiled = torch.compile(fused)
        with torch.no_grad():
            for x in (x1, x2):
                _close(compiled(x), fused(x))


def _expected_flops(m: ClusteredConv2d, x) -> int:
    """The work of the native kernels, from the shapes and the index (written out independently of the op's
    formula): filter, the K-filter conv; kernel, each input channel's M kernel responses and their sums."""
    n, c_in, h, w = x.shape
    ho, wo = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1  # _layer's 3x3, stride 2, padding 1
    px = n * ho * wo
    if m.granularity == "filter":
        return 2 * px * m.num_clusters * c_in * 9
    m_max = max(len(set(m.index[:, i].tolist())) for i in range(c_in))
    return 2 * px * c_in * m_max * 9 + px * m.out_channels * c_in


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_flop_counter_counts_the_native_work_and_sees_the_same_output(granularity, channels_last):
    """torch.utils.flop_counter.FlopCounterMode saw nothing of the native kernels (a channels-last filter model
    counted 0 FLOPs). Under a dispatch mode, CPU inference runs as torch.ops.kcengine.indexed_conv2d, whose
    formula counts what the native kernels compute; the output is the eager one. With gradients wanted the
    layer is written in torch ops and counted as they are (the K-filter conv, or the dense conv that kernel
    granularity trains through)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = _layer(granularity, bias=False, fused=True)
    if granularity == "kernel":  # each input channel uses 2 of the 4 kernels: M = 2, below the bound
        with torch.no_grad():
            m.index.copy_(torch.arange(10)[:, None] % 2 + 2 * (torch.arange(6)[None, :] % 2))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 9, 11).contiguous(memory_format=fmt)
    with torch.no_grad():
        eager = m(x)
        with FlopCounterMode(display=False) as fc:
            y = m(x)
    _close(y, eager)
    assert fc.get_total_flops() == _expected_flops(m, x) > 0
    if granularity == "kernel":
        assert _expected_flops(m, x) == 2 * 60 * 6 * 2 * 9 + 60 * 10 * 6  # M = 2 read from the index
    counts = fc.get_flop_counts()["Global"]
    assert [str(op) for op in counts] == ["kcengine.indexed_conv2d"]
    with FlopCounterMode(display=False) as fc:
        m(x.requires_grad_())
    k_or_dense = m.num_clusters if granularity == "filter" else m.out_channels
    assert fc.get_total_flops() == 2 * 2 * 5 * 6 * k_or_dense * 6 * 9  # one aten conv: N Ho Wo K C_in kh kw


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_fake_tensors_go_through_a_layer(granularity):
    """Under FakeTensorMode (shape propagation without data) a clustered layer's forward gave an error from the
    native kernels, which have no data to read; it now returns a fake output of the eager output's shape and
    memory format, and FlopCounterMode under it counts the bound M = min(K, C_out) for kernel granularity."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    m = _layer(granularity, bias=False, fused=True)
    real = torch.randn(2, 6, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = m(real)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        x = mode.from_tensor(real)
        with FlopCounterMode(display=False) as fc:
            y = m(x)
    assert isinstance(y, FakeTensor) and y.shape == eager.shape and y.stride() == eager.stride()
    px = 2 * 5 * 6
    want = 2 * px * 4 * 6 * 9 if granularity == "filter" else 2 * px * 6 * 4 * 9 + px * 10 * 6
    assert fc.get_total_flops() == want


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_caches_never_serve_another_codebooks_result(granularity):
    """Caches keyed on a tensor's address and version served a new tensor at a freed address (version 0 again)
    the old one's result: fresh codebooks under FlopCounterMode (the native op), a codebook swapped in by
    torch.func.functional_call (which bypasses __setattr__), and a .data write followed by invalidate_cache()
    under the native op.  Each now matches F.conv2d on the dense weight."""
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    from kcengine.conv.functional import dense_weight

    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 10)
    layer = ClusteredConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), 4, granularity=granularity).eval()

    def ref(cb, bias):
        return F.conv2d(x, dense_weight(cb, layer.index, granularity), bias, padding=1)

    with torch.no_grad():
        layer(x)  # the prepared call
        for _ in range(3):
            cb = torch.randn_like(layer.codebook)
            torch.testing.assert_close(functional_call(layer, {"codebook": cb}, (x,)), ref(cb, layer.bias))
        for _ in range(4):
            cb = torch.randn_like(layer.codebook)
            with FlopCounterMode(display=False):
                y = kcengine.indexed_conv2d(x, cb, layer.index, padding=1, granularity=granularity)
            torch.testing.assert_close(y, ref(cb, None))
            del cb, y  # the next codebook may be allocated where this one was
        with FlopCounterMode(display=False):
            layer(x)
        layer.codebook.data.copy_(torch.randn_like(layer.codebook))
        layer.invalidate_cache()
        with FlopCounterMode(display=False):
            y = layer(x)
        torch.testing.assert_close(y, ref(layer.codebook, layer.bias))


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("fused", [False, True])
def test_torch_func_vmap_and_grad_run_the_conv_in_torch_ops(granularity, fused):
    """vmap over a layer in inference failed ("querying is_contiguous inside of vmap") once an eager call had
    prepared the per-sample shape, and otherwise warned that the cpu backend failed, on every call."""
    from torch.func import grad, vmap

    m = _layer(granularity, fused=fused)
    xs = torch.randn(3, 2, 6, 7, 7, generator=torch.Generator().manual_seed(1))
    dense = m.to_dense().detach()
    with torch.no_grad():
        ref = torch.stack([_dense_forward(m, dense, x) for x in xs])
        m(xs[0])  # the prepared eager call for [2, 6, 7, 7]
        _close(vmap(m)(xs), ref)  # (a fallback's RuntimeWarning is an error in this suite)
    m.codebook.requires_grad_(False)
    _close(vmap(m)(xs), ref)
    m.codebook.requires_grad_(True)
    xr = xs[0].clone().requires_grad_()
    _dense_forward(m, dense, xr).square().sum().backward()
    _close(grad(lambda x: m(x).square().sum())(xs[0]), xr.grad)


def _dense_forward(m, weight, x):
    """The layer's function through F.conv2d on its dense weight (BN and ReLU of a fused layer after)."""
    y = F.conv2d(x, weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    if m.scale is not None:
        y = y * m.scale[:, None, None] + m.shift[:, None, None]
    return torch.relu(y) if m.relu else y


def test_a_residual_larger_than_the_conv_output_is_added_as_the_unfused_model_adds_it():
    """A global-context branch, relu(bn(conv(pool(x))) + x): fuse_for_inference made it conv(pool(x), residual=x),
    which the layer refused ("must ... broadcast to" the [N, C, 1, 1] output)."""
    class GlobalContext(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = ClusteredConv2d(8, 8, 1, 4, bias=False), nn.BatchNorm2d(8)

        def forward(self, x):
            return F.relu(self.bn(self.conv(F.adaptive_avg_pool2d(x, 1))) + x)

    m = GlobalContext().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        x = torch.randn(2, 8, 5, 5)
        ref = m(x)
        fused = fuse_for_inference(m)
        assert any(isinstance(c, ClusteredConv2d) and c.relu for c in fused.modules())  # the add went in
        for _ in range(2):  # (the second call: the prepared one)
            _close(fused(x), ref)
        with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 8, 1, 1\) or broadcast "
                                             r"with it, got \(2, 7, 5, 5\)"):
            m.conv(F.adaptive_avg_pool2d(x, 1), residual=torch.randn(2, 7, 5, 5))
