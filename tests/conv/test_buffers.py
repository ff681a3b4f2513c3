"""The cpu backend's output-buffer cache (csrc/cpu/buffers.cpp, kcengine.conv.output_cache_info): outputs
of 1 MiB and more reuse freed blocks of the same size, never one still alive, with the same values as
F.conv2d; autograd's outputs stay torch's own."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kcengine import _core
from kcengine.conv import (ClusteredConv2d, dense_weight, empty_output_cache, output_cache_info,
                           set_output_cache_limit)


def _layer(granularity, c_in=8, c_out=64, k=3):
    g = torch.Generator().manual_seed(3)
    if granularity == "filter":
        cb, idx = torch.randn(5, c_in, k, k, generator=g), torch.randint(0, 5, (c_out,), generator=g)
    else:
        cb, idx = torch.randn(4, k, k, generator=g), torch.randint(0, 4, (c_out, c_in), generator=g)
    m = ClusteredConv2d(c_in, c_out, k, num_clusters=cb.shape[0], padding=1, bias=False,
                        granularity=granularity, backend="cpu").eval()
    with torch.no_grad():
        m.codebook.copy_(cb)
    m.set_index(idx)
    return m, dense_weight(cb, idx, granularity, c_in)


@pytest.fixture
def cache():
    set_output_cache_limit(512)
    empty_output_cache()
    yield
    set_output_cache_limit(512)
    empty_output_cache()


@pytest.mark.parametrize("granularity", ["filter", "kernel"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_reuse_freed_blocks_never_live_ones(cache, granularity, channels_last):
    m, w = _layer(granularity)
    x = torch.randn(2, 8, 48, 48)  # output 2 x 64 x 48 x 48 float32 = 1.18 MB: cached
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref = F.conv2d(x, w, padding=1)
    with torch.inference_mode():
        y1 = m(x)
        ptr1 = y1.data_ptr()
        y2 = m(x)  # y1 alive: a different block
        assert y2.data_ptr() != ptr1
        torch.testing.assert_close(y1, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(y2, ref, rtol=1e-4, atol=1e-4)
        before = output_cache_info()
        del y1
        assert output_cache_info()["cached_blocks"] == before["cached_blocks"] + 1
        y3 = m(x)  # served from y1's block
        assert y3.data_ptr() == ptr1
        assert output_cache_info()["hits"] == before["hits"] + 1
        torch.testing.assert_close(y3, ref, rtol=1e-4, atol=1e-4)
        assert y3._base is None  # a tensor of its own, not a view
        want_cl = channels_last or granularity == "kernel"  # the kernel pass writes channels-last
        assert y3.is_contiguous(memory_format=torch.channels_last) == want_cl
        assert y3.is_contiguous() == (not want_cl)


def test_small_outputs_autograd_and_limit_zero_bypass_the_cache(cache):
    m, w = _layer("filter")
    x = torch.randn(2, 8, 48, 48)
    start = output_cache_info()
    unchanged = lambda: all(output_cache_info()[k] == start[k] for k in ("hits", "misses"))  # noqa: E731
    with torch.inference_mode():
        m(torch.randn(1, 8, 8, 8))  # 16 KiB output: torch's allocator
    assert unchanged()
    xg = x.clone().requires_grad_(True)
    y = m(xg)  # recorded by autograd: torch's allocator, in-place ops allowed
    y.add_(1.0)
    (y * y).sum().backward()
    xr = x.clone().requires_grad_(True)
    yr = F.conv2d(xr, w, padding=1) + 1.0
    (yr * yr).sum().backward()
    torch.testing.assert_close(y.detach(), yr.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-3)
    assert unchanged()
    set_output_cache_limit(0)
    with torch.inference_mode():
        y = m(x)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
    assert unchanged()


def test_limit_and_release(cache):
    m, _ = _layer("filter")
    x = torch.randn(2, 8, 48, 48)
    with torch.inference_mode():
        ys = [m(x) for _ in range(3)]
    nbytes = ys[0].numel() * 4
    del ys
    info = output_cache_info()
    assert info["cached_blocks"] == 3 and info["cached_bytes"] >= 3 * nbytes
    set_output_cache_limit(2.5 * nbytes / 2**20)  # keeps two blocks
    assert output_cache_info()["cached_blocks"] == 2
    freed = empty_output_cache()
    assert freed >= 2 * nbytes and output_cache_info()["cached_bytes"] == 0


def test_limit_evicts_oldest_and_skips_live_sizes(cache):
    """Blocks of two sizes: lowering the limit while the larger size's blocks are all alive frees only the
    free ones; a block returning to a full cache evicts the oldest free block, not itself."""
    small, big = 1 << 18, 1 << 19  # float32 elements: 1 MiB and 2 MiB
    a = torch.from_numpy(_core.pooled_empty([small], "float32"))
    b = torch.from_numpy(_core.pooled_empty([big], "float32"))
    del a  # the 1 MiB block is free, the 2 MiB one alive
    set_output_cache_limit(0)
    info = output_cache_info()
    assert info["cached_blocks"] == 0 and info["cached_bytes"] == 0
    set_output_cache_limit(2.5)
    del b  # 2 MiB cached
    c = torch.from_numpy(_core.pooled_empty([small], "float32"))
    d = torch.from_numpy(_core.pooled_empty([small], "float32"))
    del c  # 3 MiB > 2.5: the older 2 MiB block goes
    info = output_cache_info()
    assert info["cached_blocks"] == 1 and info["cached_bytes"] == 1 << 20
    del d
    assert output_cache_info()["cached_bytes"] == 2 << 20


def test_bad_arguments():
    for bad in (-1, "2", None, True, float("nan"), float("inf"), 2.0**40):
        with pytest.raises(ValueError, match="mib must be a number between 0 and"):
            set_output_cache_limit(bad)
    set_output_cache_limit(np.float32(512))  # numpy numbers are numbers
    assert output_cache_info()["limit_bytes"] == 512 << 20
    with pytest.raises(ValueError, match="shape entries must be >= 0, got -2"):
        _core.pooled_empty([3, -2], "float32")
    with pytest.raises(ValueError, match="dtype must be float32 or float64, got int32"):
        _core.pooled_empty([3], np.int32)
    with pytest.raises(ValueError, match="channels_last needs a 4-d shape"):
        _core.pooled_empty([3, 4], "float32", True)
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        _core.pool_set_limit(-5)


def test_env_limit_is_checked(monkeypatch):
    from kcengine.conv import backends

    monkeypatch.setenv("KCENGINE_OUTPUT_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="KCENGINE_OUTPUT_CACHE_MB must be a number of MiB.*'lots'"):
        backends._env_cache_bytes()
    for bad in ("-3", "nan", "inf"):
        monkeypatch.setenv("KCENGINE_OUTPUT_CACHE_MB", bad)
        with pytest.raises(ValueError, match=f"KCENGINE_OUTPUT_CACHE_MB must be between 0 and .*'{bad}'"):
            backends._env_cache_bytes()
    monkeypatch.setenv("KCENGINE_OUTPUT_CACHE_MB", "1.5")
    assert backends._env_cache_bytes() == 3 << 19


def test_a_bad_env_limit_is_named_by_the_first_output_whatever_its_size(monkeypatch):
    """It was read only by the first output of 1 MiB or more: a small model ran with a bad value unnoticed."""
    import torch

    from kcengine.conv import backends

    monkeypatch.setattr(backends, "_pool_limit", None)  # as in a fresh process
    monkeypatch.setenv("KCENGINE_OUTPUT_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="KCENGINE_OUTPUT_CACHE_MB must be a number of MiB.*'lots'"):
        backends._empty_out((1, 2, 3, 3), torch.float32, False)
    monkeypatch.setenv("KCENGINE_OUTPUT_CACHE_MB", "512")
    assert backends._empty_out((1, 2, 3, 3), torch.float32, False).shape == (1, 2, 3, 3)
