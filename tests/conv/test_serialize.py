"""save_compressed / load_compressed: exact round trip, compact index, file size against dense."""
import io
import re

import pytest
import torch
import torch.nn as nn

import kcengine
from kcengine.conv.serialize import checkpoint_sizes, dense_state_dict, is_compressed_file
from kcengine.nn import ClusteredConv2d


class Net(nn.Module):
    def __init__(self, k1=16, k2=300, granularity="filter"):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(64, 512, 3, padding=1))
        self.k1, self.k2, self.granularity = k1, k2, granularity

    def forward(self, x):
        return self.body(self.bn1(self.conv1(x)))


def _cluster(net: Net) -> Net:
    g = torch.Generator().manual_seed(0)
    net = net.eval()
    c1 = ClusteredConv2d(16, 64, 3, net.k1, padding=1, bias=False, granularity=net.granularity)
    c2 = ClusteredConv2d(64, 512, 3, net.k2, padding=1, granularity=net.granularity)
    for c in (c1, c2):
        c.set_index(torch.randint(0, c.num_clusters, c.index.shape, generator=g))
    net.conv1, net.body[1] = c1, c2
    return net


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
def test_round_trip_is_exact(tmp_path, granularity):
    torch.manual_seed(0)
    model = _cluster(Net(granularity=granularity))
    model.bn1.running_mean.normal_()
    path = tmp_path / "m.pt"
    nbytes = kcengine.save_compressed(model, path)
    assert nbytes == path.stat().st_size
    raw = torch.load(path, weights_only=True)  # plain containers only
    assert raw["state_dict"]["conv1.index"].dtype == torch.uint8
    assert raw["state_dict"]["body.1.index"].dtype == torch.int16  # K = 300 > 256
    skeleton = Net(granularity=granularity)
    skel_state = {k: v.clone() for k, v in skeleton.state_dict().items()}
    loaded = kcengine.load_compressed(path, model=skeleton)
    assert isinstance(loaded.conv1, ClusteredConv2d) and isinstance(skeleton.conv1, nn.Conv2d)
    assert all(torch.equal(v, skeleton.state_dict()[k]) for k, v in skel_state.items())  # skeleton untouched
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = torch.randn(1, 16, 9, 9)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_cosine_layers_round_trip_with_their_norms(tmp_path):
    """compress's cosine option keeps each filter's norm in ``scale`` and the bias in ``shift``: a compact
    checkpoint rebuilds such layers (no bias parameter, the cosine flag that effective_weight reads)."""
    from kcengine.compress.layers import effective_weight

    torch.manual_seed(0)
    dense = Net().eval()
    model, _ = kcengine.compress(dense, ratio=0.25, cosine=True)
    assert model.body[1].bias is None and model.body[1].shift is not None
    path = tmp_path / "m.pt"
    kcengine.save_compressed(model, path)
    loaded = kcengine.load_compressed(path, model=Net())
    for name in ("conv1", "body.1"):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert getattr(b, "_kc_cosine", False) and b.bias is None
        torch.testing.assert_close(effective_weight(b), effective_weight(a), rtol=0, atol=0)
    x = torch.randn(1, 16, 9, 9)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_element_layers_round_trip(tmp_path, dtype):
    """Per-element layers (compress granularity="element") are rebuilt too: ``prune --granularity element``
    wrote a model.pt that neither ``eval --weights`` nor load_compressed could read (the skeleton's dense
    convs met a state dict of codebooks and indexes).  Also a strided, dilated and grouped conv, and the
    dense state dict those layers give."""
    from kcengine.compress.layers import ElementClusteredConv2d

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, (1, 3), stride=(2, 1),
                          padding=(0, 2), dilation=(1, 2), groups=2, bias=False)).eval().to(dtype)
    model, _ = kcengine.compress(dense, ratio=0.5, granularity="element")
    assert all(isinstance(model[i], ElementClusteredConv2d) for i in (0, 2))
    path = tmp_path / "m.pt"
    kcengine.save_compressed(model, path)
    loaded = kcengine.load_compressed(path, model=dense)
    assert isinstance(loaded[2], ElementClusteredConv2d) and loaded[2].bias is None and loaded[2].groups == 2
    assert loaded[0].codebook.dtype == dtype and loaded[0].num_clusters == model[0].num_clusters
    x = torch.randn(2, 4, 7, 9, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    dsd = dense_state_dict(model)
    assert set(dsd) == {"0.weight", "0.bias", "2.weight"}
    assert torch.equal(dsd["2.weight"], model[2].to_dense().detach())


def test_file_size_against_dense(tmp_path):
    """Filter granularity, K = C_out/4 everywhere: the codebook is 1/4 of the dense weights, the index one byte
    (or two) per filter; the file is smaller than the dense checkpoint by nearly 4x."""
    model = _cluster(Net(k1=16, k2=128))
    path = tmp_path / "m.pt"
    nbytes = kcengine.save_compressed(model, path)
    buf = io.BytesIO()
    torch.save(dense_state_dict(model), buf)
    dense_bytes = buf.getbuffer().nbytes
    weights = (16 * 16 + 128 * 64) * 9 * 4  # codebooks [K, C_in, 3, 3], float32
    dense_weights = (64 * 16 + 512 * 64) * 9 * 4
    assert dense_bytes > dense_weights
    assert nbytes > weights + 64 + 512  # codebooks + uint8 indexes
    ratio = dense_bytes / nbytes
    assert 3.5 < ratio < 4.0, ratio
    sizes = checkpoint_sizes(model)
    assert sizes["dense_bytes"] == dense_bytes and abs(sizes["compressed_bytes"] - nbytes) < 2048


def test_builder_and_errors(tmp_path):
    path = tmp_path / "m.pt"
    model = _cluster(Net())
    kcengine.save_compressed(model, path)
    with pytest.raises(ValueError, match=r"records no builder: pass model="):
        kcengine.load_compressed(path)
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"is not a kcengine compressed checkpoint"):
        kcengine.load_compressed(bad, model=Net())
    with pytest.raises(ValueError, match=r"builder must be 'package.module:callable', got 'nope'"):
        kcengine.save_compressed(model, path, builder="nope")
    # a builder that cannot run is refused when the file is written, not when it is read back (it was saved)
    fresh = tmp_path / "never.pt"
    for builder, msg in (("torchvision.models:resnet19", r"builder 'torchvision.models:resnet19' cannot be imported"),
                         ("kcengine_no_such_module:f", r"builder 'kcengine_no_such_module:f' cannot be imported"),
                         ("torch:pi", r"builder 'torch:pi' is a float, not a callable"),
                         (":resnet18", r"builder must be 'package.module:callable', got ':resnet18'")):
        with pytest.raises(ValueError, match=msg):
            kcengine.save_compressed(model, fresh, builder=builder)
        assert not fresh.exists()

    import torchvision

    rn = torchvision.models.resnet18(num_classes=3)
    conv = rn.layer1[0].conv1
    rn.layer1[0].conv1 = ClusteredConv2d(64, 64, 3, 8, padding=1, bias=False)
    kcengine.save_compressed(rn, path, builder="torchvision.models:resnet18", builder_kwargs={"num_classes": 3})
    loaded = kcengine.load_compressed(path)
    assert isinstance(loaded.layer1[0].conv1, ClusteredConv2d) and conv is not None
    assert torch.equal(loaded.fc.weight, rn.fc.weight)


def test_malformed_files_are_value_errors_naming_the_file(tmp_path):
    path = tmp_path / "m.pt"
    kcengine.save_compressed(_cluster(Net()), path, builder="torchvision.models:resnet18")
    good = torch.load(path, weights_only=True)
    name = next(iter(good["clustered"]))
    cases = [  # (what is broken, message)
        ({"state_dict": None}, "'state_dict' is NoneType"),
        ({"clustered": [1]}, "'clustered' must map layer names"),
        ({"clustered": {name: {**good["clustered"][name], "num_clusters": "x"}}}, f"layer '{name}' has an unusable"),
        ({"clustered": {name: {"in_channels": 3}}}, f"layer '{name}' has an unusable"),
        ({"builder": "nope"}, "builder 'nope' is not 'module:callable'"),
        ({"builder_kwargs": [1]}, "builder_kwargs is list"),
        ({"builder": "kcengine_no_such_module:f"}, "cannot be imported here"),
        ({"builder_kwargs": {"depht": 20}}, "failed with the recorded builder_kwargs"),
        ({"builder_kwargs": {"num_classes": 3}}, "does not fit ResNet: the skeleton has no module 'body'"),
    ]
    for change, msg in cases:
        bad = tmp_path / "bad.pt"
        torch.save({**good, **change}, bad)
        with pytest.raises(ValueError, match=msg) as info:
            kcengine.load_compressed(bad, model=None if "builder" in str(change) else Net())
        assert str(bad) in str(info.value)


def test_unreadable_files_and_bad_paths_are_value_errors_naming_them(tmp_path):
    """A truncated file was torch's RuntimeError (miniz), random bytes an UnpicklingError suggesting
    weights_only=False, a folder a RuntimeError on save, a missing folder 'Parent directory ... does not
    exist' (RuntimeError), and path=None an AttributeError about seek."""
    path = tmp_path / "m.pt"
    model = _cluster(Net())
    kcengine.save_compressed(model, path)
    raw = path.read_bytes()
    files = {"trunc.pt": raw[: len(raw) // 2], "random.pt": bytes(range(256)) * 4, "empty.pt": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / name))} could not be read as a kcengine "
                                             rf"compressed checkpoint"):
            kcengine.load_compressed(tmp_path / name, model=Net())
    with pytest.raises(ValueError, match=r"do not load with torch.load\(weights_only=True\)"):
        kcengine.load_compressed(tmp_path / "random.pt", model=Net())
    for bad, msg in [(None, "path must be a file path .* got NoneType"), (3, "got int"),
                     (tmp_path, "is a folder; give the checkpoint file's path")]:
        with pytest.raises(ValueError, match=msg):
            kcengine.load_compressed(bad, model=Net())
        with pytest.raises(ValueError, match=msg):
            kcengine.save_compressed(model, bad)
    with pytest.raises(ValueError, match=r"its folder '.*no_such_folder' does not exist"):
        kcengine.save_compressed(model, tmp_path / "no_such_folder" / "m.pt")
    with pytest.raises(FileNotFoundError):  # a missing file stays the OS's own error
        kcengine.load_compressed(tmp_path / "missing.pt", model=Net())
    assert kcengine.load_compressed(path, model=Net()) is not None  # and the good file still loads


def test_loaded_model_is_in_eval_mode_and_computes_what_was_saved(tmp_path):
    """A skeleton (or a builder's model) in train mode gave back a train-mode model, whose BatchNorm used the
    batch's statistics and rewrote its running ones on the first call: outputs off by up to 2.6 on resnet20."""
    torch.manual_seed(0)
    model = _cluster(Net())
    model.bn1.running_mean.normal_()
    kcengine.save_compressed(model, tmp_path / "m.pt")
    skeleton = Net().train()
    loaded = kcengine.load_compressed(tmp_path / "m.pt", skeleton)
    assert not loaded.training and all(not m.training for m in loaded.modules())
    assert skeleton.training  # the skeleton is not touched
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert torch.equal(loaded.bn1.running_mean, model.bn1.running_mean)


def test_a_fused_graph_loads_only_into_a_fused_skeleton_and_says_so(tmp_path):
    from kcengine.nn import fuse_for_inference

    torch.manual_seed(0)
    model = _cluster(Net())
    fused = fuse_for_inference(model)
    kcengine.save_compressed(fused, tmp_path / "f.pt")
    with pytest.raises(ValueError, match=r"no module 'conv1_fused' .* saved from fuse_for_inference's graph"):
        kcengine.load_compressed(tmp_path / "f.pt", Net())
    back = kcengine.load_compressed(tmp_path / "f.pt", fuse_for_inference(_cluster(Net())))
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(back(x), fused(x), rtol=0, atol=0)


@pytest.mark.parametrize("granularity", ["filter", "kernel", "element"])
def test_a_checkpoint_takes_the_skeletons_dtype(tmp_path, granularity):
    """A float64 file loaded into a float32 skeleton: the clustered layers were built in the file's dtype and
    every other layer kept the skeleton's, so the model ran in neither (load_state_dict converts to the
    skeleton's dtype, and so does load_compressed now)."""
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))

    dense = make().double().eval()
    cm, _ = kcengine.compress(dense, ratio=0.5, granularity=granularity)
    kcengine.save_compressed(cm, tmp_path / "m.kc")
    lm = kcengine.load_compressed(tmp_path / "m.kc", make())
    assert {t.dtype for t in lm.state_dict().values() if t.is_floating_point()} == {torch.float32}
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(lm(x.float()), cm.eval()(x).float(), rtol=1e-4, atol=1e-5)
    # a compressed float32 skeleton too (a per-element layer has a codebook and no weight)
    skel, _ = kcengine.compress(make(), ratio=0.5, granularity=granularity)
    lm2 = kcengine.load_compressed(tmp_path / "m.kc", skel)
    assert {t.dtype for t in lm2.state_dict().values() if t.is_floating_point()} == {torch.float32}


def test_builder_kwargs_that_would_not_load_are_refused_at_save(tmp_path):
    """A numpy scalar (or a Path) in builder_kwargs saved without a word and made a file that
    torch.load(weights_only=True), hence load_compressed, could never read.  Numpy and 0-d torch scalars are
    written as the Python numbers they hold; other objects are refused by name, and nothing is written."""
    import numpy as np

    rn = nn.Sequential(nn.Conv2d(3, 8, 3))
    kcengine.save_compressed(rn, tmp_path / "ok.pt", builder="torch.nn:Sequential",
                             builder_kwargs={"n": np.int64(20), "t": (np.float32(0.5), [torch.tensor(3)])})
    assert is_compressed_file(tmp_path / "ok.pt")
    kw = torch.load(tmp_path / "ok.pt", weights_only=True)["builder_kwargs"]
    assert kw == {"n": 20, "t": (0.5, [3])} and type(kw["n"]) is int
    for bad, msg in (({"root": tmp_path}, r"builder_kwargs\['root'\] is a \w*Path .* pass e.g. str\(path\)"),
                     ({"f": [1, object()]}, r"builder_kwargs\['f'\]\[1\] is a object"),
                     ([("num_classes", 3)], r"builder_kwargs must be a dict .* got list"),
                     ({3: 1}, r"builder_kwargs keys must be argument names \(str\), got 3")):
        with pytest.raises(ValueError, match=msg):
            kcengine.save_compressed(rn, tmp_path / "bad.pt", builder="torch.nn:Sequential", builder_kwargs=bad)
        assert not (tmp_path / "bad.pt").exists()


def test_a_skeleton_on_the_meta_device_is_filled(tmp_path):
    """A skeleton built under ``torch.device("meta")`` (no memory for weights about to be overwritten) loaded
    "successfully" with every layer but the clustered ones still on meta (copying into a meta tensor is a
    no-op), and the model failed at its first forward."""
    model = _cluster(Net()).eval()
    kcengine.save_compressed(model, tmp_path / "m.pt")
    with torch.device("meta"):
        skel = Net()
    loaded = kcengine.load_compressed(tmp_path / "m.pt", skel)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert all(t.is_meta for t in skel.state_dict().values())  # the caller's skeleton is not touched
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    class WithTable(nn.Module):  # a buffer the state dict does not carry: nothing could fill it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    src, _ = kcengine.compress(WithTable(), ratio=0.5)
    kcengine.save_compressed(src, tmp_path / "t.pt")
    with torch.device("meta"):
        skel = WithTable()
    with pytest.raises(ValueError, match=r"skeleton on the meta device whose buffer 'table' is not in the state dict"):
        kcengine.load_compressed(tmp_path / "t.pt", skel)


def test_per_element_index_is_written_in_the_narrowest_dtype(tmp_path):
    """The per-element layers' index is int64 in the layer (torch.gather takes no other) and was written so: a
    resnet20 at ratio 0.25 made a "compact" file over twice the dense checkpoint.  It is written as uint8
    (K <= 256) and read back into the int64 buffer."""
    from kcengine.models import load_model

    dense = load_model("resnet20", None).model.eval()
    model, _ = kcengine.compress(dense, ratio=0.25, granularity="element")
    path = tmp_path / "e.pt"
    kcengine.save_compressed(model, path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state["layer1.0.conv1.index"].dtype == torch.uint8
    assert torch.equal(state["layer1.0.conv1.index"].long(), model.layer1[0].conv1.index)
    assert checkpoint_sizes(model)["ratio"] > 1.8  # codebook [D, K] float32 + one byte per weight
    loaded = kcengine.load_compressed(path, load_model("resnet20", None).model)
    assert loaded.layer1[0].conv1.index.dtype == torch.int64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("where", ["root", "inside"])
def test_a_placeholder_without_weights_takes_the_models_dtype(tmp_path, where):
    """A clustered layer loaded into an ``nn.Identity`` placeholder: its dtype was looked up under the key
    ``.codebook`` at the root (so a float64 file came back float32), and inside a float32 model it came back in
    the file's float64 among float32 layers."""
    torch.manual_seed(0)
    if where == "root":
        cm, _ = kcengine.compress(nn.Conv2d(3, 8, 3).double(), ratio=0.5)
        kcengine.save_compressed(cm, tmp_path / "m.pt")
        assert kcengine.load_compressed(tmp_path / "m.pt", nn.Identity()).codebook.dtype == torch.float64
        return
    cm, _ = kcengine.compress(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)).double(), ratio=0.5)
    kcengine.save_compressed(cm, tmp_path / "m.pt")
    lm = kcengine.load_compressed(tmp_path / "m.pt", nn.Sequential(nn.Identity(), nn.Conv2d(8, 4, 3)))
    assert {t.dtype for t in lm.state_dict().values() if t.is_floating_point()} == {torch.float32}
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(lm(x.float()), cm.eval()(x).float(), rtol=1e-4, atol=1e-5)


def test_review_cases_of_the_load_and_save_checks(tmp_path):
    """What the first form of the checks above broke or let through: a lazy module in the skeleton (load_state_dict
    initializes it; the one-line misfit report asked its shape), np.float64 and IntEnum values (float and int
    subclasses the unpickler refuses), a mapping that is no dict, and a meta skeleton's non-persistent buffer
    that has values (to_empty re-allocated it)."""
    import enum
    import types

    import numpy as np

    torch.manual_seed(0)
    src, _ = kcengine.compress(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)),
                               ratio=0.5)
    kcengine.save_compressed(src, tmp_path / "m.pt")
    lazy = kcengine.load_compressed(tmp_path / "m.pt", nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(),
                                                                     nn.LazyLinear(4)))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(lazy(x), src.eval()(x))

    class Depth(enum.IntEnum):
        TWENTY = 20

    kcengine.save_compressed(src, tmp_path / "k.pt", builder="torch.nn:Sequential",
                             builder_kwargs=types.MappingProxyType({"a": np.float64(0.5), "b": Depth.TWENTY,
                                                                    "c": np.str_("s"), "d": np.bool_(True)}))
    kw = torch.load(tmp_path / "k.pt", weights_only=True)["builder_kwargs"]
    assert kw == {"a": 0.5, "b": 20, "c": "s", "d": True}
    assert [type(kw[k]) for k in "abcd"] == [float, int, str, bool]

    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("table", torch.arange(4.0, device="cpu") + 1, persistent=False)

        def forward(self, x):
            return self.conv(x) * self.table[:, None, None]

    torch.manual_seed(0)
    src, _ = kcengine.compress(WithTable(), ratio=0.5)
    kcengine.save_compressed(src, tmp_path / "t.pt")
    with torch.device("meta"):
        skel = WithTable()
    assert not skel.table.is_meta
    loaded = kcengine.load_compressed(tmp_path / "t.pt", skel)
    assert torch.equal(loaded.table, torch.arange(4.0) + 1)
    with torch.no_grad():
        assert torch.equal(loaded(x), src.eval()(x))


def test_kcengine_cifar_resnets_record_their_own_builder(tmp_path):
    """save_compressed(small, path) of a compressed resnet20 (the README's line) made a file that
    load_compressed(path) refused without a skeleton; kcengine's own CIFAR ResNets now record their builder. A
    model of another class, or whose classifier was replaced, records none, as before."""
    from kcengine.models import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(32, num_classes=7).eval()
    small, _ = kcengine.compress(model, ratio=0.5)
    path = tmp_path / "small.pt"
    kcengine.save_compressed(small, path)
    loaded = kcengine.load_compressed(path)
    assert type(loaded) is type(model) and loaded.depth == 32 and loaded.linear.out_features == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    small.linear = nn.Sequential(nn.Linear(64, 7))
    kcengine.save_compressed(small, path)
    with pytest.raises(ValueError, match=r"records no builder: pass model="):
        kcengine.load_compressed(path)
    assert isinstance(kcengine.load_compressed(path, small).linear, nn.Sequential)


def test_models_from_load_model_record_their_builder(tmp_path):
    """A torchvision model from kcengine.models.load_model, compressed, saved and loaded back without a skeleton
    (the file needed one: the model's class does not tell resnet18 from resnet34).  The builder is recorded only
    where its skeleton fits the file: a replaced classifier, or a plain torchvision model, records none."""
    import torchvision

    from kcengine.models import load_model

    torch.manual_seed(0)
    model = load_model("resnet18", weights=None, num_classes=5).model
    small, _ = kcengine.compress(model, ratio=0.5)
    path = tmp_path / "small.pt"
    kcengine.save_compressed(small, path)
    assert torch.load(path, weights_only=True)["builder_kwargs"] == {"name": "resnet18", "weights": None,
                                                                     "num_classes": 5}
    loaded = kcengine.load_compressed(path)
    assert type(loaded) is torchvision.models.ResNet and loaded.fc.out_features == 5
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, ClusteredConv2d)) == sorted(
        n for n, m in small.named_modules() if isinstance(m, ClusteredConv2d))
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), small.eval()(x))
    small.fc = nn.Linear(512, 3)  # no longer what the recorded builder makes
    kcengine.save_compressed(small, path)
    with pytest.raises(ValueError, match=r"records no builder: pass model="):
        kcengine.load_compressed(path)
    kcengine.save_compressed(kcengine.compress(torchvision.models.resnet18(num_classes=5), ratio=0.5)[0], path)
    with pytest.raises(ValueError, match=r"records no builder: pass model="):
        kcengine.load_compressed(path)
    # an explicit builder is kept as given, checked or not
    kcengine.save_compressed(small, path, builder="torchvision.models:resnet34")
    assert torch.load(path, weights_only=True)["builder"] == "torchvision.models:resnet34"
    # a tag naming any other callable is not called, nor recorded
    from kcengine.conv.serialize import BUILDER_ATTR

    setattr(small, BUILDER_ATTR, ("torch.nn:Sequential", {}))
    kcengine.save_compressed(small, path)
    assert torch.load(path, weights_only=True)["builder"] is None
