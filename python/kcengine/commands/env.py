"""``python -m kcengine env``: versions, backends and why not, CPU features, threads."""
from __future__ import annotations

import importlib.util
import platform
import shutil

HELP = "versions, available backends (and why not), CPU features, threads"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect() -> dict:
    import numpy as np
    import torch

    from .. import _core, _registry
    from ..bench.common import machine_info

    info = {"kcengine": __import__("kcengine").__version__, "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__}
    for mod in ("torchvision", "triton", "cupy", "sklearn", "faiss"):
        spec = importlib.util.find_spec(mod)
        info[mod] = "not installed" if spec is None else _version(mod)
    info["nvcc"] = shutil.which("nvcc") or "not on PATH"
    info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    info["backends"] = {b: (_registry.backend_status(b) or "available") for b in _registry.BACKENDS}
    info[_registry._ENV] = _env_backend(_registry)
    m = machine_info()
    info["cpu"] = m.get("cpu")
    info["cpu_features"] = m.get("cpu_features")
    info["kmeans_solver_build"] = _core.kmeans_isa()
    info["openmp_threads"] = _core.max_threads()
    info["torch_threads"] = torch.get_num_threads()
    return info


def _env_backend(registry) -> str:
    """The ``KCENGINE_BACKEND`` override as it stands: not set, or its value and whether it can run here (every
    call with backend="auto" takes it, and fails where it cannot)."""
    value = registry.env_backend()
    if value == "auto":
        return "not set (backend='auto' picks per call)"
    if value not in registry.BACKENDS:
        return f"{value!r}: not a backend (one of {registry.BACKENDS}); every backend='auto' call fails"
    reason = registry.backend_status(value)
    if reason:
        return f"{value!r}: cannot run here ({reason}); every backend='auto' call fails"
    lacking = sorted(op for op, entry in registry._OPS.items() if value not in entry.impls)
    return f"{value!r}: every backend='auto' call runs it" + (
        f" ({', '.join(lacking)} has no {value!r}: those calls fail)" if lacking else "")


def _version(mod: str) -> str:
    try:
        return getattr(__import__(mod), "__version__", "installed")
    except Exception as exc:  # an installed module that fails to import says why
        return f"installed but fails to import ({type(exc).__name__})"


def run(args) -> int:
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, val in info.items():
        if isinstance(val, dict):
            print(f"{key}:")
            for b, s in val.items():
                print(f"  {b:<8} {s}")
        else:
            print(f"{key:<{width}}  {val}")
    return 0
