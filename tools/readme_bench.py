#!/usr/bin/env python3
"""Rewrite README.md's benchmark section from the recorded files in bench/results/.

Tables are copied verbatim from what the suites wrote (with their date, commit and machine
lines), so the README never carries a hand-typed figure.  Run after re-recording:
    python tools/readme_bench.py
``--check`` writes nothing and exits 1 when the README differs from what the results give (the
test suite runs it, so a re-recording without this step fails the tests).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
KERNEL_E2E = "## End to end: resnet18 inference, every conv clustered at kernel granularity"
KERNEL_E2E_CAPTION = "End to end with every conv at kernel granularity, fused, channels-last (not a target):"


def meta(text: str) -> list[str]:
    return [ln for ln in text.splitlines()
            if re.match(r"- (date|commit|machine|measured|kcengine solver|GPU|\*\*No GPU)|Measured ", ln)]


def first_table(text: str, after: str | None = None) -> str:
    if after is not None:
        i = text.find(after)
        if i < 0:
            return ""
        text = text[i:]
    lines, out = text.splitlines(), []
    for ln in lines:
        if ln.startswith("|"):
            out.append(ln)
        elif out:
            break
    return "\n".join(out)


def section(title: str, path: Path, tables: list[tuple[str, str | None]], note: str = "") -> str:
    if not path.exists():
        return f"### {title}\n\n(not recorded yet: `{path.relative_to(ROOT)}`)\n"
    text = path.read_text()
    parts = [f"### {title}\n", f"From [{path.relative_to(ROOT)}]({path.relative_to(ROOT)}):\n"]
    parts += meta(text) + [""]
    if note:
        parts += [note, ""]
    for caption, anchor in tables:
        t = first_table(text, anchor)
        if t:
            parts += ([caption, ""] if caption else []) + [t, ""]
    return "\n".join(parts)


def seed_summary(path: Path) -> str:
    """The mean/range lines a ``--seeds`` recovery run ends with."""
    if not path.exists():
        return ""
    text = path.read_text()
    tail = text.split("Over the finetune seeds", 1)[1] if "Over the finetune seeds" in text else ""
    return "\n".join(line for line in tail.splitlines() if line.startswith("- "))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--check"]):
        print("usage: python tools/readme_bench.py [--check]", file=sys.stderr)
        return 2
    r = ROOT / "bench" / "results"
    cli = r / "cli_resnet18" / "report.md"
    cli_part = section("`python -m kcengine bench --model resnet18` on this machine (CPU)", cli, [("", "## Summary")],
                       note="The summary table of a default run (full report, CSVs and plots in that folder).")
    body = "\n".join([
        cli_part,
        section("Clustering on the CPU: resnet20 (real weights), all cores", r / "kmeans_cpu.md",
                [("", "## resnet20")]),
        section("Clustering on the CPU: resnet20, all cores, on an AVX2 CPU without AVX-512",
                r / "kmeans_cpu_avx2.md", [("", "## resnet20")]),
        section("Clustering on the CPU: resnet20, one thread per method, on an AVX2 CPU without AVX-512",
                r / "kmeans_cpu_avx2_1thread.md", [("", "## resnet20")]),
        section("Clustering on the CPU: resnet18 (default init), all cores, on an AVX2 CPU without AVX-512",
                r / "kmeans_cpu_resnet18.md", [("", "## resnet18")]),
        section("Clustering on the CPU: resnet18 (default init), all cores, AVX-512",
                r / "kmeans_cpu_resnet18_avx512.md", [("", "## resnet18")]),
        section("Clustering on the CPU: resnet18 (default init), all cores, AVX-512, on an Intel Xeon",
                r / "kmeans_cpu_resnet18_intel.md", [("", "## resnet18")]),
        section("Clustering on the CPU: resnet20, one thread per method", r / "kmeans_cpu_1thread.md",
                [("", "## resnet20")]),
        section("Clustering on the CPU: resnet18 (default init), one thread per method",
                r / "kmeans_cpu_resnet18_1thread.md", [("", "## resnet18")]),
        section("Centroid-indexed convolution (resnet18 shapes), all cores", r / "indexed_conv.md",
                [("", "## Targets"), (KERNEL_E2E_CAPTION, KERNEL_E2E)]),
        section("Centroid-indexed convolution (resnet18 shapes), one thread per side", r / "indexed_conv_1thread.md",
                [("", "## Targets"), (KERNEL_E2E_CAPTION, KERNEL_E2E)]),
        section("Centroid-indexed convolution (resnet18 shapes), all cores, on an AVX2 CPU without AVX-512",
                r / "indexed_conv_avx2.md", [("", "## Targets")]),
        section("Compression of resnet20 without recovery (CIFAR-10 sample)", r / "compression_resnet20.md",
                [("", "## Whole model")]),
        section("Recovery of resnet20 (CIFAR-10 sample) with finetune's defaults: k = C_out/2, 3/4 and a mixed plan",
                r / "recovery_resnet20.md", [("", None)]),
        section("Recovery of resnet20 in every mode (frozen, centroids, progressive) at k = C_out/4, 1/2, 3/4 with "
                "finetune's defaults (centroids at 1/2 and 3/4: the table above)", r / "recovery_resnet20_modes.md",
                [("", None)]),
        section("Recovery of resnet56 (CIFAR-10 sample) with finetune's defaults: k = C_out/2, 3/4 and a mixed plan",
                r / "recovery_resnet56.md", [("", None)]),
        section("Recovery of resnet20: the spread over finetune seeds (batch 64, the recipe)",
                r / "recovery_resnet20_seeds_b64.md", [("", None)], note=seed_summary(r / "recovery_resnet20_seeds_b64.md")),
        section("Recovery of resnet20: the spread over finetune seeds (batch 128, before)", r / "recovery_resnet20_seeds.md",
                [("", None)], note=seed_summary(r / "recovery_resnet20_seeds.md")),
        section("Adversarial robustness of resnet20 (CIFAR-10 sample): dense against clustered and recovered",
                r / "robustness_resnet20.md", [("", None)],
                note="`robust_top1`: correct as given and after the attack (L-infinity, eps in [0, 1] pixel units; "
                     "PGD from a random start, steps of 2.5 eps / steps); the clustered models are recovered with "
                     "finetune's defaults first. The file gives the whole setup."),
        section("Clustering on a GPU (NVIDIA H200): resnet18 shapes", r / "kmeans_gpu.md", [("", "## resnet18")]),
        section("Clustering on a GPU (NVIDIA H200): e_large, all 3x3 kernels of resnet18 as one problem, k = 4096",
                r / "kmeans_gpu_large.md", [("", "## resnet18")]),
        section("Centroid-indexed convolution on a GPU (NVIDIA H200): triton backend vs dense cuDNN",
                r / "indexed_conv_gpu.md", [("", "## Summary"), ("End to end:", "## End to end")]),
    ])
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text:
        text = text.replace("BENCH_TABLES_PLACEHOLDER", f"{BEGIN}\n{END}")
    pre, rest = text.split(BEGIN, 1)
    _, post = rest.split(END, 1)
    new = f"{pre}{BEGIN}\n{body}\n{END}{post}"
    if argv == ["--check"]:
        if new != text:
            print("README.md's benchmark section differs from bench/results: run python tools/readme_bench.py",
                  file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
