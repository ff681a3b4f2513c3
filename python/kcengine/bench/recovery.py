"""Recovery after clustering on the CIFAR sample: accuracy before and after each finetune mode, with time.

``python -m kcengine.bench.recovery --model resnet20 --out bench/results`` trains on the 4,660 sample
training images and scores the 846 test images.  Every conv is clustered at filter granularity with
k = C_out * r; for each r the table gives the accuracy right after clustering, after BN recalibration
only, after the output-aware refit (+ BN), and after each finetune mode; plus a mixed plan with the
same total number of unique filters as r = 0.5 whose per-layer k comes from the output sensitivity
sweep, as ``finetune(plan={"sensitivity": 0.5})`` chooses it (:func:`kcengine.train.sensitivity_plan`: each
layer clustered alone and refit on finetune's 512 calibration images, KL from the dense model's outputs on
1,024 other training images; never the test set).  Rows
are written as they finish (``recovery_<model>.md/.csv``), so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from .common import cifar_sample_model, git_commit, machine_info, markdown_table, now_utc, write_csv

__all__ = ["run", "parse_runs", "parse_set"]

COLUMNS = ["plan", "k_total", "step", "mode", "epochs", "top1", "seconds", "note"]


def _write(out: Path, name: str, rows: list, header: dict, extra: str = "") -> None:
    write_csv(out / f"recovery_{name}.csv", rows)
    lines = [f"# Recovery after clustering: {name} on the CIFAR-10 sample", "",
             f"Measured {header['date']} on {header['machine']}, commit {header['commit']}, by "
             f"`python -m kcengine.bench.recovery {header['args']}`.", "",
             header["setup"], "", markdown_table(rows, COLUMNS), extra]
    (out / f"recovery_{name}.md").write_text("\n".join(lines))


# (plan label, mode, epochs or None for the default): most informative first, so a cut-short run keeps them
DEFAULT_RUNS = (("ratio 0.5", "centroids", None), ("ratio 0.75", "centroids", None),
                ("mixed (0.5 budget)", "centroids", None), ("ratio 0.5", "frozen", None),
                ("ratio 0.5", "progressive", None), ("ratio 0.25", "centroids", None))


def run(model_name: str = "resnet20", out_dir="bench/results", runs=None, threads: int = 2,
        limit_train: int | None = None, name: str | None = None, finetune_options: dict | None = None,
        seeds=None, batch_size: int | None = None) -> Path:
    """Run ``runs`` (tuples (plan label, mode, epochs or None, peak LR or None); default DEFAULT_RUNS) and
    write ``recovery_<name>.md/.csv`` (name: the model's by default) under ``out_dir``.  ``finetune_options``:
    keyword arguments for every :func:`kcengine.finetune` call that override its defaults (ablations; the
    table's header lists them).  ``seeds``: finetune each run once per seed (its shuffling, augmentation
    and mixup draws; the clustering stays k-means seed 0), to show the run-to-run spread; the table
    ends with each plan's mean and range, and no curves are drawn.  ``batch_size``: the training loader's
    (default finetune's ``RECOMMENDED_BATCH``; its default peak LR scales with it)."""
    from .. import compress
    from ..data.datasets import Normalization, cifar10_dataset, make_loader
    from ..evaluate import top1_accuracy
    from ..train import DEFAULT_EPOCHS, finetune, recalibrate_bn
    from ..train.finetune import (DEFAULT_LR, LR_REFERENCE_BATCH, RECOMMENDED_BATCH, default_lr, finetune_defaults,
                                  sensitivity_images)
    from ..train.sensitivity import sensitivity_plan

    if seeds is not None and "seed" in (finetune_options or {}):
        raise ValueError("pass the finetune seed through seeds= or finetune_options, not both")
    seeds = [int(v) for v in seeds] if seeds is not None else None
    torch.set_num_threads(threads)
    lm, data = cifar_sample_model(model_name, "recovery")
    name = name or model_name
    norm = Normalization(lm.mean, lm.std)
    train = cifar10_dataset(data, "train", norm, limit=limit_train)
    test = cifar10_dataset(data, "test", norm)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(train.labels), generator=g)  # shuffle once so the first images mix classes
    train = type(train)(train.images[perm], train.labels[perm], train.classes)
    batch = RECOMMENDED_BATCH if batch_size is None else batch_size
    loader = make_loader(train, batch, shuffle=True, seed=0)
    evald = (test.images, test.labels)
    out = Path(out_dir)
    ft_opts = dict(finetune_options or {})
    args = f"--model {model_name}" + (f" --runs \"{_format_runs(runs)}\"" if runs else "") + "".join(
        f" --set {k}={v!r}" for k, v in ft_opts.items()) + \
        (f" --seeds {','.join(map(str, seeds))}" if seeds is not None else "") + \
        (f" --batch-size {batch}" if batch != RECOMMENDED_BATCH else "") + \
        (f" --name {name}" if name != model_name else "") + (f" --threads {threads}" if threads != 2 else "")
    fd = finetune_defaults()  # the defaults the text names
    header = {"args": args, "date": now_utc(), "commit": git_commit(), "machine": ", ".join(
        f"{k}={v}" for k, v in machine_info().items() if k in ("cpu", "cores", "torch")) + f", threads={threads}",
        "setup": (f"Train: {len(train.labels)} sample training images, batch {batch}; test: {len(test.labels)} images. "
                  "Filter granularity, every conv clustered (kcengine.compress, k-means seed 0). Steps: "
                  "`clustered` = right after clustering; `bn` = BN statistics recalibrated on 512 training "
                  "images (evenly spaced, as finetune takes them); `refit` = output-aware refit of every "
                  "clustered layer (kcengine.train.calibrate: "
                  "centroids and assignment chosen so each layer's outputs match the dense ones up to the "
                  "per-channel affine map the following BN absorbs) + BN; then `kcengine.finetune` in each mode "
                  f"with its defaults (distillation T={fd['temperature']:g}, alpha={fd['alpha']:g} from the dense "
                  f"model, block outputs matched at weight {fd['feature_weight']:g}; SGD Nesterov, one-cycle "
                  f"LR peak {default_lr('sgd', batch):g} ({DEFAULT_LR['sgd']:g} per {LR_REFERENCE_BATCH} images of batch); "
                  "crop+flip; "
                  f"mixup Beta({fd['mixup']:g}, {fd['mixup']:g}); "
                  f"{DEFAULT_EPOCHS['centroids']} "
                  "epochs for centroids), which starts with the refit + BN step. "
                  "`seconds` = wall time of the step (finetune: everything it did, evaluation every epoch included) "
                  "on a machine shared with other jobs (timings are inflated by the sharing).")}
    if ft_opts:
        header["setup"] += " **Finetune options changed from the defaults: " + ", ".join(
            f"{k}={v!r}" for k, v in ft_opts.items()) + ".**"
    rows: list = []
    base = top1_accuracy(lm.model, test.images, test.labels)
    rows.append({"plan": "dense", "k_total": sum(m.out_channels for m in lm.model.modules()
                                                 if isinstance(m, torch.nn.Conv2d)),
                 "step": "baseline", "mode": "", "epochs": 0, "top1": base, "seconds": 0.0, "note": ""})
    _write(out, name, rows, header)
    # the `bn` row recalibrates on the images finetune's refit + BN step takes; the mixed plan is finetune's
    # plan={"sensitivity": 0.5}, measured here once on the images finetune would take for it
    calib_idx, held_idx = sensitivity_images(len(train.images), 512)
    bn_calib = train.images[torch.tensor(calib_idx)]
    runs = list(runs or DEFAULT_RUNS)
    mixed_note, mixed_plan_ks = "", None
    for label, mode, n_ep, *rest in runs:
        run_lr = rest[0] if rest else None
        if label.startswith("mixed"):
            if mixed_plan_ks is None:
                t0 = time.perf_counter()
                mixed_plan_ks = sensitivity_plan(lm.model, bn_calib, train.images[torch.tensor(held_idx)],
                                                 0.5)["layers"]
                mixed_note = (f"plan={{'sensitivity': 0.5}}: output sensitivity (each layer alone, refit on the "
                              f"512 calibration images; KL on {len(held_idx)} other train images) "
                              f"{time.perf_counter() - t0:.0f} s; k: ") + \
                    ", ".join(f"{n}={k}" for n, k in mixed_plan_ks.items())
            plan = {"layers": mixed_plan_ks}
        else:
            plan = {"ratio": float(label.split()[1])}
        if not any(r["plan"] == label for r in rows):
            t0 = time.perf_counter()
            cm, rep = compress(lm.model, plan)
            k_total = sum(lr.k for lr in rep.layers)
            acc = top1_accuracy(cm, test.images, test.labels)
            rows.append({"plan": label, "k_total": k_total, "step": "clustered", "mode": "", "epochs": 0,
                         "top1": acc, "seconds": time.perf_counter() - t0, "note": mixed_note if plan.get("layers")
                         else ""})
            t0 = time.perf_counter()
            bn_only = recalibrate_bn(copy.deepcopy(cm), bn_calib)
            rows.append({"plan": label, "k_total": k_total, "step": "bn", "mode": "", "epochs": 0,
                         "top1": top1_accuracy(bn_only, test.images, test.labels),
                         "seconds": time.perf_counter() - t0, "note": ""})
            _write(out, name, rows, header)
        k_total = next(r["k_total"] for r in rows if r["plan"] == label)
        tag = label.split()[0] + (label.split()[1] if label.startswith("ratio") else "")
        for seed in seeds if seeds is not None else [None]:
            t0 = time.perf_counter()
            opts = run_options(ft_opts, mode, seed)
            res = finetune(lm.model, loader, mode=mode, plan=plan, epochs=n_ep, lr=run_lr, eval_data=evald,
                           progress=False, plot_path=None if seeds is not None else
                           out / f"recovery_{name}_{mode}_{tag}.png", **opts)
            _add_finetune_rows(rows, res, label, k_total, mode, n_ep, run_lr, t0, seed)
            _write(out, name, rows, header, _seed_summary(rows) if seeds is not None else "")
    return out / f"recovery_{name}.md"


_STAGE_OPTIONS = ("order", "stage_epochs", "stage_training")


def run_options(ft_opts: dict, mode: str, seed) -> dict:
    """finetune's options for one run: ``--set``'s (``ft_opts``) and the run's seed; the stage options go to the
    progressive runs only (finetune refuses them in another mode)."""
    opts = dict(ft_opts, **({"seed": seed} if seed is not None else {}))
    if mode != "progressive":
        opts = {k: v for k, v in opts.items() if k not in _STAGE_OPTIONS}
    return opts


def _add_finetune_rows(rows, res, label, k_total, mode, n_ep, run_lr, t0, seed) -> None:
    """Append a finetune result's rows: its refit start (once per plan) and its final accuracy."""
    from ..train import DEFAULT_EPOCHS

    if mode != "progressive" and not any(r["plan"] == label and r["step"] == "refit" for r in rows):
        rows.append({"plan": label, "k_total": k_total, "step": "refit", "mode": "", "epochs": 0,
                     "top1": res.accuracy_start, "seconds": float("nan"),
                     "note": "output-aware refit + BN (finetune's first step)"})
    n_default = DEFAULT_EPOCHS[mode]
    rows.append({"plan": label, "k_total": k_total, "step": "finetune", "mode": mode,
                 "epochs": len(res.history), "top1": res.accuracy, "seconds": time.perf_counter() - t0,
                 "note": ("stages " + " > ".join(s[0].split(".")[0] for s in res.stages) + "; " if res.stages
                          else "") + ("default epochs" if n_ep is None or n_ep == n_default else
                                      f"epochs={n_ep} (default {n_default})")
                 + ("" if run_lr is None else f"; peak LR {run_lr:g} (not finetune's default)")
                 + ("" if seed is None else f"; finetune seed {seed}")})


def _seed_summary(rows) -> str:
    """Markdown lines: mean and range of the finetune top-1 of each (plan, mode) over its seeds."""
    groups: dict = {}
    for r in rows:
        if r["step"] == "finetune":
            groups.setdefault((r["plan"], r["mode"]), []).append(r["top1"])
    lines = ["", "Over the finetune seeds (same clustering, same data; only the order of batches, the "
                 "augmentation and the mixup draws change):", ""]
    for (plan, mode), accs in groups.items():
        lines.append(f"- {plan}, {mode}: mean {100 * sum(accs) / len(accs):.1f}%, range "
                     f"{100 * min(accs):.1f}-{100 * max(accs):.1f}% over {len(accs)} seed{'' if len(accs) == 1 else 's'}")
    return "\n".join(lines) + "\n"


def _format_runs(runs) -> str:
    """The ``--runs`` text that :func:`parse_runs` reads back into ``runs``."""
    items = []
    for label, mode, epochs, *rest in runs:
        plan = "mixed" if label.startswith("mixed") else label.split()[1]
        item = f"{plan}:{mode}"
        lr = rest[0] if rest else None
        if epochs is not None or lr is not None:
            item += f":{'' if epochs is None else epochs}"
        if lr is not None:
            item += f":{lr:g}"
        items.append(item)
    return ";".join(items)


def parse_runs(text: str) -> list[tuple]:
    """``"0.75:centroids:8:0.002;mixed:centroids"`` -> [("ratio 0.75", "centroids", 8, 0.002),
    ("mixed (0.5 budget)", "centroids", None, None)]: PLAN:MODE[:EPOCHS[:LR]], empty EPOCHS = default."""
    runs = []
    for item in text.split(";"):
        parts = item.split(":")
        if len(parts) < 2 or len(parts) > 4:
            raise ValueError(f"--runs item {item!r} is not PLAN:MODE[:EPOCHS[:LR]]")
        label = "mixed (0.5 budget)" if parts[0] == "mixed" else f"ratio {float(parts[0]):g}"
        epochs = int(parts[2]) if len(parts) > 2 and parts[2] else None
        runs.append((label, parts[1], epochs, float(parts[3]) if len(parts) > 3 else None))
    return runs


def parse_set(items) -> dict:
    """``["feature_weight=0", "schedule=cosine"]`` -> ``{"feature_weight": 0, "schedule": "cosine"}``."""
    import ast

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--set {item!r} is not KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=("resnet20", "resnet56"))
    p.add_argument("--out", default="bench/results")
    p.add_argument("--runs", default=None,
                   help="';'-separated PLAN:MODE[:EPOCHS[:LR]], PLAN = a ratio or 'mixed', LR the peak "
                        "learning rate (default: DEFAULT_RUNS with the finetune defaults)")
    p.add_argument("--name", default=None, help="write recovery_NAME.md/.csv (default: the model name)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a finetune default for every run (e.g. --set feature_weight=0); VALUE is read as "
                        "a Python literal, else kept as a string")
    p.add_argument("--batch-size", type=int, default=None,
                   help="training batch (default: finetune's RECOMMENDED_BATCH; its default LR scales with it)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated finetune seeds: each run once per seed (the run-to-run spread)")
    a = p.parse_args(argv)
    seeds = None
    if a.seeds is not None:
        try:
            seeds = [int(v) for v in a.seeds.split(",")]
        except ValueError:
            p.error(f"--seeds must be comma-separated ints, got --seeds {a.seeds!r}")
    path = run(a.model, a.out, parse_runs(a.runs) if a.runs else None, threads=a.threads, name=a.name,
               finetune_options=parse_set(a.set), seeds=seeds, batch_size=a.batch_size)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
