"""kcengine._checks: the argument checks every public entry point shares, against plain Python rules."""
import numpy as np
import pytest
import torch

from kcengine._checks import check_bool, check_device, check_float, check_int


@pytest.mark.parametrize("v", [0, 7, np.int64(7), np.uint8(3), torch.tensor(5).item(), np.array(5), torch.tensor(5),
                               np.array(3, dtype=np.int16)])
def test_check_int_accepts_integral_values_and_returns_python_ints(v):
    out = check_int(v, "n", 0, 10)
    assert type(out) is int and out == int(v)


@pytest.mark.parametrize("v, low, high, msg", [
    (True, 0, None, r"n must be an int >= 0, got n=True"),
    (1.0, 0, None, r"n must be an int >= 0, got n=1.0"),
    ("3", None, None, r"n must be an int, got n='3'"),
    (-1, 0, None, r"n must be an int >= 0, got n=-1"),
    (11, None, 10, r"n must be an int <= 10, got n=11"),
    (np.int64(11), 1, 10, r"n must be an int in \[1, 10\], got n=np.int64\(11\)"),
    (np.array(True), 0, None, r"n must be an int >= 0, got n=array\(True\)"),
    (np.array(2.0), 0, None, r"n must be an int >= 0, got n=array\(2\.\)"),
    (np.array([2]), 0, None, r"n must be an int >= 0, got n=array\(\[2\]\)"),
    (torch.tensor(12), 0, 10, r"n must be an int in \[0, 10\], got n=tensor\(12\)"),
    (torch.tensor(5, device="meta"), 0, None, r"n must be an int >= 0, got n=tensor\(\.\.\., device='meta'"),
])
def test_check_int_refuses_with_the_name_and_value(v, low, high, msg):
    with pytest.raises(ValueError, match=msg):
        check_int(v, "n", low, high)


def test_check_int_optional():
    assert check_int(None, "n", 1, optional=True) is None
    with pytest.raises(ValueError, match=r"n must be an int >= 1 or None, got n=0"):
        check_int(0, "n", 1, optional=True)


@pytest.mark.parametrize("v, kw, ok", [(0.0, {}, True), (0.0, {"low_open": True}, False), (np.float32(0.5), {}, True),
                                       (float("nan"), {}, False), (float("inf"), {}, False), (True, {}, False),
                                       (1.5, {"high": 1.0}, False), (1, {"high": 1.0}, True), ("1", {}, False)])
def test_check_float(v, kw, ok):
    if ok:
        assert check_float(v, "x", 0.0, **kw) == float(v)
    else:
        with pytest.raises(ValueError, match=r"x must be a finite number >.*got x="):
            check_float(v, "x", 0.0, **kw)


def test_check_float_optional():
    assert check_float(None, "x", optional=True) is None
    with pytest.raises(ValueError, match=r"x must be a finite number >= 0.0 or None, got x=-1"):
        check_float(-1, "x", optional=True)
    with pytest.raises(ValueError, match=r"x must be a finite number >= 0.0, got x=None"):
        check_float(None, "x")


def test_check_device():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("tpu", 3.5, "cuda:x"):
        with pytest.raises(ValueError, match=r"dev must be a torch device or a string such as 'cpu' or 'cuda:0', got"):
            check_device(bad, "dev")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        with pytest.raises(ValueError, match=r"dev='cuda' but torch sees no CUDA device here"):
            check_device("cuda", "dev")
    else:
        with pytest.raises(ValueError, match=rf"dev='cuda:{n}' but torch sees {n} CUDA device"):
            check_device(f"cuda:{n}", "dev")


@pytest.mark.parametrize("v, out", [(True, True), (0, False), (None, False), (np.bool_(True), True),
                                    (np.array(False), False), (torch.tensor(True), True)])
def test_check_bool_accepts_bools_0_1_none_and_0d_bool_arrays(v, out):
    assert check_bool(v, "relu") is out


@pytest.mark.parametrize("v", ["no", 0.5, 2, torch.tensor([True]), torch.tensor(1.0), np.array([True])])
def test_check_bool_refuses_with_the_name_and_value(v):
    with pytest.raises(ValueError, match=r"relu must be True or False, got relu="):
        check_bool(v, "relu")


def test_device_scope_makes_a_cuda_device_current_and_is_a_no_op_elsewhere():
    """The GPU backends launch inside device_scope(data's device): CuPy's stream check and Triton's launcher
    read CUDA's current device, so data on cuda:1 with cuda:0 current failed.  Built here without a GPU (the
    scope is entered only where CUDA is)."""
    import contextlib

    import torch

    from kcengine._checks import device_scope

    scope = device_scope("cuda:1")
    assert isinstance(scope, torch.cuda.device) and scope.idx == 1
    assert isinstance(device_scope(torch.device("cuda", 0)), torch.cuda.device)
    for cpu in ("cpu", torch.device("cpu")):
        scope = device_scope(cpu)
        assert isinstance(scope, contextlib.nullcontext)
        with scope:
            pass
