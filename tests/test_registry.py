"""kcengine._registry.run_with_fallback: which run-time failures move on to the next backend and which stop."""
import warnings

import pytest

from kcengine import _registry

CALLS = []


def _fail_runtime(*a):
    CALLS.append("cpu")
    raise RuntimeError("kernel not built for this shape")


def _fail_cpu_oom(*a):
    CALLS.append("cpu")
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 2880057600288 bytes")


def _ok(*a):
    CALLS.append("torch")
    return "torch result"


@pytest.fixture()
def op():
    name = "test_fallback_op"
    yield name
    _registry._OPS.pop(name, None)
    CALLS.clear()


def _register(op, cpu_impl):
    _registry.register(op, "cpu", f"{__name__}:{cpu_impl}")
    _registry.register(op, "torch", f"{__name__}:_ok")


def test_a_failing_auto_backend_warns_and_falls_back(op, monkeypatch):
    monkeypatch.delenv("KCENGINE_BACKEND", raising=False)
    _register(op, "_fail_runtime")
    with pytest.warns(RuntimeWarning, match="backend 'cpu' failed for test_fallback_op .*kernel not built"):
        name, out = _registry.run_with_fallback(op, "auto", "cpu", lambda n, impl: impl())
    assert (name, out, CALLS) == ("torch", "torch result", ["cpu", "torch"])


def test_out_of_memory_is_not_retried_on_another_backend(op, monkeypatch):
    """The next backend on the same device needs the same output: retrying only repeated the failure under
    warnings saying each backend 'failed'."""
    monkeypatch.delenv("KCENGINE_BACKEND", raising=False)
    _register(op, "_fail_cpu_oom")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="can't allocate memory"):
            _registry.run_with_fallback(op, "auto", "cpu", lambda n, impl: impl())
    assert CALLS == ["cpu"]


def test_an_explicit_backend_error_propagates(op):
    _register(op, "_fail_runtime")
    with pytest.raises(RuntimeError, match="kernel not built"):
        _registry.run_with_fallback(op, "cpu", "cpu", lambda n, impl: impl())
    assert CALLS == ["cpu"]


def test_a_refusal_of_the_environments_backend_names_the_variable(monkeypatch):
    """``KCENGINE_BACKEND=torch`` and exact1d (a cpu-only algorithm): the torch backend's refusal named no argument
    of the call, which passed none; it names the variable now.  A backend named in the call is refused as it
    was, and without the variable auto runs exact1d on the cpu."""
    import numpy as np

    import kcengine

    x = np.linspace(0.0, 1.0, 40)[:, None]
    monkeypatch.setenv("KCENGINE_BACKEND", "torch")
    with pytest.raises(NotImplementedError, match=r"^algorithm='exact1d' is implemented by the cpu backend only "
                                                  r"\(the backend came from KCENGINE_BACKEND='torch' in the "
                                                  r"environment: unset it, or name a backend in the call\)$"):
        kcengine.kmeans(x, 4, algorithm="exact1d")
    with pytest.raises(NotImplementedError, match=r"^algorithm='exact1d' is implemented by the cpu backend only$"):
        kcengine.kmeans(x, 4, algorithm="exact1d", backend="torch")
    assert kcengine.kmeans(x, 4, algorithm="exact1d", backend="cpu").algorithm == "exact1d"
    monkeypatch.delenv("KCENGINE_BACKEND")
    assert kcengine.kmeans(x, 4, algorithm="exact1d").algorithm == "exact1d"


def test_candidates_follow_the_environment_and_new_registrations(op, monkeypatch):
    """candidates() keeps its answers per (op, backend, device type, KCENGINE_BACKEND): a change of the variable
    between calls is honoured at once, and a backend registered later is offered from then on."""
    monkeypatch.delenv("KCENGINE_BACKEND", raising=False)
    _registry.register(op, "torch", f"{__name__}:_ok")
    assert _registry.candidates(op, "auto", "cpu") == (["torch"], False)
    _registry.register(op, "cpu", f"{__name__}:_fail_runtime")
    assert _registry.candidates(op, "auto", "cpu") == (["cpu", "torch"], False)
    monkeypatch.setenv("KCENGINE_BACKEND", "torch")
    assert _registry.candidates(op, "auto", "cpu") == (["torch"], True)
    assert _registry.candidates(op, "cpu", "cpu") == (["cpu"], True)  # an argument beats the variable
    monkeypatch.setenv("KCENGINE_BACKEND", "triton")
    with pytest.raises(ValueError,
                       match=r"KCENGINE_BACKEND \(environment\)='triton' does not implement test_fallback_op"):
        _registry.candidates(op, "auto", "cpu")
    with pytest.raises(ValueError, match="does not implement"):  # errors are raised again, not kept
        _registry.candidates(op, "auto", "cpu")
    monkeypatch.delenv("KCENGINE_BACKEND")
    names, _ = _registry.candidates(op, "auto", "cpu")
    names.append("cuda")  # the caller's list is its own
    assert _registry.candidates(op, "auto", "cpu") == (["cpu", "torch"], False)
    with pytest.raises(ValueError, match=r"backend=\['cpu'\] is not one of"):
        _registry.candidates(op, ["cpu"], "cpu")


def test_backend_status_gives_every_reason_a_gpu_backend_cannot_run(monkeypatch):
    """`kcengine env` showed only the first reason (no device), so a user who then got a GPU met the second
    (no cupy) only after; each reason is given, and each alone when it is the only one."""
    import importlib.util

    import torch

    real = importlib.util.find_spec
    for has_device, missing in ((False, {"cupy", "triton"}), (True, {"cupy", "triton"}), (False, set())):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: has_device)
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else
                            ("a spec" if name in ("cupy", "triton") else real(name, *a)))
        device = None if has_device else "no CUDA device (torch.cuda.is_available() is False)"
        cupy = "cupy is not installed (pip install 'kcengine[cuda12]' or 'kcengine[cuda13]')" if missing else None
        triton = "triton is not installed" if missing else None
        for backend, package in (("cuda", cupy), ("triton", triton)):
            want = "; and ".join(r for r in (device, package) if r) or None
            assert _registry.backend_status(backend) == want, (backend, has_device, missing)
