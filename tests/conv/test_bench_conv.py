"""kcengine.bench.conv on a tiny input: every row measured, errors small, files written."""
import math

import pytest
import torch

from kcengine.bench.conv import FROZEN_ROW, resnet18_conv_shapes, run_conv_bench


def test_resnet18_shapes():
    shapes = resnet18_conv_shapes(224)
    keys = {(s["c_in"], s["c_out"], s["k"], s["stride"], s["h_in"]) for s in shapes}
    assert (3, 64, 7, 2, 224) in keys and (512, 512, 3, 1, 7) in keys and (256, 512, 1, 2, 14) in keys
    assert len(shapes) == 11 and sum(s["count"] for s in shapes) == 20


def test_bench_runs_small(tmp_path):
    r = run_conv_bench(tmp_path, batches=(1,), divisors=(4,), size=32, log=lambda *_: None,
                       layer_repeat={(1, "filter"): 1, (1, "kernel"): 1}, e2e_repeat={1: 1},
                       steady_malloc=False)  # leaves pytest's malloc alone (see the subprocess test below)
    assert len(r["layers"]) == 11 * 2
    for row in r["layers"]:
        assert row["dense_ms"] > 0 and row["clustered_ms"] > 0 and math.isfinite(row["speedup"])
        assert row["dense_eager_ms"] > 0 and math.isfinite(row["speedup_vs_eager"])
        assert row["max_rel_err"] < 1e-4, row
        assert 0 < row["flop_ratio"] < 1
        # filter rows also time the K-filter conv alone (the path's ceiling); kernel rows have none
        assert (row["unique_conv_ms"] > 0) if row["granularity"] == "filter" else math.isnan(row["unique_conv_ms"])
    assert {e["memory_format"] for e in r["e2e"]} >= {"nchw", "channels_last"}
    assert all(e["max_rel_err"] < 1e-4 for e in r["e2e"] if e["memory_format"] in ("nchw", "channels_last"))
    frozen = [e for e in r["e2e"] if e["memory_format"] == FROZEN_ROW]
    assert len(frozen) == 1  # measured against the frozen dense model too (NaN only where TorchScript fails)
    assert frozen[0]["max_rel_err"] < 1e-4 or not math.isfinite(frozen[0]["speedup"])
    # kernel granularity end to end: K = C_out/8 and C_out/4, fused, equal to the dense weights' output
    assert [(e["batch"], e["K"]) for e in r["e2e_kernel"]] == [(1, "C_out/8"), (1, "C_out/4")]
    assert all(e["max_rel_err"] < 1e-4 and e["speedup"] > 0 for e in r["e2e_kernel"]), r["e2e_kernel"]
    assert len(r["checkpoint"]) == 6
    for c in r["checkpoint"]:  # codebook 1/d of the conv weights plus uint8 indexes; fc and BN stored alike
        assert 1.5 < c["ratio"] < 20, c
    md = (tmp_path / "indexed_conv.md").read_text()
    assert "Checkpoint size" in md and "unique_conv_speedup" in md and "speedup_vs_eager" in md
    assert "every conv clustered at kernel granularity" in md and (tmp_path / "indexed_conv_e2e_kernel.csv").is_file()
    assert "commit" in md and "torch threads" in md and str(torch.get_num_threads()) in md
    assert f"- allocator: {r['info']['allocator']}" in md
    # the best-of counts it used, and only for what it ran
    assert "best of the repeats: layers 1 (filter) / 1 (kernel) at batch 1; end to end 1 at batch 1;" in md
    assert (tmp_path / "indexed_conv.csv").stat().st_size > 0


def test_cli_records_its_command(tmp_path):
    """The report says how it was made, options included (a one-thread file must not read like the default)."""
    from kcengine.bench.conv import main

    argv = ["--out", str(tmp_path), "--batches", "1", "--granularity", "kernel", "--no-e2e", "--size", "32",
            "--threads", "1", "--name", "one_thread", "--system-malloc"]
    assert main(argv) == 0
    md = (tmp_path / "one_thread.md").read_text()
    assert f"recorded by `python -m kcengine.bench.conv --out {tmp_path} --batches 1" in md
    assert "--threads 1 --name one_thread --system-malloc`" in md and "torch threads 1" in md
    assert "- allocator: the C library's malloc as the process left it" in md
    assert "best of the repeats: layers 5 (kernel) at batch 1; one warm-up each" in md  # no batch 32, no e2e


_FAULTS = """
import resource, sys, torch
from kcengine.bench.common import keep_freed_memory_mapped
said = keep_freed_memory_mapped() if sys.argv[1] == "steady" else "system"
faults = []
for i in range(8):  # 64 MiB: above glibc's largest mmap threshold, so fresh pages each time by default
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    del t
print(said is not None, min(faults[1:]))
"""


def test_keep_freed_memory_mapped_stops_refaulting():
    """After keep_freed_memory_mapped (glibc), a freed 64 MiB tensor's pages serve later ones: fills
    without page faults, against one per page (16384) on every fill without it."""
    import subprocess
    import sys

    from kcengine.bench.common import keep_freed_memory_mapped  # noqa: F401  (importable)

    def run(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        said, faults = out.stdout.split()
        return said == "True", int(faults)

    import os
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages always on: a 64 MiB mapping takes few faults either way")
    if os.environ.get("LD_PRELOAD"):
        pytest.skip("a preloaded allocator (LD_PRELOAD) ignores glibc's mallopt")
    glibc, steady = run("steady")
    if not glibc:
        pytest.skip("not glibc: keep_freed_memory_mapped changes nothing here")
    _, system = run("system")
    assert system >= 16000, system
    # A fresh process may, rarely, refault anyway: one CI run in session 50 saw 16384 faults a fill with the
    # setting (not reproduced in 25 runs after it; the cause was not found). The property is that the setting
    # stops the refaulting, so up to three fresh processes are asked.
    tries = [steady]
    while tries[-1] >= 1000 and len(tries) < 3:
        tries.append(run("steady")[1])
    assert tries[-1] < 1000, tries
