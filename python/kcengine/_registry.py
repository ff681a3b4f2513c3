"""One backend registry for every op of kcengine (k-means, indexed convolution).

A *backend* is a way of running an op: ``cpu`` (the C++/OpenMP core), ``torch`` (plain torch,
any device: the reference), ``cuda`` (CUDA C++ through CuPy) and ``triton``.  Each op registers,
per backend, the dotted path of its implementation; nothing is imported until it is used, so
``import kcengine`` never touches cupy, triton or a GPU.

Resolution rules (shared by all ops):

* ``backend="auto"`` (or ``None``): the environment variable ``KCENGINE_BACKEND`` wins when set;
  otherwise the first *available* backend of the op's preference list for the data's device.
* An explicitly requested backend that cannot run raises ``RuntimeError`` naming the reason; one that
  does not implement the op at all (e.g. ``"cuda"`` for a convolution) is a bad value: ``ValueError``.
* ``run_with_fallback`` runs an auto-selected backend and, should it fail at run time, warns and
  falls back to the next candidate; an explicit backend's errors propagate.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["BACKENDS", "backend_status", "register", "resolve", "candidates", "run_with_fallback"]

BACKENDS = ("cpu", "torch", "cuda", "triton")
_ENV = "KCENGINE_BACKEND"


def _check_cpu() -> str | None:
    try:
        importlib.import_module("kcengine._core")
    except ImportError as exc:  # pragma: no cover - only on a broken install
        return f"native module kcengine._core failed to import: {exc}"
    return None


def _check_torch() -> str | None:
    return None


def _cuda_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _all_reasons(*reasons) -> str | None:
    """Every reason a backend cannot run, joined (the device and the package: `env` showed only the first, so a
    user who fixed it met the second), or None."""
    found = [r for r in reasons if r]
    return "; and ".join(found) if found else None


def _check_cuda() -> str | None:
    return _all_reasons(_cuda_reason(), importlib.util.find_spec("cupy") is None and
                        "cupy is not installed (pip install 'kcengine[cuda12]' or 'kcengine[cuda13]')")


def _check_triton() -> str | None:
    return _all_reasons(_cuda_reason(), importlib.util.find_spec("triton") is None and "triton is not installed")


_CHECKS: dict[str, Callable[[], str | None]] = {
    "cpu": _check_cpu,
    "torch": _check_torch,
    "cuda": _check_cuda,
    "triton": _check_triton,
}
# Which devices a backend can take data on.
_DEVICES = {"cpu": ("cpu",), "torch": ("cpu", "cuda"), "cuda": ("cuda",), "triton": ("cuda",)}
# Preference order of "auto", per device type.
_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


@dataclass
class _Op:
    impls: dict[str, str] = field(default_factory=dict)  # backend -> "module:function"
    loaded: dict[str, Callable] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}


def register(op: str, backend: str, target: str) -> None:
    """Register ``target`` ("package.module:function") as ``op``'s implementation on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    _OPS.setdefault(op, _Op()).impls[backend] = target
    _CANDIDATES.clear()


def env_backend() -> str:
    """The ``KCENGINE_BACKEND`` override as every reader takes it: stripped, ``"auto"`` when unset or empty."""
    return os.environ.get(_ENV, "").strip() or "auto"


def check_backend_name(value, name: str = "backend", op: str | None = None) -> None:
    """ValueError naming the argument ``name`` unless ``value`` is "auto" or one of ``BACKENDS`` -- one that
    implements ``op``, when given (for arguments stored now and resolved later, e.g. a layer's conv backend:
    "cuda" is a k-means backend only)."""
    names = ("auto",) + tuple(b for b in BACKENDS if op is None or b in _OPS[op].impls)
    if value not in names:
        what = f" ({op} backends; {value!r} implements k-means only)" if op and value in BACKENDS else ""
        raise ValueError(f"{name} must be one of {names}{what}, got {name}={value!r}")


def backend_status(backend: str) -> str | None:
    """``None`` when ``backend`` can run here, else the reason it cannot."""
    if backend not in _CHECKS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    return _CHECKS[backend]()


def _load(op: str, backend: str) -> Callable:
    entry = _OPS[op]
    fn = entry.loaded.get(backend)
    if fn is None:
        module, _, name = entry.impls[backend].partition(":")
        fn = getattr(importlib.import_module(module), name)
        entry.loaded[backend] = fn
    return fn


def _device_type(device) -> str:
    dtype = getattr(device, "type", device)
    return "cuda" if str(dtype).startswith("cuda") else "cpu"


# candidates()'s answers, per (op, backend, device type, KCENGINE_BACKEND).  What a backend needs is there or
# not for the life of the process (register() starts the memo afresh), and every eager layer call asks: at
# batch 1 on CIFAR, re-running the checks was a fifth of a layer's Python time.  Errors are not kept; they
# are raised again on each call.
_CANDIDATES: dict[tuple, tuple[tuple[str, ...], bool]] = {}


def candidates(op: str, backend: str | None, device="cpu") -> tuple[list[str], bool]:
    """Backends to try for ``op`` in order, and whether the choice was explicit."""
    if backend is not None and not isinstance(backend, str):  # unhashable or odd: _candidates says what is wrong
        return _candidates(op, backend, _device_type(device))
    key = (op, backend, _device_type(device), os.environ.get(_ENV))
    hit = _CANDIDATES.get(key)
    if hit is None:
        names, explicit = _candidates(op, backend, key[2])
        hit = _CANDIDATES[key] = (tuple(names), explicit)
    return list(hit[0]), hit[1]


def check_op_backend(op: str, backend: str | None, source: str = "backend") -> None:
    """ValueError, worded as a call to ``op`` words it, unless ``backend`` is None, "auto" or a backend that
    implements ``op``; whether it can run here is not asked.  For the paths that run torch ops whatever the
    name (graph capture, forward-mode AD), so that a bad name is refused there as in eager."""
    if backend in (None, "auto"):
        return
    if backend not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not one of {('auto',) + BACKENDS}")
    if backend not in _OPS[op].impls:
        raise ValueError(f"{source}={backend!r} does not implement {op}; {op} has "
                         f"{('auto',) + tuple(b for b in BACKENDS if b in _OPS[op].impls)}")


def _candidates(op: str, backend: str | None, dev: str) -> tuple[list[str], bool]:
    if op not in _OPS:
        raise ValueError(f"op={op!r} has no registered backends")
    explicit = backend not in (None, "auto")
    source = "backend"  # what chose the backend, for the errors below
    if not explicit:
        env = env_backend()
        if env != "auto":
            backend, explicit, source = env, True, f"{_ENV} (environment)"
    if explicit:
        check_op_backend(op, backend, source)
        if dev not in _DEVICES[backend]:
            reason = backend_status(backend)
            here = f"; it cannot run here at all: {reason}" if reason else \
                f"; move the data there first, e.g. torch.as_tensor(x, device='{_DEVICES[backend][0]}')"
            raise RuntimeError(
                f"{source}={backend!r} cannot run on data on device {dev!r} "
                f"(it takes {', '.join(_DEVICES[backend])} data{here})"
            )
        reason = backend_status(backend)
        if reason:
            raise RuntimeError(f"{source}={backend!r} is not available: {reason}")
        return [backend], True
    names = [b for b in _PREFERENCE[dev] if b in _OPS[op].impls and backend_status(b) is None]
    if not names:  # pragma: no cover - torch is always available
        raise RuntimeError(f"no backend available for {op} on {dev}")
    return names, False


def resolve(op: str, backend: str | None = "auto", device="cpu") -> tuple[str, Callable]:
    """The backend name and implementation that ``op`` would run with."""
    names, _ = candidates(op, backend, device)
    return names[0], _load(op, names[0])


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed: torch's OutOfMemoryError (CUDA) or its CPU allocator's
    RuntimeError, whose only mark is the message."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    msg = str(exc)
    return "can't allocate memory" in msg or "out of memory" in msg.lower()


def run_with_fallback(op: str, backend: str | None, device, call: Callable[[str, Callable], object]):
    """Run ``call(name, impl)`` on the resolved backend; returns ``(name, result)``.

    An auto-selected backend that raises ``RuntimeError``/``NotImplementedError`` is skipped
    with a warning and the next candidate is tried; an explicitly requested backend's error
    propagates unchanged (one chosen by ``KCENGINE_BACKEND``: its NotImplementedError names the
    variable), and so does running out of memory (the next backend on the same device needs the
    same output: trying it only repeats the failure under a misleading warning).
    """
    names, explicit = candidates(op, backend, device)
    from_env = explicit and backend in (None, "auto")  # KCENGINE_BACKEND chose it, not the caller
    last_exc: Exception | None = None
    for name in names:
        impl = _load(op, name)
        if explicit:
            try:
                return name, call(name, impl)
            except NotImplementedError as exc:
                if not from_env:
                    raise
                raise NotImplementedError(f"{exc} (the backend came from {_ENV}={name!r} in the environment: unset "
                                          f"it, or name a backend in the call)") from exc
        try:
            return name, call(name, impl)
        except (RuntimeError, NotImplementedError) as exc:
            if _out_of_memory(exc):
                raise
            last_exc = exc
            warnings.warn(f"kcengine: backend {name!r} failed for {op} ({exc}); falling back",
                          RuntimeWarning, stacklevel=3)
    assert last_exc is not None
    raise last_exc
