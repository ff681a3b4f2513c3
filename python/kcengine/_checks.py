"""Argument checks shared by the public entry points, so every one words its errors the same way:
``<name> must be <what>, got <name>=<value>``."""
from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_float", "check_bool", "check_device", "device_scope", "first_line", "state_dict_misfit",
           "scalar_value", "tensor_from_numpy"]


def scalar_value(value):
    """The Python number a 0-d numpy array, numpy scalar or 0-d torch tensor holds; ``value`` itself for anything
    else (and for a meta tensor, which holds none): what every check then reads as a plain scalar."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        try:
            return value.item()
        except (RuntimeError, ValueError, TypeError):
            pass
    return value


def check_int(value, name: str, low: int | None = None, high: int | None = None, *, optional: bool = False):
    """``value`` as a Python int (any integral type is accepted: ``numpy.int64`` too, and a 0-d integer numpy
    array or torch tensor; ``bool`` not), or None when ``optional``; ValueError naming ``name`` and the value
    unless ``low <= value <= high``."""
    if optional and value is None:
        return None
    scalar = scalar_value(value)  # (a meta tensor's stays a tensor: refused below, by name)
    ok = isinstance(scalar, numbers.Integral) and not isinstance(scalar, bool)
    if ok:
        v = int(scalar)
        ok = (low is None or v >= low) and (high is None or v <= high)
    if not ok:
        if low is not None and high is not None:
            what = f"an int in [{low}, {high}]"
        elif low is not None:
            what = f"an int >= {low}"
        elif high is not None:
            what = f"an int <= {high}"
        else:
            what = "an int"
        raise ValueError(f"{name} must be {what}{' or None' if optional else ''}, got {name}={value!r}")
    return v


def check_float(value, name: str, low: float = 0.0, *, low_open: bool = False, high: float | None = None,
                optional: bool = False) -> float | None:
    """``value`` as a Python float, or None when ``optional``; ValueError naming ``name`` and the value unless it
    is a finite real number ``>= low`` (``> low`` when ``low_open``) and ``<= high`` (numpy's scalars, and a 0-d
    real numpy array or torch tensor, count as the number they hold; bools do not)."""
    if optional and value is None:
        return None
    v = scalar_value(value)
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and \
        (v > low if low_open else v >= low) and (high is None or v <= high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be a finite number {rng}{' or None' if optional else ''}, got {name}={value!r}")
    return float(v)


def check_bool(value, name: str) -> bool:
    """``value`` as a Python bool: True/False (numpy's too, and a 0-d bool array or tensor), the ints 0 and 1, or
    None (False); ValueError naming ``name`` for anything else (a string such as "no" would read as True)."""
    if value is None or type(value).__name__ in ("bool", "bool_") or \
            (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    if str(getattr(value, "dtype", "")) in ("bool", "torch.bool") and getattr(value, "shape", None) == () and \
            str(getattr(value, "device", "cpu")) != "meta":
        return bool(value.item())
    raise ValueError(f"{name} must be True or False, got {name}={value!r}")


def check_device(device, name: str = "device"):
    """``device`` as a ``torch.device``; ValueError naming ``name`` for a string torch cannot parse
    (``"tpu"``), another type, or a CUDA device this process cannot use (none, or an ordinal past the
    last), instead of torch's RuntimeError or AssertionError from deep inside the first ``.to()``."""
    import torch

    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a torch device or a string such as 'cpu' or 'cuda:0', got "
                         f"{name}={device!r} ({exc})") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{name}={device!r} but torch sees no CUDA device here; use {name}='cpu'")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{name}={device!r} but torch sees {n} CUDA device(s) (0..{n - 1})")
    return dev


def device_scope(device):
    """A context that makes ``device`` CUDA's current device while kernels are launched on its data (CuPy's
    stream check, its ``Device`` attributes and Triton's launcher all read the current device, not the
    data's: data on ``cuda:1`` while ``cuda:0`` is current failed or ran on the wrong device); a no-op for any
    other device."""
    import contextlib

    import torch

    dev = torch.device(device)
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def tensor_from_numpy(a):
    """A CPU tensor of a caller's numpy array ``a``, sharing its memory where ``a`` is C-contiguous and writable.
    A read-only array (``np.load(..., mmap_mode="r")``, a broadcast view, ``np.frombuffer`` of bytes) is copied:
    torch has no read-only tensors and warns on such a view.  Nothing here writes to the tensor either way."""
    import numpy as np
    import torch

    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message ("" when it has none): what an error that wraps a library's error
    (torch.load's, say) quotes of it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def state_dict_misfit(own, state, optional_suffixes: tuple = ()) -> str:
    """How the state dict ``state`` fails to fit a model whose own is ``own``, in one line (counts and the first
    few keys; ``load_state_dict``'s report is a page, a line per key), or "" when keys and shapes agree.  Keys
    of ``own`` ending in ``optional_suffixes`` may be absent from ``state``."""
    def shape(t):  # None where there is none to compare: a lazy module's uninitialized parameter, a non-tensor
        try:
            return tuple(t.shape)
        except (AttributeError, RuntimeError, TypeError):
            return None

    missing = [k for k in own if k not in state and not k.endswith(tuple(optional_suffixes))]
    unexpected = [k for k in state if k not in own]
    pairs = [(k, shape(state[k]), shape(own[k])) for k in own if k in state]
    wrong = [f"{k}: checkpoint {a} vs model {b}" for k, a, b in pairs if a is not None and b is not None and a != b]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if wrong:
        parts.append(f"{len(wrong)} of another shape (e.g. {wrong[:2]})")
    return "; ".join(parts)
