import os
import shutil

import pytest
import torch
from torch import nn

from kcengine.models import (CIFAR_CHECKPOINT_URLS, CifarResNet, MissingWeightsError, extract_state_dict,
                             hub_cache_path, load_model, load_state_dict_into, read_checkpoint)


@pytest.mark.parametrize("depth,n_conv", [(20, 19), (32, 31), (44, 43), (56, 55), (110, 109)])
def test_cifar_resnet_shape_and_layer_count(depth, n_conv):
    m = CifarResNet(depth).eval()
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == n_conv  # 6n convs in blocks + the stem
    with torch.inference_mode():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_parameter_count_matches_paper():
    m = CifarResNet(20)
    n = sum(p.numel() for p in m.parameters())
    assert 0.26e6 < n < 0.28e6  # 0.27M in He et al. table 6


def test_option_a_shortcut_zero_pads_and_subsamples():
    blk = CifarResNet(20).layer2[0]
    x = torch.randn(1, 16, 8, 8)
    s = blk.shortcut(x)
    assert s.shape == (1, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0


def test_bad_depth_is_a_clear_error():
    with pytest.raises(ValueError, match="depth must be 6n\\+2.*depth=21"):
        CifarResNet(21)


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_bad_num_classes_is_refused(name, n):
    """num_classes=0 silently built 10 (or 1000) outputs ('or' default), -1 a torch RuntimeError."""
    from kcengine.models import load_model

    with pytest.raises(ValueError, match=rf"num_classes must be an int >= 1 or None, got num_classes={n}"):
        load_model(name, None, num_classes=n)


def _variants(state):
    yield state
    yield {"state_dict": state}
    yield {"model": state}
    yield {"module." + k: v for k, v in state.items()}
    yield {"state_dict": {"module." + k: v for k, v in state.items()}, "best_prec1": 90.0}


def test_checkpoint_formats_all_load_the_same(tmp_path):
    src = CifarResNet(20)
    state = src.state_dict()
    for i, obj in enumerate(_variants(state)):
        p = tmp_path / f"ck{i}.th"
        torch.save(obj, p)
        dst = CifarResNet(20)
        load_state_dict_into(dst, read_checkpoint(p))
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), (i, k)


def test_whole_module_pickle_loads(tmp_path):
    src = CifarResNet(20)
    p = tmp_path / "whole.pt"
    torch.save(src, p)
    assert torch.equal(read_checkpoint(p)["linear.weight"], src.linear.weight)


def test_unreadable_checkpoint_is_a_value_error_naming_the_file(tmp_path):
    """A file torch.load cannot read (text, empty, a truncated zip) raised torch's own UnpicklingError or
    EOFError, naming neither the file nor the argument; a non-path raised pathlib's TypeError."""
    good = tmp_path / "good.th"
    torch.save(CifarResNet(20).state_dict(), good)
    cases = {"text.th": b"hello\n", "empty.th": b"", "truncated.th": good.read_bytes()[:200]}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ValueError, match=rf"weights file '.*{name}' could not be read by torch.load \("):
            read_checkpoint(p)
        with pytest.raises(ValueError, match=rf"weights file '.*{name}' could not be read by torch.load"):
            load_model("resnet20", str(p))
    with pytest.raises(ValueError, match=r"weights file must be a path \(str or os.PathLike\), got int"):
        read_checkpoint(3)
    assert set(read_checkpoint(good)) == set(CifarResNet(20).state_dict())  # the check refuses only bad files


def test_mismatching_checkpoint_says_what_differs():
    state = CifarResNet(20).state_dict()
    with pytest.raises(ValueError, match="missing|unexpected|another shape"):
        load_state_dict_into(CifarResNet(32), state)
    with pytest.raises(ValueError, match="no state_dict"):
        extract_state_dict({"epoch": 3})


def test_each_checkpoint_mismatch_is_named(tmp_path):
    """Missing, unexpected and reshaped entries each get their count and examples; a key given twice once
    `module.` is stripped, an object that is no state dict, and a folder are refused by name."""
    state = CifarResNet(20).state_dict()
    less = {k: v for k, v in state.items() if k != "linear.bias"}
    with pytest.raises(ValueError, match=r"^checkpoint does not fit CifarResNet: 1 missing \(e.g. "
                                         r"\['linear.bias'\]\)$"):
        load_state_dict_into(CifarResNet(20), less)
    more = {**state, "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"^checkpoint does not fit CifarResNet: 1 unexpected \(e.g. "
                                         r"\['extra.weight'\]\)$"):
        load_state_dict_into(CifarResNet(20), more)
    other = CifarResNet(20, num_classes=100).state_dict()
    with pytest.raises(ValueError, match=r"^checkpoint does not fit CifarResNet: 2 of another shape \(e.g. "
                                         r"\['linear.weight: checkpoint \(100, 64\) vs model \(10, 64\)'"):
        load_state_dict_into(CifarResNet(20), other)
    no_counter = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    load_state_dict_into(CifarResNet(20), no_counter)  # older checkpoints lack the BN counters: fine
    with pytest.raises(ValueError, match=r"checkpoint has two entries for 'linear.bias' once prefixes are stripped "
                                         r"\(one was 'module.linear.bias'\)"):
        extract_state_dict({**state, "module.linear.bias": state["linear.bias"]})
    with pytest.raises(ValueError, match=r"checkpoint holds no state_dict: got an object of type list"):
        extract_state_dict([state])
    with pytest.raises(MissingWeightsError, match=r"weights file '.*' is a folder, not a checkpoint file"):
        read_checkpoint(tmp_path)


def test_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="not in the torch hub cache.*--weights PATH"):
        load_model("resnet20", "pretrained", allow_download=False)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_model("resnet20", str(tmp_path / "nope.th"))
    monkeypatch.chdir(tmp_path)  # a bare file name with a suffix is a path too (it was "is not a path")
    for name in ("weights.ckpt", "model.safetensors"):
        with pytest.raises(MissingWeightsError, match=f"weights file '{name}' does not exist"):
            load_model("resnet20", name)


def test_torchvision_by_name_without_weights_and_missing_enum_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    lm = load_model("resnet18", None)
    assert not lm.pretrained and "default initialization" in lm.weights
    assert lm.model.fc.out_features == 1000
    with pytest.raises(MissingWeightsError, match="resnet18.IMAGENET1K_V1 are not in the torch hub cache"):
        load_model("resnet18", "IMAGENET1K_V1", allow_download=False)
    with pytest.raises(ValueError, match="not one of resnet18's weights"):
        load_model("resnet18", "NOPE_V9")
    import torchvision

    # the enum member, as torchvision takes it (its message read "IMAGENET1K_V1 is not one of ['IMAGENET1K_V1']")
    with pytest.raises(MissingWeightsError, match="resnet18.IMAGENET1K_V1 are not in the torch hub cache"):
        load_model("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1, allow_download=False)
    with pytest.raises(MissingWeightsError, match="resnet18.IMAGENET1K_V1 are not in the torch hub cache"):
        load_model("resnet18", "ResNet18_Weights.IMAGENET1K_V1", allow_download=False)  # torchvision's string form
    with pytest.raises(ValueError, match="are ResNet50_Weights, not resnet18's \\(ResNet18_Weights\\)"):
        load_model("resnet18", torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    with pytest.raises(ValueError, match="not a known model"):
        load_model("resnet19")


def test_torchvision_compact_file_round_trips_through_its_builder(tmp_path):
    # what prune --out writes for a torchvision model: load_compressed rebuilds it from the recorded
    # builder alone, load_model from the path, both equal to the clustered model
    import kcengine
    from kcengine.models.zoo import model_builder
    from kcengine.nn import ClusteredConv2d

    torch.manual_seed(0)
    dense = load_model("mobilenet_v3_small", None, num_classes=7).model
    clustered, _ = kcengine.compress(dense, ratio=0.5, layers="features.0.0|features.1.block.2.0")
    builder, kwargs = model_builder("mobilenet_v3_small", num_classes=7)
    path = tmp_path / "model.pt"
    kcengine.save_compressed(clustered, path, builder=builder, builder_kwargs=kwargs)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = clustered.eval()(x)
        for got in (kcengine.load_compressed(path), load_model("mobilenet_v3_small", str(path), num_classes=7).model):
            assert sum(isinstance(m, ClusteredConv2d) for m in got.modules()) == 2
            assert torch.equal(got.eval()(x), want)


def test_pretrained_cifar_loads_through_the_hub_cache(shared_data, tmp_path, monkeypatch):
    """The real path: load_state_dict_from_url(public URL) finds the file in $TORCH_HOME/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = CIFAR_CHECKPOINT_URLS["resnet20"]
    dst = hub_cache_path(url)
    assert str(dst).startswith(str(tmp_path))
    dst.parent.mkdir(parents=True)
    shutil.copy(shared_data / "checkpoints" / os.path.basename(url), dst)
    lm = load_model("resnet20", "pretrained", allow_download=False)
    ref = read_checkpoint(shared_data / "checkpoints" / "resnet20-12fca82f.th")
    assert lm.pretrained and lm.weights == url
    assert torch.equal(lm.model.layer3[2].conv2.weight, ref["layer3.2.conv2.weight"])


def test_a_checkpoint_of_another_cifar_depth_names_it(tmp_path):
    """A resnet56 checkpoint given as resnet20's weights (an easy slip: --weights without --model) says which
    model it holds, plain or compact; a checkpoint of the same depth that does not fit gets no such guess."""
    from kcengine import compress, save_compressed
    from kcengine.models import load_model

    torch.manual_seed(0)
    r56 = CifarResNet(56)
    plain = tmp_path / "r56.th"
    torch.save({"state_dict": {"module." + k: v for k, v in r56.state_dict().items()}}, plain)
    with pytest.raises(ValueError, match=r"does not fit CifarResNet: .*; the file holds a resnet56 .*pass "
                                         r"name='resnet56'$"):
        load_model("resnet20", plain)
    assert load_model("resnet56", plain).name == "resnet56"
    small, _ = compress(r56.eval(), ratio=0.5, seed=0)
    compact = tmp_path / "m.pt"
    save_compressed(small, compact)
    with pytest.raises(ValueError, match=r"the file holds a resnet56 .*pass name='resnet56'$"):
        load_model("resnet32", compact)
    other = CifarResNet(20, num_classes=100).state_dict()
    torch.save(other, tmp_path / "r20c100.th")
    with pytest.raises(ValueError) as exc:
        load_model("resnet20", tmp_path / "r20c100.th")
    assert "holds a" not in str(exc.value)
