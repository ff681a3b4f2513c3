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
# what the command writes in --out (cli.main refuses a folder standing at one of these names before any work)
OUT_FILES = ("report.md", "results.json", "clustering.csv", "clustering_kernels.csv", "clustering_speedup.png",
             "inference.csv", "inference_layers.csv", "inference_layers.png", "accuracy.csv", "accuracy_vs_unique.png")


def add_arguments(p) -> None:
    p.add_argument("--model", default="resnet18",
                   help="resnet18/34/50, mobilenet_v3_small, resnet20..110, ... (default resnet18)")
    p.add_argument("--weights", default=None,
                   help="'pretrained', 'none' (default init) or a checkpoint PATH (default: ../shared/data's "
                        "checkpoint for a CIFAR ResNet, else pretrained weights from the hub cache, else default init)")
    p.add_argument("--data", default=None,
                   help="CIFAR-10 python-batches folder for the accuracy section, which CIFAR ResNets alone run "
                        "(default ../shared/data's when present, else the section is skipped)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="(default cpu)")
    p.add_argument("--backend", default="auto",
                   help="kcengine's k-means backend: auto, cpu, torch, cuda, triton (default auto). It clusters the "
                        "inference and accuracy sections' models; in the clustering table, --device cpu times the "
                        "cpu backend as `kcengine` and --backend torch adds the torch reference's row; --device "
                        "cuda times cuda or triton as named (auto, torch: both) beside the torch reference")
    p.add_argument("--ratio", type=float, default=0.25,
                   help="k = round(C_out * ratio) for the inference section (default 0.25); the accuracy section "
                        "scores its own set of plans (ratios 0.75, 0.5, 0.25, relative inertia 0.5, elbow)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma list of " + ", ".join(SECTIONS) + " (default: all)")
    p.add_argument("--quick", action="store_true", help="small workloads: the whole run in about a minute")
    p.add_argument("--max-problems", type=int, default=None,
                   help="cap problems per clustering workload (default: a_sweep 32 and d_element 2000 evenly spaced "
                        "problems, the others whole; --quick: 12 each, d_element 200)")
    p.add_argument("--recover-epochs", type=int, default=0,
                   help="finetune each clustered model this many epochs (finetune's recipe: output-aware refit, then "
                        "centroids mode with distillation) and report "
                        "the recovered accuracy too (default 0)")
    p.add_argument("--out", default=None, help="output folder (default kcengine-bench-<model>-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout instead of the summary")


def _check_args(args):
    import torch

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise UserError(f"--sections: unknown section {bad[0]!r} (choose from {', '.join(SECTIONS)})")
    if not sections:
        raise UserError(f"--sections {args.sections!r} names no section (choose from {', '.join(SECTIONS)})")
    if args.recover_epochs < 0:
        raise UserError(f"--recover-epochs must be >= 0, got {args.recover_epochs}")
    if not 0 < args.ratio <= 1:
        raise UserError(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    from .eval import check_backend_arg

    check_backend_arg(args.backend)
    if args.device == "cpu" and args.backend in ("cuda", "triton"):
        raise UserError(f"--backend {args.backend} clusters on the GPU: use it with --device cuda")
    if args.device == "cuda" and args.backend == "cpu":
        raise UserError("--backend cpu clusters on the CPU: use it with --device cpu")
    from ..models import list_models

    if args.model not in list_models():
        raise UserError(f"--model {args.model!r} is not a supported model (try resnet18, resnet50, "
                        f"mobilenet_v3_small, resnet20, resnet56)")
    if args.weights is not None and args.weights.lower() in ("none", "pretrained"):
        args.weights = args.weights.lower()  # as eval and prune read them
    if args.weights is not None and args.weights not in ("none", "pretrained"):
        from ..conv.serialize import is_compressed_file

        if Path(args.weights).is_dir():
            raise UserError(f"--weights {args.weights}: a folder, not a checkpoint file")
        if not Path(args.weights).is_file():
            raise UserError(f"--weights {args.weights}: no such file")
        if is_compressed_file(args.weights):
            raise UserError(f"--weights {args.weights}: a clustered model (a save_compressed file, as prune and "
                            f"finetune --out write); bench clusters a dense model itself: pass the dense weights "
                            f"(evaluate a clustered model with `kcengine eval --weights`)")
    if args.max_problems is not None and args.max_problems < 1:
        raise UserError(f"--max-problems must be >= 1, got {args.max_problems}")
    if args.data is not None and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: no such folder")
    _check_data(args, sections)
    return sections


def _check_data(args, sections) -> None:
    """A --data folder of the wrong layout is the user's mistake: said before the other sections run (minutes),
    not when the accuracy section reaches it."""
    from ..models import is_cifar_model

    if args.data is None or "accuracy" not in sections or not is_cifar_model(args.model):
        return
    from ..data.cifar import _FILES, find_cifar10, read_cifar10

    try:  # read, not only looked for: a damaged batch was found after the clustering section had written its files
        folder = find_cifar10(args.data)
        missing = [n for n in _FILES["test"] + (_FILES["train"] if args.recover_epochs else []) if
                   not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} missing from {folder}")
        for split in ("test", "train") if args.recover_epochs else ("test",):
            read_cifar10(folder, split)
    except Exception as exc:
        raise UserError(f"--data {args.data}: not a CIFAR-10 python-batches folder ({exc})") from None


def _log(msg: str) -> None:
    """Progress lines go to stderr, so stdout carries only the summary (or the JSON)."""
    import sys

    print(msg, file=sys.stderr, flush=True)


# The CPU clustering table: a method whose calls add up to less than this runs again, up to QUICK_CALLS_MAX
# calls in all (time_methods' min_seconds / max_repeat).
QUICK_CALLS_SECONDS, QUICK_CALLS_MAX = 1.0, 5


def run_clustering(args, out: Path) -> dict:
    from ..bench import kmeans as kb
    from ..bench.common import markdown_table, write_csv

    if args.max_problems:
        caps = dict(max_problems=args.max_problems, sweep_step=8 if args.quick else 1)
    elif args.quick:
        caps = dict(max_problems={"a_sweep": 12, "b_filters": 12, "c_kernels": 12, "d_element": 200}, sweep_step=8)
    else:  # sized so the default run takes minutes; 1-D problems are cheap, so many more of them
        caps = dict(max_problems={"a_sweep": 32, "d_element": 2000}, sweep_step=1)
    if args.weights == "none":  # the default initialization here too, as in the other sections
        import torch

        from ..models import load_model

        torch.manual_seed(0)
        layers = kb.conv_weights(load_model(args.model, None).model)
        source = f"{args.model} with its default initialization (seed 0; --weights none)"
    else:
        from ..models.checkpoints import MissingWeightsError

        try:  # an explicit --weights pretrained that cannot be had is an error, as in the other sections
            layers, source = kb.load_weights(args.model, None if args.weights == "pretrained" else args.weights,
                                             require_trained=args.weights == "pretrained")
        except MissingWeightsError as exc:
            raise UserError(str(exc)) from None
        except Exception as exc:  # a checkpoint of another model, or no checkpoint at all: before any work
            raise _weights_error(args, exc) from None
    if args.quick:  # the first layers only: the smallest problems of every workload kind
        layers = layers[:6]
        source += "; --quick: the first 6 conv layers"
    wls = kb.build_workloads(layers, kb.WORKLOADS, **caps)
    _log(f"[clustering] {source}")
    from tqdm.auto import tqdm

    if args.device == "cuda":
        from .. import _registry
        from ..bench import kmeans_gpu as kg

        if not args.quick:
            wls.append(kg.large_workload(layers))
        methods = [m for m in ("cuda", "triton") if _registry.backend_status(m) is None] + ["torch"]
        if args.backend not in ("auto", "torch"):
            methods = [args.backend, "torch"]
        methods += [m for m in kb.available_methods("cpu") if m == "sklearn"]
        ceilings = kg.device_ceilings()
        table, kernels = [], []
        with tqdm(total=len(wls) * len(methods), desc="clustering (cuda)", unit="run", leave=False) as bar:
            for wl in wls:
                # the torch reference, like scikit-learn, takes minutes on e_large
                rows, ks = kg.run_gpu_workload(wl, methods, ceilings=ceilings, progress=lambda w, m: bar.update(1),
                                               skip_on_large=kg.SLOW_ON_LARGE + ("torch",))
                table += rows
                kernels += ks
        write_csv(out / "clustering_kernels.csv", kernels)
        extra = ("\nKernels (fraction of the device's measured ceilings):\n\n" + markdown_table(kernels)
                 if kernels else "")
        timing = ""
    else:
        methods = kb.available_methods("cpu")
        # The torch reference is the GPU baseline; on the CPU it is the slowest method by far
        # (python -m kcengine.bench.kmeans measures it for the recorded tables): timed with --backend torch only.
        methods = [m for m in methods if m != "torch" or args.backend == "torch"]
        rows = []
        with tqdm(total=len(wls) * len(methods), desc="clustering", unit="run", leave=False) as bar:
            for wl in wls:
                rows += kb.run_workload(wl, methods, repeat=1, progress=lambda w, m: bar.update(1),
                                        min_seconds=QUICK_CALLS_SECONDS, max_repeat=QUICK_CALLS_MAX)
        table, extra = kb.rows_table(rows), ""
        timing = (f"\n\nseconds: best call, same inputs; each method runs once, and one whose calls add up to less "
                  f"than {QUICK_CALLS_SECONDS:g} s runs again until they do (at most {QUICK_CALLS_MAX} calls; the note "
                  f"says so): on a shared machine a call of milliseconds is easily disturbed, one of a minute averages "
                  f"that out.")
    write_csv(out / "clustering.csv", table)
    _plot_clustering(table, out / "clustering_speedup.png")
    return {"source": source, "workloads": [{"name": w.name, "problems": w.n_problems, "of": w.total_problems,
                                             "note": w.note} for w in wls],
            "rows": table, "markdown": source + timing + "\n\n" + markdown_table(table) + extra}


def _plot_clustering(rows, path: Path) -> None:
    from .._plot import figure, save

    wls = sorted({r["workload"] for r in rows})
    methods = [m for m in ("kcengine", "exact1d", "cuda", "triton", "faiss", "torch")
               if any(r["method"] == m for r in rows)]
    fig = figure((7, 3.5))
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [next((r["x vs sklearn"] for r in rows if r["workload"] == w and r["method"] == m), float("nan"))
                for w in wls]
        ax.bar([j + i * width for j in range(len(wls))], vals, width, label=m)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(wls))], wls)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("speed-up vs scikit-learn (log)")
    ax.legend(fontsize=8)
    save(fig, path, dpi=110)


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
    summary = _summary(results)
    results["summary"] = summary
    from ..bench.common import markdown_table

    md.append("## Summary\n")
    md.append(markdown_table(summary))
    (out / "report.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(markdown_table(summary))
        print(f"full report: {out / 'report.md'} (results.json, CSVs and plots beside it)")
    return 0


def _weights_error(args, exc) -> UserError:
    """--weights PATH that does not load into --model, in every section's words."""
    return UserError(f"--weights {args.weights}: could not be loaded into {args.model} ({exc})")


def _load(args):
    """(LoadedModel, line on the weights) with pretrained weights when available, else default init."""
    import torch

    from ..models import load_model
    from ..models.checkpoints import MissingWeightsError

    torch.manual_seed(0)
    if args.weights == "none":
        return load_model(args.model, None), "default initialization (--weights none)"
    if args.weights not in (None, "pretrained"):
        try:
            lm = load_model(args.model, args.weights)
        except Exception as exc:
            raise _weights_error(args, exc) from None
        return lm, f"weights from {args.weights}"
    if args.weights == "pretrained":  # the published file beside the shared data, as eval's --weights pretrained
        from .eval import _shared_copy_of_pretrained

        local = _shared_copy_of_pretrained(args.model)
        if local is not None:
            return load_model(args.model, local), f"weights from {Path(local).name}"
    if args.weights is None:
        from ..bench.common import shared_data_dir

        data = shared_data_dir()
        cands = sorted((data / "checkpoints").glob(f"{args.model}-*.th")) if data else []
        if cands:
            return load_model(args.model, str(cands[0])), f"weights from {cands[0].name}"
    try:
        lm = load_model(args.model, "pretrained", allow_download=False)
        return lm, f"pretrained weights {lm.weights}"
    except MissingWeightsError as exc:
        if args.weights == "pretrained":
            raise UserError(str(exc)) from None
        torch.manual_seed(0)
        return load_model(args.model, None), "default initialization (no pretrained weights here)"


def _summary(results: dict) -> list[dict]:
    """One row per headline figure of each section that ran, then the time each section took."""
    rows = []
    sec = results["sections"]
    for r in sec.get("clustering", {}).get("rows", []):
        if r["method"] in ("kcengine", "cuda", "triton") and r.get("x vs sklearn") == r.get("x vs sklearn"):
            rows.append({"what": f"clustering {r['workload']}: {r['method']} vs scikit-learn",
                         "value": f"{r['x vs sklearn']:.1f}x faster, inertia x{r['inertia / sklearn']:.3f}"})
    by_batch: dict = {}
    for r in sec.get("inference", {}).get("rows", []):
        by_batch.setdefault(r["batch"], []).append(r)
    for n, rs in by_batch.items():  # channels-last (the fast layout) first, then the others as measured
        rs = sorted(rs, key=lambda r: r.get("memory_format") != "channels_last")
        vals = [f"{r['speedup']:.2f}x {r.get('memory_format', '')}".rstrip() for r in rs]
        rows.append({"what": f"inference batch {n}: clustered vs dense", "value": ", ".join(vals)})
    for r in sec.get("inference", {}).get("sizes", []):
        rows.append({"what": r["what"], "value": f"{r['ratio']:.2f}x smaller"})
    acc = [r for r in sec.get("accuracy", {}).get("rows", []) if r.get("accuracy_after") is not None]
    if acc:
        base = acc[0]["accuracy_before"]
        rows.append({"what": "accuracy of the dense model", "value": f"{100 * base:.2f}%"})
        for r in acc:
            val = f"{100 * r['accuracy_after']:.2f}% at {r['compression']:.2f}x fewer unique weights"
            if r.get("accuracy_recovered") is not None:
                val += f", {100 * r['accuracy_recovered']:.2f}% after {r['recover_epochs']} epochs"
            rows.append({"what": f"accuracy {r['granularity']} {r['plan']}", "value": val})
    elif "accuracy" in sec:
        rows.append({"what": "accuracy", "value": sec["accuracy"].get("skipped", "not run")})
    for name, t in results["timings_s"].items():
        rows.append({"what": f"time of the {name} section", "value": f"{t:.1f} s"})
    return rows


def run_inference(args, out: Path) -> dict:
    """Dense model vs the same model with every conv clustered (filter, k = C_out * ratio), BN,
    residual add and ReLU fused into the gather: latency per batch size, per-layer, bytes."""
    import os
    import tempfile

    import torch
    import torch.nn as nn

    from ..bench.baselines import PackedDenseConv, frozen_dense
    from ..bench.common import keep_freed_memory_mapped, markdown_table, time_against, time_alternating, write_csv
    from ..compress import compress
    from ..conv import ClusteredConv2d, fuse_for_inference, save_compressed

    lm, src = _load(args)
    _log(f"[inference] {args.model}: {src}; clustering every conv at ratio {args.ratio}")
    # no time below depends on page faults from what the process freed before (both sides alike)
    allocator = keep_freed_memory_mapped() or "the C library's malloc as the process left it"
    import copy

    clustered, report = compress(lm.model, ratio=args.ratio, granularity="filter", seed=0, backend=args.backend)
    clustered.eval()
    # The dense baseline carries the same (clustered) weights as ordinary Conv2d layers, so the
    # two models compute the same function and their outputs can be compared.
    dense = copy.deepcopy(lm.model).eval()
    with torch.no_grad():
        for name, m in clustered.named_modules():
            if isinstance(m, ClusteredConv2d):
                dense.get_submodule(name).weight.copy_(m.to_dense())
    try:
        fast = fuse_for_inference(clustered)
        fused = "BN, residual add and ReLU fused into the gather"
    except ValueError as exc:
        fast, fused = clustered, f"not fused ({exc})"
    h, w = lm.input_size
    if args.quick:
        h, w = min(h, 112), min(w, 112)
    batches = (1, 8) if args.quick else (1, 32)
    repeat = {1: 5, 8: 2, 32: 2} if args.quick else {1: 10, 32: 3}
    # ...and more rounds where calls are short (CIFAR models: a round of milliseconds): half a second a row,
    # a tenth per layer
    min_seconds = 0.25 if args.quick else 0.5
    rows = []
    from tqdm.auto import tqdm

    # Both models in each memory format (input and weights): NCHW, torch's default, and channels-last, the
    # faster one on the CPU for both sides.
    formats = (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last))
    # The dense model at its stock-PyTorch best (BN folded, weights prepacked, ReLU fused), channels-last,
    # built once: the ratio against it is what clustering itself buys (see kcengine.bench.baselines).
    frozen, frozen_why = frozen_dense(dense.to(memory_format=torch.channels_last),
                                      torch.randn(1, 3, h, w).contiguous(memory_format=torch.channels_last))
    for n in tqdm(batches, desc="inference", leave=False):
        torch.manual_seed(n)
        x0 = torch.randn(n, 3, h, w)
        for fmt_name, fmt in formats:
            x = x0.contiguous(memory_format=fmt)
            dense, fast = dense.to(memory_format=fmt), fast.to(memory_format=fmt)
            td, tc, err = time_against(lambda: dense(x), lambda: fast(x), repeat.get(n, 2), flip=True,
                                       min_seconds=min_seconds)
            rows.append({"batch": n, "input": f"{h}x{w}", "memory_format": fmt_name, "dense_ms": td * 1e3,
                         "clustered_ms": tc * 1e3, "speedup": td / tc, "rel_diff_vs_dense": err})
        if frozen is not None:
            x = x0.contiguous(memory_format=torch.channels_last)
            fast = fast.to(memory_format=torch.channels_last)
            tj, tc, err = time_against(lambda: frozen(x), lambda: fast(x), repeat.get(n, 2), flip=True,
                                       min_seconds=min_seconds)
            rows.append({"batch": n, "input": f"{h}x{w}", "memory_format": "channels_last, dense frozen",
                         "dense_ms": tj * 1e3, "clustered_ms": tc * 1e3, "speedup": tj / tc, "rel_diff_vs_dense": err})
    # Per-layer: each conv alone on its real input (batch 1, channels-last), dense Conv2d vs ClusteredConv2d.
    inputs: dict = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: inputs.__setitem__(name, i[0].detach()))
             for name, m in dense.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.inference_mode():
        dense(torch.randn(1, 3, h, w).contiguous(memory_format=torch.channels_last))
    for hk in hooks:
        hk.remove()
    layer_rows = []
    clustered.to(memory_format=torch.channels_last)
    cl_mods = dict(clustered.named_modules())
    with torch.inference_mode():
        for name, xin in inputs.items():
            xin = xin.contiguous(memory_format=torch.channels_last)
            conv, cl = dense.get_submodule(name), cl_mods.get(name)
            if not isinstance(cl, ClusteredConv2d):
                continue
            # dense: the same stored-reorder oneDNN path as the clustered layer's conv; eager Conv2d beside it
            packed = PackedDenseConv.from_conv(conv)
            td, tc, te = time_alternating((lambda: packed(xin), lambda: cl(xin), lambda: conv(xin)), 3, flip=True,
                                          min_seconds=min_seconds / 5)
            layer_rows.append({"layer": name, "shape": f"{conv.in_channels}->{conv.out_channels} "
                               f"{conv.kernel_size[0]}x{conv.kernel_size[1]}/{conv.stride[0]}",
                               "k": cl.num_clusters, "dense_ms": td * 1e3, "clustered_ms": tc * 1e3,
                               "speedup": td / tc, "dense_eager_ms": te * 1e3, "speedup_vs_eager": te / tc})
    with tempfile.TemporaryDirectory() as tmp:
        dpath = os.path.join(tmp, "dense.pt")
        torch.save(dense.state_dict(), dpath)
        dense_bytes = os.path.getsize(dpath)
        comp_bytes = save_compressed(clustered, os.path.join(tmp, "clustered.pt"))

    def param_bytes(m):
        return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    write_csv(out / "inference.csv", rows)
    write_csv(out / "inference_layers.csv", layer_rows)
    _plot_layers(layer_rows, out / "inference_layers.png")
    summary = [{"what": "checkpoint bytes", "dense": dense_bytes, "clustered": comp_bytes,
                "ratio": dense_bytes / comp_bytes},
               {"what": "parameter + buffer bytes in memory", "dense": param_bytes(dense),
                "clustered": param_bytes(clustered), "ratio": param_bytes(dense) / param_bytes(clustered)},
               {"what": "unique conv weights", "dense": report.total_conv_weights,
                "clustered": report.model_unique_weights, "ratio": report.compression_ratio}]
    frozen_note = ("`channels_last, dense frozen`: the dense model as TorchScript frozen for inference (BN folded, "
                   "weights prepacked, ReLU fused), its strongest stock-PyTorch CPU form, against the same clustered "
                   "model" if frozen is not None else f"no frozen dense baseline here ({frozen_why})")
    md = (f"{src}; every conv clustered at k = round(C_out * {args.ratio}) (filter granularity), {fused}. "
          f"{frozen_note}. Allocator: {allocator}.\n\n"
          + markdown_table(rows) + "\nPer layer (batch 1, channels-last, each conv alone on its real input; no "
          "fusion; dense = the dense weight through the same stored-reorder oneDNN path as the clustered conv, "
          "`dense_eager_ms` = the eager Conv2d, which reorders its weight on every call):\n\n"
          + markdown_table(layer_rows) + "\n" + markdown_table(summary))
    return {"source": src, "rows": rows, "layers": layer_rows, "sizes": summary, "allocator": allocator,
            "markdown": md}


def _plot_layers(rows, path: Path) -> None:
    if not rows:
        return
    from .._plot import figure, save

    fig = figure((max(6, 0.35 * len(rows)), 3.5))
    ax = fig.subplots()
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["dense_ms"] for r in rows], 0.4, label="dense")
    ax.bar([i + 0.2 for i in xs], [r["clustered_ms"] for r in rows], 0.4, label="clustered")
    ax.set_xticks(list(xs), [r["layer"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("ms (batch 1)")
    ax.legend(fontsize=8)
    save(fig, path, dpi=110)


def run_accuracy(args, out: Path) -> dict:
    """Accuracy against compression for fixed ratios and the inertia/elbow plans (CIFAR ResNets
    with --data).  Without weights and data the section says why in one line and is skipped."""
    from ..bench.common import markdown_table, shown_path, write_csv
    from ..models import is_cifar_model

    if not is_cifar_model(args.model):
        line = (f"skipped: the accuracy section runs CIFAR ResNets only (15 compressed variants scored on an "
                f"ImageNet-style folder would take hours on a CPU); for {args.model}: kcengine prune --model "
                f"{args.model} --weights W --data FOLDER --ratio 0.5")
        _log(f"[accuracy] {line}")
        return {"skipped": line, "markdown": line}
    from .eval import cifar_root

    data_dir = cifar_root(args.data)
    if data_dir is None or (args.data is None and not data_dir.is_dir()):
        import os

        env = os.environ.get("KCENGINE_DATA")
        line = "skipped: no --data folder given (a CIFAR-10 python-batches folder)" + (
            f", and KCENGINE_DATA={env} is not a folder" if env and not Path(env).is_dir() else "")
        _log(f"[accuracy] {line}")
        return {"skipped": line, "markdown": line}
    from ..compress import compress
    from ..data.cifar import read_cifar10
    from ..data.datasets import Normalization, normalize_uint8

    try:  # a data folder of the wrong layout is the user's mistake: say so before anything else
        split = read_cifar10(data_dir, "test")
    except Exception as exc:
        raise UserError(f"--data {data_dir}: not a CIFAR-10 python-batches folder ({exc})") from None
    lm, src = _load(args)
    if not lm.pretrained:
        line = f"skipped: {args.model} has no trained weights here ({src}); accuracy would be meaningless"
        _log(f"[accuracy] {line}")
        return {"skipped": line, "markdown": line}
    images = normalize_uint8(split.images, Normalization(lm.mean, lm.std))
    if args.quick:
        images, labels = images[:256], split.labels[:256]
    else:
        labels = split.labels
    plans = [("ratio 0.75", dict(ratio=0.75)), ("ratio 0.5", dict(ratio=0.5)), ("ratio 0.25", dict(ratio=0.25)),
             ("relative inertia 0.5", dict(plan={"relative_inertia": 0.5})),
             ("elbow", dict(plan={"elbow": True}))]
    grans = ("filter", "kernel", "element")
    if args.quick:  # kernel-granularity models are the slowest to evaluate on a CPU
        plans, grans = plans[1:2], ("filter", "element")
    rows = []
    from tqdm.auto import tqdm

    train_loader = None
    if args.recover_epochs:
        from ..data.datasets import TensorImages, make_loader
        from ..train.finetune import RECOMMENDED_BATCH

        try:
            tr = read_cifar10(data_dir, "train")
        except Exception as exc:
            raise UserError(f"--recover-epochs needs the training batches in {data_dir} ({exc})") from None
        train_loader = make_loader(TensorImages(normalize_uint8(tr.images, Normalization(lm.mean, lm.std)), tr.labels),
                                   batch_size=RECOMMENDED_BATCH, shuffle=True, seed=0)
    for gran in grans:
        for name, kw in tqdm(plans, desc=f"accuracy ({gran})", leave=False):
            try:
                small, rep = compress(lm.model, granularity=gran, eval_data=(images, labels), seed=0,
                                      backend=args.backend, **kw)
            except ValueError as exc:
                rows.append({"granularity": gran, "plan": name, "note": str(exc)[:80]})
                continue
            row = {"granularity": gran, "plan": name, "accuracy_before": rep.accuracy_before,
                   "accuracy_after": rep.accuracy_after, "unique_ratio": 1 / rep.compression_ratio,
                   "compression": rep.compression_ratio, "seconds": rep.seconds_total}
            if train_loader is not None and gran != "element":
                from ..train import finetune

                t0 = time.perf_counter()
                # the recipe: refit to the dense layers (filter granularity), then train the codebooks
                res = finetune(small, train_loader, mode="centroids", teacher=lm.model, epochs=args.recover_epochs,
                               output_calibration=True, eval_data=(images, labels), progress=False)
                row.update(accuracy_recovered=res.accuracy, recover_epochs=args.recover_epochs,
                           recover_seconds=time.perf_counter() - t0)
            rows.append(row)
    write_csv(out / "accuracy.csv", rows)
    _plot_accuracy(rows, out / "accuracy_vs_unique.png")
    md = f"{src}; {len(labels)} test images of {shown_path(data_dir)}\n\n" + markdown_table(rows)
    return {"source": src, "rows": rows, "markdown": md}


def _plot_accuracy(rows, path: Path) -> None:
    from .._plot import figure, save

    fig = figure((6, 4))
    ax = fig.subplots()
    for gran in ("filter", "kernel", "element"):
        pts = [(r["unique_ratio"], r["accuracy_after"]) for r in rows if r.get("granularity") == gran
               and r.get("accuracy_after") is not None]
        if pts:
            pts.sort()
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=gran)
        rec = sorted((r["unique_ratio"], r["accuracy_recovered"]) for r in rows if r.get("granularity") == gran
                     and r.get("accuracy_recovered") is not None)
        if rec:
            ax.plot([p[0] for p in rec], [100 * p[1] for p in rec], "s--", label=f"{gran}, recovered")
    base = next((r["accuracy_before"] for r in rows if r.get("accuracy_before") is not None), None)
    if base is not None:
        ax.axhline(100 * base, color="k", ls="--", lw=0.8, label="dense")
    ax.set_xlabel("unique / total conv weights")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=8)
    save(fig, path, dpi=110)
