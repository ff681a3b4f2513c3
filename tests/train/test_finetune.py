"""kcengine.finetune: modes keep their invariants, progressive order, resume, validation."""
import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

import kcengine
from kcengine.data.datasets import TensorImages, make_loader
from kcengine.nn import ClusteredConv2d
from kcengine.train import finetune, lr_factor
from kcengine.train.checkpoint import CHECKPOINT_NAME


FAST = dict(epochs=2, progress=False, calibration_images=32, lr=0.05)


def clustered(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ClusteredConv2d)}


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_public_reexport():
    assert kcengine.finetune is finetune


def test_frozen_changes_no_clustered_weight_but_trains_the_rest(tiny):
    model, ds, loader = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    before = state_copy(cm)
    r = finetune(cm, loader, mode="frozen", teacher=model, **FAST)
    after = r.model.state_dict()
    for name, mod in clustered(cm).items():
        assert torch.equal(after[name + ".codebook"], before[name + ".codebook"]), name
        assert torch.equal(after[name + ".index"], before[name + ".index"]), name
    # the rest did train (BN affine and linear moved), and the caller's model is untouched
    assert not torch.equal(after["linear.weight"], before["linear.weight"])
    assert not torch.equal(after["bn2.weight"].abs(), before["bn2.weight"].abs())
    for k, v in before.items():
        assert torch.equal(cm.state_dict()[k], v), k


def test_history_reports_each_epochs_mean_loss_and_train_accuracy(tiny, monkeypatch):
    """The epoch's row is the image-weighted mean of the batches' losses and the share of images whose
    logits' argmax was the label (the sums are kept on the device and read back once per epoch)."""
    model, ds, loader = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    ft = sys.modules["kcengine.train.finetune"]
    real = ft.distillation_loss
    seen = []

    def recording(out, t_logits, target, **kw):
        loss = real(out, t_logits, target, **kw)
        seen.append((float(loss.detach()), out.detach().argmax(1).clone(), out.shape[0]))
        return loss

    monkeypatch.setattr(ft, "distillation_loss", recording)
    labels = [y for _, y in make_loader(ds, 16, shuffle=False)]
    r = finetune(cm, make_loader(ds, 16, shuffle=False), mode="centroids", teacher=model, augment=False, mixup=0.0,
                 feature_weight=0.0, **{**FAST, "epochs": 1})
    assert len(seen) == len(labels) == 3
    n = sum(b for _, _, b in seen)
    row = r.history[-1]
    assert row["loss"] == pytest.approx(sum(l * b for l, _, b in seen) / n, rel=1e-12)
    correct = sum(int((p == y).sum()) for (_, p, _), y in zip(seen, labels))
    assert row["train_top1"] == pytest.approx(correct / n, rel=1e-12) and 0 < correct < n


def test_centroids_keeps_every_filter_equal_to_its_centroid(tiny):
    model, ds, loader = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    r = finetune(cm, loader, mode="centroids", teacher=model, output_calibration=False, **FAST)
    for name, mod in clustered(r.model).items():
        old = clustered(cm)[name]
        assert torch.equal(mod.index, old.index), name  # index fixed (no refit requested)
        assert not torch.equal(mod.codebook, old.codebook), name  # the codebook trained
        dense = mod.to_dense()
        cb = mod.codebook.detach()
        for o in range(mod.out_channels):  # independent check: row o is codebook[index[o]]
            assert torch.equal(dense[o], cb[int(mod.index[o])]), (name, o)
        assert len({tuple(r.flatten().tolist()) for r in dense}) <= mod.num_clusters


def test_centroids_output_is_the_dense_conv_of_the_shared_filters(tiny):
    model, ds, loader = tiny
    r = finetune(model, loader, mode="centroids", plan=0.5, **FAST)  # a bare float plan is the ratio
    mod = r.model.conv2
    assert mod.num_clusters == mod.out_channels // 2
    x = torch.randn(2, 8, 8, 8)
    ref = torch.nn.functional.conv2d(x, mod.codebook.detach()[mod.index.long()], mod.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), ref, atol=1e-5, rtol=1e-5)


def test_progressive_clusters_exactly_the_planned_layers_in_order(tiny, monkeypatch):
    model, ds, loader = tiny
    kc = sys.modules["kcengine.compress"]  # the package (kcengine.compress the attribute is the function)
    calls = []
    real = kc.compress

    def spy(m, plan=None, **kw):
        calls.append((kw.get("layers"), plan))
        return real(m, plan, **kw)

    monkeypatch.setattr(kc, "compress", spy)
    r = finetune(model, loader, mode="progressive", plan={"layers": {"conv1": 3, "conv2": 5}},
                 order=["conv2", "conv1"], stage_epochs=1, **{**FAST, "epochs": 1})
    # first call: the plan on the dense model (k per layer); then one call per stage, in order
    assert calls[0] == (None, {"layers": {"conv1": 3, "conv2": 5}})
    assert [c[0] for c in calls[1:]] == [["conv2"], ["conv1"]]
    assert [c[1] for c in calls[1:]] == [{"layers": {"conv2": 5}}, {"layers": {"conv1": 1 + 2}}]
    assert r.stages == [["conv2"], ["conv1"]]
    cl = clustered(r.model)
    assert sorted(cl) == ["conv1", "conv2"]
    assert cl["conv1"].num_clusters == 3 and cl["conv2"].num_clusters == 5
    assert [h["phase"] for h in r.history] == ["stage 1", "stage 2", "final"]


def test_progressive_default_order_is_deepest_group_first():
    from kcengine.train.progressive import default_order, resolve_order

    names = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer3.0.conv1"]
    assert default_order(names) == [["layer3.0.conv1"], ["layer2.0.conv1"], ["layer1.0.conv1", "layer1.0.conv2"],
                                    ["conv1"]]
    assert resolve_order([r"layer1\..*", "conv1"], names) == [["layer1.0.conv1", "layer1.0.conv2"], ["conv1"]]
    with pytest.raises(ValueError, match="more than one stage"):
        resolve_order(["conv1", ["conv1"]], names)
    with pytest.raises(ValueError, match="matches no layer"):
        resolve_order(["nope"], names)
    # the groups the default order uses, by their module names (was "order stage 'layer1' matches no layer")
    assert resolve_order(["conv1", "layer1", "layer2.0", "layer3"], names) == \
        [["conv1"], ["layer1.0.conv1", "layer1.0.conv2"], ["layer2.0.conv1"], ["layer3.0.conv1"]]
    with pytest.raises(ValueError, match="order stage 'layer' matches no layer"):  # a prefix, not a module
        resolve_order(["layer"], names)
    with pytest.raises(ValueError, match=r"order stage 'layer\[' is neither a layer, a module holding layers, nor "
                                         r"a valid regex"):
        resolve_order(["layer["], names)
    assert resolve_order(None, names) == default_order(names)
    assert resolve_order((["layer2.0.conv1", "conv1"], "layer3"), names) == \
        [["layer2.0.conv1", "conv1"], ["layer3.0.conv1"]]
    for order in ("conv1", 3):
        with pytest.raises(ValueError, match=rf"order must be a list of stages \(names, regexes or lists of names\), "
                                             rf"got order={order!r}"):
            resolve_order(order, names)
    with pytest.raises(ValueError, match=r"order stage \['conv1', 'fc'\] names \['fc'\], which are not clustered by "
                                         r"the plan; layers are \['conv1', "):
        resolve_order([["conv1", "fc"]], names)
    with pytest.raises(ValueError, match=r"order items must be a layer name, a regex or a list of names, got 3"):
        resolve_order(["conv1", 3], names)


def test_progressive_freeze_fixes_earlier_stages(tiny):
    model, ds, loader = tiny
    r = finetune(model, loader, mode="progressive", plan={"ratio": 0.5}, order=["conv2", "conv1"],
                 stage_training="freeze", stage_epochs=1, **{**FAST, "epochs": 0})
    # conv2 was clustered in stage 1 and frozen from stage 2 on: its codebook is what stage 1 left.
    # Re-run stage 1 alone to get that state independently.
    r1 = finetune(model, loader, mode="progressive", plan={"ratio": 0.5}, order=["conv2"],
                  stage_training="freeze", stage_epochs=1, **{**FAST, "epochs": 0})
    torch.testing.assert_close(r.model.conv2.codebook, r1.model.conv2.codebook, atol=0, rtol=0)


def test_progressive_freeze_trains_no_codebook_after_the_last_stage(tiny):
    """The documented meaning of "freeze": the final epochs train BN and the dense layers, no codebook."""
    model, ds, loader = tiny
    kw = dict(mode="progressive", plan={"ratio": 0.5}, order=["conv2", "conv1"], stage_training="freeze",
              stage_epochs=1)
    r0 = finetune(model, loader, **kw, **{**FAST, "epochs": 0})
    r1 = finetune(model, loader, **kw, **{**FAST, "epochs": 1})
    for name in ("conv1", "conv2"):
        torch.testing.assert_close(getattr(r1.model, name).codebook, getattr(r0.model, name).codebook, atol=0, rtol=0)
    assert any(not torch.equal(a, b) for (n, a), b in zip(r1.model.named_parameters(), r0.model.parameters())
               if "codebook" not in n)


def _run(kit, loader, ckpt, epochs=3, **kw):
    torch.manual_seed(0)
    model = kit.TinyNet().eval()
    return finetune(model, loader, mode="centroids", plan={"ratio": 0.5}, checkpoint_dir=ckpt,
                    **{**FAST, "epochs": epochs, **kw})


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch, kit, mixup):
    ds = kit.tiny_data()
    full = _run(kit, make_loader(ds, 16, shuffle=True, seed=0), tmp_path / "a", mixup=mixup)
    # crash during epoch 3: the optimizer step raises after the second epoch's checkpoint
    ft = sys.modules["kcengine.train.finetune"]  # the module (kcengine.train.finetune the attribute is the function)

    real = ft._train_phase
    ckpt = tmp_path / "b"

    def crashing(*a, **k):
        orig_step = torch.optim.SGD.step
        n = {"steps": 0}

        def step(self, *sa, **sk):
            n["steps"] += 1
            if n["steps"] > 2 * 3 + 1:  # 3 batches per epoch: crash in the third epoch
                raise KeyboardInterrupt
            return orig_step(self, *sa, **sk)

        monkeypatch.setattr(torch.optim.SGD, "step", step)
        try:
            return real(*a, **k)
        finally:
            monkeypatch.setattr(torch.optim.SGD, "step", orig_step)

    monkeypatch.setattr(ft, "_train_phase", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(kit, make_loader(ds, 16, shuffle=True, seed=0), ckpt, mixup=mixup)
    saved = torch.load(ckpt / CHECKPOINT_NAME, weights_only=False)
    assert (saved["phase"], saved["epoch"]) == (0, 2)
    monkeypatch.setattr(ft, "_train_phase", real)
    resumed = _run(kit, make_loader(ds, 16, shuffle=True, seed=0), ckpt, mixup=mixup)
    assert resumed.resumed_from == (0, 2)
    assert len(resumed.history) == 3
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], abs=1e-6)
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, atol=1e-6, rtol=1e-6, msg=k)


def test_resume_refuses_other_settings(tmp_path, kit):
    ds = kit.tiny_data()
    _run(kit, make_loader(ds, 16, shuffle=True, seed=0), tmp_path, epochs=1)
    with pytest.raises(ValueError, match="other settings"):
        _run(kit, make_loader(ds, 16, shuffle=True, seed=0), tmp_path, epochs=2)


def test_mixup_feeds_the_teacher_and_student_mixed_batches(tiny):
    model, ds, _ = tiny
    loader = make_loader(ds, 16, shuffle=False)
    cm, _ = kcengine.compress(model, ratio=0.5)
    seen = []
    teacher = type(model)().eval()
    teacher.load_state_dict(model.state_dict())
    teacher.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    finetune(cm, loader, mode="centroids", teacher=teacher, augment=False, mixup=0.4, **{**FAST, "epochs": 1})
    assert len(seen) == 4 and seen[0].shape[0] == 2  # the first: finetune's check of the teacher's outputs
    seen = seen[1:]
    for b, m in enumerate(seen):
        x = ds.images[16 * b:16 * (b + 1)]
        assert not torch.allclose(m, x)  # mixed ...
        torch.testing.assert_close(m.mean(0), x.mean(0), atol=1e-5, rtol=0)  # ... within the batch (mean kept)
    plain = finetune(cm, loader, mode="centroids", teacher=model, augment=False, **{**FAST, "epochs": 1})
    mixed = finetune(cm, loader, mode="centroids", teacher=model, augment=False, mixup=0.4, **{**FAST, "epochs": 1})
    assert plain.history[0]["loss"] != pytest.approx(mixed.history[0]["loss"])


def test_distillation_changes_the_loss(tiny):
    model, ds, loader = tiny
    a = finetune(model, loader, plan={"ratio": 0.5}, alpha=0.0, **FAST)
    b = finetune(model, loader, plan={"ratio": 0.5}, alpha=0.9, **FAST)
    assert a.history[0]["loss"] != pytest.approx(b.history[0]["loss"], rel=1e-3)


class _Blocky(torch.nn.Module):
    """One conv-BN-ReLU block as a submodule (the feature point) and a linear head."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                                         torch.nn.ReLU())
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.linear(self.block(x).mean((2, 3)))


def test_feature_distillation_adds_the_block_term_and_leaves_no_hook(tiny):
    _, ds, loader = tiny
    torch.manual_seed(0)
    model = _Blocky().eval()
    a = finetune(model, loader, plan={"ratio": 0.5}, feature_weight=0.0, **FAST)
    b = finetune(model, loader, plan={"ratio": 0.5}, feature_weight=3.0, **FAST)
    assert b.history[0]["loss"] > a.history[0]["loss"]  # same first batch, plus a positive feature term
    assert not any(m._forward_hooks for m in b.model.modules())
    with pytest.raises(ValueError, match="feature_weight"):
        finetune(model, loader, plan={"ratio": 0.5}, feature_weight=-1.0, **FAST)


def test_plot_and_eval(tiny, tmp_path):
    model, ds, loader = tiny
    r = finetune(model, loader, plan={"ratio": 0.5}, eval_data=ds, plot_path=tmp_path / "c.png", **FAST)
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert all(0 <= h["eval_top1"] <= 1 for h in r.history)
    assert r.accuracy == r.history[-1]["eval_top1"]


def test_lr_factor_shapes():
    assert lr_factor("onecycle", 0.0) == pytest.approx(1 / 25)
    assert lr_factor("onecycle", 0.15) == pytest.approx(1.0)
    assert lr_factor("onecycle", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5)
    assert [lr_factor("step", t) for t in (0.1, 0.6, 0.9)] == pytest.approx([1, 0.1, 0.01])


def test_default_peak_lr_scales_with_the_loaders_batch(tiny):
    """Without lr=, the peak LR is DEFAULT_LR per 128 images of the loader's batch (the same step per image),
    as the optimizer really runs it (constant schedule: the LR at every step is the peak)."""
    from kcengine.train.finetune import DEFAULT_LR, default_lr

    assert default_lr("sgd", 128) == DEFAULT_LR["sgd"] == 0.01
    assert default_lr("sgd", 64) == pytest.approx(0.005)
    assert default_lr("adamw", 256) == pytest.approx(2 * DEFAULT_LR["adamw"])
    assert default_lr("sgd", None) == 0.01  # a loader built on a batch_sampler
    model, ds, _ = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    for batch in (8, 32):
        loader = make_loader(ds, batch, shuffle=True, seed=0)
        r = finetune(cm, loader, teacher=model, epochs=1, schedule="constant", progress=False,
                     calibration_images=32)
        assert r.history[-1]["lr"] == pytest.approx(0.01 * batch / 128)


def test_stage_epochs_takes_any_sequence_of_ints(tiny):
    """A numpy array or a range of per-stage epochs is read as the list it holds (a tuple/list-only check
    refused them)."""
    model, ds, loader = tiny
    plan = {"layers": {"conv1": 3, "conv2": 5}}
    for per in (np.array([0, 1]), range(2), (0, 1)):
        r = finetune(model, loader, mode="progressive", plan=plan, order=["conv2", "conv1"], stage_epochs=per,
                     **{**FAST, "epochs": 0})
        assert [h["phase"] for h in r.history if h.get("epoch") is not None].count("stage 2") == 1


@pytest.mark.parametrize("kw, match", [
    ({"mode": "nope"}, "mode must be one of"),
    ({"epochs": -1}, "epochs must be an int >= 0"),
    ({"lr": 0.0}, "lr must be"),
    ({"schedule": "linear"}, "schedule must be one of"),
    ({"optimizer": "adam"}, "optimizer must be one of"),
    ({"alpha": 1.5}, "alpha must be"),
    ({"temperature": 0}, "temperature must be"),
    ({"mode": "progressive"}, "needs plan="),
    ({"mixup": -1.0}, "mixup must be a finite number >= 0"),
    ({"stage_training": "thaw"}, r"stage_training must be one of \('keep', 'freeze'\), got stage_training='thaw'"),
    ({"granularity": "element"},
     r"granularity must be one of \('filter', 'kernel'\) for finetuning, got granularity='element'"),
    ({"device": "tpu"}, r"device must be a torch device or a string such as 'cpu' or 'cuda:0', got device='tpu'"),
    ({"seed": 1.0}, r"seed must be an int in \[0, 9223372036854775807\], got seed=1.0"),
    ({"seed": 2**64}, r"seed must be an int in \[0, 9223372036854775807\], got seed=18446744073709551616"),
    ({"eval_batch_size": 0}, r"eval_batch_size must be an int >= 1, got eval_batch_size=0"),
    ({"stage_epochs": 1.5}, r"stage_epochs must be an int or a list of ints \(one per stage\), got 1.5"),
    ({"stage_epochs": [1, -1]}, r"stage_epochs\[1\] must be an int >= 0, got stage_epochs\[1\]=-1"),
    ({"plot_path": 3}, r"plot_path must be a file path or None, got int 3"),
    ({"compress_options": "seed=0"}, r"compress_options must be a dict of keyword arguments for kcengine.compress "
     r"\(e.g. \{'seed': 1\}\) or None, got str 'seed=0'"),
    ({"calibration_images": np.int64(0)}, r"calibration_images must be an int >= 1, got calibration_images="),
    ({"checkpoint_dir": 3}, "checkpoint_dir must be a path"),
    # booleans: "no" read as True (resume="no" resumed; output_calibration="no" refit a model given clustered)
    ({"resume": "no"}, r"resume must be True or False, got resume='no'"),
    ({"output_calibration": "no"}, r"output_calibration must be True or False"),
    ({"augment": "yes"}, r"augment must be True or False"),
    ({"nesterov": 2}, r"nesterov must be True or False"),
    # a plot path that cannot be written failed after the last epoch, losing the run
    ({"plot_path": "curves.pgn"}, r"plot_path='curves.pgn': matplotlib does not write '.pgn' files"),
    ({"order": ["conv1"]}, r"order sets the stages of mode='progressive'; mode='centroids' clusters every layer"),
    # the other stage options were ignored outside progressive mode (their defaults could not tell "not given")
    ({"stage_epochs": 3}, r"stage_epochs sets the stages of mode='progressive'; mode='centroids' clusters every "
     r"layer at once, got stage_epochs=3"),
    ({"stage_training": "freeze", "mode": "frozen"},
     r"stage_training sets the stages of mode='progressive'; mode='frozen' .* got stage_training='freeze'"),
])
def test_bad_arguments(tiny, kw, match):
    model, ds, loader = tiny
    with pytest.raises(ValueError, match=match):
        finetune(model, loader, **kw)


def test_checkpoint_dir_that_is_a_file_is_refused_before_training(tiny, tmp_path):
    """(Was FileExistsError from mkdir after the first epoch's work.)"""
    model, ds, loader = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    f = tmp_path / "ckpt"
    f.write_text("not a directory")
    with pytest.raises(ValueError, match=r"checkpoint_dir must be a directory .*got checkpoint_dir='.*ckpt', an "
                                         r"existing file"):
        finetune(cm, loader, epochs=1, checkpoint_dir=f, progress=False)
    assert f.read_text() == "not a directory"


def test_numpy_integers_are_accepted_as_counts(tiny):
    """Counts read from numpy (a config array, np.arange) are ints too: the same run as with Python ints."""
    model, ds, loader = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    kw = dict(teacher=model, schedule="constant", progress=False)
    a = finetune(cm, loader, epochs=np.int64(1), seed=np.int32(3), calibration_images=np.int64(32), **kw)
    b = finetune(cm, loader, epochs=1, seed=3, calibration_images=32, **kw)
    assert len(a.history) == len(b.history) == 1
    assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-6)


def test_bad_training_data_is_named(tiny):
    """(Labels outside the outputs were torch's one_hot RuntimeError, float labels another, a dataset of dicts
    torch.stack's TypeError, an empty one 'recalibrate_bn got no images', [H, W] images torch's channel mismatch of
    the first conv, which took the calibration batch as one unbatched image.)"""
    from torch.utils.data import DataLoader, TensorDataset

    model, ds, loader = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    x, y = ds.images, ds.labels
    for data, match in [(TensorDataset(x, y + 10), r"labels must be in \[0, 4\) \(the model's outputs\)"),
                        (TensorDataset(x, y.float()), "labels must be integer class indices"),
                        ([{"image": x[0]}] * 4, r"must give \(image tensor, label\) pairs, item 0 is dict"),
                        (TensorDataset(x[:0], y[:0]), "train_loader's dataset holds no images"),
                        (TensorDataset((x * 40).to(torch.uint8), y), "images must be a floating-point tensor"),
                        (TensorDataset(x[:, 0], y), r"train_loader's images must be \[C, H, W\] each .* got images "
                                                    r"of shape \(8, 8\)")]:
        with pytest.raises(ValueError, match=match):
            finetune(cm, DataLoader(data, batch_size=8), epochs=1, progress=False)
    # bad eval_data is named before any training (it was met after the first epoch, and called "data")
    for bad, match in [([1, 2], r"eval_data must be a DataLoader, a Dataset or an \(images, labels\) pair, got list"),
                       ((x, y[:-1]), r"eval_data's images and labels differ in length"),
                       ((x.to(torch.uint8), y), r"eval_data's images must be a floating-point tensor")]:
        with pytest.raises(ValueError, match=match):
            finetune(cm, loader, epochs=1, progress=False, eval_data=bad)


def test_training_batches_that_are_not_pairs_are_named(tiny):
    """Dataset items may be pairs while the loader's collate makes dicts: each batch is checked as evaluate
    checks its batches (was: the dict unpacked into its two keys, then 'str' object has no attribute 'to')."""
    from torch.utils.data import DataLoader, TensorDataset

    model, ds, loader = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    data = TensorDataset(ds.images, ds.labels)
    as_dicts = DataLoader(data, batch_size=8, collate_fn=lambda b: {"image": torch.stack([i for i, _ in b]),
                                                                    "label": torch.stack([t for _, t in b])})
    with pytest.raises(ValueError, match=r"each batch of data must be an \(images, labels\) pair, got a dict"):
        finetune(cm, as_dicts, epochs=1, progress=False)


def test_dense_model_without_plan_is_refused(tiny):
    model, ds, loader = tiny
    with pytest.raises(ValueError, match="no ClusteredConv2d"):
        finetune(model, loader, progress=False, epochs=1)


class _OtherArch(nn.Module):
    """Another architecture of the same 4 classes: a teacher of logits, not a dense counterpart."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 1))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


class _Blocks(nn.Module):
    """Two conv blocks (feature points b1, b2) and a head."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.linear = nn.Linear(8, 4)

    def forward(self, x):
        return self.linear(self.b2(self.b1(x)).mean((2, 3)))


def _codebooks(model):
    return {n: (m.codebook.detach().clone(), m.index.clone()) for n, m in clustered(model).items()}


def test_a_teacher_of_another_architecture_gives_logits_the_dense_model_its_layers(tiny):
    """With plan=, the refit and the block features match the dense model's layers whatever the teacher; a
    teacher of another architecture gives only its logits.  (Its layers were matched to the student's wherever
    names agreed: here none did, so the refit was skipped and the features dropped without a word.)"""
    model, ds, loader = tiny
    torch.manual_seed(1)
    other = _OtherArch().eval()
    kw = dict(plan=0.5, progress=False, calibration_images=32)
    own = finetune(model, loader, epochs=0, **kw)
    given = finetune(model, loader, epochs=0, teacher=other, **kw)
    assert given.calibration and given.calibration.keys() == own.calibration.keys()
    for n, (cb, idx) in _codebooks(own.model).items():  # the same refit: against the dense model
        assert torch.equal(_codebooks(given.model)[n][0], cb) and torch.equal(_codebooks(given.model)[n][1], idx)
    torch.manual_seed(0)
    blocks = _Blocks().eval()
    feat = dict(plan=0.5, progress=False, calibration_images=32, epochs=1, lr=0.05, alpha=0.0, feature_weight=2.0)
    a = finetune(blocks, loader, **feat)  # the features only (alpha=0): from the dense model either way
    b = finetune(blocks, loader, teacher=other, **feat)
    assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-6)
    c = finetune(blocks, loader, teacher=other, **{**feat, "alpha": 0.9})  # its logits do count
    assert c.history[0]["loss"] != pytest.approx(a.history[0]["loss"], rel=1e-3)
    # a model that arrives clustered has no dense counterpart but a teacher that is one
    cm, _ = kcengine.compress(model, ratio=0.5)
    with pytest.raises(ValueError, match=r"output_calibration=True refits the clustered layers to a dense "
                                         r"counterpart of the model, and the teacher is not one \(only the student "
                                         r"has conv1, conv2; only the teacher has body.0, body.2\)"):
        finetune(cm, loader, teacher=other, output_calibration=True, **FAST)
    with pytest.raises(ValueError, match=r"output_calibration=True needs a dense counterpart of the model"):
        finetune(cm, loader, output_calibration=True, **FAST)
    assert finetune(cm, loader, teacher=model, output_calibration=True, **FAST).calibration
    assert finetune(cm, loader, teacher=other, **FAST).history  # logits only


def test_resume_names_the_settings_that_changed(tmp_path, tiny):
    """A changed plan (or granularity, lr, alpha, ...) resumed the old run and gave back the old plan's model."""
    model, ds, loader = tiny
    finetune(model, loader, plan=0.5, checkpoint_dir=tmp_path, **{**FAST, "epochs": 1})
    with pytest.raises(ValueError, match=r"other settings \(.*plan '0.5' -> '0.25'"):
        finetune(model, loader, plan=0.25, checkpoint_dir=tmp_path, **{**FAST, "epochs": 1})
    with pytest.raises(ValueError, match=r"alpha 0.9 -> 0.5"):
        finetune(model, loader, plan=0.5, checkpoint_dir=tmp_path, alpha=0.5, **{**FAST, "epochs": 1})


def test_resume_refuses_another_model_or_teacher(tmp_path, tiny):
    """A checkpoint continued with other weights (another model or teacher) trained on from the old run's."""
    model, ds, loader = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    finetune(cm, loader, teacher=model, checkpoint_dir=tmp_path, **{**FAST, "epochs": 1})
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters())[0].add_(1e-3)
    with pytest.raises(ValueError, match=r"other settings \(another teacher \(its state dict differs\)\)"):
        finetune(cm, loader, teacher=other, checkpoint_dir=tmp_path, **{**FAST, "epochs": 1})
    cm2, _ = kcengine.compress(other, ratio=0.5)
    with pytest.raises(ValueError, match=r"other settings \(another model \(its state dict differs\)\)"):
        finetune(cm2, loader, teacher=model, checkpoint_dir=tmp_path, **{**FAST, "epochs": 1})
    res = finetune(copy.deepcopy(cm), loader, teacher=copy.deepcopy(model), checkpoint_dir=tmp_path,
                   **{**FAST, "epochs": 1})
    assert res.resumed_from == (0, 1)  # equal copies are the same model


def test_a_plot_path_under_a_file_is_refused_before_training(tiny, tmp_path):
    model, ds, loader = tiny
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"plot_path=.*afile.* is a file, not a folder"):
        finetune(model, loader, plan=0.5, plot_path=tmp_path / "afile" / "c.png", checkpoint_dir=tmp_path / "ck",
                 **FAST)
    assert not (tmp_path / "ck").exists()  # nothing ran


def test_a_nan_image_stops_the_run_with_a_message(tiny):
    """One NaN pixel made every weight NaN, and the run reported an accuracy."""
    model, ds, _ = tiny
    x = ds.images.clone()
    x[5, 0, 3, 3] = float("nan")  # (a corner pixel can fall outside the augmentation's crop)
    loader = make_loader(TensorImages(x, ds.labels, ds.classes), 16, shuffle=True, seed=0)
    cm, _ = kcengine.compress(model, ratio=0.5)
    with pytest.raises(ValueError, match=r"the training loss became nan in centroids epoch 1: NaN or Inf in the "
                                         r"training images"):
        finetune(cm, loader, teacher=model, **FAST)


def test_progressive_stages_of_a_sensitivity_plan_are_checked_before_the_sweep(tiny, monkeypatch):
    """A bad order or stage_epochs was found only after the sensitivity sweep (the long step) had run."""
    model, ds, loader = tiny
    ft = sys.modules["kcengine.train.finetune"]
    monkeypatch.setattr(ft, "_resolve_sensitivity", lambda *a, **k: pytest.fail("the sweep ran"))
    with pytest.raises(ValueError, match="stage_epochs has 3 entries for 2 stages"):
        finetune(model, loader, mode="progressive", plan="sensitivity=0.5", stage_epochs=[1, 1, 1], **FAST)
    with pytest.raises(ValueError, match="order stage"):
        finetune(model, loader, mode="progressive", plan="sensitivity=0.5", order=[["nope"]], **FAST)


def test_sensitivity_plan_checks_its_arguments_before_the_sweep(tiny):
    from kcengine.train import sensitivity_plan

    model, ds, _ = tiny
    x = ds.images
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    for kw, msg in [(dict(min_ratio=2.0), r"min_ratio must be a number in \[0, 1\], got min_ratio=2.0"),
                    (dict(min_ratio=float("nan")), r"min_ratio must be a number in \[0, 1\]"),
                    (dict(ratios=0.5), r"ratios must be a sequence of numbers in \(0, 1\], got ratios=0.5"),
                    (dict(eval_images=bad), r"eval_images holds NaN or Inf values")]:
        args = dict(calib_images=x[:16], eval_images=x[16:]) | kw
        with pytest.raises(ValueError, match=msg):
            sensitivity_plan(model, ratio=0.5, **args)


def test_bad_checkpoints_teachers_and_loaders_are_named_before_training(tiny, tmp_path):
    """Each was a raw error from torch or Python (UnpicklingError, NotADirectoryError after the first epoch,
    an AttributeError on a tuple, "has no len()", a duplicate keyword), some after the refit."""
    model, ds, loader = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    (tmp_path / "afile").write_text("x")

    class Pairs(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(ds.images, ds.labels))

    class TwoHeads(nn.Module):
        def forward(self, x):
            return model(x), model(x)

    strings = torch.utils.data.DataLoader(list(zip(ds.images, [str(int(v)) for v in ds.labels])), batch_size=16)
    for kw, msg in [
        (dict(checkpoint_dir=tmp_path / "bad"), r"could not be read as a finetune checkpoint .* resume=False"),
        (dict(checkpoint_dir=tmp_path / "afile" / "ck"), r"cannot be made: .*afile' is a file"),
        (dict(teacher=TwoHeads()), r"teacher's outputs must be logits of the model's shape \(2, 4\) .* got tuple"),
        (dict(teacher=nn.Sequential(model, nn.Linear(4, 10))), r"got shape \(2, 10\)"),
        (dict(train_loader=torch.utils.data.DataLoader(Pairs(), batch_size=16)),
         r"train_loader's dataset has no length \(Pairs"),
        (dict(train_loader=strings), r"each batch's labels must be a tensor of class indices, got a tuple of str"),
        (dict(compress_options={"seed": 1}), r"compress_options apply when finetune clusters the model \(plan=\)"),
    ]:
        args = dict(train_loader=loader) | kw
        with pytest.raises(ValueError, match=msg):
            finetune(cm, **args, **FAST)
    with pytest.raises(ValueError, match=r"compress_options may not set \['granularity'\]"):
        finetune(model, loader, plan=0.5, compress_options={"granularity": "kernel"}, **FAST)


def test_calibration_reads_a_dataset_subclass_through_its_items(tiny, monkeypatch):
    """The calibration images of a TensorDataset subclass that transforms its items were its raw tensors."""
    model, ds, _ = tiny
    ft = sys.modules["kcengine.train.finetune"]

    class Shifted(torch.utils.data.TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x + 100.0, y

    loader = make_loader(Shifted(ds.images, ds.labels), 16)
    got = ft._dataset_images(loader, [0, 5])
    torch.testing.assert_close(got, ds.images[[0, 5]] + 100.0)


def test_an_epoch_without_batches_is_an_error(tiny):
    model, ds, _ = tiny
    loader = torch.utils.data.DataLoader(ds, batch_size=64, drop_last=True)  # 48 images: no batch
    cm, _ = kcengine.compress(model, ratio=0.5)
    with pytest.raises(ValueError, match=r"train_loader yielded no batch in centroids epoch 1"):
        finetune(cm, loader, **FAST)


def test_the_callers_loader_generator_is_left_where_it_was(tiny):
    """Each epoch seeds the loader's generator; the caller's loader then shuffled differently afterwards."""
    model, ds, loader = tiny
    twin = make_loader(ds, 16, shuffle=True, seed=0)
    cm, _ = kcengine.compress(model, ratio=0.5)
    finetune(cm, loader, **FAST)
    assert [y.tolist() for _, y in loader] == [y.tolist() for _, y in twin]


def test_the_callers_random_stream_is_left_where_it_was(tiny):
    """Each epoch seeds torch's global RNG from `seed`; the caller's stream used to continue from the last
    epoch's seed after a run, whatever it was before.  Now it is put back."""
    model, ds, loader = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    a = finetune(cm, loader, teacher=model, **FAST)
    assert torch.equal(torch.rand(4), want)
    torch.manual_seed(7)  # and the run itself does not depend on the caller's stream
    b = finetune(cm, loader, teacher=model, **FAST)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    torch.manual_seed(123)  # also where finetune clusters the model itself (compress drew from it)
    finetune(model, loader, plan=0.5, **FAST)
    assert torch.equal(torch.rand(4), want)


@pytest.mark.parametrize("side, padding", [(8, 1), (32, 4), (40, 5)])
def test_augmentation_shift_scales_with_the_image(kit, monkeypatch, side, padding):
    """The crop's padding is 1/8 of the image's shorter side (CIFAR's 4 pixels at 32 x 32), at least 1; the
    batches reach cifar_augment unchanged otherwise."""
    torch.manual_seed(0)
    model = kit.TinyNet().eval()
    small = kit.tiny_data(n=16)
    ds = TensorImages(nn.functional.interpolate(small.images, size=(side, side + 3)), small.labels, small.classes)
    ft = sys.modules["kcengine.train.finetune"]
    real, seen = ft.cifar_augment, []

    def recording(x, generator=None, *, padding=4, flip=True):
        seen.append((tuple(x.shape), padding))
        return real(x, generator, padding=padding, flip=flip)

    monkeypatch.setattr(ft, "cifar_augment", recording)
    cm, _ = kcengine.compress(model, ratio=0.5)
    finetune(cm, make_loader(ds, 8, shuffle=False), mode="centroids", teacher=model, **{**FAST, "epochs": 1})
    assert seen == [((8, 3, side, side + 3), padding)] * 2


class _ListDataset(torch.utils.data.Dataset):
    """(image, label) pairs from plain Python indexing: finetune reads such a dataset item by item."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


@pytest.mark.parametrize("kind", ["tensors", "items"])
def test_calibration_images_are_spread_over_a_class_sorted_dataset(kind):
    """A dataset stored class by class (ImageFolder's order) calibrates BN on every class: 10 classes of 10
    constant images (class j's pixels all j), sorted; 10 calibration images give the input BN the mean of the
    images at 0, 10, ..., 90 (4.5), where the first 10 would give 0."""
    labels = torch.arange(10).repeat_interleave(10)
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 3, 6, 6).contiguous()
    ds = TensorImages(images, labels) if kind == "tensors" else _ListDataset(images, labels)
    conv = ClusteredConv2d(3, 4, 3, 2)
    model = nn.Sequential(nn.BatchNorm2d(3), conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    r = finetune(model, make_loader(ds, 8, shuffle=True, seed=0), epochs=0, progress=False, calibration_images=10)
    expected = images[torch.arange(0, 100, 10)].mean(dim=(0, 2, 3))
    torch.testing.assert_close(r.model[0].running_mean, expected)
    assert float(expected[0]) == 4.5


def test_resume_takes_compress_options_by_value_and_older_fingerprints(tmp_path, tiny):
    """A callable in compress_options (its repr holds an address) made every resume fail; a checkpoint written
    before the fingerprint's newer keys is compared on the keys it has; compress_options may restrict layers."""
    import torch as _torch

    model, ds, loader = tiny
    kw = dict(plan=0.5, checkpoint_dir=tmp_path, **{**FAST, "epochs": 1})
    first = finetune(model, loader, compress_options={"seed": 1, "progress": lambda s: None}, **kw)
    again = finetune(model, loader, compress_options={"seed": 1, "progress": lambda s: None}, **kw)
    assert again.resumed_from == (0, 1) and again.layer_ks == first.layer_ks
    path = tmp_path / CHECKPOINT_NAME
    state = _torch.load(path, weights_only=False)
    state["fingerprint"] = {k: state["fingerprint"][k] for k in ("mode", "phases", "seed", "schedule", "optimizer")}
    _torch.save(state, path)
    assert finetune(model, loader, compress_options={"seed": 1}, **kw).resumed_from == (0, 1)
    only = finetune(model, loader, plan=0.5, compress_options={"layers": ["conv1"]}, **FAST)
    assert list(only.layer_ks) == ["conv1"]


def test_frozen_mode_freezes_per_element_codebooks_too(tiny):
    """Session 55: frozen mode froze ClusteredConv2d codebooks only; a per-element layer's codebook trained, a
    model of only such layers was refused as "no ClusteredConv2d layer", and layer_ks left them out."""
    model, ds, loader = tiny
    a, _ = kcengine.compress(model, ratio=0.5, layers=["conv1"])
    mixed, _ = kcengine.compress(a, ratio=0.5, layers=["conv2"], granularity="element")
    before = state_copy(mixed)
    r = finetune(mixed, loader, mode="frozen", teacher=model, **FAST)
    after = r.model.state_dict()
    for key in ("conv1.codebook", "conv1.index", "conv2.codebook", "conv2.index"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["linear.weight"], before["linear.weight"])
    assert r.layer_ks == {"conv1": 4, "conv2": mixed.conv2.num_clusters}
    element, _ = kcengine.compress(model, ratio=0.5, granularity="element")
    r = finetune(element, loader, mode="frozen", teacher=model, **{**FAST, "epochs": 1})
    assert torch.equal(r.model.conv1.codebook, element.conv1.codebook) and set(r.layer_ks) == {"conv1", "conv2"}


def test_a_sampler_with_its_own_generator_is_seeded_per_epoch(tiny, tmp_path, monkeypatch):
    """Session 55: only the loader's generator was seeded per epoch; a sampler holding its own
    (``SubsetRandomSampler(idx, generator=g)``) went on drawing from it: two runs of one seed differed, a
    resumed run ended elsewhere than the uninterrupted one, and the caller's generator was left advanced."""
    from torch.utils.data import DataLoader, SubsetRandomSampler

    model, ds, _ = tiny
    cm, _ = kcengine.compress(model, ratio=0.5)
    g = torch.Generator().manual_seed(0)
    state = g.get_state().clone()
    loader = DataLoader(ds, batch_size=16, sampler=SubsetRandomSampler(range(len(ds)), generator=g))
    kw = dict(mode="centroids", teacher=model, **{**FAST, "epochs": 3})
    a = finetune(cm, loader, **kw)
    assert torch.equal(g.get_state(), state)  # the caller's generator comes back where it was
    b = finetune(cm, loader, **kw)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    # interrupted in the second epoch, then resumed: the same run
    step, calls = torch.optim.SGD.step, [0]

    def crashing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 4:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", crashing)
    with pytest.raises(KeyboardInterrupt):
        finetune(cm, loader, checkpoint_dir=tmp_path, **kw)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    c = finetune(cm, loader, checkpoint_dir=tmp_path, **kw)
    assert c.resumed_from is not None
    assert [h["loss"] for h in c.history] == [h["loss"] for h in a.history]
    assert all(torch.equal(v, a.model.state_dict()[k]) for k, v in c.model.state_dict().items())


def test_progressive_takes_compress_options_layers(tiny):
    """Session 55: progressive mode passed layers= to each stage's compress beside compress_options' own:
    "compress() got multiple values for keyword argument 'layers'"."""
    model, ds, loader = tiny
    r = finetune(model, loader, mode="progressive", plan=0.5, compress_options={"layers": ["conv2"]},
                 stage_epochs=1, **{**FAST, "epochs": 1})
    assert r.layer_ks == {"conv2": 6} and isinstance(r.model.conv1, nn.Conv2d)
    one, _ = kcengine.compress(model, ratio=0.5, layers=["conv2"])
    assert r.layer_ks == {n: m.num_clusters for n, m in clustered(one).items()}


def test_numpy_numbers_are_taken_and_float64_images_named(tiny):
    """Session 55: numpy numbers were refused with a message showing a valid value ("alpha must be in [0, 1],
    got alpha=np.float32(0.5)"), a bool was taken as 1, and float64 training images failed inside torch
    ("expected scalar type Double but found Float")."""
    from kcengine.train import distillation_loss, output_sensitivity, sensitivity_plan
    from kcengine.train.augment import cifar_augment

    model, ds, loader = tiny
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert distillation_loss(s, t, y, temperature=np.float32(2), alpha=np.float64(0.5)).item() == pytest.approx(
        distillation_loss(s, t, y, temperature=2.0, alpha=0.5).item())
    for kw in (dict(alpha=True), dict(temperature=True)):
        with pytest.raises(ValueError, match="must be"):
            distillation_loss(s, t, y, **kw)
    x = ds.images
    g = (lambda: torch.Generator().manual_seed(0))
    assert torch.equal(cifar_augment(x[:4], g(), padding=np.int64(2)), cifar_augment(x[:4], g(), padding=2))
    rows = output_sensitivity(model, x[:16], x[16:32], ratios=np.array([0.5], dtype=np.float32))
    assert {r["k"] for r in rows if r["layer"] == "conv1"} == {4}
    plan = sensitivity_plan(model, x[:16], x[16:32], np.float32(0.5), ratios=(0.5, 1.0))
    assert plan == sensitivity_plan(model, x[:16], x[16:32], 0.5, ratios=(0.5, 1.0))
    loader64 = make_loader(TensorImages(x.double(), ds.labels, ds.classes), 16)
    with pytest.raises(ValueError, match="images are torch.float64 but the model's parameters are torch.float32"):
        finetune(model, loader64, plan=0.5, **FAST)
