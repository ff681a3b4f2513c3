"""Adversarial robustness of clustered models on the CIFAR sample: accuracy under FGSM and PGD, dense against
clustered-and-recovered, on the same 846 test images.

``python -m kcengine.bench.robustness --model resnet20`` loads the public checkpoint from ../shared/data, clusters
every conv at k = C_out * r for each ``--ratios`` value (filter granularity, k-means seed 0), recovers each with
``kcengine.finetune``'s defaults (training on the 4,660 sample training images, as bench/results/recovery_*.md),
and attacks the dense model and each recovered one with every ``--attacks`` item
(:func:`kcengine.evaluate.adversarial_accuracy`, L-infinity in [0, 1] pixel units, attack seed 0).  Writes
``robustness_<name>.md/.csv``; rows are written as they finish.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .common import cifar_sample_model, git_commit, machine_info, markdown_table, now_utc, write_csv

__all__ = ["run", "parse_attacks"]

COLUMNS = ["model", "unique_filters", "attack", "eps", "clean_top1", "robust_top1", "seconds", "note"]
DEFAULT_ATTACKS = "fgsm:1,fgsm:2,pgd:1,pgd:2"


def parse_attacks(text: str) -> list[tuple[str, float]]:
    """``"fgsm:1,pgd:2"`` -> ``[("fgsm", 1/255), ("pgd", 2/255)]`` (eps given in 1/255 units)."""
    out = []
    for item in text.split(","):
        name, sep, eps = item.strip().partition(":")
        try:
            val = float(eps) / 255
        except ValueError:
            val = float("nan")
        if not sep or name not in ("fgsm", "pgd") or not 0 <= val <= 1:
            raise ValueError(f"--attacks item {item!r} is not fgsm:N or pgd:N with eps = N/255 in [0, 1]")
        out.append((name, val))
    return out


def run(model_name: str = "resnet20", out_dir="bench/results", ratios=(0.75, 0.5), attacks=DEFAULT_ATTACKS,
        steps: int = 10, threads: int = 2, name: str | None = None, epochs: int | None = None) -> Path:
    """Measure and write ``robustness_<name>.md/.csv`` (see the module docstring); returns the .md path."""
    from ..conv import ClusteredConv2d
    from ..data.datasets import Normalization, cifar10_dataset, make_loader
    from ..evaluate import adversarial_accuracy
    from ..evaluate.robustness import eps_text
    from ..train import finetune
    from ..train.finetune import RECOMMENDED_BATCH

    attack_list = parse_attacks(attacks) if isinstance(attacks, str) else list(attacks)
    torch.set_num_threads(threads)
    lm, data = cifar_sample_model(model_name, "robustness")
    name = name or model_name
    norm = Normalization(lm.mean, lm.std)
    test = cifar10_dataset(data, "test", norm)
    evald = (test.images, test.labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = f"--model {model_name} --ratios {','.join(f'{r:g}' for r in ratios)} --attacks " + \
        ",".join(f"{a}:{e * 255:g}" for a, e in attack_list) + (f" --steps {steps}" if steps != 10 else "") + \
        (f" --epochs {epochs}" if epochs is not None else "") + (f" --name {name}" if name != model_name else "") + \
        (f" --threads {threads}" if threads != 2 else "")
    machine = ", ".join(f"{k}={v}" for k, v in machine_info().items() if k in ("cpu", "cores", "torch"))
    head = [f"# Adversarial robustness: {name} on the CIFAR-10 sample, dense against clustered and recovered", "",
            f"Measured {now_utc()} on {machine}, threads={threads}, commit {git_commit()}, by "
            f"`python -m kcengine.bench.robustness {args}`.", "",
            f"Test: the {len(test.labels)} sample test images. `robust_top1`: correct both as given and after the "
            "attack (kcengine.evaluate.adversarial_accuracy; L-infinity, eps in [0, 1] pixel units; FGSM one step "
            f"of eps; PGD {steps} steps of 2.5 eps / {steps} from a uniform random start, attack seed 0). "
            "Clustered models: every conv at k = C_out * r (filter granularity, k-means seed 0), then "
            "kcengine.finetune with its defaults"
            + (f" but {epochs} epochs" if epochs is not None else "")
            + " (the recipe of recovery_resnet20.md, distilled from the dense model) on the sample's training "
            "images. `seconds`: the attack's wall time.", ""]
    rows: list = []

    def write():
        write_csv(out / f"robustness_{name}.csv", rows)
        (out / f"robustness_{name}.md").write_text("\n".join(head + [markdown_table(rows, COLUMNS), ""]))

    def attack_all(label, model, unique, note):
        for attack, eps in attack_list:
            r = adversarial_accuracy(model, evald, mean=lm.mean, std=lm.std, eps=eps, attack=attack,
                                     steps=steps if attack == "pgd" else None,
                                     batch_size=250, seed=0)
            rows.append({"model": label, "unique_filters": unique, "attack": r.label().split(",")[0],
                         "eps": eps_text(eps), "clean_top1": r.clean_top1, "robust_top1": r.robust_top1,
                         "seconds": r.seconds, "note": note})
            write()

    n_filters = sum(m.out_channels for m in lm.model.modules() if isinstance(m, torch.nn.Conv2d))
    attack_all("dense", lm.model, n_filters, "")
    train = cifar10_dataset(data, "train", norm)
    perm = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0))
    train = type(train)(train.images[perm], train.labels[perm], train.classes)
    loader = make_loader(train, RECOMMENDED_BATCH, shuffle=True, seed=0)
    for ratio in ratios:
        t0 = time.perf_counter()
        res = finetune(lm.model, loader, plan={"ratio": float(ratio)}, epochs=epochs, eval_data=evald,
                       progress=False)
        unique = sum(m.num_clusters for m in res.model.modules() if isinstance(m, ClusteredConv2d))
        attack_all(f"ratio {ratio:g}, recovered", res.model, unique,
                   f"finetune {len(res.history)} epochs, {time.perf_counter() - t0:.0f} s")
    return out / f"robustness_{name}.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=("resnet20", "resnet56"))
    p.add_argument("--out", default="bench/results")
    p.add_argument("--ratios", default="0.75,0.5", help="k = C_out * r per conv, comma list (default 0.75,0.5)")
    p.add_argument("--attacks", default=DEFAULT_ATTACKS,
                   help=f"comma list of fgsm:N / pgd:N, eps = N/255 (default {DEFAULT_ATTACKS})")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--epochs", type=int, default=None, help="finetune epochs (default: finetune's)")
    p.add_argument("--name", default=None, help="write robustness_NAME.md/.csv (default: the model name)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    a = p.parse_args(argv)
    try:
        ratios = [float(v) for v in a.ratios.split(",")]
    except ValueError:
        ratios = []
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        p.error(f"--ratios must be comma-separated numbers in (0, 1], got {a.ratios!r}")
    try:
        attacks = parse_attacks(a.attacks)
    except ValueError as exc:
        p.error(str(exc))
    if a.steps < 1:
        p.error(f"--steps must be >= 1, got {a.steps}")
    if a.epochs is not None and a.epochs < 0:  # checked here, before the dense rows are measured and written
        p.error(f"--epochs must be >= 0, got {a.epochs}")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    path = run(a.model, a.out, ratios, attacks, steps=a.steps, threads=a.threads, name=a.name, epochs=a.epochs)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
