"""Augmentation, distillation loss, BN recalibration and checkpoint layouts against plain references."""
import math

import pytest
import torch
import torch.nn.functional as F

import kcengine

from kcengine.models import cifar_resnet
from kcengine.train import cifar_augment, distillation_loss, recalibrate_bn
from kcengine.train.distill import FeatureTap, feature_loss, feature_points


def test_augment_is_a_padded_crop_or_its_mirror():
    x = torch.randn(16, 3, 8, 8)
    y = cifar_augment(x, torch.Generator().manual_seed(0), padding=2)
    xp = F.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(16):
        crops = [xp[i, :, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        plain = any(torch.equal(y[i], c) for c in crops)
        mirrored = any(torch.equal(y[i], c.flip(2)) for c in crops)
        assert plain or mirrored, i
        flips += mirrored and not plain
    assert 0 < flips < 16
    assert torch.equal(cifar_augment(x, torch.Generator().manual_seed(0), padding=2), y)  # reproducible
    assert torch.equal(cifar_augment(x, padding=0, flip=False), x)


def test_distillation_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    T, a = 3.0, 0.7
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(5), y].mean()
    ref = a * T * T * kl + (1 - a) * ce
    assert float(distillation_loss(s, t, y, temperature=T, alpha=a)) == pytest.approx(float(ref), rel=1e-5)
    assert float(distillation_loss(s, None, y)) == pytest.approx(float(ce), rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, y, temperature=-1)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, t, y, alpha=math.nan)


def test_feature_points_are_the_blocks_and_the_tap_sees_their_outputs():
    m = cifar_resnet(20).eval()
    pts = feature_points(m)
    assert pts == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m.layer1[0](F.relu(m.bn1(m.conv1(x))))  # independent: the first block run by hand
        with FeatureTap(m, pts) as tap:
            m(x)
            feats = tap.take()
    assert len(feats) == 9 and torch.equal(feats[0], ref)
    assert feats[-1].shape == (2, 64, 4, 4)
    assert not m.layer1[0]._forward_hooks  # hooks removed on exit
    with pytest.raises(ValueError, match="nope"):
        FeatureTap(m, ["nope"])


def test_feature_loss_is_the_mean_relative_squared_error():
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 8, 2, 2, generator=g)]
    t = [torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 8, 2, 2, generator=g)]
    ref = sum(float(((a - b) ** 2).sum() / (b ** 2).sum()) for a, b in zip(s, t)) / 2
    assert float(feature_loss(s, t)) == pytest.approx(ref, rel=1e-6)
    assert float(feature_loss(t, t)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        feature_loss([s[0]], [t[1]])


def test_recalibrate_bn_gives_the_exact_batch_statistics(kit):
    m = kit.TinyNet().eval()
    x = torch.randn(40, 3, 8, 8)
    recalibrate_bn(m, x, max_images=None)
    with torch.no_grad():
        h = m.conv1(x)
    torch.testing.assert_close(m.bn1.running_mean, h.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.bn1.running_var, h.var((0, 2, 3), unbiased=True), atol=1e-4, rtol=1e-4)
    assert not m.training and m.bn1.momentum == 0.1
    with pytest.raises(ValueError, match="max_images"):
        recalibrate_bn(m, x, max_images=0)


def test_recalibrate_bn_averages_the_batches_of_a_loader_up_to_max_images(kit):
    """From a DataLoader the statistics are the average of the per-batch ones over the batches seen, the last
    cut at max_images (16 + 4 of 48 here); an (images, labels) pair reads its images in batches of 256.
    Bad data is named; the weights and every BN's momentum are left as they were."""
    from kcengine.data.datasets import make_loader

    m = kit.TinyNet().eval()
    ds = kit.tiny_data(48)
    weights = {k: v.clone() for k, v in m.state_dict().items() if "running" not in k and "num_batches" not in k}
    recalibrate_bn(m, make_loader(ds, 16), max_images=20)
    with torch.no_grad():
        hs = [m.conv1(ds.images[:16]), m.conv1(ds.images[16:20])]
    mean = sum(h.mean((0, 2, 3)) for h in hs) / 2
    var = sum(h.var((0, 2, 3), unbiased=True) for h in hs) / 2
    torch.testing.assert_close(m.bn1.running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.bn1.running_var, var, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in weights.items())
    assert m.bn1.momentum == m.bn2.momentum == 0.1 and not m.training

    pair = kit.TinyNet().eval()
    recalibrate_bn(pair, (ds.images, ds.labels), max_images=None)
    with torch.no_grad():
        h = pair.conv1(ds.images)
    torch.testing.assert_close(pair.bn1.running_mean, h.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"data must be a DataLoader, an images tensor or an \(images, labels\) "
                                         r"pair, got list"):
        recalibrate_bn(m, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"recalibrate_bn got no images from data"):
        recalibrate_bn(m, ds.images[:0])
    assert m.bn1.momentum == 0.1  # restored after the failures too


@pytest.mark.parametrize("cosine", [False, True])
def test_checkpoint_layout_rebuilds_a_dense_model_that_loads_the_clustered_state(kit, cosine):
    """apply_layout turns a fresh dense model into the clustered one's shape: its state loads strictly and it
    computes the same outputs (cosine: no bias parameter, the bias in ``shift``, the norms in ``scale``)."""
    from kcengine.compress.layers import effective_weight
    from kcengine.train.checkpoint import apply_layout, clustered_layout

    torch.manual_seed(0)
    dense = kit.TinyNet(bn=False).eval()  # conv2 has a bias
    cm, _ = kcengine.compress(dense, ratio=0.5, cosine=cosine)
    layout = clustered_layout(cm)
    assert layout["conv2"]["num_clusters"] == 6 and layout["conv2"].get("cosine", False) == cosine
    rebuilt = apply_layout(kit.TinyNet(bn=False).eval(), layout)
    rebuilt.load_state_dict(cm.state_dict())  # strict
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), cm(x), rtol=0, atol=0)
    for name in ("conv1", "conv2"):
        torch.testing.assert_close(effective_weight(getattr(rebuilt, name)), effective_weight(getattr(cm, name)))


def test_checkpoint_layout_written_before_the_full_configs_still_resumes(kit):
    """Finetune checkpoints used to store {"k", "granularity"} per layer: apply_layout rebuilds those layers from
    the dense conv's geometry, so a run interrupted before the format change resumes."""
    from kcengine.train.checkpoint import apply_layout

    torch.manual_seed(0)
    dense = kit.TinyNet().eval()
    cm, _ = kcengine.compress(dense, ratio=0.5)
    old = {n: {"k": m.num_clusters, "granularity": m.granularity} for n, m in cm.named_modules()
           if isinstance(m, kcengine.nn.ClusteredConv2d)}
    rebuilt = apply_layout(kit.TinyNet().eval(), old)
    rebuilt.load_state_dict(cm.state_dict())  # strict
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), cm(x), rtol=0, atol=0)
    assert apply_layout(rebuilt, old) is rebuilt  # layers already clustered: checked, kept
