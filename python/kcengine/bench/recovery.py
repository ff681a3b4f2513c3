"""Recovery after clustering on the CIFAR sample: accuracy before and after each finetune mode, with time.

``python -m kcengine.bench.recovery --model resnet20 --out bench/results`` trains on the 4,660 sample
training images and scores the 846 test images.  Every conv is clustered at filter granularity with
k = C_out * r; for each r the table gives the accuracy right after clustering, after BN recalibration
only, after the output-aware refit (+ BN), and after each finetune mode; plus a mixed plan with the
same total number of unique filters as r = 0.5 whose per-layer k comes from the sensitivity sweep
(measured on training images, never on the test set).  Rows are written as they finish
(``recovery_<model>.md/.csv``), so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from .common import git_commit, machine_info, markdown_table, now_utc, shared_data_dir, write_csv

__all__ = ["run", "mixed_plan"]

COLUMNS = ["plan", "k_total", "step", "mode", "epochs", "top1", "seconds", "note"]


def mixed_plan(sens, budget: int) -> dict[str, int]:
    """Per-layer k with ``sum(k) <= budget`` from a sensitivity sweep: start every layer at its largest
    swept k and repeatedly lower the layer whose next smaller k costs the least accuracy per filter saved."""
    ks, accs = {}, {}
    for name in sens.layers():
        rows = sorted(sens.layer_rows(name), key=lambda r: r["k"])
        ks[name] = [r["k"] for r in rows]
        accs[name] = [r["accuracy"] for r in rows]
    pos = {n: len(ks[n]) - 1 for n in ks}
    total = sum(ks[n][pos[n]] for n in ks)
    while total > budget:
        best, best_cost = None, None
        for n in ks:
            i = pos[n]
            if i == 0:
                continue
            saved = ks[n][i] - ks[n][i - 1]
            cost = max(accs[n][i] - accs[n][i - 1], 0.0) / saved
            if best_cost is None or cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            break
        total -= ks[best][pos[best]] - ks[best][pos[best] - 1]
        pos[best] -= 1
    return {n: int(ks[n][pos[n]]) for n in ks}


def _write(out: Path, name: str, rows: list, header: dict, extra: str = "") -> None:
    write_csv(out / f"recovery_{name}.csv", rows)
    lines = [f"# Recovery after clustering: {name} on the CIFAR-10 sample", "",
             f"Measured {header['date']} on {header['machine']}, commit {header['commit']}, by "
             f"`python -m kcengine.bench.recovery --model {name}`.", "",
             header["setup"], "", markdown_table(rows, COLUMNS), extra]
    (out / f"recovery_{name}.md").write_text("\n".join(lines))


def run(model_name: str = "resnet20", out_dir="bench/results", ratios=(0.75, 0.5, 0.25), modes=None,
        epochs: dict | None = None, progressive_ratios=(0.5,), mixed: bool = True, threads: int = 2,
        limit_train: int | None = None) -> Path:
    from .. import compress
    from ..compress import sensitivity_sweep
    from ..data.datasets import Normalization, cifar10_dataset, make_loader
    from ..evaluate import top1_accuracy
    from ..models import load_model
    from ..train import DEFAULT_EPOCHS, finetune, recalibrate_bn
    from ..train.calibrate import calibrate_outputs

    torch.set_num_threads(threads)
    data = shared_data_dir()
    if data is None:
        raise FileNotFoundError("../shared/data is absent (set KCENGINE_DATA): the recovery bench needs the CIFAR "
                                "sample and checkpoints")
    ckpt = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}[model_name]
    lm = load_model(model_name, data / "checkpoints" / ckpt)
    norm = Normalization(lm.mean, lm.std)
    train = cifar10_dataset(data, "train", norm, limit=limit_train)
    test = cifar10_dataset(data, "test", norm)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(train.labels), generator=g)  # shuffle once so the first images mix classes
    train = type(train)(train.images[perm], train.labels[perm], train.classes)
    loader = make_loader(train, 128, shuffle=True, seed=0)
    evald = (test.images, test.labels)
    modes = modes or ("frozen", "centroids", "progressive")
    ep = dict(DEFAULT_EPOCHS)
    ep.update(epochs or {})
    out = Path(out_dir)
    header = {"date": now_utc(), "commit": git_commit(), "machine": ", ".join(
        f"{k}={v}" for k, v in machine_info().items() if k in ("cpu", "cores", "torch")) + f", threads={threads}",
        "setup": (f"Train: {len(train.labels)} sample training images, batch 128; test: {len(test.labels)} images. "
                  "Filter granularity, every conv clustered (kcengine.compress, k-means seed 0). Steps: "
                  "`clustered` = right after clustering; `bn` = BN statistics recalibrated on 512 training "
                  "images; `refit` = output-aware refit of every clustered layer (kcengine.train.calibrate: "
                  "centroids and assignment chosen so each layer's outputs match the dense ones up to the "
                  "per-channel affine map the following BN absorbs) + BN; then `kcengine.finetune` in each mode "
                  "with its defaults (distillation T=4, alpha=0.9 from the dense model; SGD Nesterov, one-cycle "
                  "LR peak 0.01; crop+flip), which starts with the refit + BN step. "
                  "`seconds` = wall time of the step (finetune: everything it did) on a shared machine.")}
    rows: list = []
    base = top1_accuracy(lm.model, test.images, test.labels)
    rows.append({"plan": "dense", "k_total": sum(m.out_channels for m in lm.model.modules()
                                                 if isinstance(m, torch.nn.Conv2d)),
                 "step": "baseline", "mode": "", "epochs": 0, "top1": base, "seconds": 0.0, "note": ""})
    _write(out, model_name, rows, header)
    calib = train.images[:512]
    plans = [(f"ratio {r:g}", {"ratio": r}) for r in ratios]
    if mixed:
        t0 = time.perf_counter()
        sens = sensitivity_sweep(lm.model, train.images[:1000], train.labels[:1000],
                                 ratios=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0))
        _, rep = compress(lm.model, ratio=0.5)
        budget = sum(lr.k for lr in rep.layers)
        ks = mixed_plan(sens, budget)
        mixed_seconds = time.perf_counter() - t0
        plans.append(("mixed (0.5 budget)", {"layers": ks}))
    for label, plan in plans:
        t0 = time.perf_counter()
        cm, rep = compress(lm.model, plan)
        k_total = sum(lr.k for lr in rep.layers)
        acc = top1_accuracy(cm, test.images, test.labels)
        note = f"sensitivity sweep {mixed_seconds:.0f} s; k: " + ", ".join(
            f"{n}={k}" for n, k in plan["layers"].items()) if "layers" in plan else ""
        rows.append({"plan": label, "k_total": k_total, "step": "clustered", "mode": "", "epochs": 0, "top1": acc,
                     "seconds": time.perf_counter() - t0, "note": note})
        t0 = time.perf_counter()
        bn_only = recalibrate_bn(copy.deepcopy(cm), calib)
        rows.append({"plan": label, "k_total": k_total, "step": "bn", "mode": "", "epochs": 0,
                     "top1": top1_accuracy(bn_only, test.images, test.labels), "seconds": time.perf_counter() - t0,
                     "note": ""})
        t0 = time.perf_counter()
        refit = copy.deepcopy(cm)
        calibrate_outputs(refit, lm.model, calib)
        recalibrate_bn(refit, calib)
        rows.append({"plan": label, "k_total": k_total, "step": "refit", "mode": "", "epochs": 0,
                     "top1": top1_accuracy(refit, test.images, test.labels), "seconds": time.perf_counter() - t0,
                     "note": ""})
        _write(out, model_name, rows, header)
        del bn_only, refit
        for mode in modes:
            if mode == "progressive" and not (label.startswith("ratio") and float(label.split()[1])
                                              in progressive_ratios):
                continue
            t0 = time.perf_counter()
            res = finetune(lm.model, loader, mode=mode, plan=plan, epochs=ep[mode], eval_data=evald,
                           progress=False, plot_path=out / f"recovery_{model_name}_{mode}_{label.split()[0]}"
                           f"{label.split()[1] if label.startswith('ratio') else ''}.png"
                           if (mode == "centroids" and label == "ratio 0.5") else None)
            n_ep = len(res.history)
            rows.append({"plan": label, "k_total": k_total, "step": "finetune", "mode": mode, "epochs": n_ep,
                         "top1": res.accuracy, "seconds": time.perf_counter() - t0,
                         "note": ("stages " + " > ".join(s[0].split(".")[0] for s in res.stages)
                                  if res.stages else "") + f" start {100 * (res.accuracy_start or 0):.1f}%"})
            _write(out, model_name, rows, header)
    _write(out, model_name, rows, header)
    return out / f"recovery_{model_name}.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=("resnet20", "resnet56"))
    p.add_argument("--out", default="bench/results")
    p.add_argument("--ratios", default="0.75,0.5,0.25")
    p.add_argument("--modes", default="frozen,centroids,progressive")
    p.add_argument("--epochs", default="", help="mode=N,... overriding kcengine.train.DEFAULT_EPOCHS")
    p.add_argument("--no-mixed", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    eps = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in a.epochs.split(",") if kv}
    path = run(a.model, a.out, tuple(float(r) for r in a.ratios.split(",")), tuple(a.modes.split(",")), eps,
               mixed=not a.no_mixed, threads=a.threads)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
