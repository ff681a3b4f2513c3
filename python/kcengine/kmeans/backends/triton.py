"""The ``triton`` backend: the packed ragged-batch driver of ``cuda.py`` (seeding, Lloyd with
per-problem convergence masks, empty-cluster repair, final E-step, best of ``n_init``) run with
the Triton kernels of ``triton_kernels.py``.  It needs no CuPy.  The host drives the Lloyd
iterations (one synchronization per iteration, to stop when every problem has converged).

Distances are exact fp32 by default (``tl.dot`` with ``input_precision="ieee"``); set
``KCENGINE_TRITON_TF32=1`` (or pass ``tf32=True`` to :func:`solve`) to allow TF32 tensor cores,
which may change labels where distances tie within TF32's precision.

The data must be on a CUDA device, except under ``TRITON_INTERPRET=1`` where CPU tensors run
through the Triton interpreter (how the tests check the whole backend without a GPU).
"""
from __future__ import annotations

import os

from ..._checks import device_scope
from ..api import Problems, RawResult
from .cuda import check_supported, collect, solve_packed
from .triton_kernels import TritonKernels, interpreting


def _tf32_from_env() -> bool:
    return os.environ.get("KCENGINE_TRITON_TF32", "0").lower() in ("1", "true", "on", "yes")


def solve(probs: Problems, *, tf32: bool | None = None) -> RawResult:
    """Solve every problem of ``probs`` (torch tensors on one CUDA device) with Triton kernels."""
    check_supported(probs, "triton")
    dev = probs.datasets[0].device
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(f"the triton backend takes CUDA tensors (got data on {dev}; "
                           "CPU tensors run only under TRITON_INTERPRET=1)")
    kernels = TritonKernels(tf32=_tf32_from_env() if tf32 is None else tf32)
    out: list = []
    with device_scope(dev):  # Triton launches on the current device, whatever device the data is on
        # One packed batch per dtype is all there is: the api gives one dtype per call.
        solve_packed(probs, list(range(probs.n_problems)), kernels, out)
        return collect(probs, out)
