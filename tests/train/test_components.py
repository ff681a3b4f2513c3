"""Augmentation, distillation loss and BN recalibration against plain references."""
import math

import pytest
import torch
import torch.nn.functional as F

from kcengine.train import cifar_augment, distillation_loss, recalibrate_bn


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
