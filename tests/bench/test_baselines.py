"""The dense inference baselines compute exactly what the dense model computes, and leave it unchanged."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kcengine.bench.baselines import PackedDenseConv, frozen_dense


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_dense_conv_equals_f_conv2d(channels_last, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=bias)
    x = torch.randn(2, 5, 11, 9)
    if channels_last:  # the stored-reorder path; NCHW takes the F.conv2d fallback
        x = x.contiguous(memory_format=torch.channels_last)
    packed = PackedDenseConv.from_conv(conv)
    with torch.inference_mode():
        want = F.conv2d(x, conv.weight, conv.bias, 2, 1)
        for _ in range(2):  # the second call reuses the stored reorder
            got = packed(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        x2 = torch.randn(1, 5, 6, 6).contiguous(memory_format=torch.channels_last)  # new shape: new reorder
        torch.testing.assert_close(packed(x2), F.conv2d(x2, conv.weight, conv.bias, 2, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.Conv2d(4, 6, 3, padding="same")])
def test_packed_dense_conv_falls_back_to_f_conv2d(conv):
    x = torch.randn(1, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(PackedDenseConv.from_conv(conv)(x), conv(x))


def test_frozen_dense_matches_and_leaves_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding them is checked
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    run, why = frozen_dense(model, x)
    if run is None:
        pytest.skip(f"TorchScript cannot freeze here: {why}")
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x), rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
