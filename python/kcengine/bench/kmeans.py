"""Clustering benchmark: a model's conv weights as batched k-means workloads, kcengine against
scikit-learn (one ``KMeans`` per problem, as people do today), faiss and the torch reference.

Workloads (from the issue "Engine foundation"):

* ``a_sweep``   - every layer, every k from 2 to C_out, filters as points (one batched call);
* ``b_filters`` - filters, k = round(0.9 * C_out) per layer;
* ``c_kernels`` - the 3x3 kernels of each layer as 9-D points, k = min(256, N);
* ``d_element`` - every coordinate of every layer's filters as its own 1-D problem, k = min(10, C_out)
  (kcengine runs Lloyd, and ``exact1d``, the optimal 1-D clustering, is reported beside it).

Every method gets the same inputs in one process; times are best-of-``repeat``; quality is the
inertia of each method's centroids on the full data (faiss subsamples large problems by default),
summarized as the geometric mean over problems of inertia / scikit-learn's inertia (see ``_geo_ratio``).
``max_problems`` keeps an evenly spaced subset of a workload's problems (the same subset for every
method) so large models stay affordable; reports say when that happened.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .common import (command_line, forced_isa, git_commit, machine_info, markdown_table, now_utc, peak_rss_mb,
                     repo_root, runnable_isas, shared_data_dir, time_alternating, write_csv)

WORKLOADS = ("a_sweep", "b_filters", "c_kernels", "d_element")
METHODS = ("kcengine", "exact1d", "torch", "sklearn", "faiss")


@dataclass
class Workload:
    """Problems as (data array, k) pairs; ``data`` arrays may repeat (k sweep of one layer)."""

    name: str
    xs: list
    ks: list
    note: str = ""
    total_problems: int = 0

    @property
    def n_problems(self) -> int:
        return len(self.ks)

    @property
    def bytes(self) -> int:
        return sum(x.nbytes for x in {id(x): x for x in self.xs}.values())


def conv_weights(model) -> list[tuple[str, np.ndarray]]:
    """(name, float32 [C_out, C_in, kh, kw]) of every conv layer of ``model`` (groups == 1)."""
    import torch.nn as nn

    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            out.append((name, m.weight.detach().cpu().numpy().astype(np.float32, copy=True)))
    return out


def load_weights(model_name: str, weights=None, *, require_trained: bool = False
                 ) -> tuple[list[tuple[str, np.ndarray]], str]:
    """Conv weights of ``model_name`` and a line saying where they came from.

    CIFAR ResNets use the real checkpoint in ``../shared/data/checkpoints`` when present (or
    ``weights``); torchvision models their pretrained weights when cached, else the default
    init with seed 0 (speed work only needs the shapes) -- unless ``require_trained``, where
    :class:`~kcengine.models.checkpoints.MissingWeightsError` is raised instead (the CLI's explicit
    ``--weights pretrained``)."""
    import torch

    from ..models import load_model
    from ..models.checkpoints import MissingWeightsError

    if weights is None:
        data = shared_data_dir()
        if data is not None:
            cands = sorted((data / "checkpoints").glob(f"{model_name}-*.th"))
            if cands:
                weights = str(cands[0])
    torch.manual_seed(0)
    try:
        lm = load_model(model_name, weights if weights is not None else "pretrained", allow_download=False)
        src = f"{model_name} weights from {Path(str(lm.weights)).name}"
    except MissingWeightsError:
        if require_trained:
            raise
        torch.manual_seed(0)
        lm = load_model(model_name, None)
        src = (f"{model_name} with its default initialization (seed 0; no pretrained weights here: shapes are what "
               "matter for speed)")
    return conv_weights(lm.model), src


def _subset(n: int, cap: int | None) -> list[int]:
    if cap is None or n <= cap:
        return list(range(n))
    if cap == 1:
        return [0]
    return sorted({int(round(i * (n - 1) / (cap - 1))) for i in range(cap)})


def build_workloads(layers, which=WORKLOADS, max_problems: int | dict | None = None,
                    sweep_step: int = 1) -> list[Workload]:
    """The workloads ``which`` from ``layers``; ``max_problems`` caps each (an int for all, or a
    dict workload -> cap) with an evenly spaced subset."""
    out = []
    for name in which:
        xs, ks = [], []
        if name == "a_sweep":
            for _, w in layers:
                x = np.ascontiguousarray(w.reshape(w.shape[0], -1))
                for k in range(2, w.shape[0] + 1, sweep_step):
                    xs.append(x)
                    ks.append(k)
        elif name == "b_filters":
            for _, w in layers:
                xs.append(np.ascontiguousarray(w.reshape(w.shape[0], -1)))
                ks.append(max(1, int(round(0.9 * w.shape[0]))))
        elif name == "c_kernels":
            for _, w in layers:
                if w.shape[2:] == (3, 3):
                    x = np.ascontiguousarray(w.reshape(-1, 9))
                    xs.append(x)
                    ks.append(min(256, x.shape[0]))
        elif name == "d_element":
            for _, w in layers:
                flat = w.reshape(w.shape[0], -1)
                cols = np.ascontiguousarray(flat.T)[:, :, None]  # [D, C_out, 1]
                for j in range(cols.shape[0]):
                    xs.append(cols[j])
                    ks.append(min(10, w.shape[0]))
        else:
            raise ValueError(f"workload {name!r} is not one of {WORKLOADS}")
        cap = max_problems.get(name) if isinstance(max_problems, dict) else max_problems
        idx = _subset(len(ks), cap)
        wl = Workload(name, [xs[i] for i in idx], [ks[i] for i in idx], total_problems=len(ks))
        if len(idx) < len(ks):
            wl.note = f"{len(idx)} of {len(ks)} problems (evenly spaced subset, same for every method)"
        if name == "a_sweep" and sweep_step > 1:
            wl.note = (wl.note + "; " if wl.note else "") + f"k from 2 to C_out in steps of {sweep_step}"
        out.append(wl)
    return out


# ------------------------------------------------------------------------------------ methods

def _inertia(x: np.ndarray, c: np.ndarray) -> float:
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    d2 = (x64 * x64).sum(1)[:, None] - 2 * x64 @ c64.T + (c64 * c64).sum(1)[None]
    return float(np.maximum(d2.min(1), 0).sum())


def run_kcengine(wl: Workload, seed: int = 0, backend: str = "cpu", algorithm: str = "auto"):
    import kcengine

    res = kcengine.kmeans(wl.xs, wl.ks, seed=seed, backend=backend, algorithm=algorithm)
    return [np.asarray(c) for c in res.centroids]


def run_torch(wl: Workload, seed: int = 0, device: str = "cpu"):
    import torch

    import kcengine

    xs = {id(x): torch.from_numpy(x).to(device) for x in wl.xs}
    res = kcengine.kmeans([xs[id(x)] for x in wl.xs], wl.ks, seed=seed, backend="torch")
    return [c.cpu().numpy() for c in res.centroids]


def run_sklearn(wl: Workload, seed: int = 0):
    import warnings

    from sklearn.cluster import KMeans

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on duplicate points
        for x, k in zip(wl.xs, wl.ks):
            out.append(KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed).fit(x).cluster_centers_)
    return out


def run_faiss(wl: Workload, seed: int = 0):
    """faiss.Kmeans with its defaults (25 iterations, at most 256 points per centroid sampled)."""
    import os

    import faiss

    out = []
    # faiss warns on stderr from C++ for every small problem; keep the terminal readable.
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        for x, k in zip(wl.xs, wl.ks):
            km = faiss.Kmeans(x.shape[1], k, seed=seed + 1234, verbose=False)
            km.train(np.ascontiguousarray(x, dtype=np.float32))
            out.append(np.asarray(km.centroids))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return out


def available_methods(device: str = "cpu") -> list[str]:
    import importlib.util

    methods = ["kcengine", "exact1d", "torch"]
    if importlib.util.find_spec("sklearn"):
        methods.append("sklearn")
    if importlib.util.find_spec("faiss") and device == "cpu":
        methods.append("faiss")
    return methods


@dataclass
class Row:
    workload: str
    method: str
    problems: int
    seconds: float
    speedup_vs_sklearn: float = float("nan")
    inertia_ratio: float = float("nan")  # geometric mean over problems of inertia / sklearn's
    note: str = ""
    extra: dict = field(default_factory=dict)


def _geo_ratio(ours: list[float], ref: list[float]) -> float:
    """Geometric mean over problems of ``ours / ref``.  A problem where both inertias are zero (k = N
    distinct points: every method's exact answer) counts as equal; one where only the reference's is zero
    has no finite ratio and is left out; NaN when no problem is left."""
    logs = []
    for a, b in zip(ours, ref):
        if b > 1e-12 * (1 + a):
            logs.append(math.log(max(a, 1e-300) / b))
        elif a <= 1e-12 * (1 + b):
            logs.append(0.0)
    return float(math.exp(sum(logs) / len(logs))) if logs else float("nan")


def time_methods(name: str, fns: dict, methods, *, repeat: int = 1, progress=None, sync=None, errors=None,
                 min_seconds: float = 0.0, max_repeat: int = 5, calls: dict | None = None):
    """Best-of-``repeat`` seconds of each method's call, alternating the order of the methods over
    repeats (same inputs); a method that raises records its error (NaN in the table) instead of
    aborting the run.  Returns ``(times, outputs, errors)``; ``sync`` runs before and after each call.

    ``min_seconds``: a method whose calls so far add up to less than this runs again (the quick ones,
    still alternating, up to ``max_repeat`` calls in all): a call of a few milliseconds on a shared
    machine is one scheduler hiccup away from reading several times slower, while a call of a minute
    averages such hiccups out (the best of more calls is also a little lower: ``calls``, when given, is
    filled with each method's number of calls, for the table to say).  ``progress`` is called once per method
    and repeat of the first loop."""
    times = {m: float("inf") for m in methods}
    spent = {m: 0.0 for m in methods}
    calls = {} if calls is None else calls
    calls.update({m: 0 for m in methods})
    outs: dict = {}
    errors = dict(errors or {})

    def call(m):
        try:
            if sync:
                sync()
            t0 = time.perf_counter()
            out = fns[m]()
            if sync:
                sync()
            dt = time.perf_counter() - t0
            times[m] = min(times[m], dt)
            spent[m] += dt
            calls[m] += 1
            outs[m] = out
        except Exception as exc:  # a failing baseline records NaN rather than aborting
            errors[m] = f"{type(exc).__name__}: {exc}"[:200]

    r = 0
    while True:  # the repeats for every method, then more rounds for the quick ones
        todo = methods if r < repeat else [m for m in methods if m not in errors and spent[m] < min_seconds
                                           and calls[m] < max_repeat]
        if not todo:
            break
        for m in (todo if r % 2 == 0 else list(reversed(todo))):
            if m not in errors:
                call(m)
            if progress and r < repeat:
                progress(name, m)
        r += 1
    return times, outs, errors


def run_workload(wl: Workload, methods, *, repeat: int = 1, seed: int = 0, progress=None,
                 min_seconds: float = 0.0, max_repeat: int = 5) -> list[Row]:
    """Time every method on ``wl`` (alternating order over repeats; see :func:`time_methods` for
    ``min_seconds``) and compare inertia."""
    fns: dict[str, Callable] = {
        "kcengine": lambda: run_kcengine(wl, seed),
        "exact1d": lambda: run_kcengine(wl, seed, algorithm="exact1d"),
        "torch": lambda: run_torch(wl, seed),
        "sklearn": lambda: run_sklearn(wl, seed),
        "faiss": lambda: run_faiss(wl, seed),
    }
    methods = [m for m in methods if not (m == "exact1d" and wl.name != "d_element")]
    calls: dict = {}
    times, cents, errors = time_methods(wl.name, fns, methods, repeat=repeat, progress=progress,
                                        min_seconds=min_seconds, max_repeat=max_repeat, calls=calls)
    inert = {m: [_inertia(x, c) for x, c in zip(wl.xs, cs)] for m, cs in cents.items()}
    rows = []
    for m in methods:
        note = errors.get(m, "") or (f"best of {calls[m]} calls" if calls[m] > repeat else "")
        row = Row(wl.name, m, wl.n_problems, times[m] if m in cents else float("nan"), note=note)
        if "sklearn" in cents and m in cents:
            row.speedup_vs_sklearn = times["sklearn"] / times[m]
            row.inertia_ratio = _geo_ratio(inert[m], inert["sklearn"])
        rows.append(row)
    return rows


def run_clustering_bench(model: str = "resnet20", *, weights=None, workloads=WORKLOADS, methods=None,
                         max_problems: int | None = None, sweep_step: int = 1, repeat: int = 1, seed: int = 0,
                         progress=None) -> dict:
    """The clustering section of ``kcengine bench``: returns {'source', 'workloads', 'rows'}."""
    layers, source = load_weights(model, weights)
    wls = build_workloads(layers, workloads, max_problems=max_problems, sweep_step=sweep_step)
    methods = list(methods) if methods else available_methods()
    rows = []
    rss0 = peak_rss_mb()
    for wl in wls:
        rows += run_workload(wl, methods, repeat=repeat, seed=seed, progress=progress)
    return {
        "source": source,
        "workloads": [{"name": w.name, "problems": w.n_problems, "of": w.total_problems, "note": w.note,
                       "input_mb": w.bytes / 2**20} for w in wls],
        "rows": rows,
        "peak_rss_mb_before": rss0,
    }


def kcengine_peak_memory(model: str, weights=None, workload: str = "c_kernels", sweep_step: int = 1) -> dict:
    """Peak memory of kcengine on one workload, in a child process that imports only numpy and
    the native core (no torch), so its peak RSS is the input plus what the k-means call allocates."""
    import json
    import subprocess
    import sys
    import tempfile

    from .. import _core

    so = _core.__file__  # loaded alone in the child: the kcengine package would import torch
    layers, _ = load_weights(model, weights)
    wl = build_workloads(layers, [workload], sweep_step=sweep_step)[0]
    with tempfile.TemporaryDirectory() as tmp:
        uniq = {id(x): i for i, x in enumerate({id(x): x for x in wl.xs}.values())}
        arrays = list({id(x): x for x in wl.xs}.values())
        np.savez(f"{tmp}/data.npz", *arrays)
        np.save(f"{tmp}/index.npy", np.array([uniq[id(x)] for x in wl.xs], dtype=np.int64))
        np.save(f"{tmp}/k.npy", np.array(wl.ks, dtype=np.int64))
        code = (
            "import json, resource, sys, numpy as np\n"
            "import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('_core', {so!r})\n"
            "core = importlib.util.module_from_spec(spec); spec.loader.exec_module(core)\n"
            f"z = np.load({tmp + '/data.npz'!r}); data = [np.ascontiguousarray(z[f]) for f in z.files]\n"
            f"idx = np.load({tmp + '/index.npy'!r}); k = np.load({tmp + '/k.npy'!r})\n"
            # VmHWM (peak RSS of this address space): ru_maxrss would carry the parent's peak over fork
            "hwm = lambda: float(next(l for l in open('/proc/self/status')\n"
            "                         if l.startswith('VmHWM')).split()[1]) / 1024\n"
            "before = hwm()\n"
            "core.kmeans_batch_f32(data, None, idx, k, 'k-means++', None, 1, 300, 1e-4, 0, 'auto')\n"
            "after = hwm()\n"
            "print(json.dumps({'input_mb': sum(a.nbytes for a in data) / 2**20, 'rss_before_mb': before,"
            " 'rss_after_mb': after}))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["added_mb"] = res["rss_after_mb"] - res["rss_before_mb"]
    return res


def set_threads(n: int) -> None:
    """Use ``n`` threads in every method: kcengine's OpenMP, scikit-learn's, faiss's and torch's."""
    import os

    import torch

    from .. import _core

    os.environ["OMP_NUM_THREADS"] = str(n)
    _core.set_num_threads(n)
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def rows_table(rows: list[Row]) -> list[dict]:
    return [{"workload": r.workload, "method": r.method, "problems": r.problems, "seconds": r.seconds,
             "x vs sklearn": r.speedup_vs_sklearn, "inertia / sklearn": r.inertia_ratio, "note": r.note}
            for r in rows]


def write_report(results: list[dict], out_dir: Path, name: str = "kmeans_cpu", command: str | None = None) -> Path:
    """Markdown + CSV of one or more clustering runs, with machine, commit, date (and the command, if given)."""
    info = machine_info()
    lines = ["# Batched k-means on CPU: kcengine vs scikit-learn, faiss, torch reference\n",
             f"- date: {now_utc()}", f"- commit: {git_commit()}",
             *([f"- recorded by `{command}`"] if command else []),
             f"- machine: {info.get('cpu')} ({info.get('cores')} cores, {info.get('threads', '?')} threads, "
             f"features {info.get('cpu_features', '?')}); torch {info['torch']}, numpy {info['numpy']}"]
    try:
        import sklearn

        lines.append(f"- scikit-learn {sklearn.__version__}")
    except ImportError:
        pass
    try:
        import faiss

        lines.append(f"- faiss {faiss.__version__}")
    except ImportError:
        pass
    from .. import _core

    lines.append(f"- kcengine solver build: {_core.kmeans_isa()}; threads per method: "
                 f"{results[0].get('threads', 'default')}")
    lines.append("- seconds: best of the repeats, same inputs, methods alternating order; inertia / sklearn: "
                 "geometric mean over problems of the method's inertia divided by scikit-learn's "
                 "(k-means++, n_init=1, tol=1e-4, one KMeans per problem; a problem both solve at inertia 0, "
                 "k = N, counts as 1)")
    csv_rows = []
    for res in results:
        lines.append(f"\n## {res['source']}\n")
        for w in res["workloads"]:
            lines.append(f"- {w['name']}: {w['problems']} problems, input {w['input_mb']:.2f} MB"
                         + (f" ({w['note']})" if w["note"] else ""))
        lines.append("")
        table = rows_table(res["rows"])
        lines.append(markdown_table(table))
        if res.get("memory") and "added_mb" in res["memory"]:
            m = res["memory"]
            lines.append(f"Memory: a process holding only numpy, the native core and the {m['workload']} input "
                         f"({m['input_mb']:.1f} MB) peaks at {m['rss_after_mb']:.0f} MB during the k-means call, "
                         f"{m['added_mb']:.1f} MB above its peak before the call "
                         f"(budget: 2 x input + 200 MB = {2 * m['input_mb'] + 200:.0f} MB).\n")
        for t in table:
            csv_rows.append({"source": res["source"], **t})
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    write_csv(out_dir / f"{name}.csv", csv_rows)
    return md


def isa_comparison(model: str = "resnet20", repeat: int = 3, out_dir: Path | None = None,
                   command: str | None = None, name: str = "kmeans_isa") -> Path:
    """kcengine on the four workloads with each compiled copy of the solver (generic x86-64,
    AVX2, AVX-512), forced through ``KCENGINE_CPU_ISA``: what the portable build's runtime
    dispatch buys on this CPU.  Writes ``<name>.md``."""
    from .. import _core

    layers, source = load_weights(model)
    wls = build_workloads(layers, WORKLOADS, max_problems={"a_sweep": 200, "d_element": 2000})
    isas = runnable_isas()
    rows = []

    def run_as(isa, wl):
        with forced_isa(isa):
            run_kcengine(wl)

    for wl in wls:
        best = time_alternating([lambda isa=isa: run_as(isa, wl) for isa in isas], repeat, warmup=0, flip=True)
        times = dict(zip(isas, best))
        row = {"workload": wl.name, "problems": wl.n_problems}
        for isa in isas:
            row[f"{isa} s"] = times[isa]
        for isa in isas[1:]:
            row[f"{isa} vs generic"] = times["generic"] / times[isa]
        rows.append(row)
    info = machine_info()
    lines = ["# kcengine's k-means solver per instruction set (runtime dispatch)\n",
             f"- date: {now_utc()}", f"- commit: {git_commit()}",
             *([f"- recorded by `{command}`"] if command else []),
             f"- machine: {info.get('cpu')} ({info.get('cores')} cores, {info.get('threads')} threads, features "
             f"{info.get('cpu_features')})",
             f"- {source}; best of {repeat}, copies alternating; the wheel carries all three copies and picks the "
             f"best the CPU supports ({_core.kmeans_isa()} here); `KCENGINE_CPU_ISA` forces one", "",
             markdown_table(rows)]
    out = (out_dir or (repo_root() or Path.cwd()) / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text("\n".join(lines))
    return path


_LARGE_MODEL_CAP = {"a_sweep": 48, "d_element": 4000}
_LARGE_MODEL_CAP_TEXT = ",".join(f"{k}={v}" for k, v in _LARGE_MODEL_CAP.items())


def parse_caps(value: str | None, models) -> int | dict | None:
    """``--max-problems`` as ``build_workloads`` takes it: ``"all"`` -> no cap; ``None`` -> no cap for
    resnet20 alone, else the recorded results' caps (resnet18's a_sweep is 4,780 problems: scikit-learn
    and the torch reference would take hours and ~15 GB on every one; the evenly spaced subset is the
    same for every method); ``"N"`` -> N for every workload; ``"a_sweep=48,..."`` -> per workload."""
    if value == "all":
        return None
    if value is None:
        if all(m == "resnet20" for m in models):
            return None
        print(f"capping the workloads at {_LARGE_MODEL_CAP_TEXT} problems (pass --max-problems all for every one)",
              flush=True)
        return dict(_LARGE_MODEL_CAP)
    if "=" in value:
        return {k: int(v) for k, v in (kv.split("=") for kv in value.split(","))}
    return int(value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="model(s) whose conv weights form the workloads")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--methods", default=None, help=f"comma list of {METHODS}")
    p.add_argument("--max-problems", default=None,
                   help="cap per workload: an int for all, or e.g. a_sweep=48,d_element=4000; 'all' for no cap "
                        "(default: no cap for resnet20; for larger models the cap of the recorded results, "
                        f"{_LARGE_MODEL_CAP_TEXT})")
    p.add_argument("--sweep-step", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for the report (<name>.md, and .csv but with --isa; default bench/results)")
    p.add_argument("--name", default=None, help="report name (default kmeans_cpu, or kmeans_isa with --isa)")
    p.add_argument("--threads", type=int, default=None, help="threads for every method (default: all cores)")
    p.add_argument("--isa", action="store_true", help="compare the solver's instruction-set copies instead")
    argv, command = command_line("kcengine.bench.kmeans", argv)
    args = p.parse_args(argv)
    if args.isa:
        print("wrote", isa_comparison((args.model or ["resnet20"])[0], out_dir=Path(args.out) if args.out else None,
                                      command=command, name=args.name or "kmeans_isa"))
        return 0
    args.max_problems = parse_caps(args.max_problems, args.model or ["resnet20"])
    if args.threads:
        set_threads(args.threads)
    models = args.model or ["resnet20"]
    results = []
    for model in models:
        def prog(w, m):
            print(f"  {model} {w}: {m} done", flush=True)

        res = run_clustering_bench(model, workloads=args.workloads.split(","),
                                   methods=args.methods.split(",") if args.methods else None,
                                   max_problems=args.max_problems, sweep_step=args.sweep_step, repeat=args.repeat,
                                   progress=prog)
        res["memory"] = {"workload": "c_kernels", **kcengine_peak_memory(model, workload="c_kernels")}
        res["threads"] = args.threads or "all cores"
        results.append(res)
        print(markdown_table(rows_table(res["rows"])))
    out = Path(args.out) if args.out else (repo_root() or Path.cwd()) / "bench" / "results"
    print("wrote", write_report(results, out, args.name or "kmeans_cpu", command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
