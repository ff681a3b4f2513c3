"""Output-aware refit against the dense model: exact where the maths says it must be, never worse elsewhere."""
import pytest
import torch

import kcengine
from kcengine.train import calibrate_outputs, recalibrate_bn
from kcengine.train.calibrate import following_batchnorm


def _images(n=32, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_pairs_of_scaled_and_negated_filters_are_recovered_exactly(kit):
    """conv2's 12 filters are 6 directions, each once as w and once as -2w: after BN (which absorbs scale and,
    through gamma's sign, negation) 6 centroids represent the layer exactly, although k-means on the weights
    cannot pair w with -2w.  The refit must find the pairing and reproduce the dense outputs."""
    torch.manual_seed(0)
    dense = kit.TinyNet().eval()
    with torch.no_grad():
        base = torch.randn(6, 8, 3, 3)
        dense.conv2.weight.copy_(torch.cat([base, -2 * base])[torch.randperm(12)])
        dense.bn2.weight.uniform_(0.5, 1.5)
        dense.bn2.bias.uniform_(-0.5, 0.5)
    x = _images(64)
    recalibrate_bn(dense, x)  # dense BN statistics = the calibration data's, like the refit's
    cm, _ = kcengine.compress(dense, {"layers": {"conv2": 6}}, layers=["conv2"])
    with torch.no_grad():
        err_before = (cm(x) - dense(x)).abs().max().item()
    info = calibrate_outputs(cm, dense, x, iterations=20)
    assert info["conv2"]["explained_after"] == pytest.approx(1.0, abs=1e-3)  # ridge 1e-4 keeps it just below 1
    assert info["conv2"]["sign_flips"] > 0
    with torch.no_grad():
        err = (cm(x) - dense(x)).abs().max().item()
        scale = dense(x).abs().max().item()
    assert err < 2e-3 * scale, (err, scale)
    assert err_before > 50 * err
    # filters sharing a centroid: exactly 6 distinct
    assert len(torch.unique(cm.conv2.index)) == 6


def test_refit_never_lowers_the_explained_variance(kit):
    torch.manual_seed(0)
    dense = kit.TinyNet().eval()
    x = _images(48)
    recalibrate_bn(dense, x)
    cm, _ = kcengine.compress(dense, ratio=0.5)
    info = calibrate_outputs(cm, dense, x)
    assert set(info) == {"conv1", "conv2"}
    for name, r in info.items():
        assert r["explained_after"] >= r["explained_before"] - 1e-9, name
        assert 0 < r["explained_after"] <= 1 + 1e-9


def test_without_bn_least_squares_with_one_centroid_per_filter_gives_back_the_weights(kit):
    torch.manual_seed(0)
    dense = kit.TinyNet(bn=False).eval()
    x = _images(48)
    cm, _ = kcengine.compress(dense, {"layers": {"conv2": 12}}, layers=["conv2"])
    with torch.no_grad():
        cm.conv2.codebook.mul_(0.3)  # spoil it; the refit has to find the weights again
    calibrate_outputs(cm, dense, x)
    torch.testing.assert_close(cm.conv2.to_dense(), dense.conv2.weight, atol=1e-4, rtol=1e-4)


def test_following_batchnorm_finds_conv_bn_pairs(kit):
    m = kit.TinyNet()
    pairs = following_batchnorm(m, _images(2))
    assert pairs == {"conv1": m.bn1, "conv2": m.bn2}
    assert following_batchnorm(kit.TinyNet(bn=False), _images(2)) == {}


def test_calibrate_checks_inputs(kit):
    m = kit.TinyNet()
    with pytest.raises(ValueError, match="images must be"):
        calibrate_outputs(m, m, torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="iterations must be"):
        calibrate_outputs(m, m, _images(2), iterations=-1)
