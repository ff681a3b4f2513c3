"""ClusteredConv2d: construction from k-means, forward vs dense, training, BN/ReLU fusion."""
import operator
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.cluster import KMeans

import kcengine
from kcengine.compress import ElementClusteredConv2d
from kcengine.nn import ClusteredConv2d, fuse_for_inference

TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-12, 1e-10)}


def _close(y, ref, dtype=torch.float32):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, ref, atol=atol * (ref.abs().max().item() + 1), rtol=rtol)


def _sk_result(points: np.ndarray, k: int):
    km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(points)
    return SimpleNamespace(centroids=km.cluster_centers_.astype(points.dtype), labels=km.labels_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_from_conv_sklearn(granularity, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 11, 3, stride=2, padding=1).to(dtype)
    w = conv.weight.detach().numpy()
    pts = w.reshape(11, -1) if granularity == "filter" else w.reshape(-1, 9)
    k = 4
    res = _sk_result(pts, k)
    m = ClusteredConv2d.from_conv(conv, res, granularity)
    assert m.index.dtype == torch.uint8 and m.codebook.dtype == dtype
    dense = m.to_dense()
    # to_dense is exactly the centroid of each filter/kernel's cluster
    np.testing.assert_array_equal(dense.detach().numpy().reshape(pts.shape), res.centroids[res.labels])
    x = torch.randn(2, 5, 13, 10, dtype=dtype)
    _close(m(x), F.conv2d(x, dense, conv.bias, 2, 1), dtype)
    for backend in ("cpu", "torch"):
        m.backend = backend
        _close(m(x), F.conv2d(x, dense, conv.bias, 2, 1), dtype)
    # the clustered layer approximates the conv it came from
    assert (m(x) - conv(x)).abs().mean() < conv(x).abs().mean()
    assert torch.equal(conv.weight, torch.from_numpy(w))  # conv untouched


def test_from_conv_with_kcengine_kmeans_shape_contract():
    """The result fields of kcengine.kmeans (centroids [K, D], labels [N]) are what from_conv takes."""
    conv = nn.Conv2d(4, 8, 3, bias=False)
    res = SimpleNamespace(centroids=torch.randn(2, 36), labels=torch.tensor([0, 1] * 4))
    m = ClusteredConv2d.from_conv(conv, res)
    assert m.bias is None and m.num_clusters == 2
    with pytest.raises(ValueError, match=r"centroids has shape \(2, 35\).*needs D=36"):
        ClusteredConv2d.from_conv(conv, SimpleNamespace(centroids=torch.randn(2, 35), labels=res.labels))
    with pytest.raises(ValueError, match=r"labels has shape \(7,\).*needs \(8,\)"):
        ClusteredConv2d.from_conv(conv, SimpleNamespace(centroids=res.centroids, labels=res.labels[:7]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, K=2\), got 2"):
        ClusteredConv2d.from_conv(conv, SimpleNamespace(centroids=res.centroids, labels=res.labels + 1))
    with pytest.raises(ValueError, match=r"must be a k-means result \(with .centroids and .labels\) or an int "
                                         r"number of clusters, got SimpleNamespace without .labels"):
        ClusteredConv2d.from_conv(conv, SimpleNamespace(centroids=res.centroids))


_READ_ONLY_SCRIPT = """
import numpy as np, torch, kcengine
from types import SimpleNamespace
from kcengine.nn import ClusteredConv2d
torch.manual_seed(0)
conv = torch.nn.Conv2d(4, 8, 3, bias=False)
cent = np.random.default_rng(0).normal(size=(3, 36)).astype(np.float32)
labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
for a in (cent, labels):
    a.setflags(write=False)
m = ClusteredConv2d.from_conv(conv, SimpleNamespace(centroids=cent, labels=labels))
m.set_index(np.broadcast_to(np.array([2], dtype=np.int64), (8,)))
assert torch.equal(m.codebook.reshape(3, 36), torch.from_numpy(cent.copy())) and m.index.tolist() == [2] * 8
print("ok")
"""


def test_read_only_numpy_codebook_and_index_are_taken_quietly():
    """``from_conv`` and ``set_index`` take read-only numpy arrays without torch's "not writable" warning (in a
    fresh interpreter with warnings as errors: torch shows it once a process)."""
    out = subprocess.run([sys.executable, "-W", "error", "-c", _READ_ONLY_SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_from_conv_with_a_number_of_clusters_runs_kmeans(granularity):
    """from_conv(conv, K) is from_conv(conv, kcengine.kmeans(points, K, seed=seed)) (it said "missing
    .centroids"); a K past the number of points, or a bool, is refused by name; a float16 conv is clustered
    in float32 and keeps its dtype."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    w = conv.weight.detach()
    pts = w.reshape(8, -1) if granularity == "filter" else w.reshape(-1, 9)
    want = ClusteredConv2d.from_conv(conv, kcengine.kmeans(pts, 3, seed=5), granularity)
    got = ClusteredConv2d.from_conv(conv, 3, granularity, seed=5)
    assert torch.equal(got.index, want.index) and torch.equal(got.codebook, want.codebook)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(got(x), F.conv2d(x, got.to_dense(), conv.bias, padding=1))
    assert torch.equal(conv.weight, w)
    n = pts.shape[0]
    with pytest.raises(ValueError, match=rf"kmeans_result={n + 1} as a number of clusters must be in \[1, {n}\]"):
        ClusteredConv2d.from_conv(conv, n + 1, granularity)
    with pytest.raises(ValueError, match=r"got bool without .centroids"):
        ClusteredConv2d.from_conv(conv, True, granularity)
    half = ClusteredConv2d.from_conv(nn.Conv2d(4, 8, 3).half(), 3, granularity)
    assert half.codebook.dtype == torch.float16 and half.num_clusters == 3
    bad = nn.Conv2d(4, 8, 3)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"conv.weight holds NaN or Inf values"):  # it named k-means' x
        ClusteredConv2d.from_conv(bad, 3, granularity)
    with torch.device("meta"):
        meta = nn.Conv2d(4, 8, 3)
    with pytest.raises(ValueError, match=r"conv.weight is on the meta device: it has a shape but no values"):
        ClusteredConv2d.from_conv(meta, 3, granularity)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the reference's (F.conv2d's)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the reference's (torch's)
def test_constructor_takes_padding_extra_beside_a_numeric_padding():
    """padding=1 with padding_extra=(1, 0) is the layer "same" builds for a 4x3 kernel (files record it so)."""
    a = ClusteredConv2d(3, 5, (4, 3), 2, padding="same")
    b = ClusteredConv2d(3, 5, (4, 3), 2, padding=1, padding_extra=(1, 0))
    assert (a.padding, a.padding_extra) == (b.padding, b.padding_extra) == ((1, 1), (1, 0))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
        _close(a(x), F.conv2d(x, a.to_dense(), a.bias, padding="same"))
    with pytest.raises(ValueError, match=r"padding_extra=\(1, 0\) goes with a numeric padding; padding='same'"):
        ClusteredConv2d(3, 5, 3, 2, padding="same", padding_extra=(1, 0))
    with pytest.raises(ValueError, match=r"padding_extra must be >= 0, got padding_extra=\(0, -1\)"):
        ClusteredConv2d(3, 5, 3, 2, padding_extra=(0, -1))


def test_string_padding_as_torch_reads_it():
    """indexed_conv2d takes padding="valid"/"same" as F.conv2d does, an even kernel's odd row and column
    padded at the bottom and right (it refused any string); ClusteredConv2d takes them where both sides pad
    alike.  "same" with a stride, and other strings, are refused by name."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 15)
    for kh, kw in ((3, 3), (4, 2), (2, 5)):
        cb, idx = torch.randn(3, 4, kh, kw), torch.tensor([0, 1, 2, 1, 0])
        for dil in (1, 2, (1, 3)):
            for pad in ("same", "valid"):
                want = F.conv2d(x, cb[idx], padding=pad, dilation=dil)
                for backend in ("cpu", "torch"):
                    got = kcengine.indexed_conv2d(x, cb, idx, padding=pad, dilation=dil, backend=backend)
                    torch.testing.assert_close(got, want)
        kb, kidx = torch.randn(3, kh, kw), torch.randint(0, 3, (5, 4))
        want = F.conv2d(x, kb[kidx.long()], padding="same")
        torch.testing.assert_close(kcengine.indexed_conv2d(x, kb, kidx, padding="same", granularity="kernel"), want)
    with pytest.raises(ValueError, match=r"padding='same' needs stride=1 \(as in F.conv2d\), got stride=\(2, 2\)"):
        kcengine.indexed_conv2d(x, torch.randn(3, 4, 3, 3), idx, padding="same", stride=2)
    with pytest.raises(ValueError, match=r"padding must be an int, a pair of ints, 'valid' or 'same', got 'full'"):
        kcengine.indexed_conv2d(x, torch.randn(3, 4, 3, 3), idx, padding="full")
    m = ClusteredConv2d(4, 5, 3, 2, padding="same", dilation=2)
    assert m.padding == (2, 2) and ClusteredConv2d(4, 5, 3, 2, padding="valid").padding == (0, 0)
    assert m(x).shape == (2, 5, 9, 15)
    # an even kernel's "same" in a layer (was refused): one more row and column at the bottom and right
    for granularity in ("filter", "kernel"):
        for mode in ("zeros", "circular"):
            conv = nn.Conv2d(4, 6, (4, 2), padding="same", dilation=(1, 3), padding_mode=mode)
            layer = ClusteredConv2d.from_conv(conv, 3, granularity)
            assert layer.padding == (1, 1) and layer.padding_extra == (1, 1)
            assert "padding_extra=(1, 1)" in repr(layer)
            dense = nn.Conv2d(4, 6, (4, 2), padding="same", dilation=(1, 3), padding_mode=mode)
            with torch.no_grad():
                dense.weight.copy_(layer.to_dense())
                dense.bias.copy_(conv.bias)
                for fmt in (torch.contiguous_format, torch.channels_last):
                    xi = x.contiguous(memory_format=fmt)
                    torch.testing.assert_close(layer(xi), dense(xi))
                    torch.testing.assert_close(layer.eval()(xi), dense(xi))
            xg = x.clone().requires_grad_()
            layer.train()(xg).sum().backward()
            assert xg.grad.shape == x.shape and layer.codebook.grad is not None


def test_properties_and_index_dtype():
    m = ClusteredConv2d(64, 128, 3, 32, padding=1)
    assert m.unique_parameters == 32 * 64 * 9 + 128
    assert m.compression_ratio == pytest.approx((128 * 64 * 9 + 128) / (32 * 64 * 9 + 128))
    assert m.index.dtype == torch.uint8
    assert ClusteredConv2d(4, 300, 1, 300).index.dtype == torch.int16
    assert ClusteredConv2d(4, 300, 1, 256).index.dtype == torch.uint8
    assert m.state_dict()["index"].dtype == torch.uint8
    k = ClusteredConv2d(8, 16, 3, 5, granularity="kernel")
    assert k.codebook.shape == (5, 3, 3) and k.index.shape == (16, 8)
    assert k.unique_parameters == 45 + 16
    with pytest.raises(ValueError, match=r"index values must be in \[0, K=32\), got 40"):
        m.set_index(torch.full((128,), 40))
    with pytest.raises(ValueError, match=r"index must have shape \(128,\), got \(127,\)"):
        m.set_index(torch.zeros(127, dtype=torch.long))


@pytest.mark.parametrize("kw,match", [(dict(kernel_size=0), r"kernel_size must be >= 1, got kernel_size=\(0, 0\)"),
                                      (dict(stride=(1, 0)), r"stride must be >= 1, got stride=\(1, 0\)"),
                                      (dict(padding=-1), r"padding must be >= 0, got padding=\(-1, -1\)"),
                                      (dict(dilation=0), r"dilation must be >= 1, got dilation=\(0, 0\)"),
                                      (dict(stride=2**63), r"stride must be an int or a pair of ints below 2\*\*31, "
                                                           r"got stride=\(9223372036854775808, 9223372036854775808\)"),
                                      (dict(padding=(0, -2**40)), r"padding must be .* below 2\*\*31")])
def test_constructor_refuses_a_geometry_that_can_never_run(kw, match):
    """(kernel_size=0 was a ZeroDivisionError; a zero stride or negative padding built a layer every forward
    refused.)"""
    args = dict(in_channels=4, out_channels=8, kernel_size=3, num_clusters=3) | kw
    with pytest.raises(ValueError, match=match):
        ClusteredConv2d(**args)


def test_from_conv_refuses_a_conv_subclass_with_its_own_forward():
    """compress refused it by name; from_conv built a plain conv of its weight, dropping what forward did."""
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match=r"conv: it is a .*Doubled, a subclass of nn.Conv2d with its own forward"):
        ClusteredConv2d.from_conv(Doubled(3, 8, 3), 4)


def test_granularity_is_read_only_and_old_pickles_still_load():
    """Reassigning granularity broke forward with an unpack error (the codebook keeps its shape); it is now
    refused by name.  A layer pickled when it was a plain attribute loads with it."""
    m = ClusteredConv2d(3, 4, 3, 2, granularity="kernel")
    with pytest.raises(AttributeError, match=r"granularity is fixed at construction .* this layer's is 'kernel'\), "
                                             r"got granularity='filter'"):
        m.granularity = "filter"
    assert m.granularity == "kernel"
    old = dict(m.__dict__)
    old["granularity"] = old.pop("_granularity")
    m2 = ClusteredConv2d.__new__(ClusteredConv2d)
    m2.__setstate__(old)
    x = torch.randn(2, 3, 8, 8)
    assert m2.granularity == "kernel"
    torch.testing.assert_close(m2(x), F.conv2d(x, m.to_dense(), m.bias))


def test_copies_and_pickles_after_channels_last_inference():
    """A layer that has run float32 channels-last inference holds a codebook reordered by oneDNN (an opaque
    tensor with no storage): copy.deepcopy, pickle and torch.save of the module raised NotImplementedError,
    so an evaluated model could not be fused (fuse_for_inference copies) or finetuned (finetune copies).
    Copies now leave the cache behind and rebuild it."""
    import copy
    import io
    import pickle

    from kcengine.conv.backends import PackedCodebook

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    res = SimpleNamespace(centroids=conv.weight.detach().reshape(16, -1)[:4].clone(), labels=torch.arange(16) % 4)
    layer = ClusteredConv2d.from_conv(conv, res, "filter", backend="cpu").eval()
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = layer(x)
    if PackedCodebook._available():
        assert layer._cache.packed.key is not None  # the opaque reorder is there
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), torch.load(buf, weights_only=False)]
    fused = fuse_for_inference(nn.Sequential(layer, nn.BatchNorm2d(16).eval(), nn.ReLU()))
    with torch.no_grad():
        for c in copies:
            assert torch.equal(c(x), y)
        ref = torch.relu(nn.BatchNorm2d(16).eval()(y))
        torch.testing.assert_close(fused(x), ref, atol=1e-5, rtol=1e-5)
    assert layer._cache is not None  # the original keeps its cache


def test_constructor_takes_numpy_ints_like_python_ints():
    """Channel counts read from arrays (np.int64) are ints; they were refused as 'not a positive int'."""
    a = ClusteredConv2d(np.int64(4), np.int32(8), 3, np.int64(3), groups=np.int64(2))
    b = ClusteredConv2d(4, 8, 3, 3, groups=2)
    assert (a.in_channels, a.out_channels, a.num_clusters, a.groups) == (4, 8, 3, 2)
    assert all(type(v) is int for v in (a.in_channels, a.out_channels, a.num_clusters, a.groups))
    assert a.codebook.shape == b.codebook.shape and a.index.shape == b.index.shape
    with pytest.raises(ValueError, match=r"in_channels must be a positive int, got np.float64\(4.0\)"):
        ClusteredConv2d(np.float64(4), 8, 3, 3)


@pytest.mark.parametrize("kw, match", [
    (dict(dtype=torch.int32), r"dtype must be None or a floating torch.dtype \(torch.float32, ...\), got "
                              r"dtype=torch.int32"),  # was "Only Tensors of floating point ... can require gradients"
    (dict(dtype="float32"), r"dtype must be None or a floating torch.dtype .*, got dtype='float32'"),
    (dict(device="tpu"), r"device must be a torch device or a string such as 'cpu' or 'cuda:0', got device='tpu'"),
])
def test_constructor_names_a_bad_dtype_or_device(kw, match):
    with pytest.raises(ValueError, match=match):
        ClusteredConv2d(4, 8, 3, 3, **kw)
    m = ClusteredConv2d(4, 8, 3, 3, device="meta", dtype=torch.float64)  # what torch's own init paths pass
    assert m.codebook.is_meta and m.codebook.dtype == torch.float64


def test_constructor_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cpu', 'torch', 'triton'\), got "
                                         r"backend='tpu'"):
        ClusteredConv2d(4, 8, 3, 3, backend="tpu")
    # "cuda" names a k-means backend with no conv: it was accepted, then every forward failed
    with pytest.raises(ValueError, match=r"\(conv backends; 'cuda' implements k-means only\), got backend='cuda'"):
        ClusteredConv2d(4, 8, 3, 3, backend="cuda")
    with pytest.raises(ValueError, match=r"got backend='cuda'"):
        ClusteredConv2d.from_conv(nn.Conv2d(4, 8, 3), 3, backend="cuda")


def test_training_gradients_flow_to_codebook_only():
    torch.manual_seed(1)
    m = ClusteredConv2d(3, 6, 3, 2, padding=1)
    m.set_index(torch.tensor([0, 1, 1, 0, 1, 1]))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    m(x).square().sum().backward()
    w = m.to_dense().detach().requires_grad_(True)
    F.conv2d(x.detach(), w, m.bias.detach(), padding=1).square().sum().backward()
    want = torch.zeros_like(m.codebook).index_add_(0, m.index.long(), w.grad)
    _close(m.codebook.grad, want)
    assert "index" not in dict(m.named_parameters())
    m.freeze_codebook()
    assert not m.codebook.requires_grad
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    before = m.codebook.detach().clone()
    m.zero_grad()
    m(x).sum().backward()
    opt.step()
    assert torch.equal(m.codebook, before) and m.bias.grad is not None


def test_fuse_bn_relu_matches_conv_bn_relu():
    torch.manual_seed(2)
    m = ClusteredConv2d(5, 7, 3, 3, padding=1, bias=True)
    m.set_index(torch.randint(0, 3, (7,)))
    bn = nn.BatchNorm2d(7)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    bn.eval()
    fused = m.fuse_bn_relu(bn)
    assert m.scale is None and not m.relu  # original untouched
    x = torch.randn(2, 5, 9, 11)
    with torch.no_grad():
        ref = torch.relu(bn(F.conv2d(x, m.to_dense(), m.bias, padding=1)))
        _close(fused(x), ref)
        r = torch.randn_like(ref)
        _close(fused(x, r), torch.relu(bn(F.conv2d(x, m.to_dense(), m.bias, padding=1)) + r))
    with pytest.raises(ValueError, match=r"bn.num_features=8 must equal out_channels=7"):
        m.fuse_bn_relu(nn.BatchNorm2d(8))
    # a plain layer loading the fused state dict takes scale/shift in its own dtype (a float64 file left them
    # float64 in a float32 layer, whose forward then refused them); the ReLU is configuration, set by hand
    plain = ClusteredConv2d(5, 7, 3, 3, padding=1, bias=True)
    plain.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in fused.state_dict().items()})
    assert plain.scale.dtype == plain.shift.dtype == torch.float32
    plain.relu = True
    with torch.no_grad():
        _close(plain(x), ref)


def _clustered_resnet(granularity="filter", seed=0):
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.1)
    for name, conv in [(n, c) for n, c in model.named_modules() if isinstance(c, nn.Conv2d)]:
        c_out, c_in, kh, kw = conv.weight.shape
        k = max(1, c_out // 4)
        g = torch.Generator().manual_seed(hash(name) % 1000)
        if granularity == "filter":
            res = SimpleNamespace(centroids=torch.randn(k, c_in * kh * kw, generator=g) * 0.05,
                                  labels=torch.randint(0, k, (c_out,), generator=g))
        else:
            res = SimpleNamespace(centroids=torch.randn(k, kh * kw, generator=g) * 0.05,
                                  labels=torch.randint(0, k, (c_out * c_in,), generator=g))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                ClusteredConv2d.from_conv(conv, res, granularity))
    return model.eval()


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_fuse_for_inference_resnet18(granularity):
    model = _clustered_resnet(granularity)
    fused = fuse_for_inference(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    fused_layers = [m for m in fused.modules() if isinstance(m, ClusteredConv2d)]
    assert n_bn == 0  # every BN folded into its conv
    assert sum(m.relu for m in fused_layers) == 1 + 16  # stem + two per BasicBlock
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        _close(fused(x), model(x))
        # and the dense oracle: same model with every clustered conv replaced by its dense weight
        dense = _clustered_resnet(granularity)
        for name, m in list(dense.named_modules()):
            if isinstance(m, ClusteredConv2d):
                conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=False)
                conv.weight.data.copy_(m.to_dense())
                parent, _, leaf = name.rpartition(".")
                setattr(dense.get_submodule(parent), leaf, conv)
        _close(fused(x), dense(x))


class _BroadcastTail(nn.Module):
    """conv -> bn -> (+ r) -> relu, where r only broadcasts to the conv's output (or has another dtype)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = ClusteredConv2d(8, 8, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        r = {"per-channel": x[:, :, :1, :1], "row": x[:1], "wider dtype": x.double(), "same": x}[self.kind]
        return torch.relu(self.bn(self.conv(x)) + r)


@pytest.mark.parametrize("kind", ["per-channel", "row", "wider dtype", "same"])
def test_fused_residual_that_only_broadcasts_is_added_after_the_conv(kind):
    """fuse_for_inference fuses `bn(conv(x)) + r` whatever r's shape (the trace cannot know it); the fused
    layer refused an r that merely broadcasts ('residual must have the output's shape'), so a model that ran
    unfused failed fused.  Now such an r (or one of another dtype) is added after the conv, as torch's +
    would, and the fused model equals the unfused one and a dense F.conv2d reference."""
    torch.manual_seed(5)
    model = _BroadcastTail(kind)
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2)
    model.bn.weight.data.uniform_(-2, 2)
    model.eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())  # the BN and the add were fused
    x = torch.randn(2, 8, 6, 7)
    with torch.no_grad():
        r = {"per-channel": x[:, :, :1, :1], "row": x[:1], "wider dtype": x.double(), "same": x}[kind]
        ref = torch.relu(model.bn(F.conv2d(x, model.conv.to_dense(), None, padding=1)) + r)
        got = fused(x)
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        layer = [m for m in fused.modules() if isinstance(m, ClusteredConv2d)][0]
        with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 8, 6, 7\) or broadcast "
                                             r"with it, got \(2, 8, 6, 2\)"):
            layer(x, torch.randn(2, 8, 6, 2))
        layer.stride = (0, 0)  # reassigned geometry: the check names it (was ZeroDivisionError computing the shape)
        with pytest.raises(ValueError, match=r"stride must be >= 1, got \(0, 0\)"):
            layer(x, x[:, :, :1, :1])


class _InPlaceTail(nn.Module):
    """relu(r += bn(conv(x))): `s` writes into r, which `alias` reads afterwards (eager: the sum)."""

    def __init__(self, alias):
        super().__init__()
        self.alias = alias
        self.pre = nn.Conv2d(4, 8, 3, padding=1)
        self.conv = ClusteredConv2d(4, 8, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        s = self.pre(x)
        t = s
        s += self.bn(self.conv(x))
        out = torch.relu(s)
        return out + t if self.alias else out


@pytest.mark.parametrize("alias", [True, False])
def test_fuse_for_inference_keeps_an_in_place_add_into_a_residual_read_later(alias):
    """torch.fx records `s += y` as `s + y` (fx.Proxy has no in-place dunders), so a tensor read under another
    name after the add saw the sum in eager mode and the old value in the fused model: a silent difference of
    several units.  The tracer now records the in-place add, and fuse_for_inference leaves such an add unfused
    (the conv + BN still fuse).  Checked against the same chain computed with F.conv2d on the dense weight."""
    torch.manual_seed(6)
    model = _InPlaceTail(alias)
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    layer = [m for m in fused.modules() if isinstance(m, ClusteredConv2d)][0]
    assert layer.relu is (not alias)  # without the alias the whole tail fuses, as in a ResNet block
    x = torch.randn(2, 4, 6, 7)
    with torch.no_grad():
        s = model.pre(x) + model.bn(F.conv2d(x, model.conv.to_dense(), None, padding=1))
        ref = torch.relu(s) + s if alias else torch.relu(s)
        _close(model(x), ref)
        _close(fused(x), ref)


class _InPlaceArithmetic(_InPlaceTail):
    """-=, *= and /= into a tensor another name reads afterwards: eager sees each write through `t`."""

    def __init__(self):
        super().__init__(alias=True)

    def forward(self, x):
        s = self.pre(x)
        t = s
        s -= self.bn(self.conv(x))
        s *= 3.0
        s /= 2.0
        return torch.relu(s) + t


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ClusteredConv2d(4, 8, 3, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)  # control flow on a value: fx cannot trace it


def test_fuse_for_inference_keeps_in_place_subtract_multiply_and_divide():
    """The tracer records -=, *= and /= as the in-place operators too (as +=), so a tensor read under another
    name afterwards sees the writes in the fused model as in eager mode; and a model fx cannot trace is
    refused by name, with what to do instead."""
    torch.manual_seed(7)
    model = _InPlaceArithmetic()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    fused = fuse_for_inference(model)
    targets = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert {operator.isub, operator.imul, operator.itruediv} <= set(targets)
    x = torch.randn(2, 4, 6, 7)
    with torch.no_grad():
        s = (model.pre(x) - model.bn(F.conv2d(x, model.conv.to_dense(), None, padding=1))) * 3.0 / 2.0
        ref = torch.relu(s) + s
        _close(model(x), ref)
        _close(fused(x), ref)
    with pytest.raises(ValueError, match=r"model could not be traced by torch.fx \(TraceError: .*\); fuse its "
                                         r"blocks with ClusteredConv2d.fuse_bn_relu instead"):
        fuse_for_inference(_Untraceable())


class _WritesBetween(nn.Module):
    """The conv's input is written in place after the conv and before its chain ends."""

    def __init__(self, where):
        super().__init__()
        self.conv = ClusteredConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1), 2)
        self.bn = nn.BatchNorm2d(4)
        self.where = where

    def forward(self, x):
        h = torch.relu(x)
        o = self.bn(self.conv(h))
        if self.where == "add":
            h += 1.0
            return torch.relu(o + h)
        h.mul_(3)
        return torch.relu(o)


@pytest.mark.parametrize("where", ["add", "method"])
def test_fuse_for_inference_leaves_a_chain_with_a_write_in_between(where):
    """The fused call runs where the chain ended and read the conv's input after the write (errors of 0.6 and
    4 against the model); such a chain now stays unfused, as one whose BatchNorm has no running statistics."""
    torch.manual_seed(0)
    model = _WritesBetween(where).eval()
    x = torch.randn(2, 4, 6, 6)
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, ClusteredConv2d) and m.scale is not None for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x.clone()), model(x.clone()))
    model.bn = nn.BatchNorm2d(4, track_running_stats=False)  # was a ValueError for the whole call
    model.where = "method"
    with torch.no_grad():
        torch.testing.assert_close(fuse_for_inference(model)(x.clone()), model(x.clone()))


def test_fuse_for_inference_composes_with_an_existing_affine():
    """A layer whose scale/shift are already set (e.g. per-filter norms) still absorbs the following BN + ReLU."""
    torch.manual_seed(4)
    conv = ClusteredConv2d(3, 6, 3, 2, padding=1)
    conv.set_index(torch.tensor([0, 1, 1, 0, 1, 0]))
    conv.scale = torch.rand(6) + 0.5
    conv.shift = torch.randn(6)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 7, 9)
    with torch.no_grad():
        ref = torch.relu(bn(F.conv2d(x, conv.to_dense(), conv.bias, padding=1) * conv.scale.view(1, -1, 1, 1)
                            + conv.shift.view(1, -1, 1, 1)))
        _close(fused(x), ref)
        _close(model(x), ref)


def test_training_after_inference_mode_evaluation():
    """A layer first run under torch.inference_mode (as evaluation does) then trains normally:
    its gradient equals that of a fresh layer."""
    import torch

    from kcengine.nn import ClusteredConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1)
    res = type("R", (), {"centroids": conv.weight.detach().reshape(7, -1)[:3].clone(),
                         "labels": torch.tensor([0, 1, 2, 0, 1, 2, 0])})()
    used = ClusteredConv2d.from_conv(conv, res, "filter")
    fresh = ClusteredConv2d.from_conv(conv, res, "filter")
    x = torch.randn(2, 5, 9, 11)
    with torch.inference_mode():
        used(x)
    used(x).square().sum().backward()
    fresh(x).square().sum().backward()
    torch.testing.assert_close(used.codebook.grad, fresh.codebook.grad)


def test_repeated_forwards_still_reject_bad_arguments():
    """The forward re-derives its argument checks only when a shape/dtype/device changed; a bad call after
    good ones (or after the layer's tensors were replaced) must still raise the documented ValueError."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1)
    res = SimpleNamespace(centroids=conv.weight.detach().reshape(7, -1)[:3].clone(),
                          labels=torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    layer = ClusteredConv2d.from_conv(conv, res, "filter").eval()
    x = torch.randn(2, 5, 9, 11)
    res_ok = torch.randn(2, 7, 9, 11)
    with torch.no_grad():
        ref = F.conv2d(x, layer.to_dense(), conv.bias, padding=1)
        for _ in range(2):
            _close(layer(x), ref)
            _close(layer(x, res_ok), ref + res_ok)
        with pytest.raises(ValueError, match="residual must have the output's shape"):
            layer(x, torch.randn(2, 7, 9, 10))
        with pytest.raises(ValueError, match="x must have|channels"):
            layer(torch.randn(2, 4, 9, 11))
        with pytest.raises(ValueError, match="dtype"):
            layer(x.double())
        with pytest.raises(ValueError, match="too small|empty spatial dimension"):
            layer(torch.randn(2, 5, 0, 3))
        _close(layer(x), ref)  # and the good call still works after the failures
        layer.codebook = nn.Parameter(torch.randn(3, 4, 3, 3))  # replaced by one of the wrong C_in
        with pytest.raises(ValueError, match="codebook"):
            layer(x)


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("what", ["bigger kernel", "fewer centroids", "more centroids", "short index"])
def test_replaced_codebook_or_index_of_another_shape_is_refused(granularity, what):
    """``codebook`` and ``index`` are plain attributes: one of another shape must not compute some other
    convolution than the layer describes (a 5x5 codebook in a 3x3 layer used to run as a 5x5 conv) nor
    fail deep in a backend; the error names the attribute, the shape wanted and the shape given."""
    torch.manual_seed(0)
    layer = ClusteredConv2d(6, 10, 3, 4, padding=1, granularity=granularity)
    x = torch.randn(2, 6, 8, 8)
    ref = F.conv2d(x, layer.to_dense(), layer.bias, padding=1)
    with torch.no_grad():
        _close(layer(x), ref)  # a good forward first: its checks are then cached
    cb = layer.codebook.detach()
    if what == "bigger kernel":
        bad, name = cb.new_zeros(cb.shape[:-2] + (5, 5)), "codebook"
    elif what == "fewer centroids":
        bad, name = cb[:2].clone(), "codebook"
    elif what == "more centroids":
        bad, name = torch.cat([cb, cb]), "codebook"
    else:
        bad, name = layer.index[:3].clone(), "index"
    want = tuple(cb.shape) if name == "codebook" else tuple(layer.index.shape)
    setattr(layer, name, nn.Parameter(bad) if name == "codebook" else bad)
    with pytest.raises(ValueError, match=rf"{name} must have shape {re.escape(str(want))}.*got "
                                         rf"{re.escape(str(tuple(bad.shape)))}"):
        layer(x)


@pytest.mark.parametrize("geom", [dict(k=3, stride=1, padding=1, dilation=1), dict(k=3, stride=2, padding=1, dilation=1),
                                  dict(k=1, stride=2, padding=0, dilation=1), dict(k=7, stride=2, padding=3, dilation=1),
                                  dict(k=3, stride=1, padding=2, dilation=2)])
def test_packed_codebook_inference_matches_dense_and_follows_updates(geom):
    """CPU inference on float32 channels-last input runs the K-filter conv on a codebook reordered once for
    oneDNN (kept between calls): equal to F.conv2d with the dense weight, for every input shape that comes,
    and rebuilt when the codebook changes (optimizer step, in-place op, .to(), invalidate_cache after .data)."""
    from kcengine.conv.backends import PackedCodebook

    torch.manual_seed(0)
    conv = nn.Conv2d(13, 22, geom["k"], geom["stride"], geom["padding"], geom["dilation"], bias=True)
    res = SimpleNamespace(centroids=conv.weight.detach().reshape(22, -1)[:5].clone(),
                          labels=torch.arange(22) % 5)
    layer = ClusteredConv2d.from_conv(conv, res, "filter", backend="cpu").eval()

    def check(n, h, w):
        x = torch.randn(n, 13, h, w).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = F.conv2d(x, layer.to_dense(), layer.bias, geom["stride"], geom["padding"], geom["dilation"])
            _close(layer(x), ref)

    for shape in [(1, 17, 11), (3, 9, 20), (1, 17, 11)]:
        check(*shape)
    if PackedCodebook._available():  # the packed path really ran (else this build has no oneDNN op)
        assert layer._cache.packed.key is not None
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(2, 13, 12, 12)
    layer(x).square().sum().backward()  # training-mode call: the plain F.conv2d path, autograd
    opt.step()
    check(2, 12, 12)
    with torch.no_grad():
        layer.codebook.mul_(-1.5)
    check(2, 12, 12)
    layer.codebook.data.copy_(torch.randn_like(layer.codebook))  # unseen by the version counter...
    layer.invalidate_cache()  # ...hence the documented call
    check(2, 12, 12)
    layer.double()
    x64 = torch.randn(2, 13, 12, 12, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # not float32: F.conv2d
        ref = F.conv2d(x64, layer.to_dense(), layer.bias, geom["stride"], geom["padding"], geom["dilation"])
        _close(layer(x64), ref, torch.float64)


def test_single_input_channel_with_a_one_pixel_wide_output_matches_dense():
    """One input channel, a stride along W above 1 and an output one pixel wide: torch 2.15's oneDNN op behind
    the packed codebook returned values it never computed here (relative errors of 1 to 1e27), so that case
    runs through F.conv2d."""
    torch.manual_seed(0)
    for (kh, kw), stride, padding, dilation, (h, w) in [((7, 7), (1, 2), (3, 0), (1, 1), (8, 7)),
                                                        ((5, 5), (1, 3), (2, 2), (2, 1), (13, 2)),
                                                        ((3, 3), (1, 3), (0, 0), (2, 1), (17, 5))]:
        conv = nn.Conv2d(1, 16, (kh, kw), stride, padding, dilation, bias=False)
        res = SimpleNamespace(centroids=conv.weight.detach().reshape(16, -1)[:3].clone(), labels=torch.arange(16) % 3)
        layer = ClusteredConv2d.from_conv(conv, res, "filter", backend="cpu").eval()
        x = torch.randn(3, 1, h, w)  # one channel: contiguous in both memory formats
        with torch.no_grad():
            ref = F.conv2d(x.double(), layer.to_dense().double(), None, stride, padding, dilation)
            assert ref.shape[-1] == 1
            _close(layer(x), ref.float())


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_random_geometries_match_dense(granularity):
    """Seeded sweep of shapes, strides, paddings, dilations and memory formats (the fuzzing that found the case
    above, kept small): every output equals F.conv2d with the dense weight codebook[index]."""
    rng = np.random.default_rng(7)
    done = 0
    while done < 60:
        c_in, c_out = int(rng.choice([1, 2, 3, 8, 17])), int(rng.choice([1, 4, 7, 16]))
        kh, kw = int(rng.choice([1, 3, 5])), int(rng.choice([1, 3, 5]))
        stride = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        padding = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
        dilation = (int(rng.choice([1, 2])), int(rng.choice([1, 2])))
        h, w = int(rng.integers(1, 16)), int(rng.integers(1, 16))
        if h + 2 * padding[0] - dilation[0] * (kh - 1) - 1 < 0 or w + 2 * padding[1] - dilation[1] * (kw - 1) - 1 < 0:
            continue
        n_points = c_out if granularity == "filter" else c_out * c_in
        k = int(rng.integers(1, min(n_points, 12) + 1))
        layer = ClusteredConv2d(c_in, c_out, (kh, kw), k, stride, padding, dilation, bias=bool(rng.integers(2)),
                                granularity=granularity, backend="cpu").eval()
        with torch.no_grad():
            layer.index.copy_(torch.as_tensor(rng.integers(0, k, size=tuple(layer.index.shape))))
        layer.relu = bool(rng.integers(2))
        x = torch.as_tensor(rng.normal(size=(int(rng.choice([1, 3])), c_in, h, w)), dtype=torch.float32)
        if rng.integers(2):
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = F.conv2d(x.double(), layer.to_dense().double(), None if layer.bias is None else layer.bias.double(),
                           stride, padding, dilation)
            if layer.relu:
                ref = ref.relu()
            _close(layer(x), ref.float())
        done += 1

def _clustered_3x3(c_in, c_out, k, granularity):
    """A padded 3x3 conv clustered with its first k filters (or kernels) as centroids, members round robin."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=True)
    rows = conv.weight.detach().reshape(c_out, -1) if granularity == "filter" else conv.weight.detach().reshape(-1, 9)
    res = SimpleNamespace(centroids=rows[:k].clone(), labels=torch.arange(rows.shape[0]) % k)
    return conv, res


@pytest.mark.parametrize("n, c_in, hw, k, packed", [
    (1, 16, 32, 4, False),   # 16,384 inputs, 4,096 unique-conv outputs: F.conv2d's im2col GEMM
    (1, 64, 8, 64, False),   # 4,096 outputs
    (1, 16, 32, 8, True),    # 8,192 outputs: the stored reorder
    (1, 32, 28, 2, True),    # 25,088 inputs: F.conv2d would run oneDNN and reorder per call
    (2, 16, 32, 4, True),    # a batch of two: the same
])
def test_small_batch_one_convs_take_f_conv2d_and_the_others_the_stored_reorder(n, c_in, hw, k, packed):
    """The K-filter conv of CPU float32 channels-last inference runs on the stored oneDNN reorder except where
    F.conv2d is faster (batch 1, at most 20,480 input values, fewer than 8,192 output values: its own im2col
    path, without the packed call's fixed cost); both equal F.conv2d with the dense weight."""
    from kcengine.conv.backends import PackedCodebook

    if not PackedCodebook._available():
        pytest.skip("this torch build has no oneDNN weight-reorder op")
    torch.manual_seed(0)
    conv, res = _clustered_3x3(c_in, 2 * k, k, "filter")
    layer = ClusteredConv2d.from_conv(conv, res, "filter", backend="cpu").eval()
    x = torch.randn(n, c_in, hw, hw).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _close(layer(x), F.conv2d(x, layer.to_dense(), layer.bias, padding=1))
    assert (layer._cache.packed.key is not None) == packed


def test_im2col_rule_boundaries():
    """_im2col_is_faster's thresholds as documented: input values <= 20,480 (torch's own switch to oneDNN), output
    values < 8,192, batch 1, kernels of at most 3x3."""
    from kcengine.conv.backends import _im2col_is_faster

    one = ((1, 1), (1, 1), (1, 1))  # stride, padding, dilation
    assert _im2col_is_faster((1, 20, 32, 32), (7, 20, 3, 3), *one)          # 20,480 in, 7,168 out
    assert not _im2col_is_faster((1, 20, 32, 33), (7, 20, 3, 3), *one)      # 21,120 in
    assert not _im2col_is_faster((1, 20, 32, 32), (8, 20, 3, 3), *one)      # 8,192 out
    assert not _im2col_is_faster((2, 10, 32, 32), (2, 10, 3, 3), *one)      # batch 2
    assert not _im2col_is_faster((1, 4, 16, 16), (2, 4, 5, 5), (1, 1), (2, 2), (1, 1))  # 5x5
    assert _im2col_is_faster((1, 4, 16, 16), (2, 4, 1, 1), (1, 1), (0, 0), (1, 1))       # 1x1


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_layer_built_under_inference_mode_keeps_its_caches(granularity):
    """A layer built under torch.inference_mode (its codebook and index are inference tensors, without a
    version counter) reuses what it derived between calls, like any other layer, and equals F.conv2d;
    an in-place write there is then followed by invalidate_cache (documented), after which the result
    is again F.conv2d's."""
    from kcengine.conv.backends import PackedCodebook

    torch.manual_seed(0)
    conv, res = _clustered_3x3(6, 10, 4 if granularity == "filter" else 5, granularity)
    x = torch.randn(2, 6, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        layer = ClusteredConv2d.from_conv(conv, res, granularity, backend="cpu").eval()
        assert layer.codebook.is_inference() and layer.index.is_inference()
        ref = F.conv2d(x, layer.to_dense(), layer.bias, padding=1)
        _close(layer(x), ref)
        cache = layer._cache
        packed_key = cache.packed.key
        _close(layer(x), ref)
        assert layer._cache is cache  # not rebuilt
        if granularity == "filter" and PackedCodebook._available():
            assert packed_key is not None and cache.packed.key == packed_key
        layer.codebook.mul_(-2.0)
        layer.invalidate_cache()
        _close(layer(x), F.conv2d(x, layer.to_dense(), layer.bias, padding=1))


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_one_layer_called_from_several_threads(granularity):
    """An inference server's threads share one model: concurrent calls on the same layer with inputs of
    different shapes (each needing its own oneDNN reorder) and a cache rebuilt under them (in-place codebook
    update between rounds) all equal F.conv2d.  Each call reads the layer's cache and the packed reorder as
    one object, so it never pairs one call's key with another's weight."""
    import threading

    torch.manual_seed(0)
    conv, res = _clustered_3x3(8, 12, 5 if granularity == "filter" else 6, granularity)
    layer = ClusteredConv2d.from_conv(conv, res, granularity, backend="cpu").eval()
    shapes = [(1, 8, 9, 11), (3, 8, 16, 7), (2, 8, 5, 5), (1, 8, 20, 13)]
    xs = [torch.randn(*s).contiguous(memory_format=torch.channels_last) for s in shapes]
    errors = []

    def worker(t):
        try:
            for r in range(30):
                x = xs[(t + r) % len(xs)]
                with torch.inference_mode():
                    y = layer(x)
                    ref = F.conv2d(x, layer.to_dense(), layer.bias, padding=1)
                torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    for _ in range(3):
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors[0]
        with torch.no_grad():
            layer.codebook.mul_(1.25)  # seen by the version counter: every cache is rebuilt next round


def _fused_layer(granularity="filter", c_in=6, c_out=10, k=4):
    """A layer with a fused BN (random statistics) and ReLU, on the cpu backend."""
    conv, res = _clustered_3x3(c_in, c_out, k, granularity)
    conv.bias = None
    bn = nn.BatchNorm2d(c_out).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return ClusteredConv2d.from_conv(conv, res, granularity, backend="cpu").eval().fuse_bn_relu(bn)


def _reference(layer, x, residual=None):
    """The layer's output from its dense weight and plain torch ops."""
    y = F.conv2d(x.double(), layer.to_dense().double(), None, layer.stride, layer.padding)
    if layer.scale is not None:
        y = y * layer.scale.double()[:, None, None] + layer.shift.double()[:, None, None]
    if residual is not None:
        y = y + residual.double()
    return y.relu() if layer.relu else y


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_prepared_inference_call_follows_every_change(granularity, channels_last, monkeypatch):
    """Eager inference keeps a prepared call per signature (backends.inference_call) and uses it only while
    what it was made for holds: each change below is seen by the very next call, which equals the dense
    reference (scale, shift and index written in place or through .data, the codebook written in place,
    attributes reassigned, another input shape, a residual, KCENGINE_BACKEND, grad mode, .to(), a state
    dict loaded); copies do not share it."""
    import copy

    monkeypatch.delenv("KCENGINE_BACKEND", raising=False)
    torch.manual_seed(0)
    layer = _fused_layer(granularity)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 6, 9, 9).contiguous(memory_format=fmt)

    def check(inp=None, residual=None):
        inp = x if inp is None else inp
        with torch.no_grad():
            _close(layer(inp, residual).double(), _reference(layer, inp, residual), torch.float64 if
                   inp.dtype == torch.float64 else torch.float32)

    check()
    steady = layer.__dict__["_steady"]
    assert type(steady).__name__ == {"filter": "FilterInferenceCall", "kernel": "KernelInferenceCall"}[granularity]
    check()
    assert layer.__dict__["_steady"] is steady  # used, not rebuilt
    with torch.no_grad():
        layer.scale.mul_(-1.5)  # in place: the call's view shares the memory
        check()
        layer.shift.data = torch.randn(10)  # a new storage
        check()
        layer.codebook.mul_(0.5)
        check()
        layer.index.copy_(layer.index.flip(0))
        check()
    assert layer.__dict__["_steady"] is not steady
    layer.relu = False
    assert "_steady" not in layer.__dict__
    check()
    layer.stride = (2, 2)
    check()
    check(torch.randn(3, 6, 9, 9).contiguous(memory_format=fmt))
    check(residual=torch.randn(1, 10, 5, 5).contiguous(memory_format=fmt))
    layer.backend = "auto"
    check()
    monkeypatch.setenv("KCENGINE_BACKEND", "torch")
    with torch.no_grad():
        layer.scale.mul_(2.0)
    check()
    assert layer.__dict__["_steady"].key[6] is None  # the torch backend ran: no call prepared for it
    monkeypatch.delenv("KCENGINE_BACKEND")
    y = layer(x)  # gradients recorded: the autograd path
    y.sum().backward()
    assert layer.codebook.grad is not None
    twin = copy.deepcopy(layer)
    assert "_steady" not in twin.__dict__
    with torch.no_grad():
        twin.scale.mul_(3.0)
    check()
    layer.to(torch.float64)
    check(x.double())
    other = _fused_layer(granularity)
    layer.load_state_dict(other.to(torch.float64).state_dict())
    check(x.double())


def test_load_state_dict_converts_index_dtypes_and_refuses_values_out_of_range():
    """A state dict's index of any integer dtype loads into the layer's compact dtype; a value outside
    [0, K) is an error naming the key and the value, in the layer's own dtype too, and not wrapped into range
    by a conversion (300 into uint8 would be 44); scale/shift of a fused layer load into an unfused one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    src = ClusteredConv2d.from_conv(conv, 3).eval()
    dst = ClusteredConv2d(4, 6, 3, 3, padding=1, bias=False).eval()
    assert dst.index.dtype == torch.uint8
    x = torch.randn(2, 4, 7, 7)
    ref = F.conv2d(x, src.to_dense(), padding=1)
    sd = src.state_dict()
    sd["index"] = sd["index"].long()
    dst.load_state_dict(sd)
    assert dst.index.dtype == torch.uint8 and torch.equal(dst.index.long(), src.index.long())
    with torch.no_grad():
        _close(dst(x), ref)

    before = dst.index.clone()
    # the layer's own dtype (uint8) too: refused at load, not left for the first forward to find
    for value, dtype in ((259, torch.int64), (3, torch.int16), (-1, torch.int32), (3, torch.uint8),
                         (200, torch.uint8)):
        bad = dict(sd)
        bad["index"] = src.index.to(dtype).clone()
        bad["index"][2] = value
        with pytest.raises(RuntimeError, match=rf"index values of index must be in \[0, K=3\).*got {value}"):
            dst.load_state_dict(bad)
        assert torch.equal(dst.index, before)  # left as it was
        # non-strict loads report it too: a value past K is never a missing key to be skipped
        with pytest.raises(RuntimeError, match=r"index values of index"):
            dst.load_state_dict(bad, strict=False)
    bad["index"] = src.index.float()
    with pytest.raises(RuntimeError, match=r"index values of index must be integers, got dtype torch.float32"):
        dst.load_state_dict(bad)

    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    fused = src.fuse_bn_relu(bn, relu=False)
    plain = ClusteredConv2d(4, 6, 3, 3, padding=1, bias=False).eval()
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():
        _close(plain(x), bn(ref))


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_unbatched_input_as_conv2d_takes_it(granularity):
    """nn.Conv2d takes an unbatched [C_in, H, W] input (and returns [C_out, H', W']); a compressed model's layers
    refused it ("x must be a 4-D tensor")."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
    m = ClusteredConv2d.from_conv(conv, 4 if granularity == "filter" else 6, granularity).eval()
    dense = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect").eval()
    with torch.no_grad():
        dense.weight.copy_(m.to_dense())
        dense.bias.copy_(m.bias)
        x, r = torch.randn(3, 10, 9), torch.randn(8, 10, 9)
        y = m(x)
        assert y.shape == (8, 10, 9)
        _close(y, dense(x))
        _close(m(x, r), dense(x) + r)
        _close(m(x, torch.ones(8, 1, 1)), dense(x) + 1)


@pytest.mark.parametrize("shape", [(8,), (3, 10), (1, 1, 3, 10, 9)])
def test_input_of_other_rank_names_both_ranks_a_layer_takes(shape):
    """A layer takes 3-D and 4-D input, as nn.Conv2d does (which refuses the rest too); a 2-D one was told
    "x must be a 4-D tensor" as if unbatched input were not taken."""
    m = ClusteredConv2d.from_conv(nn.Conv2d(3, 8, 3), 4)
    with pytest.raises(ValueError, match=rf"^x must be a 3-D \[C_in, H, W\] or 4-D \[N, C_in, H, W\] tensor, got "
                                         rf"shape {re.escape(str(shape))}$"):
        m(torch.randn(shape))
    with pytest.raises(RuntimeError):  # the reference refuses them too
        nn.Conv2d(3, 8, 3)(torch.randn(shape))


def test_the_layer_keeps_its_own_index():
    """An index of the compact dtype (uint8 for K <= 256) was stored as the caller's own array: writing to the
    array changed the layer's index behind its prepared cache (forward and to_dense disagreed), and
    load_state_dict wrote into the caller's tensor."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8)
    cent = conv.weight.detach().reshape(6, -1)[:3].numpy().copy()
    m = ClusteredConv2d.from_conv(conv, SimpleNamespace(centroids=cent, labels=labels)).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        ref = F.conv2d(x, m.to_dense(), m.bias, padding=1)
        m(x)
        labels[:] = 0  # the caller reuses its array
        torch.testing.assert_close(m(x), ref)
    assert m.index.tolist() == [0, 1, 2, 0, 1, 2]
    idx = torch.tensor([2, 2, 1, 1, 0, 0], dtype=torch.uint8)
    m.set_index(idx)
    m.load_state_dict({**m.state_dict(), "index": torch.zeros(6, dtype=torch.uint8)})
    assert idx.tolist() == [2, 2, 1, 1, 0, 0] and m.index.tolist() == [0] * 6


def test_index_arguments_are_checked_where_they_were_truncated_or_failed_late():
    conv = nn.Conv2d(2, 3, 3)
    cb = torch.randn(18, 4)
    with pytest.raises(ValueError, match="index must be an integer tensor, got dtype torch.float32"):
        ElementClusteredConv2d(conv, cb, torch.full((3, 18), 0.5))  # was truncated to 0
    for bad, got in ((4, "got 4"), (-1, "got -1")):  # was the gather's RuntimeError in forward
        idx = torch.zeros(3, 18, dtype=torch.long)
        idx[1, 2] = bad
        with pytest.raises(ValueError, match=rf"index values must be in \[0, K=4\), {got}"):
            ElementClusteredConv2d(conv, cb, idx)
    with pytest.raises(ValueError, match="index must be an integer tensor, got dtype torch.float64"):
        kcengine.conv.dense_weight(torch.randn(4, 2, 3, 3), torch.tensor([0.5, 1.7], dtype=torch.float64), "filter")
    for k in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 2\*\*31\)"):
            kcengine.conv.index_dtype_for(k)
