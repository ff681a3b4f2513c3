"""Shared pieces of the benchmark suites: machine description, timing, result files.

Every recorded figure carries the machine, commit and date it was measured on; ratios are
computed inside one run (same process, same inputs, alternating order) so noisy shared
machines still give comparable numbers.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import gc
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = ["machine_info", "git_commit", "now_utc", "time_call", "write_csv", "markdown_table", "repo_root",
           "shared_data_dir", "shown_path", "peak_rss_mb", "keep_freed_memory_mapped", "runnable_isas", "forced_isa"]


def repo_root() -> Path | None:
    """The checkout this package was installed from (editable installs), else None."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "csrc").is_dir():
            return parent
    return None


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the repository root, or ``$KCENGINE_DATA``; None when absent."""
    env = os.environ.get("KCENGINE_DATA")
    if env:
        p = Path(env)
        return p if p.is_dir() else None
    root = repo_root()
    if root is None:
        root = Path.cwd()
    p = root.parent / "shared" / "data"
    return p if p.is_dir() else None


def shown_path(path) -> str:
    """``path`` as a report prints it: relative to the checkout's parent when it lies there
    (``../shared/data/...``), else its last two parts, so that no absolute path of the machine a run was made
    on ends up in a recorded file."""
    p = Path(path).resolve()
    root = repo_root() or Path.cwd()
    try:
        return str(Path("..") / p.relative_to(root.resolve().parent))
    except ValueError:
        return str(Path(*p.parts[-2:])) if len(p.parts) >= 2 else str(p)


def cifar_sample_model(model_name: str, suite: str):
    """``(LoadedModel, data folder)``: CIFAR ResNet ``model_name`` with its public checkpoint as
    ``../shared/data/checkpoints`` holds it, for the suites that measure accuracy on the CIFAR sample;
    FileNotFoundError naming ``suite`` when the folder is absent."""
    from ..models import CIFAR_CHECKPOINT_URLS, load_model
    from ..models.zoo import _cifar_depth

    depth = _cifar_depth(model_name)
    if depth is None:
        raise ValueError(f"the {suite} bench takes a CIFAR ResNet (resnet20/32/44/56/110), got {model_name!r}")
    data = shared_data_dir()
    if data is None:
        raise FileNotFoundError(f"../shared/data is absent (set KCENGINE_DATA): the {suite} bench needs the CIFAR "
                                f"sample and checkpoints")
    path = data / "checkpoints" / os.path.basename(CIFAR_CHECKPOINT_URLS[f"resnet{depth}"])
    if not path.is_file():
        raise FileNotFoundError(f"the {suite} bench needs {path} (the public resnet{depth} checkpoint)")
    return load_model(f"resnet{depth}", path), data


def git_commit(short: bool = True) -> str:
    """The checkout's commit (``+dirty`` when code outside bench/results differs), or ``$KCENGINE_COMMIT``
    where the tree has no git metadata (a copy sent to a GPU machine)."""
    root = repo_root() or Path.cwd()
    if not (root / ".git").exists() and os.environ.get("KCENGINE_COMMIT"):
        return os.environ["KCENGINE_COMMIT"]
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip() or "unknown"
        # Results being rewritten (bench/results) do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo (or ``cpuinfo``, its text)
    has them: shared machines may name only the vendor line ("AMD EPYC"), and these records were taken on
    Zen 3, Zen 4 and Zen 5 machines under that one name, whose speeds differ by up to 2x."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:  # the first processor's block is enough
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f", family {fields['cpu family']} model {fields['model']}"
    return name


def machine_info() -> dict:
    """A short description of where a benchmark ran."""
    import numpy as np
    import torch

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "os": f"{platform.system()} {platform.release()}",
    }
    try:
        from .. import _core

        info["threads"] = _core.max_threads()
        feats = _core.cpu_features()
        info["cpu_features"] = ",".join(k for k, v in feats.items() if v)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@contextlib.contextmanager
def forced_isa(isa: str | None = None):
    """Within the block, the native code takes the instruction-set copies ``isa`` names (env
    ``KCENGINE_CPU_ISA``; None leaves it as it is); the block may set the variable again.  Afterwards
    the variable is as it was before, set or unset.  It is the process's environment: not for blocks that
    overlap in several threads."""
    old = os.environ.get("KCENGINE_CPU_ISA")
    try:
        if isa is not None:
            os.environ["KCENGINE_CPU_ISA"] = isa
        yield
    finally:
        if old is None:
            os.environ.pop("KCENGINE_CPU_ISA", None)
        else:
            os.environ["KCENGINE_CPU_ISA"] = old


def runnable_isas() -> list[str]:
    """The instruction sets whose native copies this CPU runs ("generic" always, then "avx2", "avx512"),
    asked of the native side itself: ``KCENGINE_CPU_ISA`` set to each in turn, which it refuses with
    ValueError for a set the CPU lacks (AVX-512 needs F, DQ, BW and VL, not F alone)."""
    from .. import _core

    out = []
    for isa in ("generic", "avx2", "avx512"):
        with forced_isa(isa):
            try:
                _core.kmeans_isa()
            except ValueError:
                continue
        out.append(isa)
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux ru_maxrss is in KB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_call(fn: Callable[[], object], *, repeat: int = 1, warmup: int = 0, sync: Callable[[], None] | None = None):
    """(best seconds over ``repeat`` runs, last return value)."""
    out = None
    for _ in range(warmup):
        out = fn()
        if sync:
            sync()
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


_MAX_ROUNDS = 1000  # time_alternating's cap on the rounds min_seconds adds


def time_alternating(fns: Sequence[Callable[[], object]], repeat: int, *, warmup: int = 1,
                     flip: bool = False, min_seconds: float = 0.0) -> tuple:
    """Best seconds of each of ``fns`` over ``repeat`` rounds, run in turn (a, b, c, a, b, c, ...; with
    ``flip`` every other round runs them in reverse order) after ``warmup`` rounds: peers timed side by side
    on the same inputs, so load from other jobs hits them alike.  ``min_seconds``: more rounds until the
    rounds took that long in all (at most 1,000), for calls of microseconds, whose best of a few rounds
    is mostly the machine's noise."""
    for _ in range(warmup):
        for f in fns:
            f()
    best = [float("inf")] * len(fns)
    start, r = time.perf_counter(), 0
    while r < repeat or (r < _MAX_ROUNDS and time.perf_counter() - start < min_seconds):
        order = range(len(fns)) if not (flip and r % 2) else reversed(range(len(fns)))
        for j in order:
            t0 = time.perf_counter()
            fns[j]()
            best[j] = min(best[j], time.perf_counter() - t0)
        r += 1
    return tuple(best)


def keep_freed_memory_mapped() -> str | None:
    """Set this process's glibc malloc to keep freed memory mapped (``mallopt``: no mmap'd chunks, no
    heap trimming), and say so; None where the C library is not glibc (nothing is changed) or where
    glibc refused a setting.

    A large torch CPU tensor otherwise comes from fresh pages or from the heap depending on what the
    process freed before, and fresh pages cost a page fault each on first write: on resnet18's layer1 at
    batch 32 that is 6272 faults, 5-8 ms on a 44 ms dense conv, paid in some processes and not in
    others.  Benchmarks call this so that neither side's time depends on that history.  It lasts for
    the rest of the process (freed memory is reused but never returned to the system)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):
            return None
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except OSError:
        return None
    return ("glibc malloc set to keep freed memory mapped (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB), so "
            "neither side pays first-touch page faults that depend on what the process freed before" if ok else None)


def rel_diff(y, ref, eps: float = 1e-12) -> float:
    """Max abs difference of ``y`` from ``ref`` over ``ref``'s max abs value (at least ``eps``)."""
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(eps))


def time_against(reference: Callable[[], object], candidate: Callable[[], object], repeat: int, *,
                 flip: bool = False, min_seconds: float = 0.0) -> tuple[float, float, float]:
    """``(reference seconds, candidate seconds, max relative difference)``: both timed alternately
    (:func:`time_alternating`) under ``torch.inference_mode``, then the candidate's output compared with
    the reference's (max abs difference over the reference's max abs value)."""
    import torch

    with torch.inference_mode():
        tr, tc = time_alternating((reference, candidate), repeat, flip=flip, min_seconds=min_seconds)
        yr = reference()
        err = rel_diff(candidate(), yr)
    return tr, tc, err


def command_line(module: str, argv: Sequence[str] | None) -> tuple[list[str], str]:
    """``(argv, how it reads as a command)`` for a benchmark's ``main(argv)``: ``argv`` defaults to
    ``sys.argv[1:]``; the string is what reports print as ``recorded by``."""
    import shlex
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    return argv, shlex.join(["python", "-m", module, *argv])


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "NaN"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def markdown_table(rows: Iterable[dict], columns: Sequence[str] | None = None) -> str:
    rows = list(rows)
    if not rows:
        return "(no rows)\n"
    cols = list(columns) if columns else list(rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"
