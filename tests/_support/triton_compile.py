"""Compile Triton kernels for real GPU targets on a machine without a GPU.

Triton's front end and its bundled ``ptxas`` need no device: ``triton.compile`` on an ``ASTSource``
with an explicit ``GPUTarget`` lowers a kernel to a cubin, so type errors of compiled mode (which
the interpreter does not see: loop-carried dtypes, ``tl.dot`` shapes, ...) fail here, in CI.

:class:`LaunchRecorder` stands in for a module's kernel table: its launchers run unchanged, and each
``kernel[grid](*args, **constexprs)`` launch is recorded instead of run; :func:`compile_launch`
turns one recorded launch into the kernel's signature and compiles it.
"""
from __future__ import annotations

import torch

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
           torch.bool: "i1"}


class _Launch:
    def __init__(self, name, fn, log):
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid):
        def record(*args, **constexprs):
            self.log.append((self.name, self.fn, args, constexprs))
        return record


class LaunchRecorder(dict):
    """``{name: launcher}`` like the kernel tables; ``launches`` holds ``(name, jit_fn, args, constexprs)``."""

    def __init__(self, kernels: dict):
        self.launches = []
        super().__init__({k: _Launch(k, fn, self.launches) for k, fn in kernels.items()})


def _arg_type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(v).__name__}")


def compile_launch(fn, args, constexprs, capability: int):
    """Compile ``fn`` (a ``@triton.jit`` function) for ``sm_{capability}`` with the types of ``args``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig, cx = {}, {}
    pos = [n for n in names if n not in constexprs]
    assert len(pos) == len(args), (fn.__name__, pos, len(args))
    for n, v in zip(pos, args):
        sig[n] = _arg_type(v)
    for n, v in constexprs.items():
        sig[n] = "constexpr"
        cx[(names.index(n),)] = v
    return triton.compile(ASTSource(fn, sig, constexprs=cx), target=GPUTarget("cuda", capability, 32))
