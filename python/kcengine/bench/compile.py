"""torch.compile against eager on a clustered model (CPU inference): with the native op, and without it.

``python -m kcengine.bench.compile`` times, by default on resnet18 at batch 8 and 224x224 (``--model``,
``--batch``, ``--size``), channels-last, under ``torch.no_grad``:
- each model in eager mode;
- each model through ``torch.compile`` (inductor), where the clustered convs call the native kernels as
  ``torch.ops.kcengine.indexed_conv2d`` (:mod:`kcengine.conv.native_op`);
- each model compiled with that op switched off, so the convs are the torch-op form that ``torch.export``
  records: the way every capture ran before the op.

The models are filter granularity at ratio 0.25 and kernel granularity at 64 kernels a layer, each as
:func:`kcengine.compress` returns it and fused by :func:`kcengine.nn.fuse_for_inference`.

The compiler caches what it traced per code object, so each variant runs in a process of its own. The
processes alternate (op, torch ops, op, ...) for ``--rounds`` rounds. In each one, eager and compiled
calls alternate, best of ``--repeat``. A ratio is compiled over eager in the same process; the table keeps
each variant's best round.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .common import command_line, git_commit, machine_info, markdown_table, now_utc, time_alternating, write_csv

VARIANTS = ("op", "torch_ops")


def _child(variant: str, model_name: str, batch: int, size: int, repeat: int) -> None:
    """Times every model in one variant; prints one JSON line per model."""
    import logging
    import warnings

    import torch

    import kcengine
    from kcengine.conv import native_op
    from kcengine.models import load_model

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # inductor's notes on the machine
    native_op._HAVE_CUSTOM_OPS = variant == "op"
    torch.manual_seed(0)
    dense = load_model(model_name, None).model.eval()  # default init: the shapes are what matter for speed
    models = {
        "filter, ratio 0.25": kcengine.compress(dense, ratio=0.25)[0],
        "kernel, 64 a layer": kcengine.compress(dense, {"layers": {"re:layer.*": 64}}, granularity="kernel")[0],
    }
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    for name, model in models.items():
        for fused in (False, True):
            m = (kcengine.nn.fuse_for_inference(model) if fused else model).to(memory_format=torch.channels_last)
            torch._dynamo.reset()
            compiled = torch.compile(m)
            with torch.no_grad():
                t0 = time.perf_counter()
                compiled(x)
                compile_s = time.perf_counter() - t0
                eager_s, compiled_s = time_alternating([lambda: m(x), lambda: compiled(x)], repeat, warmup=1)
            print(json.dumps({"model": name, "fused": fused, "variant": variant, "eager_ms": eager_s * 1e3,
                              "compiled_ms": compiled_s * 1e3, "compile_s": compile_s}), flush=True)


def run(model: str = "resnet18", batch: int = 8, size: int = 224, rounds: int = 2, repeat: int = 7,
        progress=print) -> list[dict]:
    """Every variant in its own process, alternating, ``rounds`` times; one row per model and fused."""
    got: dict[tuple, dict] = {}
    for r in range(rounds):
        for variant in VARIANTS:
            progress(f"round {r + 1}/{rounds}: {variant}")
            out = subprocess.run([sys.executable, "-m", "kcengine.bench.compile", "--child", variant, "--model", model,
                                  "--batch", str(batch), "--size", str(size), "--repeat", str(repeat)],
                                 capture_output=True, text=True, check=True)
            for line in out.stdout.splitlines():
                rec = json.loads(line)
                key = (rec["model"], rec["fused"], variant)
                rec["ratio"] = rec["compiled_ms"] / rec["eager_ms"]
                if key not in got or rec["ratio"] < got[key]["ratio"]:
                    got[key] = rec
    rows = []
    for (model, fused, variant), rec in got.items():
        if variant != "op":
            continue
        other = got[(model, fused, "torch_ops")]
        rows.append({"layers": model, "fused": "yes" if fused else "no",
                     "eager ms": rec["eager_ms"], "compiled ms (native op)": rec["compiled_ms"],
                     "compiled / eager (native op)": rec["ratio"],
                     "eager ms (other process)": other["eager_ms"], "compiled ms (torch ops)": other["compiled_ms"],
                     "compiled / eager (torch ops)": other["ratio"]})
    return rows


def write_report(rows: list[dict], out_dir: Path, name: str, command: str, model: str, batch: int,
                 size: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / f"{name}.csv", rows)
    info = machine_info()
    lines = [
        f"# torch.compile of clustered {model} on the CPU: with the native op and without it",
        "",
        f"- date: {now_utc()}",
        f"- commit: {git_commit()}",
        f"- recorded by `{command}`",
        f"- machine: {info['cpu']} ({info['cores']} cores, {info.get('threads', '?')} threads); "
        f"torch {info['torch']}",
        f"- input: batch {batch} at {size}x{size}, channels-last, `torch.no_grad()`; {model} with its default "
        "initialization (seed 0)",
        "- compiled: `torch.compile(model)` (inductor). native op: the clustered convs call "
        "`torch.ops.kcengine.indexed_conv2d`, the native kernels eager runs; torch ops: that op switched off, the "
        "convs in the torch-op form `torch.export` records",
        "- each variant in its own processes, alternating; in each, eager and compiled calls alternate; the best "
        "round of each variant is kept (its ratio is compiled over eager in the same process)",
        "",
        markdown_table(rows),
    ]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
    argv, command = command_line("kcengine.bench.compile", argv)
    p = argparse.ArgumentParser(prog="python -m kcengine.bench.compile", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", help="a model of kcengine.models (default resnet18)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--name", help="the result files' name (default compile_MODEL)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child, a.model, a.batch, a.size, a.repeat)
        return 0
    rows = run(a.model, a.batch, a.size, a.rounds, a.repeat)
    print(markdown_table(rows))
    print(f"wrote {write_report(rows, a.out, a.name or f'compile_{a.model}', command, a.model, a.batch, a.size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
