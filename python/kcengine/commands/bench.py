"""``python -m kcengine bench``: the end-to-end benchmark of a model's compression.

Sections (all by default; choose with --sections):
  clustering  the model's conv weights as batched k-means workloads: kcengine against
              scikit-learn, faiss and the torch reference, same inputs, one run;
  inference   ClusteredConv2d model against the dense model (latency, per layer, bytes);
  accuracy    accuracy against compression (CIFAR ResNets with --data).
The output folder holds report.md, results.json, CSVs and PNG plots.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..cli import UserError

HELP = "benchmark clustering, inference and accuracy of a compressed model (writes a report folder)"
SECTIONS = ("clustering", "inference", "accuracy")


def add_arguments(p) -> None:
    p.add_argument("--model", default="resnet18", help="resnet18/34/50, mobilenet_v3_small, resnet20..110, ...")
    p.add_argument("--weights", default=None, help="checkpoint path (default: pretrained when available)")
    p.add_argument("--data", default=None, help="dataset folder (CIFAR-10 python batches for CIFAR ResNets)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backend", default="auto", help="kcengine backend: auto, cpu, torch, cuda, triton")
    p.add_argument("--ratio", type=float, default=0.25, help="k = round(C_out * ratio) for inference/accuracy")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="small workloads: the whole run in about a minute")
    p.add_argument("--max-problems", type=int, default=None, help="cap problems per clustering workload")
    p.add_argument("--recover-epochs", type=int, default=0, help="short recovery before accuracy (default 0)")
    p.add_argument("--out", default=None, help="output folder (default kcengine-bench-<model>-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout instead of the summary")


def _check_args(args):
    import torch

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise UserError(f"--sections: unknown section {bad[0]!r} (choose from {', '.join(SECTIONS)})")
    if not 0 < args.ratio <= 1:
        raise UserError(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    from .. import _registry

    if args.backend not in ("auto",) + _registry.BACKENDS:
        raise UserError(f"--backend must be auto or one of {', '.join(_registry.BACKENDS)}, got {args.backend!r}")
    if args.backend != "auto":
        reason = _registry.backend_status(args.backend)
        if reason:
            raise UserError(f"--backend {args.backend}: {reason}")
    from ..models import list_models

    if args.model not in list_models():
        raise UserError(f"--model {args.model!r} is not a supported model (try resnet18, resnet50, "
                        f"mobilenet_v3_small, resnet20, resnet56)")
    if args.weights is not None and args.weights not in ("none", "pretrained") and not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights}: no such file")
    if args.data is not None and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: no such folder")
    return sections


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_clustering(args, out: Path) -> dict:
    from ..bench import kmeans as kb
    from ..bench.common import markdown_table, write_csv

    if args.quick:
        caps = dict(max_problems=args.max_problems or 12, sweep_step=8)
    else:
        caps = dict(max_problems=args.max_problems or 48, sweep_step=1)
    weights = None if args.weights in (None, "pretrained") else args.weights
    layers, source = kb.load_weights(args.model, weights if weights != "none" else None)
    wls = kb.build_workloads(layers, kb.WORKLOADS, **caps)
    methods = kb.available_methods(args.device)
    if args.device == "cpu":
        # The torch reference is the GPU baseline; on the CPU it is the slowest method by far
        # (bench/kmeans.py measures it for the recorded tables).
        methods = [m for m in methods if m != "torch"]
    _log(f"[clustering] {source}")
    from tqdm.auto import tqdm

    rows = []
    with tqdm(total=len(wls) * len(methods), desc="clustering", unit="run", leave=False) as bar:
        for wl in wls:
            rows += kb.run_workload(wl, methods, repeat=1, progress=lambda w, m: bar.update(1))
    table = kb.rows_table(rows)
    write_csv(out / "clustering.csv", table)
    _plot_clustering(rows, out / "clustering_speedup.png")
    return {"source": source, "workloads": [{"name": w.name, "problems": w.n_problems, "of": w.total_problems,
                                             "note": w.note} for w in wls],
            "rows": table, "markdown": markdown_table(table)}


def _plot_clustering(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = sorted({r.workload for r in rows})
    methods = [m for m in ("kcengine", "exact1d", "faiss", "torch") if any(r.method == m for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [next((r.speedup_vs_sklearn for r in rows if r.workload == w and r.method == m), float("nan"))
                for w in wls]
        ax.bar([j + i * width for j in range(len(wls))], vals, width, label=m)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(wls))], wls)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("speed-up vs scikit-learn (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    sections = _check_args(args)
    from ..bench.common import git_commit, machine_info, now_utc

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"kcengine-bench-{args.model}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    results = {"model": args.model, "device": args.device, "date": now_utc(), "commit": git_commit(),
               "machine": machine_info(), "sections": {}, "timings_s": {}}
    md = [f"# kcengine bench: {args.model} on {args.device}\n", f"- date: {results['date']}",
          f"- commit: {results['commit']}", f"- machine: {results['machine'].get('cpu')}, "
          f"{results['machine'].get('cores')} cores\n"]
    for section in SECTIONS:
        if section not in sections:
            continue
        t0 = time.perf_counter()
        fn = {"clustering": run_clustering, "inference": run_inference, "accuracy": run_accuracy}[section]
        res = fn(args, out)
        dt = time.perf_counter() - t0
        results["sections"][section] = {k: v for k, v in res.items() if k != "markdown"}
        results["timings_s"][section] = dt
        md.append(f"## {section} ({dt:.1f} s)\n")
        md.append(res.get("markdown", "") + "\n")
        _log(f"[{section}] done in {dt:.1f} s")
    (out / "report.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print("\n".join(md))
        print(f"report: {out / 'report.md'}")
    return 0


def run_inference(args, out: Path) -> dict:
    return {"skipped": "inference section not wired yet", "markdown": "(not run)"}


def run_accuracy(args, out: Path) -> dict:
    return {"skipped": "accuracy section not wired yet", "markdown": "(not run)"}
